"""The Faust worker: one agent takes events.raw in batches and runs the pipeline; a timer closes
idle sessions. Faust owns consumer-group membership, partition assignment and offset commits."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import faust
import redis.asyncio as aioredis

from leadstream.config import Settings
from processors.pipeline import BatchProducer, Pipeline, adapt
from processors.accounts import AccountsContext
from processors.identity_store import IdentityGraphStore
from processors.state import SessionStateStore

log = logging.getLogger(__name__)


def create_app(settings: Settings, worker_name: str = "worker") -> faust.App:
    datadir = Path(settings.stack_dir) / "faust" / settings.name(worker_name)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.name("leadstream"),
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, settings.worker_batch_size * 2),
        producer_linger_ms=5,
    )
    raw_topic = app.topic(
        settings.topic("events.raw"), key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw", partitions=settings.partitions,
    )
    producer = BatchProducer(settings)
    redis = aioredis.from_url(settings.redis_url)
    identity_store = IdentityGraphStore(redis, prefix=settings.name("ls"))
    pipeline = Pipeline(settings, SessionStateStore(redis, prefix=settings.name("ls")), identity_store, producer)
    app.pipeline = pipeline  # type: ignore[attr-defined]  # for tests and stats

    @app.service
    class OutputProducer(faust.Service):
        """Starts the batch producer with the worker and stops it last."""

        async def on_start(self) -> None:
            await producer.start()
            pipeline.accounts = AccountsContext(await identity_store.load_ip_table())

        async def on_stop(self) -> None:
            await producer.stop()
            await redis.aclose()

    @app.agent(raw_topic)
    async def ingest(stream):
        async for events in stream.take_events(settings.worker_batch_size, within=settings.worker_batch_ms / 1000):
            # Never raise out of here: take_events acks the batch in a finally block, so an exception
            # would commit offsets of events whose outputs were never produced. Retry instead.
            delay = 0.5
            while True:
                try:
                    await pipeline.process(adapt(events))
                    break
                except Exception:
                    log.exception("batch failed; retrying in %.1fs", delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)

    @app.timer(interval=60.0)
    async def reload_ip_ranges() -> None:
        """Pick up a table loaded with `leadstream ip-ranges load` without a restart."""
        pipeline.accounts = AccountsContext(await identity_store.load_ip_table())

    @app.timer(interval=2.0)
    async def close_idle_sessions() -> None:
        assigned = app.assignor.assigned_actives()
        partitions = [tp.partition for tp in assigned if tp.topic == raw_topic.get_topic_name()]
        if partitions:
            try:
                await pipeline.close_idle(partitions)
            except Exception:
                log.exception("closing idle sessions failed; next tick retries")

    return app


def run_worker(settings: Settings, worker_name: str = "worker", loglevel: str = "warning") -> None:
    app = create_app(settings, worker_name)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
