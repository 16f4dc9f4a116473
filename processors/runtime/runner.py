"""`ProcessorRunner`: runs a processor on batches in the order of effects that makes replays harmless.

Per batch:
  1. skip messages at or below their partition's applied-offset watermark (already fully handled);
  2. the processor computes outputs, states, timers and further writes through a `Batch`, from the stored
     states (deterministic, given the runtime's clock); if the watermarks moved meanwhile (another worker
     committed), those states may not be one snapshot: StaleBatch, before anything is produced;
  3. produce every output and wait for the broker's acks;
  4. commit the changed states, deadlines, watermarks and writes in one transaction that applies only if
     every partition's watermark is unchanged (compare-and-set); otherwise raise StaleBatch, and the
     ingest hands the batch over again;
  5. return, so the ingest commits the messages' Kafka offsets.
A crash before 4 replays the batch from the same state and produces the same outputs again (the sinks
drop them by raw offset or collapse them by version). A crash after 4 skips the batch in step 1: its
outputs were acknowledged in step 3. A zombie that lost its partition fails the compare-and-set. A state
store that lost its last commits (a promoted Redis replica) has older watermarks than Kafka's committed
offsets: a partition resumes right after its watermark (`resume_offsets`), so those batches run again.

Timers follow the same order: each partition's stream clock (event time, advanced by wall time while the
partition is quiet) decides which of the processor's keys are due; the runner loads their states and
calls the processor's `on_timer` for each, then produces and commits as above.

Poison: a batch that keeps failing for a reason other than an outage (or whose step refuses a record with
`PoisonRecord`) is isolated by halves, in order: each half runs as a batch of its own, a failing half is
split again, and a single message that still fails is parked — its dead letter produced on the caller's
dead-letter topic, then its offset committed as applied with no state change, in the same order of
effects. The messages around it go through as usual, so the partition moves on and a replay skips
whatever was already done.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Callable, Protocol, Sequence, TypeVar

from processors.runtime.backoff import RetryLater, describe, is_transient
from processors.runtime.batch import Batch
from processors.runtime.clock import StreamClock, wall_clock_us
from processors.runtime.cost import METER
from processors.runtime.decoded import DecodedStates
from processors.runtime.ingest import Message
from processors.runtime.producer import Outputs
from processors.runtime.state import PartitionCommit, StateSpec, StateStore
from schemas.dead_letter import DeadLetter
from schemas.topics import Topic

log = logging.getLogger(__name__)

TIMERS_PART = "timers"
"""The meter's parts for timer ticks are named `timers <processor>`."""

R = TypeVar("R")


