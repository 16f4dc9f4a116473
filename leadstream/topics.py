"""Create LeadStream's Kafka topics with the configured partition count.

Every topic has as many partitions as events.raw: the worker writes the outputs of raw partition p to
partition p of each output topic, which is what lets the sinks deduplicate by raw offset.
"""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from leadstream.config import TOPICS, Settings


async def ensure_topics(settings: Settings, verbose: bool = True) -> dict[str, int]:
    """Create missing topics; return partitions per topic. Refuses mismatched partition counts."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        names = [settings.topic(t) for t in TOPICS]
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            await admin.create_topics(
                [NewTopic(n, num_partitions=settings.partitions, replication_factor=1) for n in missing]
            )
            if verbose:
                print(f"  created topics {', '.join(missing)} ({settings.partitions} partitions)", flush=True)
        described = await admin.describe_topics(names)
        counts = {d["topic"]: len(d["partitions"]) for d in described}
    finally:
        await admin.close()
    if len(set(counts.values())) > 1:
        raise RuntimeError(f"topics must all have the same partition count, found {counts}")
    return counts
