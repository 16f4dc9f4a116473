"""Producing a batch's outputs: records grouped per (topic, partition), sent with aiokafka's batch API."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from leadstream.config import KafkaConfig
from schemas.topics import Topic, partition_for_key


@dataclass
class Outputs:
    """Records to produce, per (topic, partition), in the order they must keep."""

    partitions: int
    records: dict[tuple[str, int], list[tuple[bytes | None, bytes]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, topic: Topic, key: bytes | None, value: bytes, input_partition: int = -1) -> None:
        """Place a record by its topic's partitioner: the input's partition, or the hash of its key."""
        if topic.partitioner == "input":
            partition = input_partition
        else:
            partition = partition_for_key(key or b"", self.partitions)
        self.records[(topic.name, partition)].append((key, value))

    def count(self, topic: Topic) -> int:
        return sum(len(v) for (name, _), v in self.records.items() if name == topic.name)

    def values(self, topic: Topic) -> list[bytes]:
        return [value for (name, _), records in sorted(self.records.items()) if name == topic.name
                for _, value in records]

    def __len__(self) -> int:
        return sum(len(v) for v in self.records.values())


class BatchProducer:
    """Produces many records per request with aiokafka's batch API (per-message send() was the hot path's
    cost). Idempotence keeps each partition's records in send order even across retries: the sinks'
    raw-offset watermark relies on it."""

    def __init__(self, kafka: KafkaConfig):
        self.kafka = kafka
        self.producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Created here, inside the running event loop, as aiokafka requires."""
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.kafka.bootstrap, enable_idempotence=True, linger_ms=5,
            max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024,
        )
        await self.producer.start()

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()

    async def send(self, outputs: Outputs) -> None:
        """Send everything, then wait for every ack: a batch's state is committed only after this returns."""
        futures = []
        for (topic, partition), records in outputs.records.items():
            full_topic = self.kafka.topic(topic)
            batch = self.producer.create_batch()
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    futures.append(await self.producer.send_batch(batch, full_topic, partition=partition))
                    batch = self.producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            if batch.record_count():
                futures.append(await self.producer.send_batch(batch, full_topic, partition=partition))
        if futures:
            await asyncio.gather(*futures)


class MemoryProducer:
    """Keeps what a stage produced, for unit tests (same `send` contract, no broker)."""

    def __init__(self) -> None:
        self.sent: list[Outputs] = []
        self.fail_next = 0

    async def send(self, outputs: Outputs) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("broker unavailable (simulated)")
        self.sent.append(outputs)
