"""The worker's garbage-collector policy: start-up objects frozen, the youngest generation collected rarely."""

from __future__ import annotations

import gc

from processors.runtime.gc_policy import WORKER_GC_THRESHOLDS, tune_for_worker


def test_a_worker_collects_every_50000_allocations_and_freezes_what_start_up_loaded():
    before = gc.get_threshold()
    try:
        kept = [[i, str(i)] for i in range(1000)]  # loaded at start-up
        tune_for_worker()
        assert gc.get_threshold() == WORKER_GC_THRESHOLDS == (50_000, 20, 10)
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
