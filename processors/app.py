"""The worker: a Faust app hosting every processor on the shared processor runtime.

Faust is the application host — services, timers, signal handling, logging. Each processor's input comes
through `BatchIngest` (a plain aiokafka consumer group; see processors/runtime/ingest.py for why the hot
path bypasses Faust's per-message stream machinery) and runs through a `ProcessorRunner`:
- raw: events.raw -> enrich (geo and network too), sessionize, resolve identity -> events, sessions, identity,
  leads.activity; beside it, when a provider is set, the company resolver fills in company cards;
- lead: leads.activity -> workflow automation and segment membership -> leads.changes, leads.state,
  rules.executions, segments.changes, segments.account-leads, cards;
- account: segments.account-leads -> account segments -> segments.changes, account cards' memberships;
- board: board.commands -> the stage machine -> board.stage-changes and the board state in Redis;
- webhooks: delivers what the lead processor queued.
Beside the lead processor runs the segment backfill job (processors/segment_backfill.py), when the worker
is given a way to query ClickHouse.
Each processor has its own watermarks and timers (a state-store namespace) and its own consumer group;
bad input of any of them goes to the catalog's dead-letter topic, which the app hands the runtime.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import faust
import orjson

from processors import networks, sessionize
from processors.companies import CompanyStore, publish_cards
from processors.company_resolver import CompanyResolver, HttpJsonProvider
from processors.enrich import Limits
from processors.account_processor import AccountProcessor
from processors.board_processor import BoardProcessor
from processors.board_store import BoardStore
from processors.definitions_store import DefinitionsStore
from processors.identity_store import IdentityGraphStore
from processors.lead_processor import LeadProcessor
from processors.lookup_tables import LookupTables
from processors.raw_processor import RawEventsProcessor, RawProcessorConfig
from processors.runtime.gc_policy import tune_for_worker
from processors.runtime.cost import METER, PUBLISH_EVERY_S, PUBLISHED_FOR_S
from processors.runtime.ingest import BatchIngest
from processors.runtime.producer import BatchProducer
from processors.runtime.redis_client import redis_from_url
from processors.runtime.runner import ProcessorRunner
from processors.runtime.state import RedisStateStore
from processors.segment_backfill import Query, SegmentBackfillJob
from processors.site_definitions import SiteDefinitionsCache
from processors.webhooks import WebhookQueue, run_dispatcher
from schemas.redis_keys import RedisKeys
from schemas.settings import KafkaSecurity, Settings
from schemas.topics import BOARD_COMMANDS, EVENTS_DLQ, EVENTS_RAW, LEADS_ACTIVITY, SEGMENTS_ACCOUNT_LEADS

log = logging.getLogger(__name__)


def session_policy(settings: Settings) -> sessionize.SessionPolicy:
    default = sessionize.SessionConfig(
        inactivity_ms=settings.session_inactivity_min * 60_000, grace_ms=settings.session_grace_min * 60_000,
        dedup_window_ms=settings.dedup_window_min * 60_000, dedup_max_ids=settings.dedup_max_ids,
    )
    return sessionize.SessionPolicy(default=default)


def visitor_state_ttl_ms(settings: Settings, policy: sessionize.SessionPolicy) -> int:
    """Idle visitors' sessionizer state expires, but never while its last session or its ids still matter."""
    ttl_ms = settings.visitor_state_ttl_days * 86_400_000
    if ttl_ms < policy.default.state_lifetime_ms:
        raise ValueError(f"visitor_state_ttl_days={settings.visitor_state_ttl_days} is shorter than session "
                         f"inactivity + grace + dedup window ({policy.default.state_lifetime_ms // 60_000} min)")
    return ttl_ms


class IngestService(faust.Service):
    """Runs one processor's ingest loop inside the Faust app."""

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


PROCESSORS = ("raw", "lead", "account", "board", "webhooks")
"""What `leadstream worker` runs by default: every processor in one process; `--processors` runs a subset."""
BOARD_PROCESSOR_GROUP = "leadstream-board-processor"
LEAD_PROCESSOR_GROUP = "leadstream-lead-processor"
ACCOUNT_PROCESSOR_GROUP = "leadstream-account-processor"

LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "single": {"": PROCESSORS},
    "split": {"raw": ("raw",), "automation": ("lead", "account", "board", "webhooks")},
}
"""How the demo, the benchmark and docker-compose spread the processors over worker processes (name suffix ->
processors). `split`, their default, gives the raw processor and the automation (rules and segments, cards,
webhooks) a process each: two cores instead of one, and a burst of raw traffic no longer queues the cards behind it."""


def faust_credentials(security: KafkaSecurity) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """Faust's own Kafka clients (its consumer and producer) connect the way every LeadStream client does."""
    ssl_context = security.aiokafka_options().get("ssl_context")
    if security.protocol.startswith("SASL_"):
        return faust.SASLCredentials(username=security.username, password=security.password,
                                     mechanism=security.sasl_mechanism, ssl_context=ssl_context)
    return faust.SSLCredentials(ssl_context) if ssl_context else None


def create_app(settings: Settings, worker_name: str = "worker", processors: tuple[str, ...] = PROCESSORS,
               clickhouse_query: Query | None = None) -> faust.App:
    """The worker's app; `clickhouse_query` (from the operator layer) lets it run segment backfills."""
    unknown = sorted(set(processors) - set(PROCESSORS))
    if unknown:
        raise ValueError(f"unknown processor(s) {', '.join(unknown)}; known: {', '.join(PROCESSORS)}")
    datadir = Path(settings.stack_dir) / "faust" / settings.name(worker_name)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.name("leadstream"),
        broker=[f"kafka://{broker}" for broker in settings.kafka_bootstrap.split(",")],  # one URL per broker
        topic_replication_factor=settings.kafka_replication_factor,  # its assignor's topic
        store="memory://",
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_credentials=faust_credentials(settings.kafka().security),
    )
    kafka = settings.kafka()
    prefix = settings.name("ls")
    producer = BatchProducer(kafka, EVENTS_DLQ)
    redis = redis_from_url(settings.redis_url)
    sessions = session_policy(settings)
    sites = SiteDefinitionsCache(DefinitionsStore(redis, prefix))
    tables = LookupTables()
    raw_store = RedisStateStore(redis, prefix, "raw")
    raw_processor = RawEventsProcessor(
        RawProcessorConfig(kafka.topic(EVENTS_RAW.name), sessions, Limits(max_payload_bytes=settings.max_payload_bytes),
                           visitor_state_ttl_ms(settings, sessions), settings.lead_max_visitors,
                           resolve_companies=bool(settings.company_provider_url), privacy=settings.privacy(), erasure_key=settings.erasure_key),
        IdentityGraphStore(raw_store, prefix), prefix, tables,
    )
    runners: dict[str, tuple[ProcessorRunner, BatchIngest]] = {}

    def add_processor(name: str, processor, store: RedisStateStore, topic, group: str) -> None:
        runner = ProcessorRunner(processor, store, producer, kafka.partitions, EVENTS_DLQ, kafka.topic(topic.name))
        ingest = BatchIngest(kafka, topic.name, group, settings.batch(), runner.process, isolate=runner.isolate,
                             resume_at=runner.resume_offsets)
        runners[name] = (runner, ingest)
        app.service(IngestService(ingest))

    if "raw" in processors:
        add_processor("raw", raw_processor, raw_store, EVENTS_RAW, "leadstream-worker")
    if "lead" in processors:
        lead = LeadProcessor(sites, WebhookQueue(redis, prefix), prefix, tables.companies, settings.erasure_key)
        add_processor("lead", lead, RedisStateStore(redis, prefix, "lead"), LEADS_ACTIVITY, LEAD_PROCESSOR_GROUP)
    if "account" in processors:
        account = AccountProcessor(sites, prefix, tables.companies, settings.erasure_key)
        add_processor("account", account, RedisStateStore(redis, prefix, "account"), SEGMENTS_ACCOUNT_LEADS,
                      ACCOUNT_PROCESSOR_GROUP)
    if "board" in processors:
        board = BoardProcessor(BoardStore(redis, prefix), sites, prefix, WebhookQueue(redis, prefix), tables.companies,
                               settings.erasure_key)
        add_processor("board", board, RedisStateStore(redis, prefix, "board"), BOARD_COMMANDS, BOARD_PROCESSOR_GROUP)

    @app.service
    class OutputProducer(faust.Service):
        """Starts the batch producer and loads the IP-range table, the company cards and (for the raw
        stage) the geo data before any batch; stops them last."""

        async def on_start(self) -> None:
            await producer.start()
            await tables.refresh(redis, prefix)
            if "raw" in processors:
                networks.warm_up()

        async def on_stop(self) -> None:
            await producer.stop()
            await redis.aclose()

    if "webhooks" in processors:
        app.service(WebhookService(settings))
    if "lead" in processors and clickhouse_query is not None:
        app.service(BackfillService(SegmentBackfillJob(kafka, redis, producer, prefix, clickhouse_query)))
    if "raw" in processors and settings.company_provider_url:
        provider = HttpJsonProvider(settings.company_provider_url, settings.company_provider_token,
                                    settings.company_provider_timeout_ms / 1000)

        async def publish(cards) -> None:
            await publish_cards(cards, CompanyStore(redis, prefix), producer, kafka.partitions)

        app.service(CompanyResolverService(CompanyResolver(redis, prefix, provider, settings.company_provider_per_minute,
                                                           publish, tables.companies)))

    @app.timer(interval=1.0)
    async def reload_lookup_tables() -> None:
        """IP ranges and company cards loaded by the CLI (or a provider) take effect within about a second."""
        try:
            await tables.refresh(redis, prefix)
        except Exception:
            log.exception("reloading the IP-range table and company cards failed; next tick retries")

    @app.timer(interval=1.0)
    async def reload_definitions() -> None:
        """Rules and boards changed by the CLI or the API take effect within about a second."""
        try:
            await sites.refresh()
        except Exception:
            log.exception("reloading rules and boards failed; next tick retries")

    @app.timer(interval=PUBLISH_EVERY_S)
    async def publish_cost() -> None:
        """CPU per part of the work so far (processors/runtime/cost.py), for `leadstream bench` to read."""
        try:
            await redis.set(RedisKeys(prefix).cost(worker_name), orjson.dumps(METER.snapshot()), ex=PUBLISHED_FOR_S)
        except Exception:
            log.exception("publishing the CPU cost failed; next tick retries")

    @app.timer(interval=2.0)
    async def processor_timers() -> None:
        """Idle sessions close; due leads get their hourly pass (each processor on its own owned partitions)."""
        for name, (runner, ingest) in runners.items():
            partitions = ingest.assigned_partitions()
            if partitions:
                try:
                    await runner.tick(partitions)
                except Exception:
                    log.exception("%s timer failed; next tick retries", name)

    return app


