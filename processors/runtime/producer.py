"""Producing a batch's outputs: records grouped per (topic, partition), sent with aiokafka's batch API.

Every record is checked against the broker's record limit before it is sent: one over it would be refused
on every retry and hold up its input partition for good, so it becomes a dead letter instead, on the
dead-letter topic the producer's owner names (the runtime does not know the application's topics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from aiokafka import AIOKafkaProducer

from schemas.dead_letter import DeadLetter
from schemas.settings import DEFAULT_MAX_RECORD_BYTES, KafkaConfig
from schemas.topics import NO_HEADERS, Headers, Topic, partition_for_key

log = logging.getLogger(__name__)


@dataclass
class Outputs:
    """Records to produce, per (topic, partition), in the order they must keep: (key, value, headers)."""

    partitions: int
    records: dict[tuple[str, int], list[tuple[bytes | None, bytes, Headers]]] = field(
        default_factory=lambda: defaultdict(list))

    def add(self, topic: Topic, key: bytes | None, value: bytes, input_partition: int = -1,
            record_type: type | None = None) -> None:
        """Place a record by its topic's partitioner: the input's partition, or the hash of its key. On a
        shared topic, `record_type` is the record's class (it travels as the record-type header)."""
        if topic.partitioner == "input":
            partition = input_partition
        else:
            partition = partition_for_key(key or b"", self.partitions)
        self.records[(topic.name, partition)].append((key, value, topic.headers(record_type)))

    def __len__(self) -> int:
        return sum(len(v) for v in self.records.values())

    def set_aside_oversized(self, max_record_bytes: int, dead_letters: Topic,
                            full_name: Callable[[str], str] = str) -> list[DeadLetter]:
        """Swap each record whose key and value exceed `max_record_bytes` for a dead letter `output_too_large`
        on `dead_letters`, at the same partition number (so it stays with the records of the same input).
        The letter names the topic, partition and key the record was for; its offset is -1 (never written).
        Dead letters themselves are bounded by construction (schemas/dead_letter.py) and not checked."""
        letters = []
        for (topic, partition), records in list(self.records.items()):
            if topic == dead_letters.name:
                continue
            kept = []
            for key, value, headers in records:
                size = len(key or b"") + len(value)
                if size <= max_record_bytes:
                    kept.append((key, value, headers))
                    continue
                letter = DeadLetter(
                    reason="output_too_large", raw=value, topic=full_name(topic), partition=partition, offset=-1,
                    message=f"a {size:,}-byte record for {full_name(topic)} (partition {partition}, key "
                            f"{(key or b'')[:200]!r}) is over the {max_record_bytes:,}-byte record limit",
                    received_ms=int(time.time() * 1000))
                self.records[(dead_letters.name, partition)].append((None, letter.to_json(), NO_HEADERS))
                letters.append(letter)
            self.records[(topic, partition)] = kept
        return letters


class BatchProducer:
    """Produces many records per request with aiokafka's batch API (per-message send() was the hot path's
    cost). Idempotence keeps each partition's records in send order even across retries: the sinks'
    raw-offset watermark relies on it. acks=all (which idempotence requires; said here so that no one lowers
    it): a record is acknowledged once every in-sync replica has it, so on a cluster with
    min.insync.replicas=2 losing the partition leader loses no acknowledged record."""

    def __init__(self, kafka: KafkaConfig, dead_letters: Topic):
        self.kafka = kafka
        self.dead_letters = dead_letters
        self.producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Created here, inside the running event loop, as aiokafka requires."""
        self.producer = AIOKafkaProducer(
            **self.kafka.client_options(), enable_idempotence=True, acks="all", linger_ms=5,
            max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024,
        )
        await self.producer.start()

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()

    async def send(self, outputs: Outputs) -> None:
        """Send everything, then wait for every ack: a batch's state is committed only after this returns."""
        for letter in outputs.set_aside_oversized(self.kafka.max_record_bytes, self.dead_letters, self.kafka.topic):
            log.error("not sent, dead-lettered instead: %s", letter.message)
        futures = []
        for (topic, partition), records in outputs.records.items():
            full_topic = self.kafka.topic(topic)
            batch = self.producer.create_batch()
            for key, value, headers in records:  # headers: a list, as aiokafka's record builder takes them
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    futures.append(await self.producer.send_batch(batch, full_topic, partition=partition))
                    batch = self.producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
            if batch.record_count():
                futures.append(await self.producer.send_batch(batch, full_topic, partition=partition))
        if futures:
            await asyncio.gather(*futures)


class MemoryProducer:
    """Keeps what a processor produced, for unit tests (same `send` contract, record limit included, no broker)."""

    def __init__(self, dead_letters: Topic, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.dead_letters = dead_letters
        self.sent: list[Outputs] = []
        self.fail_next = 0
        self.max_record_bytes = max_record_bytes

    async def send(self, outputs: Outputs) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("broker unavailable (simulated)")
        outputs.set_aside_oversized(self.max_record_bytes, self.dead_letters)
        self.sent.append(outputs)
