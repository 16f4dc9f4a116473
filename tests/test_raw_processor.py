"""The raw processor on the shared runtime, without servers: an in-memory state store and producer.

Proves the order of effects that makes at-least-once delivery safe: a replayed batch is skipped, a
batch whose produce failed is replayed with the same outputs, a zombie that lost its partition writes
nothing, and idle sessions close on the stream clock.
"""

from __future__ import annotations

import time

import orjson
import pytest

from processors import sessionize
from processors.enrich import Limits
from processors.identity_store import IdentityGraphStore
from processors.lookup_tables import LookupTables
from processors.raw_processor import RawEventsProcessor, RawProcessorConfig
from processors.runtime.ingest import Message
from processors.runtime.producer import MemoryProducer
from processors.runtime.runner import ProcessorRunner, StaleBatch
from processors.runtime.state import MemoryStateStore
from schemas.topics import EVENTS_DLQ, EVENTS_ENRICHED, IDENTITY, LEADS_ACTIVITY, SESSIONS, decode_lead_activity

NOW = int(time.time() * 1000)
POLICY = sessionize.SessionPolicy(default=sessionize.SessionConfig(inactivity_ms=30 * 60_000, grace_ms=60 * 60_000))


def event(i: int, visitor: str = "v1", **extra) -> bytes:
    return orjson.dumps({"event_id": f"e{i}", "site_id": "s", "type": "pageview", "visitor_id": visitor,
                         "ts": NOW - 3_600_000 + i * 1000, "url": f"https://acme.com/p{i}", **extra})


def messages(values: list[bytes], partition: int = 0, first_offset: int = 0) -> list[Message]:
    return [Message(partition, first_offset + i, None, v) for i, v in enumerate(values)]


def runner(store: MemoryStateStore | None = None) -> tuple[ProcessorRunner, MemoryStateStore, MemoryProducer]:
    store = store or MemoryStateStore()
    producer = MemoryProducer()
    processor = RawEventsProcessor(RawProcessorConfig("events.raw", 4, POLICY, Limits()), store,
                                   IdentityGraphStore(store, "ls"), "ls", LookupTables())
    return ProcessorRunner(processor, store, producer), store, producer


async def test_a_batch_produces_events_sessions_identity_and_the_lead_feed():
    run, store, producer = runner()
    batch = messages([event(1), event(2, email="ann@initech.io", type="form_submit"), b"{broken"])
    outputs = await run.process(batch)
    assert outputs.count(EVENTS_ENRICHED) == 2 and outputs.count(EVENTS_DLQ) == 1
    assert outputs.count(SESSIONS) >= 1 and outputs.count(IDENTITY) >= 1
    feed = [decode_lead_activity(v) for v in outputs.values(LEADS_ACTIVITY)]
    kinds = [getattr(r, "kind", "event") for r in feed]
    assert kinds.count("event") == 2 and "lead_merged" in kinds  # the anonymous lead merged into ann's
    assert store.marks[0][0] == 2


async def test_a_replayed_batch_is_skipped_and_changes_nothing():
    run, store, producer = runner()
    batch = messages([event(i) for i in range(5)])
    await run.process(batch)
    state_before = dict(store.values)
    assert await run.process(batch) is None
    assert store.values == state_before and len(producer.sent) == 1


async def test_a_failed_produce_replays_the_same_outputs_and_commits_nothing_before():
    run, store, producer = runner()
    batch = messages([event(i) for i in range(5)])
    producer.fail_next = 1
    try:
        await run.process(batch)
    except ConnectionError:
        pass
    assert store.marks == {} and store.values == {}  # nothing committed before the acks
    outputs = await run.process(batch)
    fresh_run, _, _ = runner()
    expected = await fresh_run.process(batch)
    assert outputs.values(EVENTS_ENRICHED) and len(outputs.values(EVENTS_ENRICHED)) == len(expected.values(EVENTS_ENRICHED))
    assert [orjson.loads(v)["session_id"] for v in outputs.values(EVENTS_ENRICHED)] == \
        [orjson.loads(v)["session_id"] for v in expected.values(EVENTS_ENRICHED)]


async def test_a_zombie_that_lost_its_partition_writes_nothing():
    store = MemoryStateStore()
    owner, _, _ = runner(store)
    zombie, _, _ = runner(store)
    await owner.process(messages([event(1)], first_offset=0))
    # both saw watermark 0; the new owner commits first, the zombie's compare-and-set must fail
    await owner.process(messages([event(2)], first_offset=1))
    before = dict(store.values)
    zombie_store_view = {0: (0, 0)}
    zombie.store.partition_marks = lambda partitions: _marks(zombie_store_view, partitions)
    with pytest.raises(StaleBatch):
        await zombie.process(messages([event(3, visitor="v9")], first_offset=1))
    assert store.values == before and store.marks[0][0] == 1  # not even the identity graph was touched


async def _marks(view, partitions):
    return {p: view.get(p, (-1, 0)) for p in partitions}


async def test_idle_sessions_close_on_the_stream_clock():
    run, store, producer = runner()
    await run.process(messages([event(1)]))
    assert await run.process(messages([event(1)])) is None
    closed = await run.tick([0], wall_now_ms=NOW)  # first tick: the clock starts at the stream time
    later = await run.tick([0], wall_now_ms=NOW + 2 * 3_600_000)
    upserts = [orjson.loads(v) for v in later.values(SESSIONS)]
    assert closed is None or not closed.count(SESSIONS)
    assert upserts and all(s["is_closed"] for s in upserts)
    assert await run.tick([0], wall_now_ms=NOW + 3 * 3_600_000) is None  # nothing left to close
