"""The identity graph's adapter without servers (an in-memory state store): the fenced lock, the prefetch,
and idle visitor state that expires. The same store contract on the real Redis is in
tests/integration/test_identity_lock.py.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from processors import identity, sessionize
from processors.accounts import AccountsContext
from processors.enrich import Limits, validate_and_enrich
from processors.identity_store import IdentityGraphStore
from processors.lookup_tables import LookupTables
from processors.raw_processor import RawEventsProcessor, RawProcessorConfig
from processors.runtime.batch import Batch
from processors.runtime.ingest import Message
from processors.runtime.producer import MemoryProducer, Outputs
from processors.runtime.runner import ProcessorRunner, StaleBatch
from processors.runtime.state import MemoryStateStore, PartitionCommit
from processors.runtime.writes import WriteBatch
from schemas.events import EnrichedEvent
from schemas.identity import LeadRecord, VisitorLink
from schemas.topics import EVENTS_DLQ
from tests.twins import Clock, applied, states

NOW = int(time.time() * 1000)
POLICY = sessionize.SessionPolicy()
ANN = identity.known_lead_id("s", "ann@initech.io")


def form(event_id: str, visitor: str, email: str = "ann@initech.io") -> bytes:
    return orjson.dumps({"event_id": event_id, "site_id": "s", "type": "form_submit", "visitor_id": visitor,
                         "ts": NOW - 60_000, "url": "https://acme.com/contact", "email": email})


class SlowProducer(MemoryProducer):
    """A broker that takes `delay_s` to acknowledge: longer than the identity lock's lease."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(EVENTS_DLQ)
        self.delay_s = delay_s

    async def send(self, outputs: Outputs) -> None:
        await asyncio.sleep(self.delay_s)
        await super().send(outputs)


def worker(store: MemoryStateStore, producer: MemoryProducer, lease_ms: int = 30_000,
           ttl_ms: int | None = None) -> ProcessorRunner:
    processor = RawEventsProcessor(RawProcessorConfig("events.raw", POLICY, Limits(), ttl_ms),
                                   IdentityGraphStore(store, "ls", lease_ms), "ls", LookupTables())
    return ProcessorRunner(processor, store, producer, 4, EVENTS_DLQ, clock_us=Clock(NOW))


def stored_lead(store: MemoryStateStore, lead_id: str) -> LeadRecord:
    return LeadRecord.from_json(store.redis.get(store.keys.identity_lead("s", lead_id)))


async def test_a_worker_whose_lock_lease_expired_commits_nothing() -> None:
    """A slow broker holds worker A past the 50 ms lease; B takes the lock and commits Ann's second
    browser. Unfenced, A's commit would then overwrite Ann's record with its stale copy (losing B's
    browser); fenced, A writes nothing at all, and its retry builds on B's graph."""
    store = MemoryStateStore()
    slow = worker(store, SlowProducer(0.3), lease_ms=50)
    fast = worker(store, MemoryProducer(EVENTS_DLQ))  # takes the lock once A's lease ran out; its own is long
    slow_batch = [Message(0, 0, None, form("e-laptop", "laptop"))]
    stalled = asyncio.create_task(slow.process(slow_batch))
    await asyncio.sleep(0.1)  # A holds the lock, waiting for its broker; its lease has run out
    await fast.process([Message(1, 0, None, form("e-phone", "phone"))])
    before = states(store)
    with pytest.raises(StaleBatch):
        await stalled
    assert states(store) == before and await applied(store, 0) == -1
    assert stored_lead(store, ANN).visitors == ["phone"]
    slow.producer.delay_s = 0  # the broker recovers
    slow.processor.identity.lease_ms = 30_000  # and the retry fits in the lease however busy this machine is
    await slow.process(slow_batch)
    assert stored_lead(store, ANN).visitors == ["laptop", "phone"]


