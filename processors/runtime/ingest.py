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
    or its time window is over (sinks, which want big inserts; the window: see `fill_deadline`) rather than
    handling whatever is there (processors, which want low latency; `top_up_ms`: see `_fetch`). `isolate`: how to get a poison
    batch through record by record (None: retry it forever). `resume_at`: where assigned partitions resume
    (None: Kafka's committed offset)."""

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
        deadline = time.monotonic() + self.batch.wait_ms / 1000
        windowed = False
        while count < self.batch.size and not stop():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            fetched = await self.consumer.getmany(timeout_ms=left_ms, max_records=self.batch.size - count)
            for tp, ms in fetched.items():
                batches.setdefault(tp, []).extend(ms)
                count += len(ms)
            if fetched and not windowed:
                windowed = True
                deadline = fill_deadline(min(m[0].timestamp for m in fetched.values()), self.batch.wait_ms,
                                         time.time(), time.monotonic())
        return batches


def fill_deadline(oldest_ms: int, wait_ms: int, now_s: float, monotonic_s: float) -> float:
    """When a sink's batch closes (on the monotonic clock), given the production time of its oldest record.

    The window runs from that record's production, not from the fetch loop's start: records produced while
    the previous batch was being inserted would otherwise wait that insert out on top of a whole window. A
    record already older than the window is a backlog (a catch-up, a ClickHouse outage): the batch then
    fills for a whole window from now, so that catching up takes big inserts, not many small ones.
    A producer's clock ahead of ours counts as now."""
    age_s = max(0.0, now_s - oldest_ms / 1000)
    window_s = wait_ms / 1000
    return monotonic_s + (window_s - age_s if age_s < window_s else window_s)


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