class PoisonRecord(Exception):
    """A step's refusal of a message it can never handle (`reason` as in schemas.dead_letter): the runner
    parks that message as a dead letter at once, without waiting for retries."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_batch(messages: Sequence[Message], topic: Topic, processor: str) -> list[tuple[int, object]]:
    """(partition, record) for every message of an internal topic, by the topic's record types. A record
    LeadStream did not write is poison: the runner dead-letters it (`undecodable_record`) and the partition
    moves on."""
    records = []
    for message in messages:
        try:
            records.append((message.partition, topic.decode(message.value, message.headers)))
        except Exception as err:  # noqa: BLE001 - whatever the decoder raised, the record is the cause
            raise PoisonRecord("undecodable_record", f"{processor}: undecodable record at partition "
                               f"{message.partition} offset {message.offset}: {describe(err)}") from err
    return records


class StaleBatch(RetryLater):
    """The batch was computed from state another worker has since changed: retry it from the new state
    (its already-applied messages are then skipped). Its outputs may have been produced: harmless, the
    sinks drop or collapse replays."""


class Processor(Protocol):
    name: str
    timers: StateSpec | None
    """The state whose keys the processor schedules (`Batch.schedule`); None: no timers."""

    async def step(self, batch: Batch, messages: Sequence[Message]) -> None:
        """Handle new messages: read and write states, outputs and writes through `batch`."""

    async def on_timer(self, batch: Batch, partition: int, key: str, state, now_ms: int) -> None:
        """A key of `timers` came due at `now_ms`, its partition's stream clock. A key whose state is gone
        (expired) is taken off the timer by the runtime without a call."""


class Producer(Protocol):
    async def send(self, outputs: Outputs) -> None: ...


class ProcessorRunner:
    """Runs a processor on batches of `input_topic` (its full name, which the processor's dead letters give);
    messages set aside go to `dead_letters`. `clock_us` is the wall clock (epoch microseconds) the batch's
    arrival time, the stream clocks and the processors' versions come from."""

    def __init__(self, processor: Processor, store: StateStore, producer: Producer, partitions: int,
                 dead_letters: Topic, input_topic: str = "", clock_us: Callable[[], int] = wall_clock_us):
        self.processor = processor
        self.store = store
        self.producer = producer
        self.partitions = partitions
        self.dead_letters = dead_letters
        self.input_topic = input_topic
        self.clock_us = clock_us
        self.clock = StreamClock()
        self.decoded: dict[str, DecodedStates] = defaultdict(DecodedStates)  # per kept kind of state
        self.lock = asyncio.Lock()  # one batch or timer tick at a time per process

    def _batch(self) -> Batch:
        return Batch(self.store, Outputs(self.partitions), self.clock_us() // 1000, self.clock_us, self.decoded)

    async def process(self, messages: Sequence[Message]) -> Outputs | None:
        """The batch's outputs; None when it was all applied before, or when a poison record made it go
        through in parts."""
        async with self.lock:
            try:
                return await self._process(messages)
            except PoisonRecord as poison:
                await self._isolate(messages, poison)
                return None

    async def resume_offsets(self, partitions: list[int]) -> dict[int, int]:
        """Where each of these newly assigned partitions resumes: right after its applied-offset watermark
        (at 0 when nothing was applied; beyond the topic's retention Kafka starts at its earliest)."""
        marks = await self.store.partition_marks(sorted(partitions))
        return {partition: applied + 1 for partition, (applied, _) in marks.items()}

    async def isolate(self, messages: Sequence[Message], error: BaseException) -> None:
        """The ingest's way through a batch that failed the same way again and again (see module docstring)."""
        async with self.lock:
            await self._isolate(messages, error)

    async def _isolate(self, messages: Sequence[Message], error: BaseException) -> None:
        if len(messages) == 1:
            await self._park(messages[0], error)
            return
        middle = len(messages) // 2
        for half in (messages[:middle], messages[middle:]):
            try:
                await self._process(half)
            except Exception as err:  # noqa: BLE001 - an outage stops the isolation; the ingest retries
                if is_transient(err):
                    raise
                await self._isolate(half, err)

    async def _park(self, message: Message, error: BaseException) -> None:
        """Dead-letter one message and mark it applied (produce, then commit: the usual order of effects)."""
        partition = message.partition
        applied = (await self.store.partition_marks([partition]))[partition][0]
        if message.offset <= applied:
            return
        if isinstance(error, PoisonRecord):  # the step's own words
            reason, detail = error.reason, str(error)
        else:
            reason, detail = "stage_error", f"{self.processor.name}: {describe(error)}"
        letter = DeadLetter(reason=reason, message=detail, raw=message.value or b"",
                            topic=self.input_topic, partition=partition, offset=message.offset,
                            received_ms=self.clock_us() // 1000)
        log.error("%s: %s[%d]@%d set aside as a dead letter (%s): %s", self.processor.name, self.input_topic,
                  partition, message.offset, reason, letter.message)
        outputs = Outputs(partitions=0)  # holds only the dead letter, placed on the input's partition
        outputs.add(self.dead_letters, None, letter.to_json(), partition)
        await self.producer.send(outputs)
        if not await self.store.commit([PartitionCommit(partition, applied, message.offset)]):
            raise StaleBatch(f"{self.processor.name}: partition {partition} moved on while a record was set aside")

    async def _process(self, messages: Sequence[Message]) -> Outputs | None:
        partitions = sorted({m.partition for m in messages})
        marks = await self.store.partition_marks(partitions)
        fresh = [m for m in messages if m.offset > marks[m.partition][0]]
        if len(fresh) < len(messages):
            log.info("%s: skipped %d messages already applied (a replay after a crash or rebalance)",
                     self.processor.name, len(messages) - len(fresh))
        if not fresh:
            return None
        applied: dict[int, int] = {}
        for m in fresh:
            applied[m.partition] = max(applied.get(m.partition, -1), m.offset)
        batch = self._batch()
        async with batch.locks:
            await METER.measured(self.processor.name, self._step(batch, fresh), len(fresh))
            if await self.store.partition_marks(partitions) != marks:
                # Another worker (a zombie that lost the partition, or its new owner) committed while this batch
                # read its states, so they may mix that commit's states with older ones: outputs computed from
                # them are no replay (an event already in a state is a duplicate, a dead letter). Produce nothing.
                raise StaleBatch(f"{self.processor.name}: a partition of this batch moved on while it read its "
                                 f"states; nothing was produced, the batch is recomputed")
            await METER.measured("produce", self.producer.send(batch.outputs), len(batch.outputs))
            commits = [self._commit(batch, p, marks[p][0], offset) for p, offset in applied.items()]
            committed = self.store.commit(commits, batch.writes, batch.fence, batch.guards)
            if not await METER.measured("commit", committed, len(fresh)):
                raise StaleBatch(f"{self.processor.name}: a partition of this batch moved on under us "
                                 f"(rebalance?); nothing was written, the batch is recomputed")
        return batch.outputs

    async def _step(self, batch: Batch, messages: Sequence[Message]) -> None:
        await self.processor.step(batch, messages)
        batch.finish()

    async def tick(self, partitions: Sequence[int]) -> Outputs | None:
        """Run the processor's due timers on these (owned) partitions; None when nothing was due or a
        partition moved on meanwhile (the next tick redoes it). Its CPU is the meter's `timers <processor>` part."""
        if self.processor.timers is None:
            return None
        return await METER.measured(f"{TIMERS_PART} {self.processor.name}", self._tick(partitions))

    async def _tick(self, partitions: Sequence[int]) -> Outputs | None:
        spec = self.processor.timers
        async with self.lock:
            batch = self._batch()
            marks = await self.store.partition_marks(sorted(partitions))
            clocks = {p: self.clock.now(p, stream_time, batch.now_ms)
                      for p, (applied, stream_time) in marks.items() if applied >= 0}
            due = {p: keys for p, clock in clocks.items() if (keys := await self.store.due(p, clock))}
            if not due:
                return None
            async with batch.locks:
                await batch.load((spec, {key: p for p, keys in due.items() for key in keys}))
                for p, keys in due.items():
                    for key in keys:
                        state = batch.get(spec, key)
                        if state is None:  # expired (idle past its time to live): nothing left to do
                            batch.schedule(key, None)
                        else:
                            await self.processor.on_timer(batch, p, key, state, clocks[p])
                batch.finish()
                await self.producer.send(batch.outputs)
                commits = [self._commit(batch, p, marks[p][0], marks[p][0]) for p in sorted(due)]
                if not await self.store.commit(commits, batch.writes, batch.fence, batch.guards):
                    log.info("%s: a partition moved on during a timer tick; the next tick redoes it",
                             self.processor.name)
                    return None
            return batch.outputs

    @staticmethod
    def _commit(batch: Batch, partition: int, expected: int, applied: int) -> PartitionCommit:
        return PartitionCommit(partition, expected, applied, batch.stream_times.get(partition, 0),
                               batch.deadlines.get(partition, {}))