async def test_fence_tokens_grow_and_a_stale_holder_can_neither_commit_nor_release() -> None:
    store = MemoryStateStore()
    first = await store.acquire("id:lock", lease_ms=20)
    assert first is not None and await store.acquire("id:lock", lease_ms=20) is None
    await asyncio.sleep(0.05)
    second = await store.acquire("id:lock", lease_ms=30_000)
    assert second is not None and int(second.token) > int(first.token)
    await store.release(first)  # the stale holder's release leaves the new holder's lock alone
    assert await store.acquire("id:lock", lease_ms=30_000) is None
    writes = WriteBatch()
    writes.set_many({"k": b"v", "graph": b"x"})
    assert not await store.commit([PartitionCommit(0, -1, 0)], writes, fence=first)
    assert states(store) == {} and await applied(store, 0) == -1
    assert await store.commit([PartitionCommit(0, -1, 0)], writes, fence=second)
    assert states(store) == {"k": b"v", "graph": b"x"} and await applied(store, 0) == 0


async def test_prefetch_loads_the_lead_a_linked_lead_merged_into() -> None:
    """A visitor a capped anonymous lead did not list still points at it after the merge: the prefetch
    must bring the survivor too, or the resolver would recreate it empty."""
    store = MemoryStateStore()
    graph = IdentityGraphStore(store, "ls")
    changes = identity.IdentityChanges(
        visitors={("s", "unlisted"): VisitorLink("lead_imported", 0)},
        leads={("s", "lead_imported"): LeadRecord("lead_imported", "s", merged_into=ANN),
               ("s", ANN): LeadRecord(ANN, "s", "ann@initech.io", ["listed"], visitor_count=2)},
    )
    writing = Batch(store, Outputs(4), NOW, Clock(NOW), {})
    graph.write(writing, changes)
    writing.finish()
    assert await store.commit([PartitionCommit(0, -1, 0)], writing.writes)
    event = pageview_of("unlisted")
    prefetched = await graph.prefetch(Batch(store, Outputs(4), NOW, Clock(NOW), {}), [event])
    assert ("s", ANN) in prefetched.leads
    result = identity.resolve([event], identity.InMemoryIdentityStore(prefetched), AccountsContext())
    assert result.lead_ids == [ANN]
    assert prefetched.leads["s", ANN].visitor_count == 2  # the survivor as stored, not a new empty lead


def pageview_of(visitor: str) -> EnrichedEvent:
    value = orjson.dumps({"event_id": "e1", "site_id": "s", "type": "pageview", "visitor_id": visitor, "ts": NOW})
    event = validate_and_enrich(value, NOW)
    assert isinstance(event, EnrichedEvent)
    return event


async def test_the_timer_forgets_a_visitor_whose_state_expired() -> None:
    store = MemoryStateStore()
    run = worker(store, MemoryProducer(EVENTS_DLQ), ttl_ms=50)
    await run.process([Message(0, 0, None, form("e1", "v1"))])
    key, due = store.keys.visitor_state("s", "v1"), store.keys.due("raw", 0)
    assert key in states(store) and key in store.redis.zset(due)
    await asyncio.sleep(0.1)
    await run.tick([0])  # the first tick starts the partition's clock at its stream time
    run.clock_us.now_ms = NOW + 3 * 3_600_000
    assert await run.tick([0]) is not None  # due: only the deadline changes
    assert key not in states(store) and key not in store.redis.zset(due)


def test_the_leads_column_migration_runs_on_current_clickhouse() -> None:
    from chdb import session as chdb_session

    from sinks import clickhouse
    from sinks.table_sink import TABLES

    sess = chdb_session.Session()
    try:
        sess.query("CREATE DATABASE identity_limits")
        sess.query("USE identity_limits")
        for _, path in clickhouse.migration_files():
            for statement in clickhouse.split_statements(path.read_text()):
                sess.query(statement.rstrip(";"))
        columns = orjson.loads(sess.query("DESCRIBE TABLE leads", "JSON").bytes())["data"]
        assert tuple(c["name"] for c in columns) == TABLES["leads"].columns
        sess.query("INSERT INTO leads (lead_id, site_id, visitors, version) VALUES ('old', 's', ['a', 'b'], 1)")
        assert sess.query("SELECT visitor_count FROM leads", "CSV").bytes().strip() == b"2"
    finally:
        sess.cleanup()
