"""Create LeadStream's Kafka topics (the catalog in schemas/topics.py) with the configured partition count and
replication factor (1 on one broker; 3 on a cluster, where the brokers' min.insync.replicas=2 and the producers'
acks=all make an acknowledged record survive the loss of a broker).

Every topic has as many partitions as events.raw: the worker writes the outputs of raw partition p to
partition p of each `input`-partitioned topic, which is what lets the sinks deduplicate by raw offset.
"""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.settings import KafkaConfig
from schemas.topics import CATALOG


async def ensure_topics(kafka: KafkaConfig, verbose: bool = True) -> dict[str, int]:
    """Create missing topics; return partitions per topic. Refuses mismatched partition counts."""
    admin = AIOKafkaAdminClient(**kafka.client_options())
    await admin.start()
    try:
        names = [kafka.topic(t.name) for t in CATALOG]
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            await admin.create_topics(
                [NewTopic(n, num_partitions=kafka.partitions, replication_factor=kafka.replication_factor)
                 for n in missing]
            )
            if verbose:
                print(f"  created topics {', '.join(missing)} ({kafka.partitions} partitions, "
                      f"{kafka.replication_factor} replicas each)", flush=True)
        described = await admin.describe_topics(names)
        counts = {d["topic"]: len(d["partitions"]) for d in described}
    finally:
        await admin.close()
    if len(set(counts.values())) > 1:
        raise RuntimeError(f"topics must all have the same partition count, found {counts}")
    return counts


FAUST_ASSIGNOR_TOPIC = "leadstream-__assignor-__leader"
"""The one topic Faust creates itself: its partition assignor's, named after the app (processors/app.py
names the app `leadstream` under the prefix)."""


async def delete_topics(kafka: KafkaConfig) -> None:
    """Delete every catalog topic under this prefix, and Faust's (a test namespace or a benchmark's, when done): each
    partition keeps files open in the broker, and thousands of stale ones exhaust its file handles."""
    admin = AIOKafkaAdminClient(**kafka.client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        names = [kafka.topic(name) for name in [*(t.name for t in CATALOG), FAUST_ASSIGNOR_TOPIC]
                 if kafka.topic(name) in existing]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()
