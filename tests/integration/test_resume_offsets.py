"""Where a newly assigned partition resumes, on the real Kafka: at the state store's word, never at Kafka's.

A state store that lost its last writes (a promoted Redis replica) is behind Kafka's committed offsets. aiokafka
starts fetching a new assignment from the committed offset before the rebalance listener has said where to
resume, and hands those records out while the listener waits for the store (aio-libs/aiokafka#738): a batch
from there would move the watermark past records the state never saw. The store's answer is slowed down here,
so the race is lost every time unless the ingest holds the partitions back until it has seeked.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from processors.runtime.ingest import BatchIngest, Message, consumer
from schemas.settings import BatchConfig
from schemas.topics import EVENTS_RAW

pytestmark = pytest.mark.integration

RECORDS_PER_PARTITION = 40
KAFKA_COMMITTED = 30  # Kafka's committed offset per partition: ahead of the store
STORE_APPLIED = 9  # the store's watermark per partition: resume at 10
STORE_ANSWER_S = 2.0  # the store's answer takes this long


async def _resume_from_a_store_behind_kafka(settings) -> dict[int, list[int]]:
    kafka = settings.kafka()
    topic = kafka.topic(EVENTS_RAW.name)
    producer = AIOKafkaProducer(**kafka.client_options(), acks="all")
    await producer.start()
    try:
        for partition in range(kafka.partitions):
            for i in range(RECORDS_PER_PARTITION):
                await producer.send(topic, f"{partition}:{i}".encode(), partition=partition)
        await producer.flush()
    finally:
        await producer.stop()

    group = "resume-test"
    committer = consumer(kafka, group)
    await committer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(kafka.partitions)]
        committer.assign(tps)
        await committer.commit({tp: KAFKA_COMMITTED for tp in tps})
    finally:
        await committer.stop()

    handled: dict[int, list[int]] = {p: [] for p in range(kafka.partitions)}
    done = asyncio.Event()

    async def handle(messages: list[Message]) -> None:
        for m in messages:
            handled[m.partition].append(m.offset)
        if all(len(offsets) >= RECORDS_PER_PARTITION - STORE_APPLIED - 1 for offsets in handled.values()):
            done.set()

    async def slow_store(partitions: list[int]) -> dict[int, int]:
        await asyncio.sleep(STORE_ANSWER_S)
        return {p: STORE_APPLIED + 1 for p in partitions}

    ingest = BatchIngest(kafka, EVENTS_RAW.name, group, BatchConfig(100, 50), handle, resume_at=slow_store)
    await ingest.start()
    runner = asyncio.create_task(ingest.run(lambda: done.is_set()))
    try:
        await asyncio.wait_for(done.wait(), 60)
        await runner  # it stops after committing the batch in hand
    finally:
        runner.cancel()
        await ingest.stop()
    return handled


def test_a_partition_resumes_at_the_stores_watermark_even_when_the_store_answers_late(settings):
    handled = asyncio.run(_resume_from_a_store_behind_kafka(settings))
    want = list(range(STORE_APPLIED + 1, RECORDS_PER_PARTITION))
    assert handled == {p: want for p in handled}, "records handed out before the seek (from Kafka's offset)"
