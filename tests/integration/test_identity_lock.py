"""The fenced identity lock and the visitor state's time to live on the real Redis, and the `leads`
migration on ClickHouse 18.16."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from processors.identity_store import IdentityGraphStore
from processors.runtime.state import PartitionCommit, RedisStateStore
from schemas.identity import LeadRecord, LeadRow
from sinks import clickhouse
from sinks.table_sink import TABLES

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis(settings):
    client = aioredis.from_url(settings.redis_url)
    yield client
    await client.aclose()


def graph_write(prefix: str, value: bytes):
    return lambda pipe: pipe.mset({f"{prefix}:id:l:s\x1flead": value})


async def test_two_workers_one_of_whose_lease_expired_only_the_current_holder_writes(redis, settings):
    prefix = settings.name("ls")
    zombie_store, holder_store = RedisStateStore(redis, prefix), RedisStateStore(redis, prefix)
    zombie = await zombie_store.acquire("id:lock", lease_ms=100)
    assert zombie is not None
    await asyncio.sleep(0.2)  # the zombie's broker is slow: its lease runs out
    async with IdentityGraphStore(holder_store, prefix).locked() as holder:
        assert int(holder.token) > int(zombie.token)
        stale = PartitionCommit(0, -1, 5, 0, {f"{prefix}:v:s\x1fzombie": b"state"})
        assert not await zombie_store.commit([stale], also=graph_write(prefix, b"zombie"), fence=zombie)
        assert await redis.hgetall(f"{prefix}:wm") == {}
        assert await redis.get(f"{prefix}:v:s\x1fzombie") is None
        assert await redis.get(f"{prefix}:id:l:s\x1flead") is None
        await zombie_store.release(zombie)  # leaves the holder's lock alone
        assert await holder_store.acquire("id:lock", 1000) is None
        fresh = PartitionCommit(1, -1, 7, 0, {f"{prefix}:v:s\x1fholder": b"state"})
        assert await holder_store.commit([fresh], also=graph_write(prefix, b"holder"), fence=holder)
    assert await redis.get(f"{prefix}:id:l:s\x1flead") == b"holder"
    assert await redis.hget(f"{prefix}:wm", "1") == b"7"
    assert await redis.get(f"{prefix}:id:lock") is None  # released after the commit


async def test_a_commit_whose_lock_was_taken_over_while_unheld_writes_nothing(redis, settings):
    """The lease ran out and nobody holds the lock: the stale holder's commit still writes nothing."""
    prefix = settings.name("ls")
    store = RedisStateStore(redis, prefix)
    fence = await store.acquire("id:lock", 50)
    await asyncio.sleep(0.1)
    assert not await store.commit([PartitionCommit(0, -1, 1, 0, {f"{prefix}:k": b"v"})], fence=fence)
    assert await redis.get(f"{prefix}:k") is None


async def test_visitor_states_expire_and_graph_writes_do_not(redis, settings):
    prefix = settings.name("ls")
    day_ms = 86_400_000
    store = RedisStateStore(redis, prefix, state_ttl_ms=30 * day_ms)
    states = {f"{prefix}:v:s\x1fv{i}": f"state {i}".encode() for i in range(3)}
    commit = PartitionCommit(0, -1, 0, 0, states | {f"{prefix}:v:s\x1fgone": b""}, {f"{prefix}:v:s\x1fv0": 123})
    assert await store.commit([commit], also=graph_write(prefix, b"lead"))
    for key, value in states.items():
        assert await redis.get(key) == value
        assert 29 * day_ms < await redis.pttl(key) <= 30 * day_ms
    assert await redis.pttl(f"{prefix}:id:l:s\x1flead") == -1  # the identity graph never expires
    assert await store.due(0, 200) == [f"{prefix}:v:s\x1fv0"]


def test_lead_rows_keep_their_visitor_count_on_clickhouse_18(settings):
    client = clickhouse.connect(settings.clickhouse())
    spec = TABLES["leads"]
    capped = LeadRecord("lead_a", "s", "ann@initech.io", ["v1", "v2"], visitor_count=5000)
    clickhouse.insert_columnar(client, "leads", spec.columns, [spec.to_row(LeadRow.of(capped, 1).to_json())])
    client.execute("INSERT INTO leads (lead_id, site_id, visitors, version) VALUES", [("lead_old", "s", ["v"] * 3, 1)])
    rows = client.execute("SELECT lead_id, visitor_count, length(visitors) FROM leads FINAL ORDER BY lead_id")
    assert rows == [("lead_a", 5000, 2), ("lead_old", 3, 3)]
