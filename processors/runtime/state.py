"""Per-partition processor state: what a processor declares (`StateSpec`) and where it lives (`StateStore`),
committed with a compare-and-set on an applied-offset watermark.

Why not Faust tables: a table's changelog write is not atomic with the source offset commit (exactly_once
is unreliable in faust-streaming), so a crash could apply an event twice. Here everything one batch
changes — the state of every key it touched, each partition's applied offset and stream time, the keys'
timer deadlines and every further write of the processor (the identity graph, the board views, queued
webhooks) — is written in ONE transaction that applies only if every partition's watermark is still the
one the batch was computed from (WATCH + check + MULTI/EXEC). A replayed batch finds its offsets applied
and is skipped; a zombie worker that lost a partition in a rebalance writes nothing at all, not even the
global writes. A commit made under a store lock (the identity graph's) is fenced too: it applies only while
the lock still holds the token its holder got, so a holder whose lease expired writes nothing. Any worker
can pick up any partition after a rebalance: the state lives outside the process.

Two implementations of one interface: `RedisStateStore` (production) and `MemoryStateStore` (unit tests of
a processor without servers, on the `MemoryRedis` twin). Both queue a commit through `Writes`, with the
same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, Sequence, TypeVar, Union

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from processors.runtime.writes import MemoryRedis, RedisWrites, WriteBatch, Writes
from schemas.redis_keys import RedisKeys

V = TypeVar("V")


@dataclass(frozen=True, eq=False)
class StateSpec(Generic[V]):
    """One kind of state a processor keeps per key: how it is keyed, stored and kept.

    - `key`: the key of one state (a layout from schemas/redis_keys.py);
    - `encode` / `decode`: the bytes in Redis; the runtime writes a state only when its bytes changed;
    - `ttl_ms`: each write renews the key's time to live (None: it never expires);
    - `keep_decoded`: keep the decoded value of what this worker last wrote, keyed by its exact bytes, so
      the next batch of a busy key compares bytes instead of decoding them again (large states, such as an
      account card with thousands of leads; see decoded.py). Such a value is handed out as `copy(value)`,
      since the kept one must never change.
    """

    name: str
    key: Callable[..., str]
    encode: Callable[[V], bytes]
    decode: Callable[[bytes], V]
    ttl_ms: int | None = None
    keep_decoded: bool = False
    copy: Callable[[V], V] = lambda value: value


@dataclass(frozen=True)
class Fence:
    """A taken store lock: `token` is a fencing token, a counter incremented each time `lock` is taken, so
    a holder whose lease expired can never hold the lock's current token again."""

    lock: str
    token: str


Fences = Union[Fence, Sequence[Fence], None]
"""What a commit must still hold: no lock, one, or several (a batch of several sites holds each site's)."""


def _as_fences(fence: Fences) -> tuple[Fence, ...]:
    if fence is None:
        return ()
    return (fence,) if isinstance(fence, Fence) else tuple(fence)


@dataclass
class PartitionCommit:
    """What one batch changes for one partition besides its writes: applied offset, stream time, deadlines.
    A deadline of None takes the key off the partition's timer."""

    partition: int
    expected_offset: int
    applied_offset: int
    stream_time_ms: int = 0
    deadlines: dict[str, int | None] = field(default_factory=dict)


class StateStore(Protocol):
    async def load(self, keys: list[str]) -> dict[str, bytes | None]: ...
    async def partition_marks(self, partitions: list[int]) -> dict[int, tuple[int, int]]: ...
    async def commit(self, commits: list[PartitionCommit], writes: WriteBatch | None = None,
                     fence: Fences = None, guards: dict[str, bytes | None] | None = None) -> bool: ...
    async def read(self, key: str) -> bytes | None: ...
    async def read_hash(self, key: str) -> dict[str, bytes]: ...
    async def due(self, partition: int, until_ms: int, limit: int = 5000) -> list[str]: ...
    async def acquire(self, lock: str, lease_ms: int) -> Fence | None: ...
    async def release(self, fence: Fence) -> None: ...


