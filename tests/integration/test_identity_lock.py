"""The fenced identity lock and the visitor state's time to live on the real Redis, and the `leads`
migration on ClickHouse 18.16."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from processors.identity_store import IdentityGraphStore
from processors.runtime.state import PartitionCommit, RedisStateStore
from processors.runtime.writes import WriteBatch
from schemas.redis_keys import IDENTITY_LOCK, RedisKeys
from schemas.identity import LeadRecord, LeadRow
from sinks import clickhouse
from sinks.table_sink import TABLES

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis(settings):
    client = aioredis.from_url(settings.redis_url)
    yield client
    await client.aclose()


def writes(keys: RedisKeys, visitor: str, lead_value: bytes) -> WriteBatch:
    """A batch's writes: a visitor's state and a lead of the identity graph."""
    batch = WriteBatch()
    batch.set_many({keys.visitor_state("s", visitor): b"state"})
    batch.set_many({keys.identity_lead("s", "lead"): lead_value})
    return batch


async def test_two_workers_one_of_whose_lease_expired_only_the_current_holder_writes(redis, settings):
    prefix = settings.name("ls")
    keys = RedisKeys(prefix)
    zombie_store, holder_store = RedisStateStore(redis, prefix, "raw"), RedisStateStore(redis, prefix, "raw")
    zombie = await zombie_store.acquire(IDENTITY_LOCK, lease_ms=100)
    assert zombie is not None
    await asyncio.sleep(0.2)  # the zombie's broker is slow: its lease runs out
    async with IdentityGraphStore(holder_store, prefix).locked() as holder:
        assert int(holder.token) > int(zombie.token)
        stale = PartitionCommit(0, -1, 5)
        assert not await zombie_store.commit([stale], writes(keys, "zombie", b"zombie"), fence=zombie)
        assert await redis.hgetall(keys.watermarks("raw")) == {}
        assert await redis.get(keys.visitor_state("s", "zombie")) is None
        assert await redis.get(keys.identity_lead("s", "lead")) is None
        await zombie_store.release(zombie)  # leaves the holder's lock alone
        assert await holder_store.acquire(IDENTITY_LOCK, 1000) is None
        fresh = PartitionCommit(1, -1, 7)
        assert await holder_store.commit([fresh], writes(keys, "holder", b"holder"), fence=holder)
    assert await redis.get(keys.identity_lead("s", "lead")) == b"holder"
    assert await redis.hget(keys.watermarks("raw"), "1") == b"7"
    assert await redis.get(keys.lock(IDENTITY_LOCK)) is None  # released after the commit


async def test_a_commit_whose_lock_was_taken_over_while_unheld_writes_nothing(redis, settings):
    """The lease ran out and nobody holds the lock: the stale holder's commit still writes nothing."""
    prefix = settings.name("ls")
    store = RedisStateStore(redis, prefix, "raw")
    fence = await store.acquire(IDENTITY_LOCK, 50)
    await asyncio.sleep(0.1)
    assert not await store.commit([PartitionCommit(0, -1, 1)], writes(RedisKeys(prefix), "v", b"lead"), fence=fence)
    assert await redis.get(RedisKeys(prefix).visitor_state("s", "v")) is None


async def test_visitor_states_expire_and_graph_writes_do_not(redis, settings):
    prefix = settings.name("ls")
    keys = RedisKeys(prefix)
    day_ms = 86_400_000
    store = RedisStateStore(redis, prefix, "raw")
    await redis.set(keys.visitor_state("s", "gone"), b"old")
    states = {keys.visitor_state("s", f"v{i}"): f"state {i}".encode() for i in range(3)}
    batch = WriteBatch()
    batch.set_many(states, ttl_ms=30 * day_ms)  # as the runtime writes a state declared with a time to live
    batch.delete(keys.visitor_state("s", "gone"))
    batch.set_many({keys.identity_lead("s", "lead"): b"lead"})
    commit = PartitionCommit(0, -1, 0, 0, {keys.visitor_state("s", "v0"): 123})
    assert await store.commit([commit], batch)
    for key, value in states.items():
        assert await redis.get(key) == value
        assert 29 * day_ms < await redis.pttl(key) <= 30 * day_ms
    assert await redis.get(keys.visitor_state("s", "gone")) is None
    assert await redis.pttl(keys.identity_lead("s", "lead")) == -1  # the identity graph never expires
    assert await store.due(0, 200) == [keys.visitor_state("s", "v0")]


def test_lead_rows_keep_their_visitor_count_on_clickhouse_18(settings):
    client = clickhouse.connect(settings.clickhouse())
    spec = TABLES["leads"]
    capped = LeadRecord("lead_a", "s", "ann@initech.io", ["v1", "v2"], visitor_count=5000)
    clickhouse.insert_columnar(client, "leads", spec.columns, [spec.to_row(LeadRow.of(capped, 1).to_json())])
    client.execute("INSERT INTO leads (lead_id, site_id, visitors, version) VALUES", [("lead_old", "s", ["v"] * 3, 1)])
    rows = client.execute("SELECT lead_id, visitor_count, length(visitors) FROM leads FINAL ORDER BY lead_id")
    assert rows == [("lead_a", 5000, 2), ("lead_old", 3, 3)]
