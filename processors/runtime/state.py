"""Per-partition stage state, committed with a compare-and-set on an applied-offset watermark.

Why not Faust tables: a table's changelog write is not atomic with the source offset commit (exactly_once
is unreliable in faust-streaming), so a crash could apply an event twice. Here everything one batch
changes — the state of every key it touched, each partition's applied offset and stream time, the keys'
timer deadlines and any further writes of the stage (the identity graph's) — is written in ONE
transaction that applies only if every partition's watermark is still the one the batch was computed
from (WATCH + check + MULTI/EXEC). A replayed batch finds its offsets applied and is skipped; a zombie
worker that lost a partition in a rebalance writes nothing at all, not even the global writes. Any worker can pick up
any partition after a rebalance: the state lives outside the process.

Two implementations of one interface: `RedisStateStore` (production) and `MemoryStateStore` (unit tests
of a stage without servers).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import redis.asyncio as aioredis
from redis.exceptions import WatchError

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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
    async def commit(self, commits: list[PartitionCommit], also: Callable[[Writes], None] | None = None) -> bool: ...
    async def due(self, partition: int, until_ms: int, limit: int = 5000) -> list[str]: ...
    async def acquire(self, lock: str, token: str, lease_ms: int) -> bool: ...
    async def release(self, lock: str, token: str) -> None: ...


class RedisStateStore:
    """State of one stage under `prefix`; `namespace` keeps each stage's watermarks and timers apart."""

    def __init__(self, redis: aioredis.Redis, prefix: str, namespace: str = ""):
        self.redis = redis
        self.prefix = prefix
        self._marks_key = f"{prefix}:{namespace}wm"
        self._due_prefix = f"{prefix}:{namespace}due:"
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

    async def commit(self, commits: list[PartitionCommit], also: Callable[[Writes], None] | None = None) -> bool:
        """All of the batch or nothing: False (and nothing written) when any partition's watermark moved.
        `also` queues further writes into the same transaction. A concurrent commit of other partitions
        only makes the transaction run again."""
        if not commits:
            return True
        fields = [f for c in commits for f in (str(c.partition), f"st:{c.partition}")]
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._marks_key)
                    current = await pipe.hmget(self._marks_key, fields)
                    if any(int(current[2 * i] or -1) != c.expected_offset for i, c in enumerate(commits)):
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
        if written:
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

    async def acquire(self, lock: str, token: str, lease_ms: int) -> bool:
        return bool(await self.redis.set(f"{self.prefix}:{lock}", token, nx=True, px=lease_ms))

    async def release(self, lock: str, token: str) -> None:
        await self._release(keys=[f"{self.prefix}:{lock}"], args=[token])


class MemoryStateStore:
    """The same contract in a dict, for unit tests of a stage: same CAS, same deadlines, same lock."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.marks: dict[int, tuple[int, int]] = {}
        self.deadlines: dict[int, dict[str, int]] = {}
        self.locks: dict[str, tuple[str, float]] = {}

    async def load(self, keys: list[str]) -> dict[str, bytes | None]:
        return {k: self.values.get(k) for k in keys}

    async def partition_marks(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        return {p: self.marks.get(p, (-1, 0)) for p in partitions}

    async def commit(self, commits: list[PartitionCommit], also: Callable[[Writes], None] | None = None) -> bool:
        if any(self.marks.get(c.partition, (-1, 0))[0] != c.expected_offset for c in commits):
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
                else:
                    self.values.pop(key, None)
                deadline = c.deadlines.get(key)
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

    async def acquire(self, lock: str, token: str, lease_ms: int) -> bool:
        holder = self.locks.get(lock)
        if holder is not None and holder[1] > time.monotonic():
            return False
        self.locks[lock] = (token, time.monotonic() + lease_ms / 1000)
        return True

    async def release(self, lock: str, token: str) -> None:
        if self.locks.get(lock, ("",))[0] == token:
            del self.locks[lock]


async def hold_lock(store: StateStore, lock: str, token: str, lease_ms: int) -> None:
    """Wait for a store lock (short exponential polling: holders keep it for one batch)."""
    delay = 0.002
    while not await store.acquire(lock, token, lease_ms):
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
