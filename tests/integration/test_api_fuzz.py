"""The whole API fuzzed from its own OpenAPI description, served by uvicorn over the real stack (Redis,
ClickHouse, Kafka) with a little data seeded: no input, valid or not, gets a 5xx; and every operation of a
site refuses another site's key.

Schemathesis generates the requests (schema-valid ones, and ones that break the schema) per operation,
with the site's key in the X-API-Key header; some cases are aimed at the seeded board, card, rule and
segment so the handlers behind the validation are reached too. Every 5xx found is collected, so one run shows
them all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error

from schemas.settings import Settings
from sinks.clickhouse import connect, insert_columnar
from tests import segment_seed
from tests.browser.board_seed import (
    API_KEYS,
    KEY,
    OTHER_KEY,
    PIPELINE,
    SITE,
    BoardSeeder,
    seed_account_click_stream,
    serve_api,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES_PER_STRATEGY = 15  # x up to 4 strategies per operation (valid and invalid, x 2 targets)
RULE = {"when": {"event": "pageview", "url": "*/pricing*"}, "then": [{"add_tag": "Consideration"}]}
# Ids of things that exist, so that some cases get past "no such board" to the code behind it.
SEEDED = {"site_id": SITE, "board_id": PIPELINE.id, "card_id": "account:acme.com", "rule_id": "viewed-pricing",
          "lead_id": "lead-ann", "domain": "acme.com", "segment_id": "engaged"}
SEGMENT = {"name": "Score 10+", "if": [{"field": "lead.score", "op": "gt", "value": 9}]}
REQUEST_TIMEOUT_S = 30


@pytest.fixture
def api(settings: Settings, monkeypatch) -> Iterator[tuple[str, schemathesis.BaseSchema]]:
    """The served API (with the seeded board, cards, rule and click-stream) and its loaded schema. The board
    processor is not running: a command's POST waits only briefly, then answers 202."""
    monkeypatch.setattr("api.commands.COMMAND_WAIT_S", 0.05)
    seed_account_click_stream(settings)
    ch = connect(settings.clickhouse())
    insert = lambda table, columns, rows: insert_columnar(ch, table, columns, rows)  # noqa: E731
    segment_seed.insert_membership(insert, segment_seed.changes("engaged", [("lead-ann", "lead", False)]))
    segment_seed.insert_snapshots(insert, [segment_seed.snapshot("lead-ann")])
    seeder = BoardSeeder(settings)
    with serve_api(replace(settings, api_keys=API_KEYS)) as base_url:
        session = requests.Session()
        session.headers["X-API-Key"] = KEY
        assert session.put(f"{base_url}/v1/sites/{SITE}/boards/{PIPELINE.id}",
                           json=PIPELINE.model_dump(mode="json", exclude_unset=True)).status_code == 200
        assert session.put(f"{base_url}/v1/sites/{SITE}/rules/viewed-pricing", json=RULE).status_code == 200
        assert session.put(f"{base_url}/v1/sites/{SITE}/segments/engaged", json=SEGMENT).status_code == 200
        seeder.show(("account:acme.com", "Acme", ("Consideration",), 40), ("account:globex.com", "Globex", (), 5))
        yield base_url, schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    seeder.close()


def operations(schema: schemathesis.BaseSchema) -> list[APIOperation]:
    return [result.ok() for result in schema.get_all_operations()]


def send(case: Case, base_url: str, key: str) -> requests.Response:
    """The case over HTTP. Streamed, so that an event stream (which never ends) is answered by its status and
    headers; any other body is read whole."""
    kwargs = case.as_transport_kwargs(base_url=base_url, headers={"X-API-Key": key})
    response = requests.request(**kwargs, stream=True, timeout=REQUEST_TIMEOUT_S)
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        _ = response.content
    response.close()
    return response


def run_cases(operation: APIOperation, strategy, base_url: str, key: str, examples: int, on_response) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def cases(case: Case) -> None:
        on_response(case, send(case, base_url, key))

    cases()


def test_no_input_gets_a_server_error(api) -> None:
    base_url, schema = api
    ran: Counter[str] = Counter()
    server_errors: list[str] = []

    def check(case: Case, response: requests.Response) -> None:
        ran[f"{case.operation.method.upper()} {case.operation.path}"] += 1
        if response.status_code >= 500:
            server_errors.append(f"{response.status_code} {case.as_curl_command()}\n    {response.text[:300]}")
        elif not response.headers.get("content-type", "").startswith("text/event-stream"):
            case.validate_response(response, checks=[not_a_server_error])

    for operation in operations(schema):
        parameters = {p.name for p in operation.path_parameters}
        seeded = {name: value for name, value in SEEDED.items() if name in parameters}
        for target in [{"site_id": SITE}, seeded] if len(seeded) > 1 else [seeded]:
            run_cases(operation, operation.as_strategy(path_parameters=target or None), base_url, KEY,
                      EXAMPLES_PER_STRATEGY, check)
            try:
                run_cases(operation, operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=target or None),
                          base_url, KEY, EXAMPLES_PER_STRATEGY, check)
            except Unsatisfiable:  # nothing left to break: no body, no constrained parameter
                pass

    print(f"\nfuzzed {sum(ran.values())} cases over {len(ran)} operations")
    assert len(ran) == len(operations(schema)) >= 25
    assert server_errors == [], "\n".join(server_errors)


def test_every_site_operation_refuses_another_sites_key(api) -> None:
    """Valid requests for this site's seeded board, card and rule, with the key of another site: 403 (or 404
    for what that key's own site does not have), never an answer with this site's data, never a 5xx."""
    base_url, schema = api
    statuses: dict[str, Counter[int]] = {}

    def record(case: Case, response: requests.Response) -> None:
        statuses.setdefault(f"{case.operation.method.upper()} {case.operation.path}", Counter())[response.status_code] += 1

    site_operations = [op for op in operations(schema) if any(p.name == "site_id" for p in op.path_parameters)]
    for operation in site_operations:
        parameters = {p.name for p in operation.path_parameters}
        strategy = operation.as_strategy(path_parameters={k: v for k, v in SEEDED.items() if k in parameters})
        run_cases(operation, strategy, base_url, OTHER_KEY, 5, record)

    print(f"\nwalked {sum(sum(c.values()) for c in statuses.values())} cases over {len(statuses)} operations "
          "with another site's key")
    assert len(statuses) == len(site_operations) >= 23
    assert {path: dict(c) for path, c in statuses.items() if set(c) - {403, 404}} == {}
