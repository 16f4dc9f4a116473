"""`ProcessorRunner`: runs a processor's pure step on a batch in the order of effects that makes replays harmless.

Per batch:
  1. skip messages at or below their partition's applied-offset watermark (already fully handled);
  2. the processor computes outputs and new state from the stored state (deterministic);
  3. produce every output and wait for the broker's acks;
  4. commit the new states, deadlines and watermarks in one transaction that applies only if every
     partition's watermark is unchanged (compare-and-set); otherwise raise StaleBatch, and the ingest
     hands the batch over again;
  5. return, so the ingest commits the messages' Kafka offsets.
A crash before 4 replays the batch from the same state and produces the same outputs again (the sinks
drop them by raw offset or collapse them by version). A crash after 4 skips the batch in step 1: its
outputs were acknowledged in step 3. A zombie that lost its partition fails the compare-and-set.
Timer ticks follow the same order with the partition's stream clock instead of new messages.

Poison: a batch that keeps failing for a reason other than an outage (or whose step refuses a record with
`PoisonRecord`) is isolated by halves, in order: each half runs as a batch of its own, a failing half is
split again, and a single message that still fails is parked — its dead letter produced, then its offset
committed as applied with no state change, in the same order of effects. The messages around it go
through as usual, so the partition moves on and a replay skips whatever was already done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, TypeVar

from processors.runtime.backoff import RetryLater, describe, is_transient
from processors.runtime.clock import StreamClock
from processors.runtime.cost import METER
from processors.runtime.ingest import Message
from processors.runtime.producer import Outputs
from processors.runtime.state import Fence, PartitionCommit, StateStore, Writes
from schemas.dead_letter import DeadLetter
from schemas.topics import EVENTS_DLQ

log = logging.getLogger(__name__)


@dataclass
class PartitionChanges:
    """What a step changes in one partition's state: key -> state blob (b'' deletes), key -> deadline."""

    states: dict[str, bytes] = field(default_factory=dict)
    deadlines: dict[str, int | None] = field(default_factory=dict)
    stream_time_ms: int = 0


@dataclass
class Step:
    outputs: Outputs
    changes: dict[int, PartitionChanges] = field(default_factory=dict)
    also: Callable[[Writes], None] | None = None  # further writes in the same transaction
    held: contextlib.AsyncExitStack | None = None  # locks the step took: released after its commit
    fence: Fence | None = None  # the lock whose current holder the commit must still be (see state.Fence)

    def partition(self, partition: int) -> PartitionChanges:
        return self.changes.setdefault(partition, PartitionChanges())


R = TypeVar("R")


class PoisonRecord(Exception):
    """A step's refusal of a message it can never handle (`reason` as in schemas.dead_letter): the runner
    parks that message as a dead letter at once, without waiting for retries."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_batch(messages: Sequence[Message], decode: Callable[[bytes], R], processor: str) -> list[tuple[int, R]]:
    """(partition, record) for every message of an internal topic. A record LeadStream did not write is
    poison: the runner dead-letters it (`undecodable_record`) and the partition moves on."""
    records = []
    for message in messages:
        try:
            records.append((message.partition, decode(message.value)))
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

    async def step(self, messages: Sequence[Message], received_ms: int) -> Step:
        """A lock the step needs until its commit (the identity graph's) goes into `Step.held`."""

    async def tick(self, clocks: dict[int, int]) -> Step | None:
        """Timer work for owned partitions at their stream-clock times; None when nothing is due."""


class Producer(Protocol):
    async def send(self, outputs: Outputs) -> None: ...


class ProcessorRunner:
    """Runs a processor on batches of `input_topic` (its full name, which the processor's dead letters give)."""

    def __init__(self, processor: Processor, store: StateStore, producer: Producer, input_topic: str = ""):
        self.processor = processor
        self.store = store
        self.producer = producer
        self.input_topic = input_topic
        self.clock = StreamClock()
        self.lock = asyncio.Lock()  # one batch or timer tick at a time per process

    async def process(self, messages: Sequence[Message]) -> Outputs | None:
        """The batch's outputs; None when it was all applied before, or when a poison record made it go
        through in parts."""
        async with self.lock:
            try:
                return await self._process(messages)
            except PoisonRecord as poison:
                await self._isolate(messages, poison)
                return None

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
                            received_ms=int(time.time() * 1000))
        log.error("%s: %s[%d]@%d set aside as a dead letter (%s): %s", self.processor.name, self.input_topic,
                  partition, message.offset, reason, letter.message)
        outputs = Outputs(partitions=0)  # holds only the dead letter, placed on the input's partition
        outputs.add(EVENTS_DLQ, None, letter.to_json(), partition)
        await self.producer.send(outputs)
        if not await self.store.commit([self._commit(partition, applied, message.offset, None)]):
            raise StaleBatch(f"{self.processor.name}: partition {partition} moved on while a record was set aside")

    async def _process(self, messages: Sequence[Message]) -> Outputs | None:
        received_ms = int(time.time() * 1000)
        partitions = sorted({m.partition for m in messages})
        marks = await self.store.partition_marks(partitions)
        fresh = [m for m in messages if m.offset > marks[m.partition][0]]
        if len(fresh) < len(messages):
            log.info("%s: skipped %d messages already applied (a replay after a crash or rebalance)",
                     self.processor.name, len(messages) - len(fresh))
        if not fresh:
            return None
        applied = {}
        for m in fresh:
            applied[m.partition] = max(applied.get(m.partition, -1), m.offset)
        step = await METER.measured(self.processor.name, self.processor.step(fresh, received_ms), len(fresh))
        async with step.held or contextlib.nullcontext():
            await METER.measured("produce", self.producer.send(step.outputs), len(step.outputs))
            commits = [self._commit(p, marks[p][0], offset, step.changes.get(p)) for p, offset in applied.items()]
            committed = self.store.commit(commits, also=step.also, fence=step.fence)
            if not await METER.measured("commit", committed, len(fresh)):
                raise StaleBatch(f"{self.processor.name}: a partition of this batch moved on under us "
                                 f"(rebalance?); nothing was written, the batch is recomputed")
        return step.outputs

    async def tick(self, partitions: Sequence[int], wall_now_ms: int | None = None) -> Outputs | None:
        wall_now_ms = int(time.time() * 1000) if wall_now_ms is None else wall_now_ms
        async with self.lock:
            marks = await self.store.partition_marks(sorted(partitions))
            clocks = {p: self.clock.now(p, stream_time, wall_now_ms)
                      for p, (applied, stream_time) in marks.items() if applied >= 0}
            if not clocks:
                return None
            step = await self.processor.tick(clocks)
            if step is None:
                return None
            async with step.held or contextlib.nullcontext():
                await self.producer.send(step.outputs)
                commits = [self._commit(p, marks[p][0], marks[p][0], changes) for p, changes in step.changes.items()]
                if not await self.store.commit(commits, also=step.also, fence=step.fence):
                    log.info("%s: a partition moved on during a timer tick; the next tick redoes it",
                             self.processor.name)
                    return None
            return step.outputs

    @staticmethod
    def _commit(partition: int, expected: int, applied: int, changes: PartitionChanges | None) -> PartitionCommit:
        changes = changes or PartitionChanges()
        return PartitionCommit(partition, expected, applied, changes.stream_time_ms, changes.states, changes.deadlines)


