"""`leadstream demo`: the whole pipeline on the local stack with synthetic traffic, then a summary.

Each run uses its own site id (demo-<time>) so repeated runs never mix in the summary.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import urllib.request

import redis.asyncio as aioredis

from leadstream.config import Settings
from leadstream.runner import Role, produce, wait_for
from leadstream.traffic import TrafficGenerator, ip_range_table_lines
from processors.identity_store import IdentityGraphStore
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
    ch = clickhouse.connect(settings)
    q = lambda sql: ch.execute(sql, {"site": site_id, "since": since_ms})  # noqa: E731
    out = []
    out.append(_table("Events by type", q(
        "SELECT type, count() AS n FROM events WHERE site_id = %(site)s GROUP BY type ORDER BY n DESC"), ("type", "events")))
    out.append(_table("Events by channel (humans only)", q(
        "SELECT channel, count() AS n, uniqExact(visitor_id) AS visitors FROM events"
        " WHERE site_id = %(site)s AND is_bot = 0 GROUP BY channel ORDER BY n DESC"), ("channel", "events", "visitors")))
    out.append(_table("Sessions", q(
        "SELECT channel, count() AS sessions, toUInt64(avg(duration_ms) / 1000) AS avg_s, sum(is_closed) AS closed"
        " FROM sessions FINAL WHERE site_id = %(site)s AND merged_into = '' AND is_bot = 0"
        " GROUP BY channel ORDER BY sessions DESC"), ("channel", "sessions", "avg length s", "closed")))
    out.append(_table("Top landing pages", q(
        "SELECT landing_url, count() AS n FROM sessions FINAL WHERE site_id = %(site)s AND merged_into = ''"
        " AND is_bot = 0 AND landing_url != '' GROUP BY landing_url ORDER BY n DESC LIMIT 5"), ("landing page", "sessions")))
    out.append(_table("Bots (stored, flagged)", q(
        "SELECT browser, count() AS n FROM events WHERE site_id = %(site)s AND is_bot = 1 GROUP BY browser"
        " ORDER BY n DESC LIMIT 5"),
        ("agent", "events")))
    out.append(_table("Leads", q(
        "SELECT if(email = '', 'anonymous', 'known') AS kind, count() FROM leads FINAL WHERE site_id = %(site)s"
        " AND merged_into = '' GROUP BY kind ORDER BY kind"), ("lead", "count")))
    out.append(_table("Top accounts", q(
        "SELECT account_domain, count() AS leads, countIf(email != '') AS known FROM leads FINAL"
        " WHERE site_id = %(site)s AND merged_into = '' AND account_domain != ''"
        " GROUP BY account_domain ORDER BY leads DESC, account_domain LIMIT 8"), ("account", "leads", "known")))
    out.append(_table("Identity events", q(
        "SELECT kind, count() AS n FROM identity_events FINAL WHERE site_id = %(site)s GROUP BY kind ORDER BY n DESC"),
        ("kind", "events")))
    out.append(_table("Dead letters of this run, by reason", q(
        "SELECT reason, count() AS n FROM dlq WHERE received_ms >= %(since)s GROUP BY reason ORDER BY n DESC"),
        ("reason", "messages")))
    return "\n".join(out)


def _start_api(settings: Settings, site_id: str) -> str:
    """(Re)start the API in the background with a key for this demo site; return the dashboard URL."""
    key = secrets.token_urlsafe(12)
    Role(settings, "api", "api", env={"LEADSTREAM_API_KEYS": f"{site_id}:{key}"}).start_detached()
    base = f"http://{settings.api_host}:{settings.api_port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1):
                break
        except OSError:
            time.sleep(0.3)
    return f"{base}/?site={site_id}&key={key}"


async def _publish_ip_ranges(settings: Settings, csv_text: str) -> None:
    redis = aioredis.from_url(settings.redis_url)
    try:
        await IdentityGraphStore(redis, settings.name("ls")).save_ip_ranges(csv_text)
    finally:
        await redis.aclose()


def run_demo(settings: Settings, visitors: int = 3000, seed: int = 7) -> int:
    site_id = f"demo-{int(time.time())}"
    since_ms = int(time.time() * 1000)
    print(f"\nLeadStream demo — site '{site_id}', {visitors:,} visitors", flush=True)
    ranges = ip_range_table_lines()
    asyncio.run(_publish_ip_ranges(settings, "\n".join(ranges)))
    print(f"Loaded the demo's IP-range table ({len(ranges) - 1} ranges: company offices, ISPs, datacenters)", flush=True)
    roles = [Role(settings, "demo-worker", "worker", "--name", "demo-worker").start(),
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
        print(summary(settings, site_id, since_ms))
        url = _start_api(settings, site_id)
        print(f"\nDashboard (API keeps running; ./dev down stops everything):\n  {url}")
        print(f"\nQuery it yourself: clickhouse-client --port {settings.clickhouse_port} -d {settings.clickhouse_database}"
              f" -q \"SELECT type, count() FROM events WHERE site_id = '{site_id}' GROUP BY type\"")
    finally:
        for role in roles:
            role.stop()
    return 0
