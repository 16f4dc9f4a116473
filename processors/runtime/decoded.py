"""What a processor last wrote per state key, kept decoded and reused while the stored bytes are exactly the same.

A large state (an account card with thousands of leads) takes milliseconds to decode, and a busy one
changes in every batch. Remembering the state this worker last wrote, keyed by its exact bytes, turns the
next batch's decode into a byte comparison. Content-checked: another worker's write, or a commit that
never happened, means other bytes in the store, which is simply a miss — an entry is never stale. The
runtime keeps one per kind of state a processor declares `keep_decoded` (see state.StateSpec).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class DecodedStates(Generic[V]):
    """A byte-bounded LRU of (blob -> value) per key, for blobs of at least `min_bytes` (smaller ones are
    cheap to decode). A value put here must never be changed afterwards: callers copy what they change."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, min_bytes: int = 4096) -> None:
        self.max_bytes, self.min_bytes = max_bytes, min_bytes
        self._entries: OrderedDict[str, tuple[bytes, V]] = OrderedDict()
        self.bytes_kept = 0
        self.hits = self.misses = 0

    def get(self, key: str, blob: bytes) -> V | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] == blob:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        if len(blob) >= self.min_bytes:
            self.misses += 1
        return None

    def put(self, key: str, blob: bytes, value: V) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes_kept -= len(old[0])
        if not self.min_bytes <= len(blob) <= self.max_bytes:
            return
        self._entries[key] = (blob, value)
        self.bytes_kept += len(blob)
        while self.bytes_kept > self.max_bytes:
            _, (evicted, _) = self._entries.popitem(last=False)
            self.bytes_kept -= len(evicted)

    def __len__(self) -> int:
        return len(self._entries)
