"""The in-memory twin keeps Redis's semantics: one recording of every `Writes` operation, replayed on the
real Redis (through the MULTI pipeline, as a commit does) and on `MemoryRedis`, leaves the same data."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from processors.runtime.writes import MemoryRedis, RedisWrites, WriteBatch
from schemas.redis_keys import RedisKeys

pytestmark = pytest.mark.integration
NAMES = ("a", "b", "gone", "ttl", "first", "n")


def every_write(prefix: str) -> WriteBatch:
    keys = RedisKeys(prefix)
    def k(name: str) -> str:  # test-only keys, inside this test's namespace
        return f"{prefix}:{name}"

    batch = WriteBatch()
    batch.set_many({k("a"): b"1", k("b"): "two", k("gone"): b"x"})
    batch.set_many({k("ttl"): b"expires"}, ttl_ms=60_000)
    batch.set_if_absent(k("first"), b"first", 60_000)
    batch.set_if_absent(k("first"), b"second", 60_000)  # the first value stays
    batch.delete(k("gone"), k("never"))
    batch.hash_set(k("h"), {"f1": b"v1", "f2": 2, "f3": "three"})
    batch.hash_delete(k("h"), "f2", "missing")
    batch.zset_add(k("z"), {"m1": 5, "m2": 7})
    batch.zset_add(k("z"), {"m1": 9, "m3": 1}, only_new=True)  # m1 keeps 5
    batch.zset_add(k("z"), {"m2": 8})  # m2 takes 8
    batch.zset_remove(k("z"), "m3", "missing")
    for i in range(5):
        batch.stream_add(k("s"), {"type": "card", "data": f"{i}".encode()}, maxlen=1000)
    batch.increment(k("n"))
    batch.increment(k("n"))
    batch.enqueue_once(keys.webhook_requests, "wh1", b"first", keys.webhook_due, 10)
    batch.enqueue_once(keys.webhook_requests, "wh1", b"again", keys.webhook_due, 20)  # known: nothing added
    batch.enqueue_once(keys.webhook_requests, "wh2", b"other", keys.webhook_due, 30)
    return batch


async def read_back(redis, prefix: str) -> dict:
    keys = RedisKeys(prefix)
    def k(name: str) -> str:  # test-only keys, inside this test's namespace
        return f"{prefix}:{name}"

    return {
        "strings": {name: await redis.get(k(name)) for name in NAMES},
        "expires": {name: await redis.pttl(k(name)) > 0 for name in ("a", "ttl", "first")},
        "hash": await redis.hgetall(k("h")),
        "zset": await redis.zrange(k("z"), 0, -1, withscores=True),
        "stream": [fields for _, fields in await redis.xrange(k("s"))],
        "queue": await redis.hgetall(keys.webhook_requests),
        "due": await redis.zrange(keys.webhook_due, 0, -1, withscores=True),
    }


def read_twin(twin: MemoryRedis, prefix: str) -> dict:
    keys = RedisKeys(prefix)
    def k(name: str) -> str:  # test-only keys, inside this test's namespace
        return f"{prefix}:{name}"

    return {
        "strings": {name: twin.get(k(name)) for name in NAMES},
        "expires": {name: (twin.ttl_ms(k(name)) or 0) > 0 for name in ("a", "ttl", "first")},
        "hash": {field.encode(): value for field, value in twin.hash(k("h")).items()},
        "zset": [(member.encode(), score) for member, score in twin.zset(k("z")).items()],
        "stream": [{name.encode(): value for name, value in fields.items()} for _, fields in twin.stream(k("s"))],
        "queue": {field.encode(): value for field, value in twin.hash(keys.webhook_requests).items()},
        "due": [(member.encode(), score) for member, score in twin.zset(keys.webhook_due).items()],
    }


async def test_a_recording_leaves_the_same_data_in_redis_and_in_the_twin(settings):
    prefix = settings.name("ls")
    redis = aioredis.from_url(settings.redis_url)
    try:
        async with redis.pipeline(transaction=True) as pipe:
            every_write(prefix).replay(RedisWrites(pipe))
            await pipe.execute()
        real = await read_back(redis, prefix)
    finally:
        await redis.aclose()
    twin = MemoryRedis()
    every_write(prefix).replay(twin)
    assert read_twin(twin, prefix) == real
    assert real["strings"]["first"] == b"first" and real["queue"] == {b"wh1": b"first", b"wh2": b"other"}
    assert real["zset"] == [(b"m1", 5.0), (b"m2", 8.0)] and real["strings"]["n"] == b"2"
