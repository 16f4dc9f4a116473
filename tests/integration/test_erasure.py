"""Erasure that stays erased, and the access export, on the real stack (Kafka, ClickHouse 18.16, Redis).

Ann uses two devices (two visitor ids joined by forms with her email); a rule tags her and calls a webhook
(an endpoint that refuses: the webhook stays queued), her card sits on a board. Bob and Carol are other
people of the same site. The export returns every row planted for Ann; then she is erased. The worker is
SIGKILLed and restarted and Ann comes back on a third device; the boards are rebuilt from board.commands;
the raw topic and the lead feed are replayed from their start through fresh processors (no consumer group,
no state, only the ledger): not one row, key, card or output of hers comes back, and Bob's and Carol's data
is what it was."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import orjson
import pytest
import redis as syncredis
import redis.asyncio as aioredis
from aiokafka import TopicPartition

from api.erasure import TABLES, Erasures
from leadstream.admin import rebuild_boards
from leadstream.runner import Role, count, produce, wait_drained, wait_for
from processors import sessionize
from processors.definitions_store import DefinitionsStore
from processors.enrich import Limits
from processors.identity import known_lead_id
from processors.identity_store import IdentityGraphStore
from processors.lead_processor import LeadProcessor
from processors.lookup_tables import LookupTables
from processors.raw_processor import RawEventsProcessor, RawProcessorConfig
from processors.runtime.ingest import Message
from processors.runtime.ingest import consumer as kafka_consumer
from processors.runtime.producer import MemoryProducer
from processors.runtime.runner import ProcessorRunner
from processors.runtime.state import MemoryStateStore
from processors.site_definitions import SiteDefinitionsCache
from processors.webhooks import WebhookTargets
from schemas.definitions import load_definitions
from schemas.erasure import DONE
from schemas.redis_keys import RedisKeys
from schemas.topics import EVENTS_DLQ, EVENTS_RAW, LEADS_ACTIVITY
from sinks.clickhouse import connect

pytestmark = pytest.mark.integration

NOW = int(time.time() * 1000)
SITE = "er"
ANN, ANN_DEVICES = "ann@initech.io", ("v-ann-laptop", "v-ann-phone")
OTHERS = {"v-bob": "bob@globex.com", "v-carol": ""}  # carol stays anonymous
DEFINITIONS = """
rules:
- id: filled-a-form
  when: {event: form_submit}
  then: [{add_tag: Interested}, {webhook: {url: "http://127.0.0.1:9/hook", secret_env: LEADSTREAM_WEBHOOK_SECRET_ER__CRM}}]
boards:
- id: pipeline
  name: Pipeline
  card: lead
  stages:
  - {id: new, name: New, entry: true}
  - {id: interested, name: Interested, when_tag: Interested}
