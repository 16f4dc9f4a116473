"""A processor's batch takes the records produced while the previous batch ran, on the real Kafka.

aiokafka fetches no more from a broker while records of its partitions wait in the consumer's buffer. What
the next `getmany` hands out was therefore fetched when the previous batch started, and a record produced
during that batch would wait for the batch after the next one: a whole batch's duration more on every hop
of the pipeline. The ingest asks for them right after the buffered ones.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from processors.runtime.ingest import BatchIngest, Message
from schemas.settings import BatchConfig
from schemas.topics import EVENTS_RAW

pytestmark = pytest.mark.integration

EACH = 5  # records per burst: before the start, at the start of the first batch, halfway through it
BATCH_S = 0.6  # how long the first batch takes


async def _batches(settings) -> list[list[int]]:
    kafka = settings.kafka()
    topic = kafka.topic(EVENTS_RAW.name)
    producer = AIOKafkaProducer(**kafka.client_options(), acks="all")
    await producer.start()

    async def burst(first: int) -> None:
        for i in range(first, first + EACH):
            await producer.send(topic, f"r{i}".encode(), partition=0)
        await producer.flush()

    batches: list[list[int]] = []
    done = asyncio.Event()

    async def handle(messages: list[Message]) -> None:
        batches.append([m.offset for m in messages])
        if len(batches) == 1:  # the first batch runs while two more bursts are produced
            await burst(EACH)  # fetched into the buffer at once (the consumer's fetch was waiting for data)
            await asyncio.sleep(BATCH_S / 2)
            await burst(2 * EACH)  # not fetched while the first of them wait in the buffer
            await asyncio.sleep(BATCH_S / 2)
        if sum(map(len, batches)) >= 3 * EACH:
            done.set()

    try:
        await burst(0)
        # a generous wait for the top-up fetch: the test must not depend on this machine's load
        ingest = BatchIngest(kafka, EVENTS_RAW.name, "top-up-test", BatchConfig(100, 50), handle,
                             top_up_ms=5000)
        await ingest.start()
        runner = asyncio.create_task(ingest.run(lambda: done.is_set()))
        try:
            await asyncio.wait_for(done.wait(), 60)
            await runner
        finally:
            runner.cancel()
            await ingest.stop()
    finally:
        await producer.stop()
    return batches


def test_the_next_batch_takes_what_was_produced_while_the_previous_one_ran(settings):
    batches = asyncio.run(_batches(settings))
    assert batches[0] == list(range(EACH))
    assert batches[1] == list(range(EACH, 3 * EACH)), "the second burst waited for a third batch"
