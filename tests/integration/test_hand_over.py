"""Hand-over to sales on the real stack (Kafka, Redis, ClickHouse, worker processes): a card entering an
assigning stage gets its owner; a stage change by a rule and one by a person's API move each deliver one signed
`stage.changed` webhook to a receiver on 127.0.0.1 (allowed explicitly, as the webhook tests do); a tag by
hand through the API moves the card and is a lead change with the key as actor; a SIGKILLed worker leaves
exactly one webhook per stage change and every turn of the round robin taken once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace

import orjson
import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from api.app import create_app
from leadstream.runner import Role, count, produce, start_workers, wait_for
from processors import webhooks
from processors.definitions_store import DefinitionsStore
from schemas.definitions import load_definitions
from schemas.redis_keys import RedisKeys
from sinks.clickhouse import connect
from tests.api_keys import api_key
from tests.integration.test_webhooks import SECRET, Receiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEFINITIONS = """
owners:
- {id: ann, name: Ann Example, email: ann@sales.example}
- {id: bob, name: Bob Example, email: bob@sales.example}
rules:
- id: viewed-pricing
  when: {event: pageview, url: "*/pricing*"}
  then: [{add_tag: Consideration}]
boards:
- id: pipeline
  name: Sales pipeline
  card: account
  on_stage_change: {webhook: "%(crm)s", secret_env: CRM}
  stages:
  - {id: new, name: New, entry: true, assign: {round_robin: [ann, bob]}}
  - {id: consideration, name: Consideration, when_tag: Consideration}
  - {id: decision, name: Decision, when_tag: Decision}
  - {id: won, name: Won}
