"""Time in the runtime: the wall clock it reads, and each partition's stream clock that drives timers.

Processors never read the wall clock themselves: the runner reads `clock_us` (this module's wall clock
unless a test gives it a fixed one) and hands the time on through the batch, so a processor's outputs are
a function of its inputs, its state and the clock it was given.
"""

from __future__ import annotations

import time


def wall_clock_us() -> int:
    """Epoch microseconds."""
    return time.time_ns() // 1000


class StreamClock:
    """Replayed history closes sessions (and fires timers) by event time; a quiet partition still moves on,
    because the clock runs with the wall clock from the moment its event-time high-water mark last moved."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[int, int]] = {}  # partition -> (stream time, wall time it was first seen)

    def now(self, partition: int, stream_time_ms: int, wall_now_ms: int) -> int:
        seen = self._seen.get(partition)
        if seen is None or seen[0] != stream_time_ms:
            self._seen[partition] = seen = (stream_time_ms, wall_now_ms)
        return max(stream_time_ms, stream_time_ms + (wall_now_ms - seen[1]))
