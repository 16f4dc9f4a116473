"""Per-partition processor state, committed with a compare-and-set on an applied-offset watermark.

Why not Faust tables: a table's changelog write is not atomic with the source offset commit (exactly_once
is unreliable in faust-streaming), so a crash could apply an event twice. Here everything one batch
changes — the state of every key it touched, each partition's applied offset and stream time, the keys'
timer deadlines and any further writes of the processor (the identity graph's) — is written in ONE
transaction that applies only if every partition's watermark is still the one the batch was computed
from (WATCH + check + MULTI/EXEC). A replayed batch finds its offsets applied and is skipped; a zombie
worker that lost a partition in a rebalance writes nothing at all, not even the global writes. A commit
made under a store lock (the identity graph's) is fenced too: it applies only while the lock still holds
the token its holder got, so a holder whose lease expired writes nothing. Any worker can pick up any
partition after a rebalance: the state lives outside the process.

A store may give its states a time to live (idle visitors' sessionizer blobs): every write renews it.

Two implementations of one interface: `RedisStateStore` (production) and `MemoryStateStore` (unit tests
of a processor without servers).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import redis.asyncio as aioredis
from redis.exceptions import WatchError

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_SET_WITH_TTL = """
for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1]) end
return #KEYS
"""


@dataclass(frozen=True)
class Fence:
    """A taken store lock: `token` is a fencing token, a counter incremented each time `lock` is taken, so
    a holder whose lease expired can never hold the lock's current token again."""

    lock: str
    token: str


@dataclass
class PartitionCommit:
    """What one batch changes for one partition: applied offset, stream time, key states, deadlines.
    A state of b'' deletes the key; a deadline of None takes the key off the partition's timer."""

    partition: int
    expected_offset: int
    applied_offset: int
    stream_time_ms: int
    states: dict[str, bytes] = field(default_factory=dict)
    deadlines: dict[str, int | None] = field(default_factory=dict)


class Writes(Protocol):
    """The part of a transaction that extra writes may use (a redis pipeline, or the in-memory one)."""

    def mset(self, mapping: dict[str, bytes | str]) -> object: ...


class StateStore(Protocol):
    async def load(self, keys: list[str]) -> dict[str, bytes | None]: ...
    async def partition_marks(self, partitions: list[int]) -> dict[int, tuple[int, int]]: ...
    async def commit(self, commits: list[PartitionCommit], also: Callable[[Writes], None] | None = None,
                     fence: Fence | None = None) -> bool: ...
    async def due(self, partition: int, until_ms: int, limit: int = 5000) -> list[str]: ...
    async def acquire(self, lock: str, lease_ms: int) -> Fence | None: ...
    async def release(self, fence: Fence) -> None: ...


