"""CostMeter: CPU per part of the work, charged per block or per coroutine's own steps."""

from __future__ import annotations

import asyncio

import pytest

from processors.runtime.cost import CostMeter


class FakeClock:
    """A CPU clock the test advances by hand: what the code under measure 'spends'."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


def test_a_block_is_charged_its_cpu_and_items_and_parts_accumulate():
    clock = FakeClock()
    meter = CostMeter(thread_clock=clock, process_clock=clock)
    clock.spend(5.0)  # start-up before any measured work is not counted
    with meter.measure("enrich", items=100):
        clock.spend(0.25)
    with meter.measure("enrich", items=50):
        clock.spend(0.5)
    with meter.measure("serialize", items=150):
        clock.spend(0.125)
    clock.spend(1.0)  # unmeasured work (fetching, the event loop) still counts for the process

    snapshot = meter.snapshot()
    assert snapshot["parts"] == {"enrich": {"cpu_s": 0.75, "items": 150}, "serialize": {"cpu_s": 0.125, "items": 150}}
    assert snapshot["process_cpu_s"] == pytest.approx(0.25 + 0.5 + 0.125 + 1.0)


def test_a_block_that_raises_is_still_charged():
    clock = FakeClock()
    meter = CostMeter(thread_clock=clock, process_clock=clock)
    with pytest.raises(ValueError), meter.measure("identity", items=3):
        clock.spend(0.5)
        raise ValueError("bad batch")
    assert meter.snapshot()["parts"]["identity"] == {"cpu_s": 0.5, "items": 3}


def test_a_coroutine_is_charged_its_own_steps_not_what_other_tasks_run_while_it_waits():
    clock = FakeClock()
    meter = CostMeter(thread_clock=clock, process_clock=clock)

    async def produce() -> str:
        clock.spend(0.25)  # building the request
        await asyncio.sleep(0.01)  # waiting for acks: the other task runs meanwhile
        clock.spend(0.125)  # handling the acks
        return "acked"

    async def other_processor() -> None:
        await asyncio.sleep(0)
        clock.spend(10.0)

    async def main() -> str:
        other = asyncio.create_task(other_processor())
        result = await meter.measured("produce", produce(), items=7)
        await other
        return result

    assert asyncio.run(main()) == "acked"
    assert meter.snapshot()["parts"] == {"produce": {"cpu_s": 0.375, "items": 7}}


def test_a_measured_coroutine_passes_errors_and_cancellation_through_and_is_charged():
    clock = FakeClock()
    meter = CostMeter(thread_clock=clock, process_clock=clock)
    cleaned_up = []

    async def fails() -> None:
        clock.spend(0.5)
        await asyncio.sleep(0)
        raise ConnectionError("broker unavailable")

    async def waits_forever() -> None:
        clock.spend(0.25)
        try:
            await asyncio.Event().wait()
        finally:
            clock.spend(0.125)
            cleaned_up.append(True)

    async def main() -> None:
        with pytest.raises(ConnectionError):
            await meter.measured("produce", fails())
        task = asyncio.create_task(meter.measured("commit", waits_forever()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert cleaned_up == [True]
    assert meter.snapshot()["parts"] == {"produce": {"cpu_s": 0.5, "items": 0}, "commit": {"cpu_s": 0.375, "items": 0}}


def test_nothing_measured_yet_reports_no_process_cpu():
    assert CostMeter().snapshot() == {"process_cpu_s": 0.0, "parts": {}}
