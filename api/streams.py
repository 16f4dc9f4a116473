"""What the board streams may use: a Redis pool of their own, and how many of them may be open.

An open stream holds a Redis connection while it waits for the board's feed (XREAD BLOCK), so the streams
read through their own pool of at most `api_max_streams` connections, and that many streams at most are open
in one API process (503 beyond): the other requests never wait behind them, and Redis never sees more
connections than that. One API key may hold `api_max_streams_per_key` of them (429 beyond), so a leaked key
or a runaway script cannot take every stream.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis

from api.problems import Problem
from processors.board_store import BoardStore
from processors.runtime.redis_client import blocking_pool_from_url
from schemas.settings import Settings

RETRY_AFTER_S = "5"


class StreamSlot:
    """One open stream's place; released once, when the stream ends (or, if it never started, when it is
    garbage-collected)."""

    def __init__(self, slots: StreamSlots, key_id: str) -> None:
        self._slots, self.key_id, self._released = slots, key_id, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._slots.give_back(self.key_id)

    def release_with(self, owner: object) -> None:
        """Release when `owner` (the stream's event generator) is collected, in case it never runs."""
        weakref.finalize(owner, self.release)


class StreamSlots:
    def __init__(self, total: int, per_key: int) -> None:
        self.total, self.per_key = total, per_key
        self.open: Counter[str] = Counter()

    def take(self, key_id: str) -> StreamSlot:
        if self.open[key_id] >= self.per_key:
            raise Problem(429, "too many open streams for this key",
                          f"an API key may hold {self.per_key} open streams; close one first", "too_many_streams",
                          headers={"Retry-After": RETRY_AFTER_S})
        if sum(self.open.values()) >= self.total:
            raise Problem(503, "too many open streams", "the server holds as many streams as it may; try again later",
                          "too_many_streams", headers={"Retry-After": RETRY_AFTER_S})
        self.open[key_id] += 1
        return StreamSlot(self, key_id)

    def give_back(self, key_id: str) -> None:
        self.open[key_id] -= 1
        if self.open[key_id] <= 0:
            del self.open[key_id]


@dataclass
class Streams:
    store: BoardStore  # over the streams' own bounded pool
    slots: StreamSlots

    @classmethod
    @asynccontextmanager
    async def running(cls, settings: Settings) -> AsyncIterator[Streams]:
        pool = blocking_pool_from_url(settings.redis_url, max_connections=settings.api_max_streams,
                                                        timeout=5)
        redis = aioredis.Redis.from_pool(pool)  # closes the pool with it
        try:
            yield cls(BoardStore(redis, settings.name("ls")), StreamSlots(settings.api_max_streams,
                                                                          settings.api_max_streams_per_key))
        finally:
            await redis.aclose()
