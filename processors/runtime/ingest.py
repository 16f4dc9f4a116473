"""The ingest loop every processor and sink runs on: batches from one topic, offsets committed after each
batch.

Why a plain aiokafka consumer group and not a Faust agent on the hot path: Faust's per-message stream
machinery (an Event object and a task per message, the take buffer) cost tens of microseconds per message
— about as much as enrichment, sessionization and identity together — so the batch loop measured about
2x the agent's throughput; and `take()` acks in a `finally` block, so a batch that failed could be
committed. Here the offsets of a batch are committed only after its handler returned, and a partition is
handed over in a rebalance only after the batch in flight is done.

A batch whose handler keeps failing for a reason other than an outage (see backoff.py) goes to the
consumer's `isolate`, which sets the failing records aside as dead letters: the partition moves on.

A processor's state store, not Kafka, says where a newly assigned partition resumes (`resume_at`): Kafka's
committed offset can be ahead of the state when the store lost its last writes (a Redis replica promoted
before it had them), and starting there would skip records the state never saw.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from processors.runtime.backoff import retry_until_done
from schemas.settings import BatchConfig, KafkaConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    """What a processor needs of a Kafka message (`headers`: a shared topic's record type; see schemas/topics.py)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()


def consumer(kafka: KafkaConfig, group: str | None) -> AIOKafkaConsumer:
    """The consumer settings every LeadStream reader uses: manual commits, from the earliest offset, big
    fetches. `group` None: no consumer group (partitions assigned by hand, e.g. the benchmark's baseline)."""
    return AIOKafkaConsumer(
        **kafka.client_options(), group_id=group and kafka.group(group), enable_auto_commit=False,
        auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024,
    )


PROCESSOR_COMMIT_EVERY_S = 1.0
"""How often a processor commits its Kafka offsets (and once more on a clean stop): its state's watermarks,
not Kafka, say where it resumes (`resume_at`), so a commit per batch (a write to the broker's offsets log
each time) bought nothing but load. The sinks, which resume at Kafka's offsets, commit after every batch."""

TOP_UP_MS = 10
"""How long a processor's ingest waits for the records produced while its previous batch ran (see `_fetch`)."""

Handler = Callable[[Sequence[Message]], Awaitable[object]]
Isolate = Callable[[Sequence[Message], BaseException], Awaitable[object]]
ResumeAt = Callable[[list[int]], Awaitable[dict[int, int]]]
"""The offset each of these partitions resumes at (the sinks have none: they resume at Kafka's commit)."""


class BatchIngest:
    """Feeds batches of `topic` to `handler` until stopped. `fill`: keep fetching until the batch is full
    or its time window is over (sinks, which want big inserts; when a window ends: see `FlushCadence`)
    rather than handling whatever is there (processors, which want low latency; `top_up_ms`: see `_fetch`).
    `isolate`: how to get a poison batch through record by record (None: retry it forever). `resume_at`:
    where assigned partitions resume (None: Kafka's committed offset)."""

    def __init__(self, kafka: KafkaConfig, topic: str, group: str, batch: BatchConfig, handler: Handler,
                 fill: bool = False, on_assigned: Callable[[list[int]], None] = lambda partitions: None,
                 isolate: Isolate | None = None, resume_at: ResumeAt | None = None,
                 top_up_ms: int = TOP_UP_MS):
        self.kafka, self.topic, self.group, self.batch = kafka, topic, group, batch
        self.handler = handler
        self.isolate = isolate
        self.resume_at = resume_at
        self.fill = fill
        self.top_up_ms = top_up_ms
        self.on_assigned = on_assigned
        self.consumer: AIOKafkaConsumer | None = None
        self.in_flight = asyncio.Lock()
        self.stopping = False
        self.pending: dict[TopicPartition, int] = {}  # offsets handled but not yet committed to Kafka
        self.flushes = FlushCadence(batch.wait_ms / 1000)  # when a fill batch closes
        self.committed_at = 0.0

    def assigned_partitions(self) -> list[int]:
        return sorted(tp.partition for tp in self.consumer.assignment()) if self.consumer else []

    async def start(self) -> None:
        self.consumer = consumer(self.kafka, self.group)
        self.consumer.subscribe([self.kafka.topic(self.topic)], listener=_FinishBatchFirst(self))
        await self.consumer.start()

    async def stop(self) -> None:
        self.stopping = True
        if self.consumer is not None:
            async with self.in_flight:
                await self.commit_pending()
                await self.consumer.stop()

    async def run(self, stop: Callable[[], bool]) -> None:
        """The loop: fetch a batch, hand it over until it goes through, commit its offsets."""
        while not stop() and not self.stopping:
            batches = await self._fetch(stop)
            messages = [Message(m.partition, m.offset, m.key, m.value, m.headers) for ms in batches.values() for m in ms]
            if not messages:
                continue
            isolate = None if self.isolate is None else (lambda err: self.isolate(messages, err))
            async with self.in_flight:
                done = await retry_until_done(lambda: self.handler(messages), f"{self.group}: batch of {len(messages)}",
                                              log, stopping=lambda: stop() or self.stopping, isolate=isolate)
                if done:
                    self.pending.update({tp: ms[-1].offset + 1 for tp, ms in batches.items()})
                    if self.resume_at is None or time.monotonic() >= self.committed_at + PROCESSOR_COMMIT_EVERY_S:
                        await self.commit_pending()

    async def commit_pending(self) -> None:
        """Commit the offsets of the batches handled so far. A commit refused because partitions moved in a
        rebalance loses nothing: their new owner starts from the last committed offset (a processor: from
        its state's watermark), and the watermark makes the replay a no-op."""
        offsets, self.pending = self.pending, {}
        self.committed_at = time.monotonic()
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as err:
            log.warning("%s: offset commit refused (%s); the new owner replays from the last commit", self.group, err)

    async def _fetch(self, stop: Callable[[], bool]) -> dict:
        if not self.fill:
            batches = await self.consumer.getmany(timeout_ms=self.batch.wait_ms, max_records=self.batch.size)
            count = sum(len(ms) for ms in batches.values())
            if batches and count < self.batch.size:
                # What getmany handed out was prefetched when the previous batch started: aiokafka fetches no
                # more from a broker while any of its partitions has records waiting, so those records are a
                # whole batch old, and the ones produced meanwhile would wait for the batch after this one.
                # Taking them now (the fetch they need went out when the first getmany drained the buffer)
                # costs one round trip and saves a batch's duration of latency on every hop.
                top_up = await self.consumer.getmany(timeout_ms=self.top_up_ms,
                                                    max_records=self.batch.size - count)
                for tp, ms in top_up.items():
                    batches.setdefault(tp, []).extend(ms)
            return batches
        batches: dict = {}
        count = 0
        deadline = self.flushes.next(time.monotonic())
        while count < self.batch.size and not stop():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            for tp, ms in (await self.consumer.getmany(timeout_ms=left_ms, max_records=self.batch.size - count)).items():
                batches.setdefault(tp, []).extend(ms)
                count += len(ms)
        return batches


class FlushCadence:
    """When a sink's batches close: every `window_s`, on a cadence of its own.

    The window includes the insert of the batch before: a record produced while that insert ran waits at
    most one window, not the insert and then a whole window. Each sink starts at a random phase, so the
    sinks of a process (one per table, fed by the same worker batches) do not all insert at the same moment:
    a dozen inserts at once slowed each other and the workers sharing the box. An insert that outlasts its
    window starts a new cadence, at a random phase again."""

    def __init__(self, window_s: float, phase: Callable[[], float] = random.random):
        self.window_s, self.phase = window_s, phase
        self.due: float | None = None

    def next(self, now: float) -> float:
        """The deadline of the batch starting now (never more than a window away: a batch that filled up
        early moves the cadence)."""
        if self.due is None or self.due <= now:
            self.due = now + self.window_s * (0.5 + self.phase() / 2)
        deadline = min(self.due, now + self.window_s)
        self.due = deadline + self.window_s
        return deadline


class _FinishBatchFirst(ConsumerRebalanceListener):
    """A partition is handed over only after the batch in flight is produced, stored and committed."""

    def __init__(self, ingest: BatchIngest):
        self.ingest = ingest

    async def on_partitions_revoked(self, revoked) -> None:
        # No offset commit here: a commit needs the group's coordinator, and with its broker gone it would hold
        # the rebalance up; the offsets handled since the last commit are replayed as no-ops by their new owner.
        async with self.ingest.in_flight:
            pass

    async def on_partitions_assigned(self, assigned) -> None:
        partitions = sorted(tp.partition for tp in assigned)
        ingest = self.ingest
        if ingest.resume_at is not None and partitions:
            # aiokafka starts fetching a new assignment from Kafka's committed offset before it calls this
            # listener, and `getmany` hands those records out while the listener awaits (aio-libs/aiokafka#738).
            # A batch from there would move the state's watermark past records the state never saw (a store
            # behind Kafka: a promoted Redis replica), so the partitions stay paused until the seek. Pausing
            # comes before the first await: nothing of this assignment can have been handed out yet.
            ingest.consumer.pause(*assigned)
            offsets: dict[int, int] = {}

            async def read() -> None:
                offsets.update(await ingest.resume_at(partitions))

            # Seeking here is how aiokafka's docs keep offsets outside Kafka (their local-state example).
            await retry_until_done(read, f"{ingest.group}: where partitions {partitions} resume", log)
            topic = ingest.kafka.topic(ingest.topic)
            for partition, offset in offsets.items():
                ingest.consumer.seek(TopicPartition(topic, partition), offset)
            ingest.consumer.resume(*assigned)
        ingest.on_assigned(partitions)
