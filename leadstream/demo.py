"""`leadstream demo`: the whole pipeline on the local stack with synthetic traffic, then a summary.

Each run uses its own site id (demo-<time>) so repeated runs never mix in the summary.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson

from api.segment_members import member_counts
from api.site_summary import SUMMARY
from leadstream.admin import apply_definitions_text, load_companies, publish_ip_table
from leadstream.runner import Role, produce, start_workers, wait_drained, wait_for
from leadstream.traffic import TrafficGenerator, company_card_rows, ip_range_table_lines
from processors import webhooks
from processors.board_store import BoardStore
from processors.definitions_store import DefinitionsStore
from processors.runtime.redis_client import redis_from_url
from schemas.rules import webhook_secret_name
from schemas.segments import Segment
from schemas.settings import Settings
from sinks import clickhouse


def _table(title: str, rows: list[tuple], headers: tuple[str, ...]) -> str:
    widths = [max(len(str(h)), *(len(f"{r[i]:,}" if isinstance(r[i], int) else str(r[i])) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    def fmt(row):
        return "  ".join((f"{v:>{w},}" if isinstance(v, int) else f"{str(v):<{w}}") for v, w in zip(row, widths))
    lines = [f"\n{title}", "  " + "  ".join(f"{h:<{w}}" for h, w in zip(headers, widths))]
    lines += ["  " + fmt(r) for r in rows] or ["  (none)"]
    return "\n".join(lines)


def summary(settings: Settings, site_id: str, since_ms: int) -> str:
    ch = clickhouse.connect(settings.clickhouse())
    q = lambda sql: ch.execute(sql, {"site": site_id, "since": since_ms})  # noqa: E731
    out = [_table(query.title, q(query.sql), query.headers) for query in SUMMARY]
    segments = asyncio.run(_segments(settings, site_id))
    counts = member_counts(ch, site_id, [segment.id for segment in segments])
    out.append(_table("Segments (members now; a lead segment counts leads only)",
                      [(s.id, s.of, counts[s.id], s.name) for s in segments], ("segment", "of", "members", "name")))
    out.append(_table("The LeadBoard now (cards per stage, from the live board state)",
                      asyncio.run(_board_columns(settings, site_id)), ("board", "imports", "stage", "cards")))
    out.append(_table("Dead letters of this run, by reason", q(
        "SELECT reason, count() AS n FROM dlq WHERE received_ms >= %(since)s GROUP BY reason ORDER BY n DESC"),
        ("reason", "messages")))
    return "\n".join(out)


async def _segments(settings: Settings, site_id: str) -> list[Segment]:
    redis = redis_from_url(settings.redis_url)
    try:
        return await DefinitionsStore(redis, settings.name("ls")).list_segments(site_id)
    finally:
        await redis.aclose()


async def _board_columns(settings: Settings, site_id: str) -> list[tuple]:
    """Cards per stage as the board shows them (ClickHouse's stage changes also hold cards that later
    folded into another card: a lead that joined its account), and the segment each board imports from."""
    redis = redis_from_url(settings.redis_url)
    try:
        rows = []
        for stored in await DefinitionsStore(redis, settings.name("ls")).list_boards(site_id):
            page = await BoardStore(redis, settings.name("ls")).board(site_id, stored.board, limit_per_stage=0)
            imports = stored.board.import_.segment if stored.board.import_ else "(every lead)"
            rows += [(stored.board.id, imports, column.name, column.count) for column in page.columns]
        return rows
    finally:
        await redis.aclose()


DEMO_DEFINITIONS = Path(__file__).with_name("demo_assets") / "pipeline.yaml"
WEBHOOK_PORT = 8765  # the demo's rules post to http://127.0.0.1:8765/crm-hook
CRM_STAND_IN = "127.0.0.1"


def allowing_the_crm_stand_in(settings: Settings) -> Settings:
    """Webhooks go only to public addresses unless the operator allows more: the demo (and the bench, which runs
    the demo's rules) allow their CRM stand-in's loopback address explicitly."""
    return replace(settings, webhook_allowed_targets=",".join(filter(None, (settings.webhook_allowed_targets,
                                                                            CRM_STAND_IN))))


def demo_secret_env(site_id: str) -> str:
    """The variable the demo's webhook signs with on `site_id`: webhook secrets are per site."""
    return webhook_secret_name(site_id, "CRM")


def demo_definitions(site_id: str) -> str:
    """The demo's file for one site: the file's webhook names site `demo`'s secret variable, this names
    `site_id`'s."""
    return DEMO_DEFINITIONS.read_text().replace(demo_secret_env("demo"), demo_secret_env(site_id))


def hand_over_line(hand_overs: dict[str, str]) -> str:
    """`Hand-over: 12 stage.changed webhooks delivered, owners ann 5 / bob 7` (each webhook's card owner)."""
    owners = Counter(hand_overs.values())
    return (f"Hand-over: {len(hand_overs):,} stage.changed webhooks delivered, owners "
            + (" / ".join(f"{owner} {n}" for owner, n in sorted(owners.items())) or "none"))


class _WebhookReceiver(ThreadingHTTPServer):
    """A stand-in CRM on 127.0.0.1 that checks each webhook's Standard Webhooks signature and counts them."""

    def __init__(self, secret: str):
        self.secret = secret
        self.valid: set[str] = set()
        self.invalid = 0
        self.hand_overs: dict[str, str] = {}  # webhook-id -> the owner of each stage.changed webhook's card
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    webhooks.verify(receiver.secret, dict(self.headers.items()), body)
                    receiver.valid.add(self.headers["webhook-id"])
                    sent = orjson.loads(body)
                    if sent.get("type") == "stage.changed":
                        owner = sent["data"].get("owner") or {}
                        receiver.hand_overs[self.headers["webhook-id"]] = owner.get("id") or "(nobody)"
                    self.send_response(204)
                except webhooks.WebhookVerificationError:
                    receiver.invalid += 1
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", WEBHOOK_PORT), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _start_api(settings: Settings, site_id: str) -> str:
    """(Re)start the API in the background with a key for this demo site; return the dashboard URL."""
    key = secrets.token_urlsafe(24)
    Role(settings, "api", "api", env={"LEADSTREAM_API_KEYS": f"{site_id}:{key}",
                                      "LEADSTREAM_SERVER_SECRET": secrets.token_hex(32)}).start_detached()
    base = f"http://{settings.api_host}:{settings.api_port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1):
                break
        except OSError:
            time.sleep(0.3)
    return f"{base}/board#site={site_id}&key={key}"


def run_demo(settings: Settings, visitors: int = 3000, seed: int = 7) -> int:
    settings = allowing_the_crm_stand_in(settings)
    site_id = f"demo-{int(time.time())}"
    since_ms = int(time.time() * 1000)
    print(f"\nLeadStream demo — site '{site_id}', {visitors:,} visitors", flush=True)
    ranges = ip_range_table_lines()
    print("Loading the demo's IP-range table (company offices, ISPs, datacenters):", flush=True)
    publish_ip_table(settings, "\n".join(ranges))
    print("Loading the demo companies' cards (industry, size, country, web and LinkedIn addresses):", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        cards = Path(folder) / "demo-companies.jsonl"
        cards.write_bytes(b"\n".join(orjson.dumps(row) for row in company_card_rows()))
        if load_companies(settings, str(cards)) != 0:
            return 2
    print("Applying the demo's rules, segments and LeadBoard (leadstream/demo_assets/pipeline.yaml):", flush=True)
    if apply_definitions_text(settings, demo_definitions(site_id), str(DEMO_DEFINITIONS), site_id, "rules") != 0:
        return 2
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    try:
        receiver = _WebhookReceiver(secret)
    except OSError as err:
        print(f"cannot start the demo's webhook receiver on 127.0.0.1:{WEBHOOK_PORT}: {err.strerror}", file=sys.stderr)
        return 2
    roles = [*start_workers(settings, "demo-worker", env={demo_secret_env(site_id): secret}),
             Role(settings, "demo-sink", "sink").start()]
    try:
        now_ms = int(time.time() * 1000)  # traffic of the last ~2 weeks, whenever the demo runs
        traffic = TrafficGenerator(visitors=visitors, seed=seed, site_ids=(site_id,), start_ms=now_ms - 14 * 86_400_000,
                                   now_ms=now_ms)
        print("Sending synthetic traffic to Kafka (events.raw):", flush=True)
        started = time.monotonic()
        sent = asyncio.run(produce(settings, traffic.events(), progress_every=20_000))
        print(f"  sent {sent:,} events ({traffic.valid:,} valid, {sum(traffic.malformed.values()):,} malformed)"
              f" in {time.monotonic() - started:.1f}s", flush=True)
        print("Processing (worker -> Kafka -> sink -> ClickHouse):", flush=True)
        wait_for(settings, "SELECT count() FROM events WHERE site_id = %(site)s", traffic.valid - traffic.duplicates,
                 timeout_s=600, roles=roles, params={"site": site_id}, label="events", progress=True)
        wait_for(settings, "SELECT count() FROM dlq WHERE received_ms >= %(since)s",
                 sum(traffic.malformed.values()) + traffic.duplicates, timeout_s=120, roles=roles,
                 params={"since": since_ms}, label="dead letters", progress=True)
        print(f"  all {sent:,} events accounted for in {time.monotonic() - started:.1f}s", flush=True)
        print("Workflow automation and the LeadBoard (lead processor -> board processor):", flush=True)
        wait_drained(settings, timeout_s=300, roles=roles, progress=True)
        print(summary(settings, site_id, since_ms))
        print(f"\nWebhooks received by the demo's CRM stand-in on 127.0.0.1:{WEBHOOK_PORT}: {len(receiver.valid):,}"
              f" with a valid signature, {receiver.invalid} refused")
        print(hand_over_line(receiver.hand_overs))
        url = _start_api(settings, site_id)
        print(f"\nLeadBoard (API keeps running; ./dev down stops everything):\n  {url}")
        print(f"\nQuery it yourself: clickhouse-client --port {settings.clickhouse_port} -d {settings.clickhouse_database}"
              f" -q \"SELECT type, count() FROM events WHERE site_id = '{site_id}' GROUP BY type\"")
    finally:
        for role in roles:
            role.stop()
        receiver.shutdown()
    return 0
