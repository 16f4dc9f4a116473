"""A partition's stream clock: event time, advanced by wall time while the partition is quiet."""

from __future__ import annotations


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