def _queue_partition(target: Writes, keys: RedisKeys, processor: str, commit: PartitionCommit,
                     stored_stream_time_ms: int) -> None:
    """A partition's watermark, stream time (it only moves forward) and deadlines, queued on `target`."""
    marks = {str(commit.partition): commit.applied_offset}
    if commit.stream_time_ms > stored_stream_time_ms:
        marks[f"st:{commit.partition}"] = commit.stream_time_ms
    target.hash_set(keys.watermarks(processor), marks)
    due = keys.due(processor, commit.partition)
    target.zset_add(due, {key: deadline for key, deadline in commit.deadlines.items() if deadline is not None})
    target.zset_remove(due, *(key for key, deadline in commit.deadlines.items() if deadline is None))


def _marks(values: list, partitions: list[int]) -> dict[int, tuple[int, int]]:
    """(applied offset, stream time ms) per partition from HMGET of [p, st:p, ...]; (-1, 0) when never seen."""
    return {p: (int(values[2 * i] or -1), int(values[2 * i + 1] or 0)) for i, p in enumerate(partitions)}


def _mark_fields(partitions: list[int]) -> list[str]:
    return [f for p in partitions for f in (str(p), f"st:{p}")]


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


class RedisStateStore:
    """The state of `processor` (raw, lead or board: its own watermarks and timer index) under `prefix`."""

    def __init__(self, redis: aioredis.Redis, prefix: str, processor: str):
        self.redis = redis
        self.keys = RedisKeys(prefix)
        self.processor = processor
        self._marks_key = self.keys.watermarks(processor)
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)

    async def load(self, keys: list[str]) -> dict[str, bytes | None]:
        if not keys:
            return {}
        return dict(zip(keys, await self.redis.mget(keys)))

    async def partition_marks(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        fields = _mark_fields(partitions)
        return _marks(await self.redis.hmget(self._marks_key, fields) if fields else [], partitions)

    async def read(self, key: str) -> bytes | None:
        return await self.redis.get(key)

    async def read_hash(self, key: str) -> dict[str, bytes]:
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in (await self.redis.hgetall(key)).items()}

    async def commit(self, commits: list[PartitionCommit], writes: WriteBatch | None = None,
                     fence: Fences = None, guards: dict[str, bytes | None] | None = None) -> bool:
        """All of the batch or nothing: False (and nothing written) when any partition's watermark moved,
        when a lock of `fence` (one fence or several) no longer holds its token, or when a guarded key
        (`guards`: key -> the bytes the batch read, see Batch.guard) holds other bytes now. A concurrent commit
        of other partitions only makes the transaction run again; so does anyone taking a lock or writing a
        guarded key meanwhile (both are watched), and then their check fails."""
        if not commits:
            return True
        fences = _as_fences(fence)
        fields = _mark_fields([c.partition for c in commits])
        guards = guards or {}
        locks = [self.keys.lock(f.lock) for f in fences]
        tokens = [f.token.encode() for f in fences]
        watched = [self._marks_key, *locks, *guards]
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(*watched)
                    current = await pipe.hmget(self._marks_key, fields)
                    stale = any(int(current[2 * i] or -1) != c.expected_offset for i, c in enumerate(commits))
                    if not stale and guards:
                        now = await pipe.mget(list(guards))
                        stale = any(value != expected for value, expected in zip(now, guards.values()))
                    if stale or (locks and await pipe.mget(locks) != tokens):
                        await pipe.unwatch()
                        return False
                    pipe.multi()
                    target = RedisWrites(pipe)
                    if writes is not None:
                        writes.replay(target)
                    for i, c in enumerate(commits):
                        _queue_partition(target, self.keys, self.processor, c, int(current[2 * i + 1] or 0))
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    async def due(self, partition: int, until_ms: int, limit: int = 5000) -> list[str]:
        keys = await self.redis.zrangebyscore(self.keys.due(self.processor, partition), "-inf", until_ms,
                                              start=0, num=limit)
        return [k.decode() if isinstance(k, bytes) else k for k in keys]

    async def acquire(self, lock: str, lease_ms: int) -> Fence | None:
        token = await self._acquire(keys=[self.keys.lock(lock), self.keys.lock_fence(lock)], args=[lease_ms])
        return None if token is None else Fence(lock, str(token))

    async def release(self, fence: Fence) -> None:
        await self._release(keys=[self.keys.lock(fence.lock)], args=[fence.token])