"""
ENV = {"LEADSTREAM_WEBHOOK_SECRET_ER__CRM": "a-long-enough-webhook-secret-for-tests-0123456789"}
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0.0.0 Safari/537.36"


def _event(visitor: str, n: int, ts: int, **extra) -> tuple[bytes, bytes]:
    record = {"event_id": f"{visitor}-{n}", "site_id": SITE, "visitor_id": visitor, "type": "pageview",
              "ts": ts, "url": f"https://acme.com/p{n}", "ip": "198.51.100.7", "user_agent": UA, **extra}
    return visitor.encode(), orjson.dumps(record)


def _people(first: int, ts: int) -> list[tuple[bytes, bytes]]:
    records = []
    for visitor in ANN_DEVICES:
        records += [_event(visitor, first, ts), _event(visitor, first + 1, ts + 1000, type="form_submit", email=ANN)]
    for visitor, email in OTHERS.items():
        records.append(_event(visitor, first, ts))
        if email:
            records.append(_event(visitor, first + 1, ts + 1000, type="form_submit", email=email))
    return records


async def _apply(settings) -> None:
    redis = aioredis.from_url(settings.redis_url)
    try:
        store = DefinitionsStore(redis, settings.name("ls"), webhook_targets=WebhookTargets.parse("127.0.0.1"))
        await store.apply(SITE, load_definitions(DEFINITIONS, "erasure.yaml"))
    finally:
        await redis.aclose()


def _ann_rows(ch, person_leads, person_visitors, person_webhooks) -> dict[str, int]:
    """Rows naming Ann in every table, read with the same conditions an erasure uses."""
    from api.erasure import Person, condition

    person = Person(SITE, ANN, set(person_leads), set(person_visitors), set(person_webhooks))
    found = {}
    for table in TABLES:
        where = condition(table, person)
        found[table] = ch.execute(f"SELECT count() FROM {table} WHERE {where[0]}", where[1])[0][0] if where else 0
    found["events_by_email"] = ch.execute("SELECT count() FROM events WHERE email = %(e)s", {"e": ANN})[0][0]
    found["leads_by_email"] = ch.execute("SELECT count() FROM leads WHERE email = %(e)s", {"e": ANN})[0][0]
    return found


def _others(ch) -> dict[str, object]:
    """Bob's and Carol's data: what must not change."""
    v = tuple(OTHERS)
    return {
        "events": ch.execute("SELECT visitor_id, event_id FROM events WHERE visitor_id IN %(v)s ORDER BY event_id", {"v": v}),
        "sessions": ch.execute("SELECT visitor_id, session_id, event_count FROM sessions FINAL WHERE visitor_id IN %(v)s "
                               "ORDER BY session_id", {"v": v}),
        "leads": ch.execute("SELECT lead_id, email FROM leads FINAL WHERE site_id = %(s)s AND email != %(e)s "
                            "ORDER BY lead_id", {"s": SITE, "e": ANN}),
        "rule_executions": ch.execute("SELECT lead_id, rule_id FROM rule_executions FINAL WHERE lead_id = %(l)s",
                                      {"l": known_lead_id(SITE, OTHERS["v-bob"])}),
    }


def _redis_mentions(settings, needles: list[bytes]) -> list[str]:
    """Every Redis key (with its value, whatever its type) of the namespace that names one of `needles`."""
    r = syncredis.Redis.from_url(settings.redis_url)
    found = []
    for key in r.scan_iter(match=f"{settings.topic_prefix}*", count=10_000):
        kind = r.type(key)
        if kind == b"string":
            blobs = [key, r.get(key) or b""]
        elif kind == b"hash":
            blobs = [key, *[k + v for k, v in r.hgetall(key).items()]]
        elif kind == b"zset":
            blobs = [key, *r.zrange(key, 0, -1)]
        elif kind == b"stream":
            blobs = [key, *[b"".join(k + v for k, v in fields.items()) for _, fields in r.xrange(key)]]
        else:
            blobs = [key]
        if key.endswith(b":erasure:ledger"):
            continue  # the ledger itself names their visitor and lead ids: that is what it is for
        if any(n in blob for blob in blobs for n in needles):
            found.append(key.decode(errors="replace"))
    r.close()
    return found


async def _replay(settings, topic, make_processor) -> MemoryProducer:
    """The topic from its start through a fresh processor: no consumer group, no state — only the erasure
    ledger (and definitions) copied from the real Redis. Returns what it would have produced."""
    kafka, keys = settings.kafka(), RedisKeys(settings.name("ls"))
    real = syncredis.Redis.from_url(settings.redis_url)
    store = MemoryStateStore(prefix=settings.name("ls"), processor="raw" if topic is EVENTS_RAW else "lead")
    store.redis.hash_set(keys.erasure_ledger, {k.decode(): v for k, v in real.hgetall(keys.erasure_ledger).items()})
    store.redis.set_many({keys.erasure_version: real.get(keys.erasure_version), keys.erasure_key: real.get(keys.erasure_key)})
    real.close()
    producer = MemoryProducer(EVENTS_DLQ)
    runner = ProcessorRunner(await make_processor(store), store, producer, kafka.partitions, EVENTS_DLQ, kafka.topic(topic.name))
    consumer = kafka_consumer(kafka, group=None)
    await consumer.start()
    try:
        partitions = [TopicPartition(kafka.topic(topic.name), p) for p in range(kafka.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=1000)
            messages = [Message(m.partition, m.offset, m.key, m.value, m.headers) for tp, ms in fetched.items()
                        for m in ms if m.offset < ends[tp]]
            if messages:
                await runner.process(messages)
    finally:
        await consumer.stop()
    return producer


def _produced(producer: MemoryProducer) -> list[bytes]:
    return [value for outputs in producer.sent for records in outputs.records.values() for _, value, _ in records]


@pytest.mark.slow
def test_an_erased_person_stays_erased_through_a_crash_a_rebuild_and_a_replay(settings, roles):
    settings = replace(settings, webhook_allowed_targets="127.0.0.1")
    asyncio.run(_apply(settings))
    worker = Role(settings, "worker", "worker", env=ENV).start()
    roles += [worker, Role(settings, "sink", "sink").start()]
    asyncio.run(produce(settings, _people(1, NOW - 600_000)))
    planted = 2 * len(ANN_DEVICES) + 1 + 2
    wait_for(settings, "SELECT count() FROM events", planted, 180, roles)
    wait_for(settings, "SELECT count() FROM rule_executions FINAL", 2, 120, roles)  # ann's form and bob's
    wait_for(settings, "SELECT count() FROM stage_changes FINAL WHERE to_stage = 'interested'", 2, 120, roles)
    wait_for(settings, "SELECT count() FROM webhook_deliveries FINAL", 2, 120, roles)  # a refused attempt each
    wait_drained(settings, 120, roles)

    ann_lead = known_lead_id(SITE, ANN)
    ch = connect(settings.clickhouse())
    others_before = _others(ch)
    r = syncredis.Redis.from_url(settings.redis_url)
    keys = RedisKeys(settings.name("ls"))
    assert r.hexists(keys.board_cards(SITE, "pipeline"), f"lead:{ann_lead}")
    queued = [orjson.loads(v) for v in r.hvals(keys.webhook_requests)]
    her_queued = {q["webhook_id"] for q in queued if ann_lead in q["body"]}
    assert her_queued  # her webhook waits in the queue
    # the dispatcher keeps retrying it, so her attempts grow while the export runs: count them on both sides
    attempts_before_export = ch.execute("SELECT count() FROM webhook_deliveries WHERE webhook_id IN %(w)s",
                                        {"w": tuple(her_queued)})[0][0]

    async def with_erasures(call):
        redis = aioredis.from_url(settings.redis_url)
        try:
            return await call(Erasures(redis, settings.name("ls"), settings.clickhouse()))
        finally:
            await redis.aclose()

    doc = asyncio.run(with_erasures(lambda erasures: erasures.export(SITE, ANN.upper())))
    all_leads, all_visitors = set(doc["leads"]), set(doc["visitors"])  # her known lead and the anonymous ones merged into it
    all_webhooks = ({row["webhook_id"] for row in doc["clickhouse"]["webhook_deliveries"]}
                    | {queued["webhook_id"] for queued in doc["queued_webhooks"]})
    before = _ann_rows(ch, all_leads, all_visitors, all_webhooks)

    async def erase(erasures):
        started = time.monotonic()
        job = await erasures.erase(SITE, "test", ANN)
        return job, await erasures.wait(SITE, job.erasure_id, timeout_s=120, poll_s=0.2), time.monotonic() - started

    job, done, took_s = asyncio.run(with_erasures(erase))
    # the access export: every row planted for her
    rows = doc["clickhouse"]
    assert set(doc["visitors"]) == set(ANN_DEVICES) and ann_lead in doc["leads"]
    assert {e["event_id"] for e in rows["events"]} == {f"{v}-{n}" for v in ANN_DEVICES for n in (1, 2)}
    assert {s["visitor_id"] for s in rows["sessions"]} == set(ANN_DEVICES)
    assert rows["identity_events"] and rows["visitor_leads"] and rows["lead_state"] and rows["lead_changes"]
    assert [e["rule_id"] for e in rows["rule_executions"]] == ["filled-a-form"]
    assert "interested" in {s["to_stage"] for s in rows["stage_changes"]}
    assert rows["webhook_deliveries"] and doc["queued_webhooks"] and doc["cards"] and doc["board_views"]["pipeline"]
    assert any(lead["email"] == ANN for lead in rows["leads"]) and doc["lead_state"][ann_lead]
    for table, n in before.items():
        if table == "webhook_deliveries":
            assert attempts_before_export <= len(rows[table]) <= n, (attempts_before_export, len(rows[table]), n)
        elif table in rows:
            assert len(rows[table]) == n, table

    assert done.status == DONE and done.counts["events"] == 4 and done.counts["redis:webhooks"] >= 1
    print(f"erasure of {sum(before.values())} rows in {len(job.mutations)} tables done in {took_s:.2f}s")
    after = _ann_rows(ch, all_leads, all_visitors, all_webhooks)
    assert after == {table: 0 for table in after}, after
    needles = [ANN.encode(), *(i.encode() for i in all_leads | all_visitors | all_webhooks)]
    assert _redis_mentions(settings, needles) == []
    audit = ch.execute("SELECT status, requested_by, stores, counts FROM erasures FINAL WHERE erasure_id = %(i)s",
                       {"i": job.erasure_id})
    assert audit[0][0] == DONE and audit[0][1] == "test" and "events" in audit[0][2]
    assert not [x for x in ch.execute("SELECT * FROM erasures") for n in needles if n.decode() in str(x)]

    # the worker dies; restarted, it sees Ann again on a third device (and one of her two), with new events of the others
    worker.kill()
    roles.remove(worker)
    roles.append(Role(settings, "worker-2", "worker", env=ENV).start())
    later = _people(10, NOW - 60_000) + [_event("v-ann-tablet", 20, NOW - 30_000, type="form_submit", email=ANN)]
    asyncio.run(produce(settings, later))
    wait_for(settings, "SELECT count() FROM events WHERE visitor_id IN %(v)s", 2 * len(others_before["events"]),
             180, roles, {"v": tuple(OTHERS)})
    wait_drained(settings, 120, roles)
    time.sleep(3)  # anything of hers that should not be there would arrive now
    assert _ann_rows(ch, all_leads, all_visitors | {"v-ann-tablet"}, all_webhooks) == {t: 0 for t in after}
    assert _redis_mentions(settings, needles + [b"v-ann-tablet"]) == []

    # boards rebuilt from board.commands (which still hold her card's updates): her card does not come back
    for role in roles:
        role.stop()
    assert rebuild_boards(settings) == 0
    assert not r.hexists(keys.board_cards(SITE, "pipeline"), f"lead:{ann_lead}")
    assert r.hexists(keys.board_cards(SITE, "pipeline"), f"lead:{known_lead_id(SITE, OTHERS['v-bob'])}")

    # the raw topic and the lead feed from their start, through fresh processors with only the ledger
    async def raw_processor(store):
        policy = sessionize.SessionPolicy(default=sessionize.SessionConfig(30 * 60_000, 60 * 60_000))
        return RawEventsProcessor(RawProcessorConfig(settings.topic(EVENTS_RAW.name), policy, Limits()),
                                  IdentityGraphStore(store, settings.name("ls")), settings.name("ls"), LookupTables())

    async def lead_processor(store):
        redis = aioredis.from_url(settings.redis_url)
        return LeadProcessor(SiteDefinitionsCache(DefinitionsStore(redis, settings.name("ls"))), None, settings.name("ls"))

    for topic, make in ((EVENTS_RAW, raw_processor), (LEADS_ACTIVITY, lead_processor)):
        produced = _produced(asyncio.run(_replay(settings, topic, make)))
        assert produced, topic.name  # the others' records are all there...
        assert not [v for v in produced if any(n in v for n in needles + [b"v-ann-tablet"])], topic.name  # ...hers not
        if topic is EVENTS_RAW:
            assert b"v-bob" in b"".join(produced) and b"v-carol" in b"".join(produced)

    others_after = _others(ch)
    assert others_after["leads"] == [row for row in others_before["leads"] if row[0] not in all_leads]
    assert len(others_after["leads"]) == 3  # bob's known lead; bob's and carol's anonymous ones
    assert set(others_before["events"]) < set(others_after["events"])  # theirs kept, the later ones added
    assert others_after["rule_executions"] == others_before["rule_executions"]
    r.close()
    ch.disconnect()


def test_a_guarded_commit_on_redis_writes_nothing_once_an_erasure_bumped_the_version(settings):
    """The runtime's guard on the real Redis (WATCH + compare in the commit's transaction), as on the twin."""
    from processors.runtime.state import PartitionCommit, RedisStateStore
    from processors.runtime.writes import WriteBatch

    async def run() -> tuple[bool, bool, object, int]:
        redis = aioredis.from_url(settings.redis_url)
        try:
            keys = RedisKeys(settings.name("ls"))
            store = RedisStateStore(redis, settings.name("ls"), "raw")
            writes = WriteBatch()
            writes.set_many({keys.visitor_state(SITE, "v-x"): b"state"})
            read = await store.read(keys.erasure_version)
            await redis.incr(keys.erasure_version)  # an erasure lands while the batch is held
            stale = await store.commit([PartitionCommit(0, -1, 3)], writes, guards={keys.erasure_version: read})
            written = await redis.get(keys.visitor_state(SITE, "v-x"))
            fresh = await store.commit([PartitionCommit(0, -1, 3)], writes,
                                       guards={keys.erasure_version: await store.read(keys.erasure_version)})
            return stale, fresh, written, (await store.partition_marks([0]))[0][0]
        finally:
            await redis.aclose()

    stale, fresh, written, applied = asyncio.run(run())
    assert (stale, written) == (False, None) and fresh and applied == 3
