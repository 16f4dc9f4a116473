"""Board state and click-stream data for the board API and dashboard tests, written the way production
writes them: card moves decided by the pure stage machine and stored through the board store's write side
on one MULTI pipeline (as the board processor does), their stage changes and the click-stream as ClickHouse
rows through `insert_columnar` (as the sinks do), company cards through the company store, and the API
served by uvicorn on an ephemeral port. Shared by tests/integration/test_board_api.py and the browser tests.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import redis
import redis.asyncio as aioredis
import uvicorn
from aiokafka import AIOKafkaConsumer, TopicPartition

from api.app import create_app
from processors.board_store import BoardStore
from processors.boards import CardState, Cause, FactsUpdate, apply_command, fold_updates
from processors.companies import CompanyStore
from processors.runtime.writes import RedisWrites
from schemas.boards import BoardCommand, BoardDefinition, CommandResult, StageChange, StageDefinition
from schemas.companies import Company
from schemas.settings import Settings
from sinks.clickhouse import connect, insert_columnar
from sinks.table_sink import TABLES
from tests.api_keys import api_key

SITE = "acme"
KEY = api_key("acme")
READ_ONLY_KEY = api_key("acme-ro")
OTHER_SITE, OTHER_KEY = "globex", api_key("globex")
API_KEYS = f"{SITE}:{KEY},{SITE}:{READ_ONLY_KEY}:ro,{OTHER_SITE}:{OTHER_KEY}"
HOUR_MS = 3_600_000
MINUTE_MS = 60_000
NOW_MS = int(time.time() * 1000)

PIPELINE = BoardDefinition(id="pipeline", name="Sales pipeline", card="account", stages=[
    StageDefinition(id="new", name="New", entry=True),
    StageDefinition(id="consideration", name="Consideration", when_tag="Consideration"),
    StageDefinition(id="decision", name="Decision", when_tag="Decision"),
    StageDefinition(id="customer", name="Customer"),
])


class BoardSeeder:
    """The one writer of a test's board state, standing in for the board processor's commit and for the sink
    that records its stage changes in ClickHouse."""

    def __init__(self, settings: Settings, site_id: str = SITE, boards: tuple[BoardDefinition, ...] = (PIPELINE,)):
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.store = BoardStore(self.redis, settings.name("ls"))  # write side only: it queues on our pipeline
        self.clickhouse = connect(settings.clickhouse())
        self.site_id = site_id
        self.boards = list(boards)
        self.cards: dict[str, CardState] = {}

    def _commit(self, cards, changes: list[StageChange], views, results=()) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            writes = RedisWrites(pipe)
            writes.set_many({self.store.keys.card_state(self.site_id, card.card_id): card.to_json() for card in cards})
            self.cards.update((card.card_id, card) for card in cards)
            self.store.queue_changes(writes, self.site_id, changes, views)
            for result in results:
                self.store.queue_command_result(writes, result)
            pipe.execute()
        if changes:
            spec = TABLES["stage_changes"]
            insert_columnar(self.clickhouse, "stage_changes", spec.columns,
                            [spec.to_row(change.to_json()) for change in changes])

    def show(self, *cards: tuple[str, str, tuple[str, ...], int], ts_ms: int = NOW_MS - 3 * HOUR_MS) -> None:
        """Cards' facts arrive, (card_id, title, tags, score) each, in one commit (one version bump) as one
        batch of the board processor: each card enters the rightmost stage its tags reach, else the entry stage."""
        states, changes, views = [], [], []
        for card_id, title, tags, score in cards:
            update = FactsUpdate(Cause("system", ts_ms), tags=list(tags), score=score, title=title, activity_ms=ts_ms)
            card = self.cards.get(card_id) or CardState(card_id, self.site_id)
            after, card_changes, card_views, _ = fold_updates(self.boards, card, [update])
            states.append(after)
            changes += card_changes
            views += card_views
        self._commit(states, changes, views)

    def command(self, command: BoardCommand, now_ms: int | None = None) -> CommandResult:
        """Apply a person's command as the board processor will, storing its outcome under its command id."""
        card = self.cards.get(command.card_id) or CardState(command.card_id, self.site_id)
        after, result, changes, views = apply_command(self.boards, card, command, now_ms or int(time.time() * 1000))
        self._commit([after], changes, views, [result])
        return result

    def move(self, card_id: str, to_stage: str, actor: str = "user:sales", now_ms: int | None = None,
             **fields) -> CommandResult:
        return self.command(BoardCommand(f"seed-{card_id}-{to_stage}-{time.time_ns()}", self.site_id, PIPELINE.id,
                                         card_id, "move", actor, to_stage=to_stage, **fields), now_ms)

    def close(self) -> None:
        self.redis.close()
        self.clickhouse.disconnect()


# ------------------------------------------------------------------------------------ ClickHouse click-stream

LEAD_COLUMNS = ("lead_id", "site_id", "email", "visitors", "account_domain", "merged_into", "first_ts_ms",
                "last_ts_ms", "version")
VISITOR_LEAD_COLUMNS = ("site_id", "visitor_id", "since_ts_ms", "lead_id", "version")
SESSION_COLUMNS = ("session_id", "site_id", "visitor_id", "session_index", "start_ms", "end_ms", "duration_ms",
                   "event_count", "pageview_count", "landing_url", "exit_url", "referrer", "channel", "device",
                   "browser", "os", "merged_into", "version")
EVENT_COLUMNS = ("event_id", "site_id", "type", "ts_ms", "visitor_id", "url", "url_path", "title", "channel",
                 "session_id", "referrer", "campaign", "geo_country", "geo_region", "geo_city", "network_org",
                 "network_kind")
