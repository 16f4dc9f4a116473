"""Redis store for per-visitor sessionizer state, guarded by per-partition applied-offset watermarks.

Why Redis and not Faust tables: a Faust table's changelog write is not atomic with the source offset
commit (exactly_once is unreliable in faust-streaming), so a crash can apply an event twice. Here the
state of every visitor touched by a batch, the partition's applied offset and its stream time are
written in ONE Lua call that first checks the watermark is still the one the batch was computed from
(compare-and-set). A replayed batch finds its offsets already applied and is skipped; a zombie worker
that lost its partition in a rebalance fails the check and writes nothing. Any worker can pick up any
partition after a rebalance because the state lives outside the process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

_COMMIT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (cur or '-1') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
local st = tonumber(redis.call('HGET', KEYS[1], 'st:' .. ARGV[1]) or '0')
if tonumber(ARGV[4]) > st then redis.call('HSET', KEYS[1], 'st:' .. ARGV[1], ARGV[4]) end
for i = 3, #KEYS do
  local blob, deadline = ARGV[2 * i - 1], ARGV[2 * i]
  if blob == '' then redis.call('DEL', KEYS[i]) else redis.call('SET', KEYS[i], blob) end
  if deadline == '' then redis.call('ZREM', KEYS[2], KEYS[i]) else redis.call('ZADD', KEYS[2], deadline, KEYS[i]) end
end
return 1
"""


@dataclass
class PartitionCommit:
    """What one batch changes for one partition: applied offset, stream time, visitor states, deadlines."""

    partition: int
    expected_offset: int
    applied_offset: int
    stream_time_ms: int
    states: dict[str, bytes]
    deadlines: dict[str, int | None]


class SessionStateStore:
    def __init__(self, redis: aioredis.Redis, prefix: str = "ls"):
        self.redis = redis
        self.prefix = prefix
        self._commit = redis.register_script(_COMMIT)

    @property
    def _marks_key(self) -> str:
        return f"{self.prefix}:wm"

    def visitor_key(self, site_id: str, visitor_id: str) -> str:
        # \x1f cannot occur in ids: validation rejects control characters.
        return f"{self.prefix}:v:{site_id}\x1f{visitor_id}"

    def _deadlines_key(self, partition: int) -> str:
        return f"{self.prefix}:due:{partition}"

    async def load(self, keys: list[str]) -> dict[str, bytes | None]:
        if not keys:
            return {}
        return dict(zip(keys, await self.redis.mget(keys)))

    async def partition_marks(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        """(applied offset, stream time ms) per partition; (-1, 0) when never seen."""
        fields = [f for p in partitions for f in (str(p), f"st:{p}")]
        values = await self.redis.hmget(self._marks_key, fields) if fields else []
        return {
            p: (int(values[2 * i] or -1), int(values[2 * i + 1] or 0)) for i, p in enumerate(partitions)
        }

    async def commit(self, commits: list[PartitionCommit], also: Callable[[Pipeline], None] | None = None) -> list[bool]:
        """Apply every partition's commit in one atomic round trip (MULTI/EXEC); False where the watermark
        had moved. `also` queues further writes (the identity graph's) into the same transaction."""
        async with self.redis.pipeline(transaction=True) as pipe:
            if also is not None:
                also(pipe)
            for c in commits:
                keys = [self._marks_key, self._deadlines_key(c.partition), *c.states]
                args: list = [str(c.partition), str(c.expected_offset), str(c.applied_offset), str(c.stream_time_ms)]
                for key, blob in c.states.items():
                    deadline = c.deadlines.get(key)
                    args += [blob, "" if deadline is None else str(deadline)]
                await self._commit(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        return [bool(r) for r in results[-len(commits):]] if commits else []

    async def due(self, partition: int, until_ms: int, limit: int = 5000) -> list[str]:
        keys = await self.redis.zrangebyscore(self._deadlines_key(partition), "-inf", until_ms, start=0, num=limit)
        return [k.decode() if isinstance(k, bytes) else k for k in keys]