class CompanyResolverService(faust.Service):
    """Fills in company cards for new account domains from the configured provider, beside the processors."""

    def __init__(self, resolver: CompanyResolver, **kwargs):
        super().__init__(**kwargs)
        self.resolver = resolver
        self.stopped = asyncio.Event()

    async def on_stop(self) -> None:
        self.stopped.set()
        await self.resolver.provider.close()

    @faust.Service.task
    async def _resolve(self) -> None:
        await self.resolver.run(self.stopped)


class BackfillService(faust.Service):
    """Runs segment backfills (after a segment edit) beside the lead processor."""

    def __init__(self, job: SegmentBackfillJob, **kwargs):
        super().__init__(**kwargs)
        self.job = job
        self.stopped = asyncio.Event()

    async def on_stop(self) -> None:
        self.stopped.set()

    @faust.Service.task
    async def _backfill(self) -> None:
        await self.job.run(self.stopped)


class WebhookService(faust.Service):
    """Delivers queued webhooks (Standard Webhooks) beside the processors; a slow endpoint delays none of them."""

    def __init__(self, settings: Settings, **kwargs):
        super().__init__(**kwargs)
        self.settings = settings
        self.stopped = asyncio.Event()

    async def on_stop(self) -> None:
        self.stopped.set()

    @faust.Service.task
    async def _deliver(self) -> None:
        await run_dispatcher(self.settings, self.stopped)


def run_worker(settings: Settings, worker_name: str = "worker", loglevel: str = "warning",
               processors: tuple[str, ...] = PROCESSORS, clickhouse_query: Query | None = None) -> None:
    app = create_app(settings, worker_name, processors, clickhouse_query)
    tune_for_worker()
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
