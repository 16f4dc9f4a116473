"""Deleting a stage, end to end: `PUT boards/{board}` without a stage that holds cards, through Kafka and the
real board processor, to the board API, its live stream and ClickHouse. The cards of the deleted stage end
in the nearest kept stage on its left (the new first stage when none is left of it), each with one stage
change recorded as the editor's, with the reason `stage <id> deleted`; cards elsewhere do not move; the same
edit applied again moves nothing (docs/boards.md, "Deleting a stage")."""

from __future__ import annotations

import time
from dataclasses import replace

import httpx
import orjson
import pytest

from api.keys import ApiKeys
from leadstream.runner import Role, count, wait_for
from tests.browser.board_seed import API_KEYS, KEY, PIPELINE, SITE, serve_api
from tests.integration.test_board_api import sse_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BOARD = f"/v1/sites/{SITE}/boards/{PIPELINE.id}"
DEFINITION = PIPELINE.model_dump(mode="json", exclude_unset=True)


def without(*stage_ids: str) -> dict:
    return DEFINITION | {"stages": [s for s in DEFINITION["stages"] if s["id"] not in stage_ids]}


def applied(http: httpx.Client, path: str, body: dict, key: str, timeout_s: float = 90) -> dict:
    """POST a command until the board processor has applied it (the same Idempotency-Key: it acts once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = http.post(path, json=body, headers={"Idempotency-Key": key})
        assert answer.status_code in (200, 202), answer.text
        if answer.status_code == 200:
            return answer.json()
        assert time.monotonic() < deadline, f"{path} not applied: {answer.text}"


def columns(http: httpx.Client) -> dict[str, list[str]]:
    page = http.get(BOARD).json()
    return {stage["id"]: sorted(card["card_id"] for card in stage["cards"]) for stage in page["stages"]}


def eventually(check, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return result


def test_the_cards_of_a_deleted_stage_move_left_with_one_stage_change_each(settings, roles):
    roles += [Role(settings, "worker", "worker", "--processors", "board").start(),
              Role(settings, "sink", "sink", "--tables", "stage_changes").start()]
    api_settings = replace(settings, api_keys=API_KEYS)
    with serve_api(api_settings) as base, httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=30) as http:
        assert http.put(BOARD, json=DEFINITION).status_code == 200
        for domain in ("acme.com", "globex.com", "initech.com"):
            applied(http, f"{BOARD}/cards", {"domain": domain}, f"add-{domain}")
        for domain in ("acme.com", "globex.com"):
            applied(http, f"{BOARD}/cards/account:{domain}/move", {"to": "decision"}, f"move-{domain}")
        assert columns(http) == {"new": ["account:initech.com"], "consideration": [],
                                 "decision": ["account:acme.com", "account:globex.com"], "customer": []}
        snapshot = http.get(BOARD).json()

        edited = http.put(BOARD, json=without("decision"))
        assert edited.status_code == 200 and [s["id"] for s in edited.json()["stages"]] == [
            "new", "consideration", "customer"]
        expected = {"new": ["account:initech.com"], "consideration": ["account:acme.com", "account:globex.com"],
                    "customer": []}
        eventually(lambda: columns(http) == expected)
        page = http.get(BOARD).json()
        assert [(s["id"], s["count"]) for s in page["stages"]] == [("new", 1), ("consideration", 2), ("customer", 0)]

        with http.stream("GET", f"{BOARD}/stream", headers={"Last-Event-ID": snapshot["feed_id"]}) as stream:
            events = sse_events(stream, 4)  # two stage changes and the two cards' new views
        changes = sorted((orjson.loads(e["data"]) for e in events if e["event"] == "stage_change"),
                         key=lambda change: change["card_id"])
        actor = ApiKeys(api_settings.api_key_entries(), api_settings.server_secret).grant(KEY).actor
        assert [(c["card_id"], c["from_stage"], c["to_stage"], c["actor"], c["reason"], c["seq"]) for c in changes] == [
            ("account:acme.com", "decision", "consideration", actor, "stage decision deleted", 3),
            ("account:globex.com", "decision", "consideration", actor, "stage decision deleted", 3)]

        assert http.put(BOARD, json=without("decision")).status_code == 200  # the same edit again: nothing moves
        assert http.put(BOARD, json=without("decision", "new")).status_code == 200  # no stage left of `new`
        eventually(lambda: columns(http) == {"consideration": ["account:acme.com", "account:globex.com",
                                                                 "account:initech.com"], "customer": []})

    moves = "SELECT count() FROM stage_changes FINAL WHERE site_id = %(site)s AND reason LIKE 'stage %% deleted'"
    wait_for(settings, moves, 3, 60, roles, params={"site": SITE})
    time.sleep(2)  # a doubled move would land now
    assert count(settings, moves, {"site": SITE}) == 3
