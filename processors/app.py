"""The worker: a Faust app hosting every processing stage on the shared stage runtime.

Faust is the application host — services, timers, signal handling, logging. Each stage's input comes
through `BatchIngest` (a plain aiokafka consumer group; see processors/runtime/ingest.py for why the hot
path bypasses Faust's per-message stream machinery) and runs through a `StageRunner`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import faust
import redis.asyncio as aioredis

from leadstream.config import Settings
from processors import sessionize
from processors.accounts import AccountsContext
from processors.enrich import Limits
from processors.identity_store import IdentityGraphStore, load_ip_table
from processors.raw_events import RawEventsConfig, RawEventsStage
from processors.runtime.ingest import BatchIngest
from processors.runtime.producer import BatchProducer
from processors.runtime.stage import StageRunner
from processors.runtime.state import RedisStateStore
from schemas.topics import EVENTS_RAW

log = logging.getLogger(__name__)


def session_policy(settings: Settings) -> sessionize.SessionPolicy:
    default = sessionize.SessionConfig(
        inactivity_ms=settings.session_inactivity_min * 60_000, grace_ms=settings.session_grace_min * 60_000
    )
    return sessionize.SessionPolicy(default=default)


class IngestService(faust.Service):
    """Runs one stage's ingest loop inside the Faust app."""

    def __init__(self, ingest: BatchIngest, **kwargs):
        super().__init__(**kwargs)
        self.ingest = ingest

    async def on_start(self) -> None:
        await self.ingest.start()

    async def on_stop(self) -> None:
        await self.ingest.stop()

    @faust.Service.task
    async def _run(self) -> None:
        await self.ingest.run(lambda: self.should_stop)


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
    )
    kafka = settings.kafka()
    prefix = settings.name("ls")
    producer = BatchProducer(kafka)
    redis = aioredis.from_url(settings.redis_url)
    store = RedisStateStore(redis, prefix)
    raw_events = RawEventsStage(
        RawEventsConfig(kafka.topic(EVENTS_RAW.name), kafka.partitions, session_policy(settings),
                        Limits(max_payload_bytes=settings.max_payload_bytes)),
        store, IdentityGraphStore(store, prefix), prefix,
    )
    raw_runner = StageRunner(raw_events, store, producer)
    raw_ingest = BatchIngest(kafka, EVENTS_RAW.name, "leadstream-worker", settings.batch(), raw_runner.process)

    @app.service
    class OutputProducer(faust.Service):
        """Starts the batch producer and loads the IP table before any batch; stops them last."""

        async def on_start(self) -> None:
            await producer.start()
            raw_events.accounts = AccountsContext(await load_ip_table(redis, prefix))

        async def on_stop(self) -> None:
            await producer.stop()
            await redis.aclose()

    app.service(IngestService(raw_ingest))

    @app.timer(interval=60.0)
    async def reload_ip_ranges() -> None:
        """Pick up a table loaded with `leadstream ip-ranges load` without a restart."""
        raw_events.accounts = AccountsContext(await load_ip_table(redis, prefix))

    @app.timer(interval=2.0)
    async def close_idle_sessions() -> None:
        partitions = raw_ingest.assigned_partitions()
        if partitions:
            try:
                await raw_runner.tick(partitions)
            except Exception:
                log.exception("closing idle sessions failed; next tick retries")

    return app


def run_worker(settings: Settings, worker_name: str = "worker", loglevel: str = "warning") -> None:
    app = create_app(settings, worker_name)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
