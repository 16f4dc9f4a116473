"""The raw processor on the shared runtime, without servers: the in-memory state store (on the Redis twin)
and producer, and a clock the test holds.

Proves the order of effects that makes at-least-once delivery safe: a replayed batch is skipped, a
batch whose produce failed is replayed with the same outputs, a zombie that lost its partition writes
nothing, a batch that read its states across another worker's commit produces nothing, a partition resumes
after its watermark, and idle sessions close on the stream clock, by the declared timer. And what the runtime does for
the processor: unchanged states are not written again, and its versions come from the clock it was given.
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
from schemas.identity import IdentityEvent, LeadRow
from schemas.rules import MergeNotice, handover_id
from schemas.topics import EVENTS_DLQ, EVENTS_ENRICHED, IDENTITY, IDENTITY_LEADS, LEADS_ACTIVITY, SESSIONS
from tests.twins import Clock, RecordingStore, applied, count, records, states, values

NOW = int(time.time() * 1000)
POLICY = sessionize.SessionPolicy(default=sessionize.SessionConfig(inactivity_ms=30 * 60_000, grace_ms=60 * 60_000))


def event(i: int, visitor: str = "v1", **extra) -> bytes:
    return orjson.dumps({"event_id": f"e{i}", "site_id": "s", "type": "pageview", "visitor_id": visitor,
                         "ts": NOW - 3_600_000 + i * 1000, "url": f"https://acme.com/p{i}", **extra})


def messages(values: list[bytes], partition: int = 0, first_offset: int = 0) -> list[Message]:
    return [Message(partition, first_offset + i, None, v) for i, v in enumerate(values)]


def runner(store: MemoryStateStore | None = None, ttl_ms: int | None = None
           ) -> tuple[ProcessorRunner, MemoryStateStore, MemoryProducer]:
    store = store or MemoryStateStore()
    producer = MemoryProducer(EVENTS_DLQ)
    processor = RawEventsProcessor(RawProcessorConfig("events.raw", POLICY, Limits(), ttl_ms),
                                   IdentityGraphStore(store, "ls"), "ls", LookupTables())
    return ProcessorRunner(processor, store, producer, 4, EVENTS_DLQ, clock_us=Clock(NOW)), store, producer


async def test_a_batch_produces_events_sessions_identity_and_the_lead_feed():
    run, store, producer = runner()
    batch = messages([event(1), event(2, email="ann@initech.io", type="form_submit"), b"{broken"])
    outputs = await run.process(batch)
    assert count(outputs, EVENTS_ENRICHED) == 2 and count(outputs, EVENTS_DLQ) == 1
    assert count(outputs, SESSIONS) >= 1 and count(outputs, IDENTITY) >= 1
    feed = records(outputs, LEADS_ACTIVITY)  # each record typed by its header
    kinds = [r.kind if isinstance(r, IdentityEvent) else "notice" if isinstance(r, MergeNotice) else "event"
             for r in feed]
    assert kinds.count("event") == 2 and "lead_merged" in kinds  # the anonymous lead merged into ann's
    merge = next(r for r in feed if isinstance(r, IdentityEvent) and r.kind == "lead_merged")
    notice = next(r for r in feed if isinstance(r, MergeNotice))  # ann's lead is told, ahead of her event
    assert (notice.lead_id, notice.from_lead_id, notice.handover_id) == (
        merge.lead_id, merge.from_lead_id, handover_id(merge.identity_event_id))
    assert kinds.index("notice") < len(kinds) - 1 - kinds[::-1].index("event")
    assert await applied(store, 0) == 2
    # only what the lead processor acts on: the anonymous lead's creation and its visitor's link are not
    identity_changes = {(r.kind, bool(r.email)) for r in records(outputs, IDENTITY)}
    assert {("lead_created", False), ("visitor_linked", True)} <= identity_changes
    assert {(r.kind, bool(r.email)) for r in feed if isinstance(r, IdentityEvent)} == {
        ("lead_created", True), ("lead_merged", True), ("account_linked", True)}


async def test_a_replayed_batch_is_skipped_and_changes_nothing():
    run, store, producer = runner()
    batch = messages([event(i) for i in range(5)])
    await run.process(batch)
    state_before = states(store)
    assert await run.process(batch) is None
    assert states(store) == state_before and len(producer.sent) == 1


async def test_a_failed_produce_replays_the_same_outputs_and_commits_nothing_before():
    run, store, producer = runner()
    batch = messages([event(i) for i in range(5)])
    producer.fail_next = 1
    try:
        await run.process(batch)
    except ConnectionError:
        pass
    assert await applied(store, 0) == -1 and states(store) == {}  # nothing committed before the acks
    outputs = await run.process(batch)
    fresh_run, _, _ = runner()
    expected = await fresh_run.process(batch)
    assert values(outputs, EVENTS_ENRICHED) and len(values(outputs, EVENTS_ENRICHED)) == len(values(expected, EVENTS_ENRICHED))
    assert [orjson.loads(v)["session_id"] for v in values(outputs, EVENTS_ENRICHED)] == \
        [orjson.loads(v)["session_id"] for v in values(expected, EVENTS_ENRICHED)]


async def test_a_zombie_that_lost_its_partition_writes_nothing():
    store = MemoryStateStore()
    owner, _, _ = runner(store)
    zombie, _, _ = runner(store)
    await owner.process(messages([event(1)], first_offset=0))
    # both saw watermark 0; the new owner commits first, the zombie's compare-and-set must fail
    await owner.process(messages([event(2)], first_offset=1))
    before = states(store)
    zombie_store_view = {0: (0, 0)}
    zombie.store.partition_marks = lambda partitions: _marks(zombie_store_view, partitions)
    with pytest.raises(StaleBatch):
        await zombie.process(messages([event(3, visitor="v9")], first_offset=1))
    assert states(store) == before and await applied(store, 0) == 1  # not even the identity graph was touched


async def test_a_batch_that_read_its_states_across_another_workers_commit_produces_nothing():
    """Two workers on one partition (a zombie and the new owner): the other one commits the same record while
    this batch reads its states, which then hold that record already. Computed from them, the record would be
    a duplicate_event dead letter: nothing may be produced from such a mix."""
    store = MemoryStateStore()
    owner, _, _ = runner(store)
    late, _, late_producer = runner(store)
    await owner.process(messages([event(1)], first_offset=0))
    step = late.processor.step

    async def step_while_the_owner_commits(batch, fresh):
        await owner.process(messages([event(2)], first_offset=1))
        await step(batch, fresh)

    late.processor.step = step_while_the_owner_commits
    with pytest.raises(StaleBatch):
        await late.process(messages([event(2)], first_offset=1))
    assert late_producer.sent == [] and await applied(store, 0) == 1


async def test_a_partition_resumes_right_after_its_watermark():
    run, store, _ = runner()
    await run.process(messages([event(i) for i in range(5)]))
    assert await run.resume_offsets([0, 1]) == {0: 5, 1: 0}  # partition 1: nothing applied, from its start


async def _marks(view, partitions):
    return {p: view.get(p, (-1, 0)) for p in partitions}


async def test_idle_sessions_close_on_the_stream_clock():
    run, store, producer = runner()
    await run.process(messages([event(1)]))
    assert await run.process(messages([event(1)])) is None
    closed = await run.tick([0])  # first tick: the clock starts at the stream time
    run.clock_us.now_ms = NOW + 2 * 3_600_000
    later = await run.tick([0])
    upserts = [orjson.loads(v) for v in values(later, SESSIONS)]
    assert closed is None or not count(closed, SESSIONS)
    assert upserts and all(s["is_closed"] for s in upserts)
    run.clock_us.now_ms = NOW + 3 * 3_600_000
    assert await run.tick([0]) is None  # nothing left to close


async def test_the_idle_close_timer_is_the_visitors_declared_deadline():
    """The processor only names a deadline per visitor; the runtime keeps the due index, and the timer
    takes a closed visitor off it."""
    run, store, producer = runner()
    await run.process(messages([event(1), event(2, visitor="v2")]))
    key = run.processor.visitors.key("s", "v1")
    last_event_ms = NOW - 3_600_000 + 2000
    due = store.redis.zset(store.keys.due("raw", 0))
    assert set(due) == {key, run.processor.visitors.key("s", "v2")}
    assert due[key] == NOW - 3_600_000 + 1000 + POLICY.default.inactivity_ms + POLICY.default.grace_ms
    assert await store.due(0, last_event_ms) == []
    assert await run.tick([0]) is None  # the partition's stream clock starts at its last event: nothing due
    run.clock_us.now_ms = NOW + 2 * 3_600_000
    assert count(await run.tick([0]), SESSIONS) == 2  # it ran on with the wall clock: both sessions closed
    assert store.redis.zset(store.keys.due("raw", 0)) == {}


async def test_a_batch_that_changes_no_state_writes_none():
    """Copies of events already received change nothing: the runtime drops the byte-identical write."""
    store = RecordingStore()
    run, _, producer = runner(store)
    await run.process(messages([event(1), event(2)]))
    key = run.processor.visitors.key("s", "v1")
    assert key in store.written_keys()
    outputs = await run.process(messages([event(1), event(2)], first_offset=2))  # re-sent copies
    assert count(outputs, EVENTS_DLQ) == 2 and count(outputs, EVENTS_ENRICHED) == 0
    assert key not in store.written_keys()
    assert await applied(store, 0) == 3  # the watermark still moves on


async def test_visitor_state_expires_as_declared():
    run, store, _ = runner(ttl_ms=30 * 86_400_000)
    await run.process(messages([event(1)]))
    ttl = store.redis.ttl_ms(run.processor.visitors.key("s", "v1"))
    assert 29 * 86_400_000 < ttl <= 30 * 86_400_000
    lead_keys = [key for key in states(store) if key.startswith("ls:id:l:")]
    assert lead_keys and all(store.redis.ttl_ms(key) is None for key in lead_keys)  # the graph never expires


async def test_versions_come_from_the_clock_the_runtime_was_given():
    """Lead rows are versioned by the runner's clock: with a fixed clock two runs agree byte for byte."""
    batch = messages([event(1), event(2, email="ann@initech.io", type="form_submit")])
    first, _, _ = runner()
    second, _, _ = runner()
    one, two = await first.process(batch), await second.process(batch)
    rows = [LeadRow.from_json(v) for v in values(one, IDENTITY_LEADS)]
    assert rows and {row.version for row in rows} == {NOW * 1000}
    assert one.records == two.records
