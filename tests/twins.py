"""Reading back what a processor did on the runtime's in-memory twins (MemoryStateStore on MemoryRedis,
MemoryProducer), and the clock unit tests hand the runner."""

from __future__ import annotations

from processors.runtime.producer import Outputs
from processors.runtime.state import MemoryStateStore
from schemas.redis_keys import IDENTITY_LOCK
from schemas.topics import Headers, Topic


def values(outputs: Outputs, topic: Topic) -> list[bytes]:
    """The values produced to `topic`, partition by partition, each in produce order."""
    return [value for (name, _), records in sorted(outputs.records.items()) if name == topic.name
            for _, value, _ in records]


def count(outputs: Outputs, topic: Topic) -> int:
    return len(values(outputs, topic))


def produced(outputs: Outputs, topic: Topic) -> list[tuple[bytes, Headers]]:
    """(value, headers) of every record produced to `topic`, as a consumer would read them back."""
    return [(value, headers) for (name, _), items in sorted(outputs.records.items()) if name == topic.name
            for _, value, headers in items]


def records(outputs: Outputs, topic: Topic) -> list:
    """The records produced to a shared topic, decoded by their record-type headers."""
    return [topic.decode(value, headers) for (name, _), items in sorted(outputs.records.items())
            if name == topic.name for _, value, headers in items]


def sent(producer, topic: Topic) -> list[bytes]:
    """Every value a MemoryProducer sent to `topic`, batch after batch."""
    return [value for outputs in producer.sent for value in values(outputs, topic)]


async def applied(store: MemoryStateStore, partition: int) -> int:
    """The partition's applied-offset watermark as stored (-1: nothing applied yet)."""
    return int(store.redis.hash(store.keys.watermarks(store.processor)).get(str(partition), -1))


class Clock:
    """A wall clock that stands still until a test moves it (epoch milliseconds in, microseconds out)."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms * 1000



def states(store: MemoryStateStore) -> dict[str, bytes]:
    """Every live string the store holds but the identity lock's: the processor's states and the graph."""
    lock = store.keys.lock(IDENTITY_LOCK)
    return {key: value for key in list(store.redis.strings)
            if not key.startswith(lock) and (value := store.redis.get(key)) is not None}


class RecordingStore(MemoryStateStore):
    """A MemoryStateStore that keeps the writes of every commit it is asked for (committed or not)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commits: list[list[tuple[str, tuple]]] = []

    async def commit(self, commits, writes=None, fence=None, guards=None) -> bool:
        self.commits.append(list(writes.calls) if writes is not None else [])
        return await super().commit(commits, writes, fence, guards)

    def written_keys(self, commit: int = -1) -> set[str]:
        """The keys the plain sets of one commit wrote (the last by default)."""
        return {key for name, args in self.commits[commit] if name == "set_many" for key in args[0]}
