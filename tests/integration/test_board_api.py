"""The board-state API on the real stack: site-scoped and read-only keys, problem+json for every bad input,
board pages with ETags and per-stage cursors, commands produced to Kafka (keyed and partitioned by card,
idempotent), the move pre-checks (412, 409 stage_regression, 422), the Account Panel over ClickHouse, the
server-sent event stream (tokens, resume with Last-Event-ID, reset after a trim) and rules/boards PUTs.

Board state is written through the board store's write side by the pure stage machine (tests/browser/
board_seed.py), as the board processor writes it; the processor itself is not running, so a command's POST
answers 202 until a test applies the command the way the processor will.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import replace

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from api.app import create_app
from api.commands import command_id_for
from api.keys import STREAM_TOKEN_TTL_MS, ApiKeys
from api.lead_profile import ProfileSession, merge_intervals, ownership, ownership_by_lead, session_owner
from api.routes.cards import matches
from api.routes.rules import REDACTED
from processors.lookup_tables import publish_ip_ranges
from processors.runtime.writes import RedisWrites
from schemas.boards import CommandResult
from schemas.rules import RuleExecution
from schemas.settings import Settings
from sinks.clickhouse import connect, insert_columnar
from tests.api_keys import SERVER_SECRET, api_key
from tests.browser.board_seed import (
    API_KEYS,
    HOUR_MS,
    KEY,
    MINUTE_MS,
    NOW_MS,
    OTHER_KEY,
    OTHER_SITE,
    PIPELINE,
    READ_ONLY_KEY,
    SITE,
    BoardSeeder,
    expected_partition,
    read_commands,
    seed_account_click_stream,
    seed_company_card,
    serve_api,
)

pytestmark = pytest.mark.integration
BOARD = f"/v1/sites/{SITE}/boards/pipeline"


@pytest.fixture
def seeder(settings):
    seeder = BoardSeeder(settings)
    yield seeder
    seeder.close()


@pytest.fixture
def api(settings, monkeypatch):
    """The app with its lifespan (board services), the pipeline board PUT, and a short wait for the board processor."""
    monkeypatch.setattr("api.commands.COMMAND_WAIT_S", 0.3)
    with TestClient(create_app(replace(settings, api_keys=API_KEYS))) as client:
        client.headers["X-API-Key"] = KEY
        put = client.put(BOARD, json=PIPELINE.model_dump(mode="json", exclude_unset=True))
        assert put.status_code == 200, put.text
        yield client


def problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()


# ------------------------------------------------------------------------------------------------ keys


def test_keys_are_site_scoped_and_read_only_keys_only_read(api, seeder):
    seeder.show(("account:acme.com", "Acme", (), 10))
    assert problem(api.get(BOARD, headers={"X-API-Key": ""}), 401)["title"] == "API key required"
    assert problem(api.get(BOARD, headers={"X-API-Key": OTHER_KEY}), 403)["title"] == "this API key is not for this site"
    assert api.get(BOARD, headers={"X-API-Key": READ_ONLY_KEY}).status_code == 200
    refused = problem(api.post(f"{BOARD}/cards/account:acme.com/notes", json={"text": "hi"},
                               headers={"X-API-Key": READ_ONLY_KEY}), 403)
    assert refused["title"] == "this API key is read-only"
    # the other site's own key sees nothing of this site's board, card or stream
    other = {"X-API-Key": OTHER_KEY}
    for path in ("boards/pipeline", "boards/pipeline/cards/account:acme.com", "boards/pipeline/stream",
                 "boards/pipeline/stream-token", "boards/pipeline/lead-time"):
        assert problem(api.get(f"/v1/sites/{OTHER_SITE}/{path}", headers=other), 404)["title"] == "no such board"
    assert api.get(f"/v1/sites/{OTHER_SITE}/boards", headers=other).json() == {"boards": []}
    in_url = problem(api.get(BOARD, params={"key": KEY}, headers={"X-API-Key": ""}), 401)
    assert in_url["title"] == "API key in the URL"


def test_api_key_config_has_read_only_keys():
    keys = ApiKeys(Settings(api_keys="a:1, a:2:ro, b:3").api_key_entries(), SERVER_SECRET)
    assert [(keys.grant(k).site, keys.grant(k).read_only) for k in ("1", "2", "3")] == [
        ("a", False), ("a", True), ("b", False)]
    assert keys.grant("4") is None
    with pytest.raises(ValueError):
        Settings(api_keys="a::ro").api_key_entries()


# ------------------------------------------------------------------------------------------------ board pages


def test_board_list_and_page_follow_the_contract(api, seeder):
    seeder.show(("account:acme.com", "Acme", ("Consideration",), 40), ("account:initech.com", "Initech", (), 5))
    seeder.show(("account:globex.com", "Globex", ("Decision", "Consideration"), 80))
    listed = api.get(f"/v1/sites/{SITE}/boards").json()["boards"]
    assert [(b["id"], b["name"], b["card"], [s["id"] for s in b["stages"]]) for b in listed] == [
        ("pipeline", "Sales pipeline", "account", ["new", "consideration", "decision", "customer"])]

    page = api.get(BOARD)
    body = page.json()
    assert page.headers["ETag"] == f'"{body["version"]}"' and body["version"] == 2
    assert body["board"] == {"id": "pipeline", "name": "Sales pipeline", "card": "account"}
    columns = {s["id"]: s for s in body["stages"]}
    assert [s["id"] for s in body["stages"]] == ["new", "consideration", "decision", "customer"]
    assert {k: c["count"] for k, c in columns.items()} == {"new": 1, "consideration": 1, "decision": 1, "customer": 0}
    card = columns["decision"]["cards"][0]
    assert card["card_id"] == "account:globex.com" and card["title"] == "Globex"
    assert card["tags"] == ["Consideration", "Decision"] and card["score"] == 80
    assert {"last_activity_ms", "entered_stage_ms", "owner", "notes_count"} <= card.keys()
    assert all(c["next_cursor"] is None for c in body["stages"])


def test_a_ten_thousand_card_column_is_paged(api, seeder):
    seeder.show(*[(f"account:c{i:05d}.com", f"Company {i}", (), 0) for i in range(10_000)])
    first = api.get(BOARD).json()
    new = first["stages"][0]
    assert new["count"] == 10_000 and len(new["cards"]) == 50 and new["next_cursor"] == "50"
    seen = [c["card_id"] for c in new["cards"]]
    cursor = new["next_cursor"]
    while cursor is not None:
        page = api.get(BOARD, params={"stage": "new", "cursor": cursor, "limit": 500}).json()
        assert [s["id"] for s in page["stages"]] == ["new"]
        seen += [c["card_id"] for c in page["stages"][0]["cards"]]
        cursor = page["stages"][0]["next_cursor"]
    assert len(seen) == len(set(seen)) == 10_000
    assert problem(api.get(BOARD, params={"cursor": "50"}), 400)["title"] == "cursor needs stage"
    assert problem(api.get(BOARD, params={"stage": "nope"}), 404)["title"] == "no such stage"
    for bad in ({"limit": 0}, {"limit": 501}, {"limit": "x"}, {"stage": "new", "cursor": "-1"}):
        assert "detail" in problem(api.get(BOARD, params=bad), 400)


# ------------------------------------------------------------------------------------------------ commands


def test_add_by_domain_normalises_refuses_free_mail_and_names_the_company(api, settings):
    seed_account_click_stream(settings, domain="acme.co.uk", sessions=1)  # manual_accounts: "Acme Corporation"
    added = api.post(f"{BOARD}/cards", json={"domain": "https://www.Acme.co.uk/pricing"})
    assert added.status_code == 202 and added.headers["Location"].endswith(added.json()["command_id"])
    assert added.json()["status"] == "pending"
    free_mail = problem(api.post(f"{BOARD}/cards", json={"domain": "gmail.com"}), 422)
    assert free_mail["code"] == "personal_email_domain" and "free-mail" in free_mail["detail"]
    assert problem(api.post(f"{BOARD}/cards", json={"domain": "not a domain"}), 422)["code"] == "not_a_domain"
    assert "body.domain" in problem(api.post(f"{BOARD}/cards", json={"domain": ""}), 422)["detail"]
    assert "body.domain" in problem(api.post(f"{BOARD}/cards", json={}), 422)["detail"]

    asyncio.run(publish(settings, "cidr,domain,company_name,kind\n10.0.0.0/8,initech.com,Initech,company\n"))
    assert api.post(f"{BOARD}/cards", json={"domain": "initech.com"}).status_code == 202
    commands = read_commands(settings, 2)
    assert [(c.kind, c.card_id, c.text) for _, c in commands] == [
        ("add", "account:acme.co.uk", "Acme Corporation"), ("add", "account:initech.com", "Initech")]
    assert [p for p, _ in commands] == [expected_partition(settings, c.card_id) for _, c in commands]
    assert all(c.actor.startswith("user:key-") and KEY not in c.actor for _, c in commands)


def test_move_pre_checks_and_idempotent_commands(api, seeder, settings):
    seeder.show(("account:acme.com", "Acme", ("Decision",), 70))
    version = api.get(BOARD).headers["ETag"]
    move = f"{BOARD}/cards/account:acme.com/move"

    stale = problem(api.post(move, json={"to": "customer"}, headers={"If-Match": '"0"'}), 412)
    assert stale["code"] == "stale_version"
    backward = problem(api.post(move, json={"to": "new"}, headers={"If-Match": version}), 409)
    assert backward["code"] == "stage_regression" and backward["type"] == "urn:leadstream:problem:stage_regression"
    assert "force" in backward["detail"]
    assert problem(api.post(move, json={"to": "new", "force": True}), 409)["code"] == "stage_regression"  # no reason
    assert problem(api.post(move, json={"to": "moon"}), 422)["code"] == "unknown_stage"
    assert "body.to" in problem(api.post(move, json={"too": "customer"}), 422)["detail"]
    assert problem(api.post(move, content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert problem(api.post(f"{BOARD}/cards/account:nope.com/move", json={"to": "customer"}), 404)

    headers = {"If-Match": version, "Idempotency-Key": "drag-1"}
    first = api.post(move, json={"to": "customer"}, headers=headers)
    retry = api.post(move, json={"to": "customer"}, headers=headers)
    assert first.status_code == retry.status_code == 202
    command_id = first.json()["command_id"]
    assert retry.json()["command_id"] == command_id == command_id_for(SITE, "pipeline", "account:acme.com", "drag-1")
    produced = read_commands(settings, 2)
    assert {c.command_id for _, c in produced} == {command_id}  # the retry re-sent the same command id
    partition, command = produced[0]
    assert partition == expected_partition(settings, "account:acme.com")
    assert (command.kind, command.to_stage, command.if_match) == ("move", "customer", int(version.strip('"')))

    assert seeder.command(command).ok  # the board processor applies it
    applied = api.post(move, json={"to": "customer"}, headers=headers)
    assert applied.status_code == 200 and applied.json()["status"] == "applied"
    assert applied.json()["card"]["stage_id"] == "customer"
    assert applied.headers["ETag"] == api.get(BOARD).headers["ETag"] != version
    assert api.get(f"{BOARD}/commands/{command_id}").json()["ok"] is True
    forced = api.post(move, json={"to": "decision", "force": True, "reason": "deal slipped"},
                      headers={"Idempotency-Key": "drag-2"})
    assert forced.status_code == 202


def test_a_refusal_stored_by_the_board_processor_is_answered_with_its_status(api, seeder):
    seeder.show(("account:acme.com", "Acme", (), 0))
    command_id = command_id_for(SITE, "pipeline", "account:acme.com", "k-1")
    with seeder.redis.pipeline(transaction=True) as pipe:
        seeder.store.queue_command_result(RedisWrites(pipe), CommandResult(
            command_id, SITE, "pipeline", "account:acme.com", False, "archived", "the card is archived"))
        pipe.execute()
    refused = problem(api.post(f"{BOARD}/cards/account:acme.com/owner", json={"owner": "ann"},
                               headers={"Idempotency-Key": "k-1"}), 409)
    assert (refused["code"], refused["command_id"], refused["detail"]) == ("archived", command_id, "the card is archived")


def test_notes_owner_and_archive_become_commands(api, seeder, settings):
    seeder.show(("account:acme.com", "Acme", (), 0))
    card = f"{BOARD}/cards/account:acme.com"
    assert problem(api.post(f"{card}/notes", json={"text": "   "}), 422)["code"] == "empty_note"
    assert "body.text" in problem(api.post(f"{card}/notes", json={"text": "x" * 2001}), 422)["detail"]
    assert problem(api.post(f"{BOARD}/cards/bad%01id/notes", json={"text": "hi"}), 404)
    for path, body in (("notes", {"text": "Call Ann"}), ("owner", {"owner": "bob"}), ("archive", None),
                       ("unarchive", None), ("archive", None)):
        assert api.post(f"{card}/{path}", json=body).status_code == 202
    commands = [c for _, c in read_commands(settings, 5)]
    assert [(c.kind, c.text) for c in commands] == [
        ("note", "Call Ann"), ("owner", "bob"), ("archive", ""), ("unarchive", ""), ("archive", "")]
    for command in commands:
        assert seeder.command(command).ok
    view = api.get(card).json()
    assert view["card"]["owner"] == "bob" and view["card"]["archived"] is True
    assert [n["text"] for n in view["notes"]] == ["Call Ann"]


# ------------------------------------------------------------------------------------------------ Account Panel


def test_an_accounts_ownership_is_its_leads_ownership():
    links = [("v1", 0, "A"), ("v1", 100, "B"), ("v1", 200, "A"), ("v2", 0, "C"), ("v3", 0, "B")]
    by_lead = ownership_by_lead(links, {"A", "B"})
    assert by_lead == {"A": ownership(links, "A"), "B": ownership(links, "B")}
    assert merge_intervals(by_lead) == {"v1": [(0, 100), (100, 200), (200, 2**64 - 1)], "v3": [(0, 2**64 - 1)]}
    straddling = ProfileSession("s", "v1", 1, 90, 110, 20, 2, 2, "", "", "", "direct", "", "", "", "", "", "")
    assert session_owner(straddling, by_lead) == "A"  # the lead that had the computer when it started
    assert session_owner(straddling, {"B": by_lead["B"]}) == "B"
    assert session_owner(straddling, {}) == ""


def test_account_panel_pages_the_accounts_click_stream(api, seeder, settings):
    sessions = seed_account_click_stream(settings, sessions=7)
    seed_company_card(settings)
    seeder.show(("account:acme.com", "Acme", ("Consideration",), 30), ("lead:lead-solo", "Solo", (), 5))
    first = api.get(f"{BOARD}/cards/account:acme.com").json()
    assert first["kind"] == "account" and first["card"]["stage_id"] == "consideration"
    account = first["account"]
    assert account["company_name"] == "Acme Corporation"
    assert (account["known_leads"], account["anonymous_leads"]) == (1, 1)
    assert (account["first_seen_ms"], account["last_seen_ms"]) == (NOW_MS - 8 * HOUR_MS, NOW_MS)
    assert {k: account["company"][k] for k in ("name", "industry", "employees", "country")} == {
        "name": "Acme Corporation", "industry": "Software", "employees": "51-200", "country": "NL"}
    assert account["places"] == [
        {"country": "NL", "region": "North Holland", "city": "Amsterdam", "visitors": 1, "events": 24},
        {"country": "DE", "region": "Berlin", "city": "Berlin", "visitors": 1, "events": 18}]
    assert account["networks"] == [{"org": "Acme Corporation", "kind": "business", "visitors": 1, "events": 24},
                                   {"org": "Deutsche Telekom AG", "kind": "isp", "visitors": 1, "events": 18}]
    assert [(lead["lead_id"], lead["email"], lead["first_channel"], lead["last_channel"], lead["session_count"],
             lead["event_count"], lead["score"], lead["tags"]) for lead in first["leads"]] == [
        ("lead-ann", "ann@acme.com", "referral", "referral", 4, 24, 40, ["Consideration"]),
        ("lead-anon", "", "referral", "referral", 3, 18, 15, ["Webinar"])]
    # first seen 8 h ago, straight into Consideration 3 h ago; the final stage not reached
    assert first["lead_time"] == {"start_ms": NOW_MS - 8 * HOUR_MS, "final_stage_id": "customer", "lead_time_ms": None,
                                  "stages": [{"stage_id": "consideration", "name": "Consideration",
                                              "entered_ms": NOW_MS - 3 * HOUR_MS, "lead_time_ms": 5 * HOUR_MS}]}
    assert [s["session_id"] for s in first["sessions"]] == sessions[:5]
    assert first["has_more"] and first["session_count"] == 7
    assert [e["type"] for e in first["sessions"][0]["events"]] == [
        "referrer", "pageview", "pageview", "email_open", "email_click", "exit"]
    assert {s["lead_id"] for s in first["sessions"]} == {"lead-ann", "lead-anon"}
    more = api.get(f"{BOARD}/cards/account:acme.com", params={"page": 1}).json()
    assert [s["session_id"] for s in more["sessions"]] == sessions[5:] and not more["has_more"]
    assert "page" in problem(api.get(f"{BOARD}/cards/account:acme.com", params={"page": -1}), 400)["detail"]

    lead = api.get(f"{BOARD}/cards/lead:lead-solo").json()  # no ClickHouse rows yet: an empty profile
    assert lead["kind"] == "lead" and lead["identity"] is None and lead["sessions"] == []
    assert (lead["tags"], lead["score"], lead["properties"]) == ([], 0, {})
    assert [(s["stage_id"], s["lead_time_ms"]) for s in lead["lead_time"]["stages"]] == [("new", 0)]  # from entry
    ann = api.get(f"/v1/sites/{SITE}/leads/lead-ann").json()  # a lead of the panel opens as its Lead Profile
    assert (ann["identity"]["email"], ann["session_count"], ann["has_more"]) == ("ann@acme.com", 4, False)
    assert [t["tag"] for t in ann["tags"]] == ["Consideration"] and ann["score"] == 40
    assert [s["session_id"] for s in ann["sessions"]] == ["s-6", "s-4", "s-2", "s-0"]
    assert problem(api.get(f"{BOARD}/cards/account:unknown.com"), 404)["title"] == "no such card on this board"


def test_lead_time_per_card_and_per_board(api, seeder, settings):
    """Stage changes from the stage machine, in Redis and in ClickHouse: acme.com (first seen 8 h ago) entered
    Consideration 3 h ago and was won 1 h ago; globex.com (nobody from it seen) entered 3 h ago, reached
    Decision 2 h ago, was forced back and moved on again: its first arrival counts; Solo's lead card entered."""
    seed_account_click_stream(settings, sessions=7)
    seeder.show(("account:acme.com", "Acme", ("Consideration",), 30), ("account:globex.com", "Globex", (), 5),
                ("lead:lead-solo", "Solo", (), 5))
    assert seeder.move("account:acme.com", "customer", now_ms=NOW_MS - HOUR_MS).ok
    assert seeder.move("account:globex.com", "decision", now_ms=NOW_MS - 2 * HOUR_MS).ok
    assert seeder.move("account:globex.com", "new", force=True, reason="wrong contact",
                       now_ms=NOW_MS - 90 * MINUTE_MS).ok
    assert seeder.move("account:globex.com", "decision", now_ms=NOW_MS - HOUR_MS).ok

    board = api.get(f"{BOARD}/lead-time").json()
    assert board["board_id"] == "pipeline" and board["final_stage_id"] == "customer"
    assert [(s["stage_id"], s["name"], s["cards"], s["median_ms"], s["p90_ms"]) for s in board["stages"]] == [
        ("new", "New", 2, 0, 0),
        ("consideration", "Consideration", 1, 5 * HOUR_MS, 5 * HOUR_MS),
        ("decision", "Decision", 1, HOUR_MS, HOUR_MS),
        ("customer", "Customer", 1, 7 * HOUR_MS, 7 * HOUR_MS)]
    assert board["lead_time"] == board["stages"][-1]
    assert api.get(f"{BOARD}/lead-time", headers={"X-API-Key": READ_ONLY_KEY}).json() == board

    acme = api.get(f"{BOARD}/cards/account:acme.com").json()["lead_time"]
    assert (acme["lead_time_ms"], [s["stage_id"] for s in acme["stages"]]) == (7 * HOUR_MS, ["consideration",
                                                                                           "customer"])
    globex = api.get(f"{BOARD}/cards/account:globex.com").json()["lead_time"]
    assert globex["start_ms"] == NOW_MS - 3 * HOUR_MS and globex["lead_time_ms"] is None
    assert [(s["stage_id"], s["lead_time_ms"]) for s in globex["stages"]] == [("new", 0), ("decision", HOUR_MS)]

    assert problem(api.get(f"/v1/sites/{SITE}/boards/nope/lead-time"), 404)["title"] == "no such board"
    spec = api.get("/openapi.json").json()["paths"][f"/v1/sites/{{site_id}}/boards/{{board_id}}/lead-time"]["get"]
    assert spec["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("BoardLeadTime")


# ------------------------------------------------------------------------------------------------ stream


def sse_events(response: httpx.Response, count: int) -> list[dict]:
    """The next `count` events (comments skipped) as {"id", "event", "data"}."""
    events, current = [], {}
    for line in response.iter_lines():
        if line == "":
            if current.get("event") or current.get("data"):
                events.append(current)
                if len(events) == count:
                    return events
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            current[name] = value.removeprefix(" ")
    raise AssertionError(f"stream ended after {events}")


def test_stream_tokens_resume_and_reset(settings, seeder, monkeypatch):
    monkeypatch.setattr("api.routes.board_stream.HEARTBEAT_S", 1)
    with serve_api(replace(settings, api_keys=API_KEYS)) as base, httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=10) as http:
        assert http.put(BOARD, json=PIPELINE.model_dump(mode="json", exclude_unset=True)).status_code == 200
        seeder.show(("account:acme.com", "Acme", (), 10))
        snapshot = http.get(BOARD).json()
        token = http.get(f"{BOARD}/stream-token")
        assert token.headers["Cache-Control"] == "no-store"
        url = f"{BOARD}/stream"
        keyless = httpx.Client(base_url=base, timeout=10)

        with keyless.stream("GET", url, params={"token": token.json()["token"],
                                                "last_event_id": snapshot["feed_id"]}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            seeder.show(("account:acme.com", "Acme", ("Consideration",), 30))
            change, card, version = sse_events(stream, 3)
        assert (change["event"], card["event"], version["event"]) == ("stage_change", "card", "version")
        assert orjson.loads(change["data"])["to_stage"] == "consideration"
        assert orjson.loads(change["data"])["from_stage"] == "new"
        assert orjson.loads(card["data"])["stage_id"] == "consideration" and "id" not in version
        assert orjson.loads(version["data"]) == {"version": snapshot["version"] + 1}

        seeder.show(("account:acme.com", "Acme", ("Decision",), 60))  # while disconnected
        with http.stream("GET", url, headers={"Last-Event-ID": card["id"]}) as stream:
            resumed = sse_events(stream, 2)
        assert [e["event"] for e in resumed] == ["stage_change", "card"]
        assert orjson.loads(resumed[0]["data"])["to_stage"] == "decision" and resumed[0]["id"] > card["id"]

        served, unknown = keys_of(API_KEYS), keys_of(f"{SITE}:{api_key('not-configured')}")
        for bad in ("garbage", served.stream_token(served.grant(KEY), "other-board", now_ms()).token,
                    served.stream_token(served.grant(KEY), "pipeline", now_ms() - STREAM_TOKEN_TTL_MS - 1).token,
                    unknown.stream_token(unknown.grant(api_key("not-configured")), "pipeline", now_ms()).token):
            assert problem(keyless.get(url, params={"token": bad}), 401)["title"] == "stream token invalid or expired"
        assert problem(keyless.get(url), 401)["title"] == "API key required"
        assert problem(http.get(url, headers={"Last-Event-ID": "yesterday"}), 400)["title"] == "invalid Last-Event-ID"

        with http.stream("GET", url) as stream:  # an idle stream gets heartbeat comments
            assert next(line for line in stream.iter_lines() if line).startswith(": ping")

        feed = seeder.store.keys.board_feed(SITE, "pipeline")
        seeder.show(("account:initech.com", "Initech", (), 1))
        seeder.redis.xtrim(feed, maxlen=1, approximate=False)  # the feed no longer reaches back to card["id"]
        with http.stream("GET", url, headers={"Last-Event-ID": card["id"]}) as stream:
            reset, = sse_events(stream, 1)
        assert reset["event"] == "reset" and reset["id"] == http.get(BOARD).json()["feed_id"]
        keyless.close()


def test_stream_tokens_are_bound_to_site_board_key_and_time():
    keys = keys_of(f"{SITE}:{KEY},{OTHER_SITE}:{OTHER_KEY}")
    token = keys.stream_token(keys.grant(KEY), "pipeline", 1_000).token
    assert KEY not in token
    opened = keys.check_stream_token(token, SITE, "pipeline", 1_000 + STREAM_TOKEN_TTL_MS)
    assert opened.grant == keys.grant(KEY) and opened.expires_ms == 1_000 + STREAM_TOKEN_TTL_MS
    assert not keys.check_stream_token(token, SITE, "pipeline", 1_001 + STREAM_TOKEN_TTL_MS)
    assert not keys.check_stream_token(token, OTHER_SITE, "pipeline", 1_000)
    assert not keys_of(f"{SITE}:{api_key('rotated')}").check_stream_token(token, SITE, "pipeline", 1_000)
    assert not keys.check_stream_token(token[:-2] + "AA", SITE, "pipeline", 1_000)
    other_server = keys_of(f"{SITE}:{KEY}", secret=api_key("another-server-secret"))
    assert not other_server.check_stream_token(token, SITE, "pipeline", 1_000)


def test_if_match_forms():
    assert matches(None, 7) and matches("*", 7) and matches('"7"', 7) and matches('W/"7"', 7)
    assert matches('"3", "7"', 7) and not matches('"6"', 7) and not matches("garbage", 7)


# ------------------------------------------------------------------------------------------------ definitions


def test_rules_and_board_definitions(api):
    rule = {"when": {"event": "pageview", "url": "*/pricing*"}, "then": [{"add_tag": "Consideration"}]}
    created = api.put(f"/v1/sites/{SITE}/rules/viewed-pricing", json=rule)
    assert created.status_code == 200, created.text
    assert created.json()["id"] == "viewed-pricing" and created.headers["ETag"] == f'"{created.json()["version"]}"'
    changed = api.put(f"/v1/sites/{SITE}/rules/viewed-pricing", json=rule | {"then": [{"add_score": 15}]})
    assert changed.json()["version"] > created.json()["version"]
    assert api.get(f"/v1/sites/{SITE}/rules/viewed-pricing").json()["then"] == [{"add_score": 15}]
    assert [r["id"] for r in api.get(f"/v1/sites/{SITE}/rules").json()["rules"]] == ["viewed-pricing"]

    bad_op = problem(api.put(f"/v1/sites/{SITE}/rules/r2", json=rule | {"if": [{"field": "account.domain", "op": "is_maybe"}]}), 422)
    assert "if.0.op" in bad_op["detail"]
    assert "id" in problem(api.put(f"/v1/sites/{SITE}/rules/r2", json=rule | {"id": "r3"}), 422)["detail"]
    dangling = rule | {"then": [{"move_card": {"board": "pipeline", "stage": "moon"}}]}
    assert "moon" in problem(api.put(f"/v1/sites/{SITE}/rules/r2", json=dangling), 422)["detail"]
    assert problem(api.put(f"/v1/sites/{SITE}/rules/r2", json=[1, 2]), 422)
    assert problem(api.put(f"/v1/sites/{SITE}/rules/r2", headers={"X-API-Key": READ_ONLY_KEY}, json=rule), 403)

    assert api.delete(f"/v1/sites/{SITE}/rules/viewed-pricing").status_code == 204
    assert problem(api.get(f"/v1/sites/{SITE}/rules/viewed-pricing"), 404)["title"] == "no such rule"
    assert problem(api.delete(f"/v1/sites/{SITE}/rules/viewed-pricing"), 404)

    board = PIPELINE.model_dump(mode="json", exclude_unset=True)
    before = api.get(f"/v1/sites/{SITE}/boards").json()["boards"][0]["version"]
    renamed = api.put(BOARD, json=board | {"name": "Pipeline 2"})
    assert renamed.json()["version"] > before and renamed.json()["name"] == "Pipeline 2"
    two_entries = board | {"stages": [{"id": "a", "name": "A", "entry": True}, {"id": "b", "name": "B", "entry": True}]}
    assert "entry" in problem(api.put(BOARD, json=two_entries), 422)["detail"]
    assert "stages" in problem(api.put(BOARD, json=board | {"stages": []}), 422)["detail"]


def test_rule_executions_page_newest_first(api, settings):
    url = f"/v1/sites/{SITE}/rules/hot-lead/executions"
    client = connect(settings.clickhouse())
    rows = [(f"x{i}", SITE, "hot-lead", 1, f"lead-{i}", "state", "", ["add_tag Decision"], "changed", 1000 + i, 0)
            for i in range(3)]
    rows += [rows[2], ("y", OTHER_SITE, "hot-lead", 1, "lead-y", "state", "", [], "changed", 5000, 0)]  # a replay
    insert_columnar(client, "rule_executions", [f.name for f in dataclasses.fields(RuleExecution)], rows)
    first = api.get(url, params={"limit": 2}).json()
    assert [e["execution_id"] for e in first["executions"]] == ["x2", "x1"] and first["next_offset"] == 2
    assert first["executions"][0]["actions"] == ["add_tag Decision"]
    rest = api.get(url, params={"limit": 2, "offset": 2}).json()
    assert [e["execution_id"] for e in rest["executions"]] == ["x0"] and rest["next_offset"] is None
    assert problem(api.get(url, params={"limit": 0}), 400)
    client.execute("DROP TABLE rule_executions")  # a database the migrations have not reached yet
    assert problem(api.get(url), 503)["title"] == "rule executions are not recorded yet"


def test_openapi_documents_the_board_api_and_pages_are_served(api):
    spec = api.get("/openapi.json").json()
    board_get = spec["paths"]["/v1/sites/{site_id}/boards/{board_id}"]["get"]
    assert board_get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("BoardView")
    move = spec["paths"]["/v1/sites/{site_id}/boards/{board_id}/cards/{card_id}/move"]["post"]
    assert {"200", "409", "412", "422"} <= move["responses"].keys()
    assert api.get("/board").headers["content-type"].startswith("text/html")
    assert api.get("/static/board.js").status_code == 200


# ------------------------------------------------------------------------------------------------ helpers


def now_ms() -> int:
    return int(time.time() * 1000)


def keys_of(api_keys: str, secret: str = SERVER_SECRET) -> ApiKeys:
    return ApiKeys(Settings(api_keys=api_keys).api_key_entries(), secret)


async def publish(settings, ip_ranges_csv: str) -> None:
    client = aioredis.from_url(settings.redis_url)
    try:
        await publish_ip_ranges(client, settings.name("ls"), ip_ranges_csv)
    finally:
        await client.aclose()


# ------------------------------------------------------------------------------------------------ limits


def test_one_board_page_reads_at_most_the_board_cards_limit(settings, seeder):
    seeder.show(*[(f"account:c{i:03d}.com", f"Company {i}", tags, 0) for i in range(60)
                  for tags in [("Consideration",) if i % 2 else ()]])
    with TestClient(create_app(replace(settings, api_keys=API_KEYS, api_max_board_cards=40))) as api:
        api.headers["X-API-Key"] = KEY
        assert api.put(BOARD, json=PIPELINE.model_dump(mode="json", exclude_unset=True)).status_code == 200
        page = api.get(BOARD, params={"limit": 500}).json()  # 4 stages: 10 cards each at most
        assert [(s["id"], s["count"], len(s["cards"]), s["next_cursor"]) for s in page["stages"]] == [
            ("new", 30, 10, "10"), ("consideration", 30, 10, "10"), ("decision", 0, 0, None), ("customer", 0, 0, None)]
        one = api.get(BOARD, params={"stage": "new", "cursor": "10", "limit": 500}).json()["stages"]
        assert [(s["id"], len(s["cards"]), s["next_cursor"]) for s in one] == [("new", 20, None)]  # one stage: 40


def test_site_limits_refuse_a_rule_a_board_or_a_webhook_too_many(settings):
    limited = replace(settings, api_keys=API_KEYS, max_rules_per_site=2, max_boards_per_site=1,
                      max_webhook_actions_per_site=1)
    hook = {"webhook": {"url": "https://crm.example/hook", "secret_env": "CRM_SECRET"}}
    with TestClient(create_app(limited)) as api:
        api.headers["X-API-Key"] = KEY
        assert api.put(BOARD, json=PIPELINE.model_dump(mode="json", exclude_unset=True)).status_code == 200
        refused = problem(api.put(f"/v1/sites/{SITE}/boards/second", json={"name": "B", "stages": [
            {"id": "a", "name": "A"}]}), 422)
        assert (refused["code"], refused["title"]) == ("site_limit", "site limit reached")
        assert "LEADSTREAM_MAX_BOARDS_PER_SITE" in refused["detail"]
        rule = {"when": {"event": "pageview"}, "then": [{"add_tag": "A"}]}
        assert api.put(f"/v1/sites/{SITE}/rules/r1", json=rule | {"then": [hook]}).status_code == 200
        assert problem(api.put(f"/v1/sites/{SITE}/rules/r2", json=rule | {"then": [hook]}), 422)["code"] == "site_limit"
        assert api.put(f"/v1/sites/{SITE}/rules/r2", json=rule).status_code == 200
        too_many = problem(api.put(f"/v1/sites/{SITE}/rules/r3", json=rule), 422)
        assert "LEADSTREAM_MAX_RULES_PER_SITE" in too_many["detail"]
        edited = rule | {"then": [{"add_tag": "B"}, hook]}
        assert api.put(f"/v1/sites/{SITE}/rules/r1", json=edited).status_code == 200  # at the limits, edits go on


def test_read_only_keys_get_rules_with_webhook_urls_redacted(api):
    hook = {"url": "https://hooks.example/T0/B0/s3cr3t-token", "secret_env": "CRM_SECRET"}
    rule = {"when": {"score_at_least": 50}, "then": [{"add_tag": "Hot"}, {"webhook": hook}]}
    assert api.put(f"/v1/sites/{SITE}/rules/hot", json=rule).json()["then"][1]["webhook"] == hook
    read_only = {"X-API-Key": READ_ONLY_KEY}
    for body in (api.get(f"/v1/sites/{SITE}/rules/hot", headers=read_only).json(),
                 api.get(f"/v1/sites/{SITE}/rules", headers=read_only).json()["rules"][0]):
        assert body["then"][1]["webhook"] == {"url": REDACTED, "secret_env": "CRM_SECRET"}
    assert "s3cr3t" not in api.get(f"/v1/sites/{SITE}/rules", headers=read_only).text
    assert api.get(f"/v1/sites/{SITE}/rules/hot").json()["then"][1]["webhook"] == hook


def test_streams_are_limited_per_key_and_end_when_their_token_expires(settings, seeder, monkeypatch):
    monkeypatch.setattr("api.keys.STREAM_TOKEN_TTL_MS", 3_000)
    limited = replace(settings, api_keys=API_KEYS, api_max_streams_per_key=2, api_max_streams=3)
    with TestClient(create_app(limited)) as api:  # the streams read Redis through a pool of their own, bounded
        pool = api.app.state.services.live.streams.store.redis.connection_pool
        assert isinstance(pool, aioredis.BlockingConnectionPool) and pool.max_connections == 3
    with serve_api(limited) as base, httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=10) as http:
        assert http.put(BOARD, json=PIPELINE.model_dump(mode="json", exclude_unset=True)).status_code == 200
        url = f"{BOARD}/stream"
        with http.stream("GET", url) as first, http.stream("GET", url) as second:
            assert first.status_code == second.status_code == 200
            assert first.headers["content-security-policy"].startswith("default-src 'self'")
            third = problem(http.get(url), 429)
            assert third["code"] == "too_many_streams"
            with http.stream("GET", url, headers={"X-API-Key": READ_ONLY_KEY}) as other_key:
                assert other_key.status_code == 200
                assert problem(http.get(url, headers={"X-API-Key": READ_ONLY_KEY}), 503)["code"] == "too_many_streams"
        with http.stream("GET", url) as again:  # the two closed: their places are free again
            assert again.status_code == 200

        token = http.get(f"{BOARD}/stream-token").json()
        assert token["expires_ms"] - now_ms() <= 3_000
        keyless = httpx.Client(base_url=base, timeout=10)
        started = time.monotonic()
        snapshot = http.get(BOARD).json()
        params = {"token": token["token"], "last_event_id": snapshot["feed_id"]}
        with keyless.stream("GET", url, params=params) as stream:
            seeder.show(("account:acme.com", "Acme", (), 10))
            lines = list(stream.iter_lines())  # until the server ends the stream
        assert 2.0 < time.monotonic() - started < 8  # it ended when the token expired
        assert [line for line in lines if line.startswith("event:")][:2] == ["event: stage_change", "event: card"]
        assert problem(keyless.get(url, params={"token": token["token"]}), 401)["title"] == (
            "stream token invalid or expired")
        keyless.close()
