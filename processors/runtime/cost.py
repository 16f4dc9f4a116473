"""CPU cost per part of the work, so that throughput can be compared on a busy, shared machine.

Wall-clock rates move with whatever else the machine runs; CPU seconds per event barely do. A `CostMeter`
accumulates the CPU time of named parts (enrich, sessionize, produce, ...) per batch, never per event, so
measuring costs a few clock reads per batch.

Two ways in:
- `with meter.measure("enrich"):` around synchronous code;
- `await meter.measured("produce", producer.send(outputs))` around a coroutine: only the CPU the coroutine
  itself runs is counted, not that of the other tasks the event loop runs while it waits (with several
  processors in one process, a timer around an `await` would charge one processor for the others' work).

Both read the calling thread's CPU clock. What the parts do not cover (fetching, client I/O tasks, the
event loop) is the process total minus their sum: `snapshot()` reports the process's CPU since the first
measurement next to the parts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class CostMeter:
    def __init__(self, thread_clock: Callable[[], float] = time.thread_time,
                 process_clock: Callable[[], float] = time.process_time):
        self.thread_clock = thread_clock
        self.process_clock = process_clock
        self.cpu_s: dict[str, float] = {}
        self.items: dict[str, int] = {}
        self.process_started: float | None = None  # process CPU at the first measurement: start-up is not work

    def add(self, part: str, cpu_s: float, items: int = 0) -> None:
        if self.process_started is None:
            self.process_started = self.process_clock() - cpu_s
        self.cpu_s[part] = self.cpu_s.get(part, 0.0) + cpu_s
        self.items[part] = self.items.get(part, 0) + items

    @contextlib.contextmanager
    def measure(self, part: str, items: int = 0) -> Iterator[None]:
        """CPU of the block, charged to `part` (with `items` handled), also if it raises."""
        started = self.thread_clock()
        try:
            yield
        finally:
            self.add(part, self.thread_clock() - started, items)

    async def measured(self, part: str, work: Awaitable[T], items: int = 0) -> T:
        """Await `work`, charging `part` the CPU of its own steps only (each run up to its next suspension)."""
        spent = [0.0]
        try:
            return await _StepTimer(work, self.thread_clock, spent)
        finally:
            self.add(part, spent[0], items)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready totals: {"process_cpu_s": ..., "parts": {part: {"cpu_s": ..., "items": ...}}}."""
        process = self.process_clock() - self.process_started if self.process_started is not None else 0.0
        return {"process_cpu_s": process,
                "parts": {part: {"cpu_s": cpu, "items": self.items[part]} for part, cpu in self.cpu_s.items()}}


class _StepTimer:
    """Drives a coroutine step by step for its awaiter, adding the CPU of each step to `spent[0]`."""

    def __init__(self, work: Awaitable[Any], clock: Callable[[], float], spent: list[float]):
        self.work, self.clock, self.spent = work, clock, spent

    def __await__(self) -> Generator[Any, Any, Any]:
        steps = self.work.__await__()
        send, value = steps.send, None
        while True:
            started = self.clock()
            try:
                yielded = send(value)
            except StopIteration as done:
                self.spent[0] += self.clock() - started
                return done.value
            except BaseException:
                self.spent[0] += self.clock() - started
                raise
            self.spent[0] += self.clock() - started
            try:
                value, send = (yield yielded), steps.send
            except BaseException as thrown:  # a cancellation (or any throw) goes into the coroutine
                value, send = thrown, steps.throw


PUBLISH_EVERY_S = 1.0
PUBLISHED_FOR_S = 3600
"""A worker publishes its meter's snapshot (JSON) under `RedisKeys.cost`, refreshed every PUBLISH_EVERY_S, gone
PUBLISHED_FOR_S after the worker stops."""


METER = CostMeter()
"""The process's meter: the worker's processors charge it, the worker publishes its snapshot."""