class RedisStateStore:
    """State of one processor under `prefix`; `namespace` keeps each processor's watermarks and timers apart.
    With `state_ttl_ms`, each state key expires that long after its last write."""

    def __init__(self, redis: aioredis.Redis, prefix: str, namespace: str = "", state_ttl_ms: int | None = None):
        self.redis = redis
        self.prefix = prefix
        self.state_ttl_ms = state_ttl_ms
        self._marks_key = f"{prefix}:{namespace}wm"
        self._due_prefix = f"{prefix}:{namespace}due:"
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)

    async def load(self, keys: list[str]) -> dict[str, bytes | None]:
        if not keys:
            return {}
        return dict(zip(keys, await self.redis.mget(keys)))

    async def partition_marks(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        """(applied offset, stream time ms) per partition; (-1, 0) when never seen."""
        fields = [f for p in partitions for f in (str(p), f"st:{p}")]
        values = await self.redis.hmget(self._marks_key, fields) if fields else []
        return {p: (int(values[2 * i] or -1), int(values[2 * i + 1] or 0)) for i, p in enumerate(partitions)}

    async def commit(self, commits: list[PartitionCommit], also: Callable[[Writes], None] | None = None,
                     fence: Fence | None = None) -> bool:
        """All of the batch or nothing: False (and nothing written) when any partition's watermark moved,
        or when `fence` is given and its lock no longer holds its token. `also` queues further writes into
        the same transaction. A concurrent commit of other partitions only makes the transaction run again;
        so does anyone taking the lock meanwhile (the lock key is watched), and then the token check fails."""
        if not commits:
            return True
        fields = [f for c in commits for f in (str(c.partition), f"st:{c.partition}")]
        watched = [self._marks_key] + ([self._lock_key(fence.lock)] if fence else [])
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(*watched)
                    current = await pipe.hmget(self._marks_key, fields)
                    stale = any(int(current[2 * i] or -1) != c.expected_offset for i, c in enumerate(commits))
                    if stale or (fence and await pipe.get(watched[1]) != fence.token.encode()):
                        await pipe.unwatch()
                        return False
                    pipe.multi()
                    if also is not None:
                        also(pipe)
                    for i, c in enumerate(commits):
                        self._queue(pipe, c, int(current[2 * i + 1] or 0))
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    def _queue(self, pipe, c: PartitionCommit, stream_time_ms: int) -> None:
        marks = {str(c.partition): c.applied_offset}
        if c.stream_time_ms > stream_time_ms:
            marks[f"st:{c.partition}"] = c.stream_time_ms
        pipe.hset(self._marks_key, mapping=marks)
        written = {k: v for k, v in c.states.items() if v}
        if written and self.state_ttl_ms:
            pipe.eval(_SET_WITH_TTL, len(written), *written, self.state_ttl_ms, *written.values())
        elif written:
            pipe.mset(written)
        deleted = [k for k, v in c.states.items() if not v]
        if deleted:
            pipe.delete(*deleted)
        due_key = f"{self._due_prefix}{c.partition}"
        timed = {k: d for k, d in c.deadlines.items() if d is not None}
        if timed:
            pipe.zadd(due_key, timed)
        untimed = [k for k, d in c.deadlines.items() if d is None]
        if untimed:
            pipe.zrem(due_key, *untimed)

    async def due(self, partition: int, until_ms: int, limit: int = 5000) -> list[str]:
        keys = await self.redis.zrangebyscore(f"{self._due_prefix}{partition}", "-inf", until_ms, start=0, num=limit)
        return [k.decode() if isinstance(k, bytes) else k for k in keys]

    def _lock_key(self, lock: str) -> str:
        return f"{self.prefix}:{lock}"

    async def acquire(self, lock: str, lease_ms: int) -> Fence | None:
        key = self._lock_key(lock)
        token = await self._acquire(keys=[key, f"{key}:fence"], args=[lease_ms])
        return None if token is None else Fence(lock, str(token))

    async def release(self, fence: Fence) -> None:
        await self._release(keys=[self._lock_key(fence.lock)], args=[fence.token])


class MemoryStateStore:
    """The same contract in a dict, for unit tests of a processor: same CAS, same deadlines, same fenced lock,
    same time to live (on the monotonic clock)."""

    def __init__(self, state_ttl_ms: int | None = None) -> None:
        self.state_ttl_ms = state_ttl_ms
        self.values: dict[str, bytes] = {}
        self.expiries: dict[str, float] = {}
        self.marks: dict[int, tuple[int, int]] = {}
        self.deadlines: dict[int, dict[str, int]] = {}
        self.locks: dict[str, tuple[str, float]] = {}
        self.fence_counters: dict[str, int] = {}

    async def load(self, keys: list[str]) -> dict[str, bytes | None]:
        now = time.monotonic()
        for key in keys:
            if self.expiries.get(key, now + 1) <= now:
                del self.values[key], self.expiries[key]
        return {k: self.values.get(k) for k in keys}

    async def partition_marks(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        return {p: self.marks.get(p, (-1, 0)) for p in partitions}

    def holds(self, fence: Fence) -> bool:
        holder = self.locks.get(fence.lock)
        return holder is not None and holder[0] == fence.token and holder[1] > time.monotonic()

    async def commit(self, commits: list[PartitionCommit], also: Callable[[Writes], None] | None = None,
                     fence: Fence | None = None) -> bool:
        if any(self.marks.get(c.partition, (-1, 0))[0] != c.expected_offset for c in commits):
            return False
        if fence is not None and not self.holds(fence):
            return False
        if also is not None:
            also(self)
        for c in commits:
            applied, stream_time = self.marks.get(c.partition, (-1, 0))
            self.marks[c.partition] = (c.applied_offset, max(stream_time, c.stream_time_ms))
            due = self.deadlines.setdefault(c.partition, {})
            for key, blob in c.states.items():
                if blob:
                    self.values[key] = blob
                    if self.state_ttl_ms:
                        self.expiries[key] = time.monotonic() + self.state_ttl_ms / 1000
                else:
                    self.values.pop(key, None)
                    self.expiries.pop(key, None)
            for key, deadline in c.deadlines.items():
                if deadline is None:
                    due.pop(key, None)
                else:
                    due[key] = deadline
        return True

    def mset(self, mapping: dict[str, bytes | str]) -> None:
        self.values.update({k: v.encode() if isinstance(v, str) else v for k, v in mapping.items()})

    async def due(self, partition: int, until_ms: int, limit: int = 5000) -> list[str]:
        due = self.deadlines.get(partition, {})
        return sorted((k for k, d in due.items() if d <= until_ms), key=lambda k: (due[k], k))[:limit]

    async def acquire(self, lock: str, lease_ms: int) -> Fence | None:
        holder = self.locks.get(lock)
        if holder is not None and holder[1] > time.monotonic():
            return None
        token = self.fence_counters[lock] = self.fence_counters.get(lock, 0) + 1
        self.locks[lock] = (str(token), time.monotonic() + lease_ms / 1000)
        return Fence(lock, str(token))

    async def release(self, fence: Fence) -> None:
        if self.locks.get(fence.lock, ("",))[0] == fence.token:
            del self.locks[fence.lock]


async def hold_lock(store: StateStore, lock: str, lease_ms: int) -> Fence:
    """Wait for a store lock (short exponential polling: holders keep it for one batch)."""
    delay = 0.002
    while (fence := await store.acquire(lock, lease_ms)) is None:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
    return fence
