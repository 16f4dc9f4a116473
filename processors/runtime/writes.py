"""Every write a processor's commit makes, behind one interface: `Writes`.

A processor never talks to Redis while it computes a batch. Whatever it wants written with the batch —
its states (the runtime writes those), the board views and feed, command results, queued webhooks, the
identity graph — goes into a `WriteBatch`, a plain recording of `Writes` calls. The state store replays
that recording into the batch's transaction, after the compare-and-set on the watermarks succeeded: onto
`RedisWrites` (the MULTI pipeline) in production, onto `MemoryRedis` (the in-memory twin) in unit tests.
So every processor runs, and is tested, without Redis, and what a unit test reads back from the twin is
what Redis would hold.

The operations are Redis's own, named for what they do. Two of them are one Lua call each on Redis:
- `set_many` with a time to live: redis-py costs ~15 µs of client CPU per pipelined command, one EVAL
  setting N keys ~2.5 µs per key (measured), and a batch writes hundreds of states;
- `enqueue_once`: a read-modify-write (add to the queue only when the id is new) that must be atomic.
The twin gives both the same semantics.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

from redis.asyncio.client import Pipeline

Value = bytes | str | int


class Writes(Protocol):
    """What a commit may write. Values are bytes (str and int are stored as their UTF-8 / decimal text)."""

    def set_many(self, values: Mapping[str, Value], ttl_ms: int | None = None) -> None:
        """SET every key (MSET); with `ttl_ms`, each expires that long after this write."""

    def set_if_absent(self, key: str, value: Value, ttl_ms: int) -> None:
        """SET NX PX: the first value written stays."""

    def delete(self, *keys: str) -> None:
        """DEL."""

    def hash_set(self, key: str, fields: Mapping[str, Value]) -> None:
        """HSET of several fields."""

    def hash_delete(self, key: str, *fields: str) -> None:
        """HDEL."""

    def zset_add(self, key: str, members: Mapping[str, int], only_new: bool = False) -> None:
        """ZADD: each member with its score (a member already there takes the new score; with `only_new`
        it keeps its own: ZADD NX)."""

    def zset_remove(self, key: str, *members: str) -> None:
        """ZREM."""

    def stream_add(self, key: str, fields: Mapping[str, Value], maxlen: int) -> None:
        """XADD with an automatic id, trimming the stream to about `maxlen` entries (MAXLEN ~)."""

    def increment(self, key: str) -> None:
        """INCR."""

    def enqueue_once(self, records: str, member: str, record: Value, due: str, due_ms: int) -> None:
        """Put `record` in hash `records` under `member` and schedule `member` in zset `due` at `due_ms` —
        only if `records` has no `member` yet (pending or kept after it finished): replaying an enqueue
        adds nothing."""


class WriteBatch:
    """A recording of `Writes` calls, replayed onto a real target at commit time (`replay`). Holds the
    calls in order; nothing is merged or reordered, so a replay does exactly what direct calls would."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def replay(self, target: Writes) -> None:
        for name, args in self.calls:
            getattr(target, name)(*args)

    def set_many(self, values: Mapping[str, Value], ttl_ms: int | None = None) -> None:
        self.calls.append(("set_many", (values, ttl_ms)))

    def set_if_absent(self, key: str, value: Value, ttl_ms: int) -> None:
        self.calls.append(("set_if_absent", (key, value, ttl_ms)))

    def delete(self, *keys: str) -> None:
        self.calls.append(("delete", keys))

    def hash_set(self, key: str, fields: Mapping[str, Value]) -> None:
        self.calls.append(("hash_set", (key, fields)))

    def hash_delete(self, key: str, *fields: str) -> None:
        self.calls.append(("hash_delete", (key, *fields)))

    def zset_add(self, key: str, members: Mapping[str, int], only_new: bool = False) -> None:
        self.calls.append(("zset_add", (key, members, only_new)))

    def zset_remove(self, key: str, *members: str) -> None:
        self.calls.append(("zset_remove", (key, *members)))

    def stream_add(self, key: str, fields: Mapping[str, Value], maxlen: int) -> None:
        self.calls.append(("stream_add", (key, fields, maxlen)))

    def increment(self, key: str) -> None:
        self.calls.append(("increment", (key,)))

    def enqueue_once(self, records: str, member: str, record: Value, due: str, due_ms: int) -> None:
        self.calls.append(("enqueue_once", (records, member, record, due, due_ms)))