class MemoryStateStore:
    """The same contract on the `MemoryRedis` twin (`redis`), for unit tests of a processor: same keys, same
    CAS, same deadlines, same fenced lock, same time to live. Several stores may share one twin, as the
    processors of one worker share one Redis."""

    def __init__(self, redis: MemoryRedis | None = None, prefix: str = "ls", processor: str = "raw"):
        self.redis = redis if redis is not None else MemoryRedis()
        self.keys = RedisKeys(prefix)
        self.processor = processor

    async def load(self, keys: list[str]) -> dict[str, bytes | None]:
        return dict(zip(keys, self.redis.mget(keys)))

    async def partition_marks(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        return self._stored_marks(partitions)

    def _stored_marks(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        marks = self.redis.hash(self.keys.watermarks(self.processor))
        return _marks([marks.get(f) for f in _mark_fields(partitions)], partitions)

    def holds(self, fence: Fence) -> bool:
        return self.redis.get(self.keys.lock(fence.lock)) == fence.token.encode()

    async def read(self, key: str) -> bytes | None:
        return self.redis.get(key)

    async def read_hash(self, key: str) -> dict[str, bytes]:
        return self.redis.hash(key)

    async def commit(self, commits: list[PartitionCommit], writes: WriteBatch | None = None,
                     fence: Fences = None, guards: dict[str, bytes | None] | None = None) -> bool:
        if not commits:
            return True
        current = self._stored_marks([c.partition for c in commits])
        if any(current[c.partition][0] != c.expected_offset for c in commits):
            return False
        if any(self.redis.get(key) != expected for key, expected in (guards or {}).items()):
            return False
        if not all(self.holds(f) for f in _as_fences(fence)):
            return False
        if writes is not None:
            writes.replay(self.redis)
        for c in commits:
            _queue_partition(self.redis, self.keys, self.processor, c, current[c.partition][1])
        return True

    async def due(self, partition: int, until_ms: int, limit: int = 5000) -> list[str]:
        due = self.redis.zset(self.keys.due(self.processor, partition))
        return [key for key, deadline in due.items() if deadline <= until_ms][:limit]

    async def acquire(self, lock: str, lease_ms: int) -> Fence | None:
        if self.redis.get(self.keys.lock(lock)) is not None:
            return None
        self.redis.increment(self.keys.lock_fence(lock))
        token = self.redis.get(self.keys.lock_fence(lock)).decode()
        self.redis.set_many({self.keys.lock(lock): token}, ttl_ms=lease_ms)
        return Fence(lock, token)

    async def release(self, fence: Fence) -> None:
        if self.holds(fence):
            self.redis.delete(self.keys.lock(fence.lock))


async def hold_lock(store: StateStore, lock: str, lease_ms: int) -> Fence:
    """Wait for a store lock (short exponential polling: holders keep it for one batch)."""
    delay = 0.002
    while (fence := await store.acquire(lock, lease_ms)) is None:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
    return fence


async def hold_locks(store: StateStore, locks: Sequence[str], lease_ms: int) -> list[Fence]:
    """Wait for several store locks, taken one by one in sorted order, so that two holders wanting
    overlapping sets never wait on each other in a circle. On any failure the locks already taken are
    released."""
    fences: list[Fence] = []
    try:
        for lock in sorted(set(locks)):
            fences.append(await hold_lock(store, lock, lease_ms))
    except BaseException:
        for taken in fences:
            await store.release(taken)
        raise
    return fences
