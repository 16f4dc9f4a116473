"""Kafka in -> raw, lead and board processors -> ClickHouse, Redis and the board API out, on the real stack:
a pageview fires a rule, the tag moves the account's card, and every move is one stage change; a demo
request fires a webhook that reaches a receiver signed with the site's secret and is logged in ClickHouse."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import orjson
import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from api.app import create_app
from leadstream.runner import Role, count, produce, start_workers, wait_for
from processors import webhooks
from processors.app import LAYOUTS
from processors.definitions_store import DefinitionsStore
from schemas.definitions import load_definitions
from sinks.clickhouse import connect
from tests.api_keys import api_key
from tests.integration.test_webhooks import SECRET, Receiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEFINITIONS = """
rules:
- id: viewed-pricing
  when: {event: pageview, url: "*/pricing*"}
  then: [{add_tag: Consideration}, {add_score: 15}]
- id: requested-a-demo
  when: {event: form_submit}
  if: [{field: event.properties.form, op: is, value: demo-request}]
  then: [{add_tag: Decision}, {add_score: 30}, {add_tag: {tag: Demo requested, on: account}}]
- id: tell-the-crm
  when: {event: form_submit}
  if: [{field: event.properties.form, op: is, value: demo-request}]
  then: [{webhook: {url: "%(crm)s", secret_env: LEADSTREAM_WEBHOOK_SECRET_IT__CRM}}]
boards:
- id: pipeline
  name: Sales pipeline
  card: account
  stages:
  - {id: new, name: New, entry: true}
  - {id: consideration, name: Consideration, when_tag: Consideration}
  - {id: decision, name: Decision, when_tag: Decision}
  - {id: customer, name: Customer}
"""
BASE_MS = int(time.time() * 1000) - 600_000


def raw(i: int, visitor: str, kind: str = "pageview", path: str = "/", **extra) -> tuple[bytes, bytes]:
    event = {"event_id": f"e{i}", "site_id": "it", "type": kind, "visitor_id": visitor, "ts": BASE_MS + i * 1000,
             "url": f"https://example.com{path}", "ip": "192.0.2.7",
             "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0"
                           " Safari/537.36", **extra}
    return visitor.encode(), orjson.dumps(event)


async def _apply(settings, text: str) -> None:
    redis = aioredis.from_url(settings.redis_url)
    targets = webhooks.WebhookTargets.parse(settings.webhook_allowed_targets)
    try:
        await DefinitionsStore(redis, settings.name("ls"), webhook_targets=targets).apply("it", load_definitions(text, "pipeline.yaml"))
    finally:
        await redis.aclose()


@pytest.fixture
def crm():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_pageview_fires_a_rule_and_the_tag_moves_the_card(settings, roles, crm, layout):
    """The same outcome whether one worker runs every processor or the raw processor and the automation run apart."""
    settings = replace(settings, webhook_allowed_targets="127.0.0.1")  # the CRM stand-in's address
    asyncio.run(_apply(settings, DEFINITIONS % {"crm": crm.url}))
    roles += [*start_workers(settings, "worker", layout, env={"LEADSTREAM_WEBHOOK_SECRET_IT__CRM": SECRET}),
              Role(settings, "sink", "sink").start()]
    asyncio.run(produce(settings, [
        raw(1, "v1"),
        raw(2, "v1", "form_submit", "/resources/guide", email="ann@acme.com", properties={"form": "guide"}),
        raw(3, "v1", path="/pricing"),
        raw(4, "v2", "form_submit", "/demo", email="bob@globex.io", properties={"form": "demo-request"}),
    ]))
    ch = connect(settings.clickhouse())
    wait_for(settings, "SELECT count() FROM stage_changes FINAL WHERE to_stage = 'consideration'", 1, 120, roles)
    wait_for(settings, "SELECT count() FROM stage_changes FINAL WHERE to_stage = 'decision'", 1, 60, roles)
    # Each table has its own sink, on its own cadence: the rows read below may land up to a window later.
    wait_for(settings, "SELECT count() FROM rule_executions FINAL WHERE rule_id = 'viewed-pricing'", 1, 30, roles)
    wait_for(settings, "SELECT count() FROM lead_state FINAL WHERE email = 'ann@acme.com' AND has(tags, 'Consideration')",
             1, 30, roles)

    acme = ch.execute("SELECT from_stage, to_stage, actor, rule_id, seq FROM stage_changes FINAL"
                      " WHERE card_id = 'account:acme.com' ORDER BY seq")
    assert acme[-1][1:4] == ("consideration", "rule:viewed-pricing@1", "viewed-pricing")
    assert [row[4] for row in acme] == list(range(1, len(acme) + 1))  # one stage change per move, in order
    assert all(a[1] == b[0] for a, b in zip(acme, acme[1:]))  # each move starts where the last ended
    tags = dict(ch.execute("SELECT lead_id, tags FROM lead_state FINAL WHERE email = 'ann@acme.com'"))
    assert list(tags.values()) == [["Consideration"]]
    assert count(settings, "SELECT count() FROM rule_executions FINAL WHERE rule_id = 'viewed-pricing'") == 1

    client = TestClient(create_app(replace(settings, api_keys=f"it:{api_key('it')},other:{api_key('other')}")))
    with client:
        board = client.get("/v1/sites/it/boards/pipeline", headers={"X-API-Key": api_key("it")})
        assert board.status_code == 200 and board.headers["etag"]
        columns = {stage["id"]: [card["card_id"] for card in stage["cards"]] for stage in board.json()["stages"]}
        assert "account:acme.com" in columns["consideration"] and "account:globex.io" in columns["decision"]
        globex = next(card for stage in board.json()["stages"] for card in stage["cards"]
                      if card["card_id"] == "account:globex.io")
        assert globex["tags"] == ["Decision", "Demo requested"]  # the lead's tag and the account's own
        other = {"X-API-Key": api_key("other")}
        assert client.get("/v1/sites/it/boards/pipeline", headers=other).status_code in (403, 404)
        ann = next(iter(tags))
        profile = client.get(f"/v1/sites/it/leads/{ann}", headers={"X-API-Key": api_key("it")}).json()
        assert profile["score"] == 15 and isinstance(profile["score"], int)
        assert [(t["tag"], t["source"], t["rule_id"]) for t in profile["tags"]] == \
            [("Consideration", "rule", "viewed-pricing")]
        assert profile["properties"] == {}

    wait_for(settings, "SELECT count() FROM webhook_deliveries FINAL WHERE outcome = 'delivered'", 1, 60, roles)
    ((webhook_id, rule_id, attempt, status_code),) = ch.execute(
        "SELECT webhook_id, rule_id, attempt, status_code FROM webhook_deliveries FINAL WHERE site_id = 'it'")
    assert (rule_id, attempt, status_code) == ("tell-the-crm", 1, 200)
    assert crm.ids() == [webhook_id]  # one firing, one request
    headers, body, _ = crm.requests[0]
    webhooks.verify(SECRET, headers, body)
    sent = orjson.loads(body)
    assert (sent["site_id"], sent["rule_id"]) == ("it", "tell-the-crm")
    assert sent["data"]["data"]["lead"]["email"] == "bob@globex.io"
