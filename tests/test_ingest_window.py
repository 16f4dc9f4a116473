"""A sink's batch window runs from the production of its oldest record (so a record produced while the
previous batch was being inserted does not wait that insert out on top of a whole window), and a backlog
fills whole windows (catching up takes big inserts)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.runtime.ingest import fill_deadline

NOW_S = 1_800_000_000.0  # the wall clock
MONO_S = 5_000.0  # the monotonic clock at the same moment


def approx(seconds: float):
    return pytest.approx(seconds, abs=1e-6)  # microseconds: the clocks are floats


def deadline_after(age_ms: int, wait_ms: int = 500) -> float:
    """Seconds from now until the batch closes, for an oldest record produced `age_ms` ago."""
    return fill_deadline(int(NOW_S * 1000) - age_ms, wait_ms, NOW_S, MONO_S) - MONO_S


def test_a_record_produced_just_now_gets_the_whole_window():
    assert deadline_after(0) == approx(0.5)


def test_a_record_that_waited_part_of_the_window_waits_only_the_rest():
    assert deadline_after(300) == approx(0.2)
    assert deadline_after(499) == approx(0.001)


@pytest.mark.parametrize("age_ms", [500, 501, 60_000, 86_400_000])
def test_a_backlog_fills_a_whole_window_from_now(age_ms):
    assert deadline_after(age_ms) == approx(0.5)


def test_a_producer_clock_ahead_of_ours_counts_as_now():
    assert deadline_after(-2_000) == approx(0.5)


@given(age_ms=st.integers(-10**9, 10**10), wait_ms=st.integers(1, 60_000))
def test_a_batch_closes_after_now_and_within_one_window(age_ms, wait_ms):
    left = deadline_after(age_ms, wait_ms)
    assert 0 < left <= wait_ms / 1000 + 1e-9