LEAD_STATE_COLUMNS = ("site_id", "lead_id", "email", "account_domain", "tags", "tag_sources", "score", "properties",
                      "first_ts_ms", "last_activity_ms", "merged_into", "version")
SESSION_STEPS = ("referrer", "pageview", "pageview", "email_open", "email_click", "exit")
SESSION_PAGES = (("/blog/lead-scoring", "Lead scoring, explained"), ("/pricing", "Pricing"),
                 ("/docs/getting-started", "Getting started"), ("/newsletter/spring", "Spring newsletter"),
                 ("/webinar/spring", "Spring webinar"), ("/signup", "Sign up"))  # one per step
# Where each seeded visitor browses from: (country, region, city, network organisation, network kind)
VISITOR_PLACES = {"v-ann": ("NL", "North Holland", "Amsterdam", "Acme Corporation", "business"),
                  "v-anon": ("DE", "Berlin", "Berlin", "Deutsche Telekom AG", "isp")}


def seed_account_click_stream(settings: Settings, domain: str = "acme.com", sessions: int = 7) -> list[str]:
    """Two leads of `domain` (a known contact, Ann, and an anonymous colleague) with `sessions` sessions
    between them, one hour apart, each with a referrer, pageviews, an email open and click and an exit, Ann's
    from the company's office network in Amsterdam, her colleague's from an ISP in Berlin. Ann has score 40
    and the tag Consideration, her colleague 15 and Webinar. Returns the session ids, newest first. Also
    records the account as added by hand, with its company name."""
    first_ms = NOW_MS - (sessions + 1) * HOUR_MS
    leads = [("lead-ann", SITE, f"ann@{domain}", ["v-ann"], domain, "", first_ms, NOW_MS, 1),
             ("lead-anon", SITE, "", ["v-anon"], domain, "", first_ms, NOW_MS, 1)]
    links = [(SITE, "v-ann", 0, "lead-ann", 1), (SITE, "v-anon", 0, "lead-anon", 1)]
    session_rows, event_rows = [], []
    for i in range(sessions):
        visitor = "v-ann" if i % 2 == 0 else "v-anon"
        start = first_ms + i * HOUR_MS
        session_id = f"s-{i}"
        urls = [f"https://{domain}{path}" for path, _ in SESSION_PAGES]
        session_rows.append((session_id, SITE, visitor, i + 1, start, start + 5 * MINUTE_MS, 5 * MINUTE_MS,
                             len(SESSION_STEPS), 2, urls[0], urls[-1], "https://news.example/", "referral",
                             "desktop", "Chrome", "Linux", "", 1))
        for step, (type_, url, (path, title)) in enumerate(zip(SESSION_STEPS, urls, SESSION_PAGES)):
            event_rows.append((f"{session_id}-e{step}", SITE, type_, start + step * MINUTE_MS, visitor, url,
                               path, title, "referral", session_id,
                               "https://news.example/", "spring" if type_.startswith("email") else "",
                               *VISITOR_PLACES[visitor]))
    client = connect(settings.clickhouse())
    insert_columnar(client, "leads", LEAD_COLUMNS, leads)
    insert_columnar(client, "visitor_leads", VISITOR_LEAD_COLUMNS, links)
    insert_columnar(client, "sessions", SESSION_COLUMNS, session_rows)
    insert_columnar(client, "events", EVENT_COLUMNS, event_rows)
    insert_columnar(client, "lead_state", LEAD_STATE_COLUMNS, [
        (SITE, "lead-ann", f"ann@{domain}", domain, ["Consideration"], "{}", 40, "{}", first_ms, NOW_MS, "", 1),
        (SITE, "lead-anon", "", domain, ["Webinar"], "{}", 15, "{}", first_ms, NOW_MS, "", 1)])
    insert_columnar(client, "manual_accounts", ("site_id", "domain", "company_name", "added_ms"),
                    [(SITE, domain, "Acme Corporation", first_ms)])
    return [f"s-{i}" for i in reversed(range(sessions))]


ACME_COMPANY = Company("acme.com", "Acme Corporation", industry="Software", employees="51-200", employees_min=51,
                       country="NL", website="https://acme.com/", source="file")


def seed_company_card(settings: Settings, company: Company = ACME_COMPANY) -> None:
    """A company card in Redis, as `leadstream companies load` stores it (from any thread: Playwright's sync
    API keeps an event loop running in the test's)."""

    async def publish() -> None:
        client = aioredis.from_url(settings.redis_url)
        try:
            await CompanyStore(client, settings.name("ls")).publish([company])
        finally:
            await client.aclose()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, publish()).result()


# ------------------------------------------------------------------------------------ the API and its commands


@contextmanager
def serve_api(settings: Settings) -> Iterator[str]:
    """The real API (create_app + uvicorn) on 127.0.0.1 and an ephemeral port, in a thread."""
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=2, lifespan="on"))
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def read_commands(settings: Settings, count: int, timeout_s: float = 15) -> list[tuple[int, BoardCommand]]:
    """The first `count` commands on board.commands (partition, command), read from the beginning. Runs its
    own event loop in a thread, so sync tests (and Playwright's sync API) can call it."""

    async def consume() -> list[tuple[int, BoardCommand]]:
        topic = settings.topic("board.commands")
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = [TopicPartition(topic, p) for p in range(settings.partitions)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            found: list[tuple[int, BoardCommand]] = []
            deadline = time.monotonic() + timeout_s
            while len(found) < count and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=200)
                for tp, messages in batches.items():
                    found += [(tp.partition, BoardCommand.from_json(m.value)) for m in messages]
            return sorted(found, key=lambda item: item[1].ts_ms)
        finally:
            await consumer.stop()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, consume()).result()


def expected_partition(settings: Settings, card_id: str) -> int:
    return zlib.crc32(card_id.encode()) % settings.partitions
