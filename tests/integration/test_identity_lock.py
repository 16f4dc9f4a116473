"""The fenced identity lock (one per site) and the visitor state's time to live on the real Redis, and the
`leads` migration on ClickHouse 18.16."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from processors.identity_store import IdentityGraphStore
from processors.runtime.state import PartitionCommit, RedisStateStore
from processors.runtime.writes import WriteBatch
from schemas.redis_keys import IDENTITY_LOCK, RedisKeys, identity_lock
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
    zombie = await zombie_store.acquire(identity_lock("s"), lease_ms=100)
    assert zombie is not None
    await asyncio.sleep(0.2)  # the zombie's broker is slow: its lease runs out
    async with IdentityGraphStore(holder_store, prefix).locked(["s"]) as (holder,):
        assert int(holder.token) > int(zombie.token)
        stale = PartitionCommit(0, -1, 5)
        assert not await zombie_store.commit([stale], writes(keys, "zombie", b"zombie"), fence=zombie)
        assert await redis.hgetall(keys.watermarks("raw")) == {}
        assert await redis.get(keys.visitor_state("s", "zombie")) is None
        assert await redis.get(keys.identity_lead("s", "lead")) is None
        await zombie_store.release(zombie)  # leaves the holder's lock alone
        assert await holder_store.acquire(identity_lock("s"), 1000) is None
        fresh = PartitionCommit(1, -1, 7)
        assert await holder_store.commit([fresh], writes(keys, "holder", b"holder"), fence=holder)
    assert await redis.get(keys.identity_lead("s", "lead")) == b"holder"
    assert await redis.hget(keys.watermarks("raw"), "1") == b"7"
    assert await redis.get(keys.lock(identity_lock("s"))) is None  # released after the commit


async def test_two_sites_lock_holders_run_concurrently_and_one_site_still_excludes(redis, settings):
    """Two raw workers busy with different sites never wait on each other; two with the same site do."""
    prefix = settings.name("ls")
    first, second = (IdentityGraphStore(RedisStateStore(redis, prefix, "raw"), prefix) for _ in range(2))
    entered: list[str] = []
    release = asyncio.Event()

    async def hold(graph: IdentityGraphStore, site: str) -> None:
        async with graph.locked([site]):
            entered.append(site)
            await release.wait()

    holder_a = asyncio.create_task(hold(first, "site-a"))
    holder_b = asyncio.create_task(hold(second, "site-b"))
    for _ in range(100):
        if len(entered) == 2:
            break
        await asyncio.sleep(0.01)
    assert sorted(entered) == ["site-a", "site-b"]  # both hold their site's lock at once
    same_site = asyncio.create_task(hold(second, "site-a"))
    await asyncio.sleep(0.3)
    assert sorted(entered) == ["site-a", "site-b"]  # site-a's second holder still waits
    release.set()
    await asyncio.wait_for(asyncio.gather(holder_a, holder_b, same_site), 5)
    assert entered[2:] == ["site-a"]  # and gets the lock once the first let it go
    assert await redis.keys(f"{prefix}:id:lock:*[^e]") == []  # every lock released (fence counters stay)


async def test_a_batch_of_two_sites_commits_only_while_it_holds_both_locks(redis, settings):
    """A batch carrying two sites holds both sites' locks; if either lease ran out and another worker took
    that site's lock, the batch writes nothing."""
    prefix = settings.name("ls")
    keys = RedisKeys(prefix)
    store, other = RedisStateStore(redis, prefix, "raw"), RedisStateStore(redis, prefix, "raw")
    graph = IdentityGraphStore(store, prefix, lease_ms=100)
    async with graph.locked(["site-b", "site-a", "site-b"]) as fences:
        assert [f.lock for f in fences] == [identity_lock("site-a"), identity_lock("site-b")]
        await asyncio.sleep(0.2)  # both leases run out
        taken = await other.acquire(identity_lock("site-b"), 30_000)  # a worker of site-b moves on
        assert taken is not None
        assert await store.acquire(identity_lock("site-a"), 100) is not None  # site-a's lease lapsed too
        assert not await store.commit([PartitionCommit(0, -1, 3)], writes(keys, "v", b"stale"), fence=fences)
    assert await redis.get(keys.identity_lead("s", "lead")) is None
    assert await redis.hgetall(keys.watermarks("raw")) == {}
    assert await redis.get(keys.lock(identity_lock("site-b"))) == taken.token.encode()  # left alone
    async with IdentityGraphStore(other, prefix).locked(["site-c", "site-d"]) as fences:
        assert await other.commit([PartitionCommit(0, -1, 3)], writes(keys, "v", b"fresh"), fence=fences)
    assert await redis.get(keys.identity_lead("s", "lead")) == b"fresh"


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