_SET_WITH_TTL = """
for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1]) end
return #KEYS
"""
_ENQUEUE_ONCE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  return 1
end
return 0
"""


class RedisWrites:
    """`Writes` queued on a redis-py pipeline (the commit's MULTI transaction): nothing runs until it executes."""

    __slots__ = ("pipe",)

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def set_many(self, values: Mapping[str, Value], ttl_ms: int | None = None) -> None:
        if not values:
            return
        if ttl_ms:
            self.pipe.eval(_SET_WITH_TTL, len(values), *values, ttl_ms, *values.values())
        else:
            self.pipe.mset(values)

    def set_if_absent(self, key: str, value: Value, ttl_ms: int) -> None:
        self.pipe.set(key, value, px=ttl_ms, nx=True)

    def delete(self, *keys: str) -> None:
        if keys:
            self.pipe.delete(*keys)

    def hash_set(self, key: str, fields: Mapping[str, Value]) -> None:
        if fields:
            self.pipe.hset(key, mapping=fields)

    def hash_delete(self, key: str, *fields: str) -> None:
        if fields:
            self.pipe.hdel(key, *fields)

    def zset_add(self, key: str, members: Mapping[str, int], only_new: bool = False) -> None:
        if members:
            self.pipe.zadd(key, members, nx=only_new)

    def zset_remove(self, key: str, *members: str) -> None:
        if members:
            self.pipe.zrem(key, *members)

    def stream_add(self, key: str, fields: Mapping[str, Value], maxlen: int) -> None:
        self.pipe.xadd(key, fields, maxlen=maxlen, approximate=True)

    def increment(self, key: str) -> None:
        self.pipe.incr(key)

    def enqueue_once(self, records: str, member: str, record: Value, due: str, due_ms: int) -> None:
        self.pipe.eval(_ENQUEUE_ONCE, 2, records, due, member, record, due_ms)


def _bytes(value: Value) -> bytes:
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else str(value)).encode()


class MemoryRedis:
    """The in-memory twin of the Redis a processor writes: strings (with expiry on the monotonic clock),
    hashes, sorted sets and streams, with the same semantics for every `Writes` operation (a test replays
    one recording on both and compares), and plain reads for tests and for `MemoryStateStore`. Values are
    kept as bytes, as Redis returns them."""

    def __init__(self) -> None:
        self.strings: dict[str, bytes] = {}
        self.expires_at: dict[str, float] = {}
        self.hashes: dict[str, dict[str, bytes]] = {}
        self.zsets: dict[str, dict[str, float]] = {}
        self.streams: dict[str, list[tuple[str, dict[str, bytes]]]] = {}
        self._last_stream_ms = 0
        self._stream_seq = 0

    # -- writes --------------------------------------------------------------------------------------

    def set_many(self, values: Mapping[str, Value], ttl_ms: int | None = None) -> None:
        for key, value in values.items():
            self._set(key, _bytes(value), ttl_ms)

    def set_if_absent(self, key: str, value: Value, ttl_ms: int) -> None:
        if self.get(key) is None:
            self._set(key, _bytes(value), ttl_ms)

    def _set(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        self.strings[key] = value
        if ttl_ms:
            self.expires_at[key] = time.monotonic() + ttl_ms / 1000
        else:
            self.expires_at.pop(key, None)

    def delete(self, *keys: str) -> None:
        for key in keys:
            self.strings.pop(key, None)
            self.expires_at.pop(key, None)
            self.hashes.pop(key, None)
            self.zsets.pop(key, None)
            self.streams.pop(key, None)

    def hash_set(self, key: str, fields: Mapping[str, Value]) -> None:
        self.hashes.setdefault(key, {}).update({name: _bytes(value) for name, value in fields.items()})

    def hash_delete(self, key: str, *fields: str) -> None:
        table = self.hashes.get(key, {})
        for name in fields:
            table.pop(name, None)
        if not table:
            self.hashes.pop(key, None)

    def zset_add(self, key: str, members: Mapping[str, int], only_new: bool = False) -> None:
        zset = self.zsets.setdefault(key, {})
        zset.update({member: score for member, score in members.items() if not (only_new and member in zset)})

    def zset_remove(self, key: str, *members: str) -> None:
        zset = self.zsets.get(key, {})
        for member in members:
            zset.pop(member, None)
        if not zset:
            self.zsets.pop(key, None)

    def stream_add(self, key: str, fields: Mapping[str, Value], maxlen: int) -> None:
        now_ms = int(time.time() * 1000)
        if now_ms > self._last_stream_ms:
            self._last_stream_ms, self._stream_seq = now_ms, 0
        else:
            self._stream_seq += 1
        entries = self.streams.setdefault(key, [])
        entries.append((f"{self._last_stream_ms}-{self._stream_seq}", {k: _bytes(v) for k, v in fields.items()}))
        del entries[:-maxlen]

    def increment(self, key: str) -> None:
        self._set(key, str(int(self.get(key) or 0) + 1).encode(), None)

    def enqueue_once(self, records: str, member: str, record: Value, due: str, due_ms: int) -> None:
        if member not in self.hashes.get(records, {}):
            self.hash_set(records, {member: record})
            self.zset_add(due, {member: due_ms})

    # -- reads ---------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        if self.expires_at.get(key, float("inf")) <= time.monotonic():
            self.delete(key)
        return self.strings.get(key)

    def mget(self, keys: list[str]) -> list[bytes | None]:
        return [self.get(key) for key in keys]

    def ttl_ms(self, key: str) -> int | None:
        """Milliseconds left before `key` expires; None when it never does (or does not exist)."""
        expires_at = self.expires_at.get(key)
        return None if expires_at is None or self.get(key) is None else int((expires_at - time.monotonic()) * 1000)

    def hash(self, key: str) -> dict[str, bytes]:
        return dict(self.hashes.get(key, {}))

    def zset(self, key: str) -> dict[str, float]:
        """Members and scores, lowest score first (ties by member, as Redis orders them)."""
        return dict(sorted(self.zsets.get(key, {}).items(), key=lambda item: (item[1], item[0])))

    def stream(self, key: str) -> list[tuple[str, dict[str, bytes]]]:
        return list(self.streams.get(key, []))
