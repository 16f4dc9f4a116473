"""`Batch`: what a processor works through while the runtime runs it on one batch (or one timer tick).

The processor reads and writes its declared states (`load`, `get`, `put`), sets timers
(`schedule`), tells the partition's stream clock the event time of what it handled (`advance_clock`), adds
records to `outputs` and further writes to `writes` — and never touches Redis, Kafka or the wall clock:
`now_ms` and `version()` come from the runtime's clock. When the step returns, the runtime (`finish`)
turns what changed into the batch's commit: a state whose bytes did not change is not written, deadlines
and stream times go with each partition's watermark, locks the step took are released after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, AsyncContextManager, TypeVar

from processors.runtime.decoded import DecodedStates
from processors.runtime.producer import Outputs
from processors.runtime.state import Fences, StateSpec, StateStore
from processors.runtime.writes import WriteBatch

V = TypeVar("V")
T = TypeVar("T")

SLICE_S = 0.005
"""How long a processor's loop over a batch runs before `paced` lets the event loop run the worker's other
processors: a lead batch takes up to a few hundred ms of CPU, and a board processor in the same process
whose reply from Redis or Kafka had arrived would wait that long to see it."""

_UNKNOWN = object()  # a key written without being loaded: its stored bytes are not known, so it is written


class Batch:
    """One batch's (or timer tick's) reads, writes, timers, outputs and clock, as the runtime hands it to a
    processor. Keys of partition-owned states carry their input partition (their timers and watermark);
    global states (the identity graph) are loaded with partition None.

    What it knows per key is kept in parallel dicts, not in an object per key: a batch touches thousands of
    keys, and every object the garbage collector tracks makes its collections come sooner."""

    def __init__(self, store: StateStore, outputs: Outputs, now_ms: int, clock_us: Callable[[], int],
                 decoded: dict[str, DecodedStates]) -> None:
        self._store = store
        self.outputs = outputs
        self.writes = WriteBatch()  # further writes, committed in the same transaction as the states
        self.now_ms = now_ms  # when the batch arrived (a timer tick: when it started), from the runtime's clock
        self.fence: Fences = None  # the lock(s) the commit must still hold (see state.Fence)
        self.guards: dict[str, bytes | None] = {}  # key -> bytes read: the commit applies only if still so
        self.locks = contextlib.AsyncExitStack()  # locks the step took: released after the commit
        self._clock_us = clock_us
        self._decoded = decoded
        self._specs: dict[str, StateSpec] = {}  # key -> its kind of state
        self._partitions: dict[str, int | None] = {}
        self._loaded: dict[str, Any] = {}  # key -> the bytes stored (None: none; _UNKNOWN: not loaded)
        self._values: dict[str, Any] = {}  # key -> its state as this batch left it
        self._put: dict[str, bytes] = {}  # key -> the encoded state put
        self.deadlines: dict[int, dict[str, int | None]] = {}
        self.stream_times: dict[int, int] = {}

    # -- time ----------------------------------------------------------------------------------------

    def version(self) -> int:
        """An upsert version (microseconds on the runtime's clock), read now: taken under a lock, it orders
        the writes of whoever holds the lock one after another."""
        return self._clock_us()

    def advance_clock(self, partition: int, event_ts_ms: int) -> None:
        """A record of `partition` with this event time was handled: the partition's stream clock (which runs
        its timers) moves to it — capped at the batch's arrival, so one client with a fast clock cannot
        close a partition's sessions or run its hourly pass early."""
        ts_ms = min(event_ts_ms, self.now_ms)
        if ts_ms > self.stream_times.get(partition, 0):
            self.stream_times[partition] = ts_ms

    # -- state ---------------------------------------------------------------------------------------

    async def load(self, *wanted: tuple[StateSpec, Mapping[str, int | None]]) -> None:
        """Load the states of these keys (key -> partition, None for a global state) in one round trip;
        keys this batch already loaded are not read again."""
        specs = self._specs
        keys = [key for _, wanted_keys in wanted for key in wanted_keys if key not in specs]
        if not keys:
            return
        blobs = await self._store.load(keys)
        for spec, wanted_keys in wanted:
            kept = self._decoded[spec.name] if spec.keep_decoded else None
            for key, partition in wanted_keys.items():
                if key in specs:
                    continue
                blob = blobs.get(key) or None
                value = None
                if blob is not None:
                    known = kept.get(key, blob) if kept is not None else None
                    value = spec.copy(known) if known is not None else spec.decode(blob)
                specs[key], self._partitions[key], self._loaded[key], self._values[key] = spec, partition, blob, value

    def get(self, spec: StateSpec[V], key: str) -> V | None:
        """The state of a loaded key as this batch left it (None: there is none)."""
        if self._specs[key] is not spec:
            raise KeyError(f"{key!r} was loaded as {self._specs[key].name}, not {spec.name}")
        return self._values[key]

    def put(self, spec: StateSpec[V], key: str, value: V) -> None:
        """The key's new state (encoded now: a value put must not change afterwards unless put again)."""
        if key not in self._specs:
            self._specs[key], self._partitions[key], self._loaded[key] = spec, None, _UNKNOWN
        self._values[key] = value
        self._put[key] = spec.encode(value)

    def changed(self, key: str) -> bool:
        """Whether the state put for `key` has other bytes than the stored one (so it will be written)."""
        blob = self._put.get(key)
        return blob is not None and blob != self._loaded[key]

    def schedule(self, key: str, deadline_ms: int | None) -> None:
        """Run the processor's timer for `key` once its partition's stream clock reaches `deadline_ms`
        (None: never). The key must have been loaded, with its partition."""
        partition = self._partitions[key]
        if partition is None:
            raise ValueError(f"{key!r} has no partition: only partition-owned states have timers")
        self.deadlines.setdefault(partition, {})[key] = deadline_ms

    async def guard(self, key: str) -> bytes | None:
        """Read a small key (e.g. a version) and make this batch's commit conditional on it: if anyone writes
        other bytes there before the commit, the commit writes nothing and the runtime computes the batch
        again from what is stored then (StaleBatch). A key guarded twice keeps its first reading."""
        if key not in self.guards:
            self.guards[key] = await self._store.read(key)
        return self.guards[key]

    async def read_hash(self, key: str) -> dict[str, bytes]:
        """A hash as stored now (field -> bytes), outside the batch's states: guard its version first."""
        return await self._store.read_hash(key)

    async def paced(self, items: Iterable[T]) -> AsyncIterator[T]:
        """The items, with the event loop handed to other tasks every SLICE_S of work (the batch's states and
        outputs are this processor's alone, and its runner runs one batch at a time: nothing can change
        under it meanwhile)."""
        deadline = time.perf_counter() + SLICE_S
        for item in items:
            yield item
            if time.perf_counter() >= deadline:
                await asyncio.sleep(0)
                deadline = time.perf_counter() + SLICE_S

    async def hold(self, lock: AsyncContextManager[T]) -> T:
        """Enter a lock (e.g. the identity graph's) until the batch is committed or abandoned."""
        return await self.locks.enter_async_context(lock)

    # -- the runtime's side --------------------------------------------------------------------------

    def finish(self) -> None:
        """Queue the states whose bytes changed (one multi-key write per kind of state), remembering the
        decoded values of kept ones for the next batch."""
        written: dict[StateSpec, dict[str, bytes]] = {}
        for key, blob in self._put.items():
            if blob != self._loaded[key]:
                spec = self._specs[key]
                written.setdefault(spec, {})[key] = blob
                if spec.keep_decoded:  # this batch is done with the value: it is never changed again
                    self._decoded[spec.name].put(key, blob, self._values[key])
        for spec, values in written.items():
            self.writes.set_many(values, spec.ttl_ms)