"""
SECRETS = {"LEADSTREAM_WEBHOOK_SECRET_IT__CRM": SECRET}
BASE_MS = int(time.time() * 1000) - 600_000


def raw(i: int, visitor: str, kind: str = "pageview", path: str = "/", **extra) -> tuple[bytes, bytes]:
    event = {"event_id": f"e{i}", "site_id": "it", "type": kind, "visitor_id": visitor, "ts": BASE_MS + i * 1000,
             "url": f"https://example.com{path}", "ip": "192.0.2.7",
             "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0"
                           " Safari/537.36", **extra}
    return visitor.encode(), orjson.dumps(event)


def signup(i: int, company: int) -> tuple[bytes, bytes]:
    return raw(i, f"v{company}", "form_submit", "/signup", email=f"person@company{company}.com",
               properties={"form": "signup"})


async def _apply(settings, text: str) -> None:
    redis = aioredis.from_url(settings.redis_url)
    try:
        await DefinitionsStore(redis, settings.name("ls"), webhook_targets=webhooks.WebhookTargets.parse("127.0.0.1")
                               ).apply("it", load_definitions(text, "handover.yaml"))
    finally:
        await redis.aclose()


async def _turns(settings) -> int:
    redis = aioredis.from_url(settings.redis_url)
    try:
        pattern = RedisKeys(settings.name("ls")).board_turns("it", "pipeline", 0).rsplit("\x1f", 1)[0] + "\x1f*"
        keys = [key async for key in redis.scan_iter(match=pattern)]
        return sum(orjson.loads(value).get("new", 0) for value in (await redis.mget(keys) if keys else []))
    finally:
        await redis.aclose()


@pytest.fixture
def crm():
    receiver = Receiver()
    yield receiver
    receiver.close()


def _bodies(crm: Receiver) -> dict[str, dict]:
    """webhook-id -> body of every request, each signature checked."""
    out = {}
    for headers, body, _ in list(crm.requests):
        webhooks.verify(SECRET, headers, body)
        out[headers["webhook-id"]] = orjson.loads(body)
    return out


def _wait_requests(crm: Receiver, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len({h["webhook-id"] for h, _, _ in list(crm.requests)}) < expected and time.monotonic() < deadline:
        time.sleep(0.2)


def test_owners_rule_and_api_moves_and_tags_by_hand_hand_over(settings, roles, crm):
    settings = replace(settings, webhook_allowed_targets="127.0.0.1", api_keys=f"it:{api_key('it')}")
    asyncio.run(_apply(settings, DEFINITIONS % {"crm": crm.url}))
    roles += [*start_workers(settings, "worker", "single", env=SECRETS), Role(settings, "sink", "sink").start()]
    asyncio.run(produce(settings, [signup(i, i) for i in range(1, 5)] + [raw(10, "v1", path="/pricing")]))
    wait_for(settings, "SELECT count() FROM stage_changes FINAL WHERE to_stage = 'new'", 4, 120, roles)
    wait_for(settings, "SELECT count() FROM stage_changes FINAL WHERE to_stage = 'consideration'", 1, 60, roles)

    headers = {"X-API-Key": api_key("it")}
    client = TestClient(create_app(settings))
    with client:
        board = client.get("/v1/sites/it/boards/pipeline", headers=headers).json()
        cards = {card["card_id"]: card for stage in board["stages"] for card in stage["cards"]}
        owners = {card_id: card["owner"] for card_id, card in cards.items()}
        assert len(owners) == 4 and set(owners.values()) <= {"ann", "bob"}  # every card got one of the owners
        assert cards["account:company1.com"]["stage_id"] == "consideration"
        assert client.get("/v1/sites/it/owners", headers=headers).json()["owners"][0]["email"] == "ann@sales.example"
        deleted = client.delete("/v1/sites/it/owners/ann", headers=headers)
        assert deleted.status_code == 409 and deleted.json()["code"] == "in_use"
        refused = client.post("/v1/sites/it/boards/pipeline/cards/account:company2.com/owner", headers=headers,
                              json={"owner": "somebody else"})
        assert refused.status_code == 422 and refused.json()["code"] == "unknown_owner"

        moved = client.post("/v1/sites/it/boards/pipeline/cards/account:company2.com/move", headers=headers,
                            json={"to": "won"})
        assert moved.status_code == 200, moved.text

        (lead_id,) = connect(settings.clickhouse()).execute(
            "SELECT lead_id FROM leads FINAL WHERE email = 'person@company3.com'")[0]
        tagged = client.post(f"/v1/sites/it/leads/{lead_id}/tags", headers={**headers, "Idempotency-Key": "t1"},
                             json={"tag": "Decision"})
        assert tagged.status_code == 202, tagged.text
        again = client.post(f"/v1/sites/it/leads/{lead_id}/tags", headers={**headers, "Idempotency-Key": "t1"},
                            json={"tag": "Decision"})
        assert again.json()["command_id"] == tagged.json()["command_id"]
        assert client.post("/v1/sites/it/leads/nobody/tags", headers=headers, json={"tag": "x"}).status_code == 404
        wait_for(settings, "SELECT count() FROM stage_changes FINAL WHERE to_stage = 'decision'", 1, 60, roles)

    ch = connect(settings.clickhouse())
    ((actor,),) = ch.execute("SELECT actor FROM lead_changes FINAL WHERE name = 'Decision' AND kind = 'tag_added'")
    assert actor.startswith("user:key-")
    ((card_id, stage_actor),) = ch.execute("SELECT card_id, actor FROM stage_changes FINAL WHERE to_stage = 'decision'")
    assert card_id == "account:company3.com" and stage_actor == actor  # the person moved the card by the tag

    changes = count(settings, "SELECT count() FROM stage_changes FINAL")
    assert changes == 7  # 4 entries, the rule's move, the API move, the tag's move
    _wait_requests(crm, changes, 60)
    bodies = _bodies(crm)
    assert len(bodies) == changes == len(crm.requests)  # one signed webhook per stage change, none twice
    assert {body["type"] for body in bodies.values()} == {"stage.changed"}
    by_stage = {body["data"]["to_stage"]["id"]: body for body in bodies.values()}
    rule = by_stage["consideration"]["data"]
    assert rule["cause"]["rule_id"] == "viewed-pricing" and rule["account"]["domain"] == "company1.com"
    assert rule["owner"]["id"] == owners["account:company1.com"] and rule["owner"]["email"].endswith("@sales.example")
    person = by_stage["won"]["data"]
    assert person["cause"]["actor"].startswith("user:key-") and person["from_stage"]["id"] == "new"
    assert person["owner"]["id"] == owners["account:company2.com"]
    wait_for(settings, "SELECT count() FROM webhook_deliveries FINAL WHERE outcome = 'delivered' AND board_id = 'pipeline'",
             changes, 60, roles)
    assert asyncio.run(_turns(settings)) == 4


def test_a_sigkilled_worker_leaves_one_webhook_per_stage_change_and_every_turn_once(settings, roles, crm):
    settings = replace(settings, webhook_allowed_targets="127.0.0.1")
    asyncio.run(_apply(settings, DEFINITIONS % {"crm": crm.url}))
    companies = 60
    records = [signup(i, i) for i in range(1, companies + 1)]
    records += [raw(100 + i, f"v{i}", path="/pricing") for i in range(1, companies + 1, 2)]
    worker = start_workers(settings, "worker", "single", env=SECRETS)[0]
    roles += [worker, Role(settings, "sink", "sink").start()]
    asyncio.run(produce(settings, records[: len(records) // 2]))
    wait_for(settings, "SELECT count() FROM stage_changes", 5, 120, roles)
    worker.kill()  # SIGKILL mid-stream
    asyncio.run(produce(settings, records[len(records) // 2:]))
    time.sleep(1)
    worker.start()
    expected = companies + companies // 2
    wait_for(settings, "SELECT count() FROM stage_changes FINAL", expected, 240, roles)
    _wait_requests(crm, expected, 120)
    time.sleep(2)
    bodies = _bodies(crm)
    change_ids = {row[0] for row in connect(settings.clickhouse()).execute(
        "SELECT stage_change_id FROM stage_changes FINAL")}
    assert len(change_ids) == expected
    assert {body["data"]["stage_change_id"] for body in bodies.values()} == change_ids  # one webhook id each
    assert asyncio.run(_turns(settings)) == companies  # every turn taken once: none skipped, none repeated
    entry_owners = Counter(body["data"]["owner"]["id"] for body in bodies.values()
                           if body["data"]["to_stage"]["id"] == "new")
    assert sum(entry_owners.values()) == companies
    assert abs(entry_owners["ann"] - entry_owners["bob"]) <= settings.partitions  # fair within each partition
