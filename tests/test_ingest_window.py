"""When a sink's batches close: every window on a cadence of its own, so a record produced while the previous
batch was being inserted waits at most one window; sinks start at random phases (a dozen inserts at once
slowed each other and the workers); an insert that outlasts its window starts a new cadence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.runtime.ingest import FlushCadence

WINDOW_S = 0.5


def approx(seconds: float):
    return pytest.approx(seconds, abs=1e-9)


def test_the_first_window_ends_at_a_random_phase_within_one_window():
    assert FlushCadence(WINDOW_S, phase=lambda: 0.0).next(100.0) == approx(100.25)
    assert FlushCadence(WINDOW_S, phase=lambda: 1.0).next(100.0) == approx(100.5)


def test_the_window_includes_the_insert_of_the_batch_before():
    cadence = FlushCadence(WINDOW_S, phase=lambda: 1.0)
    first = cadence.next(100.0)
    assert first == approx(100.5)
    assert cadence.next(first + 0.120) == approx(101.0)  # the insert took 120 ms: the next batch has 380 ms left
    assert cadence.next(101.0 + 0.499) == approx(101.5)


def test_an_insert_that_outlasts_its_window_starts_a_new_cadence_at_a_random_phase():
    cadence = FlushCadence(WINDOW_S, phase=lambda: 0.0)
    first = cadence.next(100.0)
    assert cadence.next(first + 0.7) == approx(first + 0.7 + 0.25)


def test_a_batch_that_filled_up_early_never_makes_the_next_wait_more_than_a_window():
    cadence = FlushCadence(WINDOW_S, phase=lambda: 1.0)
    cadence.next(100.0)  # due at 100.5, but the batch fills up by 100.1
    assert cadence.next(100.15) == approx(100.65)


@given(st.lists(st.floats(0.0, 2.0), min_size=1, max_size=30), st.floats(0.0, 1.0, exclude_max=True))
def test_every_batch_closes_after_it_starts_and_within_one_window(gaps, phase):
    cadence, now = FlushCadence(WINDOW_S, phase=lambda: phase), 1_000.0
    for gap in gaps:
        deadline = cadence.next(now)
        assert now < deadline <= now + WINDOW_S + 1e-9
        now = min(deadline, now + gap) + gap / 4  # closed at its deadline or earlier (full), then the insert
