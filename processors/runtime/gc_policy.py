"""How often a worker process runs Python's cyclic garbage collector.

A worker keeps many small containers alive between batches (the decoded states the runtime caches, a lead's
segment counters: lists of [event time, digest]). With CPython's default thresholds (700, 10, 10) the
collector runs every 700 net container allocations and re-walks those long-lived objects again and again:
measured on the lead processor in memory (20,833 records, the bench's 100 rules), 78.5 -> 69.7 µs per record
without segments and 98.7 -> 76.5 µs with the bench's 20 segments when the first threshold is 50,000.
Nearly all of a worker's garbage is freed by reference counting the moment it is dropped; the collector is
only for reference cycles, which are rare on the hot path, so collecting them less often costs little
memory (at most the cycles made by 50,000 allocations before the youngest generation is walked).
"""

from __future__ import annotations

import gc

WORKER_GC_THRESHOLDS = (50_000, 20, 10)


def tune_for_worker() -> None:
    """Objects loaded at start-up (code, the IP-range table, ...) are moved out of the collector's sight, and
    the youngest generation is collected every 50,000 net allocations instead of 700."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*WORKER_GC_THRESHOLDS)
