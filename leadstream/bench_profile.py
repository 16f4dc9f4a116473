"""`leadstream bench-profile`: ClickHouse read latency of the Lead Profile and of a 4-step funnel.

Targets (DESIGN.md): a Lead Profile page (last 5 sessions with their events) under 50 ms, and a 4-step
funnel under 1 s over 10 M events. The pipeline is not involved: a synthetic site is written straight into
a separate database, `<database>_bench` (dropped and re-created on every run), so that only reads are timed.
Data is generated with plain lists and reused column values (no numpy), and sent as columnar inserts of
CHUNK_ROWS rows, so 10 M events load in minutes.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from math import ceil

from api.lead_profile import lead_profile
from schemas.settings import ClickHouseConfig, Settings
from sinks import clickhouse

SITE = "bench"
CHUNK_ROWS = 500_000
EVENTS_PER_VISITOR = 50  # ~10 sessions of ~5 events
VISITORS_PER_LEAD = 4
LEADS_PER_ACCOUNT = 10
PROFILE_SAMPLES = 200
FUNNEL_RUNS = 5
PROFILE_TARGET_MS = 50.0
FUNNEL_TARGET_MS = 1000.0
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00Z, fixed so that every run writes the same data
HOUR_MS = 3_600_000
SEED = 7

FUNNEL_SQL = """SELECT countIf(level >= 1) AS home, countIf(level >= 2) AS pricing,
       countIf(level >= 3) AS form_submit, countIf(level >= 4) AS identify
FROM (
    SELECT visitor_id,
           windowFunnel(604800)(ts, type = 'pageview' AND url_path = '/', type = 'pageview' AND url_path = '/pricing',
                                type = 'form_submit', type = 'identify') AS level
    FROM events
    WHERE site_id = %(site_id)s AND is_bot = 0
    GROUP BY visitor_id
)"""

EVENT_COLUMNS = (
    "event_id", "site_id", "type", "ts_ms", "visitor_id", "url", "url_path", "title", "name", "channel",
    "referrer", "utm_source", "utm_medium", "utm_campaign", "email", "session_id", "lead_id",
)  # fmt: skip
SESSION_COLUMNS = (
    "session_id", "site_id", "visitor_id", "session_index", "start_ms", "end_ms", "duration_ms", "event_count",
    "pageview_count", "landing_url", "exit_url", "referrer", "channel", "utm_source", "utm_medium",
    "utm_campaign", "device", "browser", "os", "email", "is_closed", "version",
)  # fmt: skip
LEAD_COLUMNS = (
    "lead_id", "site_id", "email", "visitors", "account_domain", "merged_into", "first_ts_ms", "last_ts_ms", "version"
)
VISITOR_LEAD_COLUMNS = ("site_id", "visitor_id", "since_ts_ms", "lead_id", "version")

# (channel, referrer, utm_source, utm_medium, utm_campaign), repeated to weight them
SOURCES = (
    [("direct", "", "", "", "")] * 4
    + [("organic", "https://www.google.com/", "", "", "")] * 4
    + [("organic", "https://www.bing.com/", "", "", "")]
    + [("social", "https://www.linkedin.com/", "", "", "")] * 2
    + [("referral", "https://news.ycombinator.com/", "", "", "")]
    + [("email", "", "newsletter", "email", "monthly")] * 2
    + [("paid", "https://www.google.com/", "google", "cpc", "brand")] * 2
)
PAGES = ("/", "/pricing", "/features", "/docs", "/docs/install", "/blog", "/blog/kafka-sessions", "/about",
         "/customers", "/contact")
DEVICES = (("desktop", "Chrome", "Windows"), ("desktop", "Firefox", "Linux"), ("mobile", "Safari", "iOS"),
           ("desktop", "Safari", "Mac OS X"), ("mobile", "Chrome Mobile", "Android"))


@dataclass(frozen=True, slots=True)
class Template:
    """One session's event columns; the values are shared string objects, so generating is list extends."""

    types: tuple[str, ...]
    paths: tuple[str, ...]
    urls: tuple[str, ...]
    titles: tuple[str, ...]
    names: tuple[str, ...]
    offsets_ms: tuple[int, ...]
    identifies: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.types)

    def prefix(self, n: int) -> Template:
        return Template(*(column[:n] for column in (self.types, self.paths, self.urls, self.titles, self.names,
                                                   self.offsets_ms, self.identifies)))


_URLS = {path: f"https://bench.example{path}" for path in PAGES}
_TITLES = {path: f"Bench {path}" for path in PAGES}


def _template(steps: Sequence[tuple[str, str]], rng: random.Random) -> Template:
    offsets, at = [], 0
    for _ in steps:
        offsets.append(at)
        at += rng.randrange(5_000, 240_000)
    types = tuple(t for t, _ in steps)
    paths = tuple(p for _, p in steps)
    return Template(types, paths, tuple(_URLS[p] for p in paths), tuple(_TITLES[p] for p in paths),
                    tuple("cta_click" if t == "custom" else "" for t in types), tuple(offsets),
                    tuple(t in ("form_submit", "identify") for t in types))


def session_templates(rng: random.Random, count: int = 200) -> list[Template]:
    """Sessions of 1-9 events (5 on average); a third start on "/", some of those go on to the funnel."""
    templates = []
    for _ in range(count):
        length = rng.choice((1, 2, 3, 4, 5, 5, 6, 7, 8, 9))
        steps = [("pageview", "/" if rng.random() < 0.33 else rng.choice(PAGES))]
        if steps[0][1] == "/" and length >= 2 and rng.random() < 0.5:
            steps.append(("pageview", "/pricing"))
            if length >= 3 and rng.random() < 0.3:
                steps.append(("form_submit", "/pricing"))
                if length >= 4 and rng.random() < 0.6:
                    steps.append(("identify", "/pricing"))
        while len(steps) < length:
            steps.append(("custom", steps[-1][1]) if rng.random() < 0.05 else ("pageview", rng.choice(PAGES)))
        templates.append(_template(steps, rng))
    return templates


class Columns:
    """One table's rows as column lists, sent as a columnar INSERT every CHUNK_ROWS rows."""

    def __init__(self, client, table: str, names: Sequence[str], expected_rows: int | None = None):
        self.client, self.table, self.names, self.expected_rows = client, table, names, expected_rows
        self.lists: list[list] = [[] for _ in names]
        self.written = 0

    def append(self, row: Sequence) -> None:
        for column, value in zip(self.lists, row):
            column.append(value)
        if len(self.lists[0]) >= CHUNK_ROWS:
            self.flush()

    def extend(self, columns: Sequence[Sequence]) -> None:
        """Many rows at once, given column by column (equal lengths, in `names` order)."""
        for column, values in zip(self.lists, columns):
            column += values
        if len(self.lists[0]) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        rows = len(self.lists[0])
        if not rows:
            return
        # straight from the column lists: sinks.clickhouse.insert_columnar takes rows, and transposing costs
        self.client.execute(f"INSERT INTO {self.table} ({', '.join(self.names)}) VALUES", self.lists,
                            columnar=True, types_check=False)
        self.written += rows
        self.lists = [[] for _ in self.names]
        of = f" / {self.expected_rows:,}" if self.expected_rows else ""
        print(f"  {self.table:<14} {self.written:>12,}{of} rows", flush=True)


@dataclass
class Generated:
    events: int
    sessions: int
    visitors: int
    leads: list[str]  # every lead id, merged-away ones included: the profile resolves them


@dataclass(frozen=True)
class Shape:
    """How many visitors, leads and accounts a run of `events` events has."""

    events: int

    @property
    def visitors(self) -> int:
        return max(self.events // EVENTS_PER_VISITOR, 1)

    @property
    def leads(self) -> int:
        return max(self.visitors // VISITORS_PER_LEAD, 1)

    @property
    def accounts(self) -> int:
        return max(self.leads // LEADS_PER_ACCOUNT, 1)

    def visitor_id(self, v: int) -> str:
        return f"v{v:07d}"

    def lead_id(self, lead: int) -> str:
        return f"L{lead:07d}"

    def lead_of(self, v: int) -> int:
        """Visitors v, v + leads, v + 2 * leads, ... share a lead: far apart in the tables' key order."""
        return v % self.leads

    def email(self, lead: int) -> str:
        """Even leads are known contacts."""
        return f"user{lead}@company{lead % self.accounts}.example" if lead % 2 == 0 else ""


def write_click_stream(client, shape: Shape, rng: random.Random) -> tuple[int, list[int], list[int]]:
    """Events and sessions of every visitor; returns the session count and each lead's first / last ms."""
    templates = session_templates(rng)
    suffixes = [f"-{k}" for k in range(max(len(t) for t in templates))]
    span_ms = 40 * 24 * HOUR_MS
    events = Columns(client, "events", EVENT_COLUMNS, shape.events)
    sessions = Columns(client, "sessions", SESSION_COLUMNS)
    first_seen = [BASE_MS + span_ms] * shape.leads
    last_seen = [0] * shape.leads
    session_count = 0
    for v in range(shape.visitors):
        visitor_id, lead = shape.visitor_id(v), shape.lead_of(v)
        lead_id, email = shape.lead_id(lead), shape.email(lead)
        device, browser, os_name = DEVICES[v % len(DEVICES)]
        quota = shape.events // shape.visitors + (1 if v < shape.events % shape.visitors else 0)
        start = BASE_MS + rng.randrange(span_ms // 2)
        first_seen[lead] = min(first_seen[lead], start)
        index = 0
        while quota > 0:
            template = rng.choice(templates)
            if len(template) > quota:
                template = template.prefix(quota)
            n = len(template)
            quota -= n
            index += 1
            session_id = f"{visitor_id}-s{index}"
            channel, referrer, source, medium, campaign = rng.choice(SOURCES)
            times = [start + offset for offset in template.offsets_ms]
            events.extend((  # EVENT_COLUMNS order
                [session_id + suffix for suffix in suffixes[:n]], [SITE] * n, template.types, times,
                [visitor_id] * n, template.urls, template.paths, template.titles, template.names, [channel] * n,
                [referrer] * n, [source] * n, [medium] * n, [campaign] * n,
                [email if identifies else "" for identifies in template.identifies], [session_id] * n,
                [lead_id] * n,
            ))
            sessions.append((  # SESSION_COLUMNS order
                session_id, SITE, visitor_id, index, start, times[-1], times[-1] - start, n,
                template.types.count("pageview"), template.urls[0], template.urls[-1], referrer, channel, source,
                medium, campaign, device, browser, os_name, email if any(template.identifies) else "", 1, 1,
            ))
            session_count += 1
            last_seen[lead] = max(last_seen[lead], times[-1])
            start = times[-1] + rng.randrange(HOUR_MS, 72 * HOUR_MS)
    events.flush()
    sessions.flush()
    return session_count, first_seen, last_seen


def write_identity(client, shape: Shape, first_seen: Sequence[int], last_seen: Sequence[int]) -> list[str]:
    """visitor_leads and leads rows (every tenth known lead absorbed an anonymous one); returns all lead ids."""
    links = Columns(client, "visitor_leads", VISITOR_LEAD_COLUMNS, shape.visitors)
    for v in range(shape.visitors):
        links.append((SITE, shape.visitor_id(v), 0, shape.lead_id(shape.lead_of(v)), 1))
    links.flush()
    leads = Columns(client, "leads", LEAD_COLUMNS)
    lead_ids = []
    for k in range(shape.leads):
        lead_id, email = shape.lead_id(k), shape.email(k)
        visitors = [shape.visitor_id(v) for v in range(k, shape.visitors, shape.leads)]
        domain = f"company{k % shape.accounts}.example" if email or k % 4 == 1 else ""
        leads.append((lead_id, SITE, email, visitors, domain, "", first_seen[k], last_seen[k], 1))
        lead_ids.append(lead_id)
        if email and k % 10 == 0:
            lead_ids.append("M" + lead_id[1:])
            leads.append((lead_ids[-1], SITE, "", [], "", lead_id, first_seen[k], first_seen[k], 2))
    leads.flush()
    return lead_ids


def generate(client, events: int, seed: int = SEED) -> Generated:
    """Write `events` events with their sessions, visitor->lead links and leads into the bench database."""
    shape = Shape(events)
    session_count, first_seen, last_seen = write_click_stream(client, shape, random.Random(seed))
    return Generated(events, session_count, shape.visitors, write_identity(client, shape, first_seen, last_seen))


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_ms[min(len(sorted_ms) - 1, max(ceil(q * len(sorted_ms)) - 1, 0))]


def timed(calls: Iterable[Callable[[], object]]) -> list[float]:
    """Wall time of each call in ms, ascending."""
    times = []
    for call in calls:
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)


def report_line(name: str, times_ms: Sequence[float], target_ms: float) -> str:
    cells = [percentile(times_ms, q) for q in (0.5, 0.95, 0.99)] + [times_ms[-1]]
    verdict = "ok" if percentile(times_ms, 0.99) < target_ms else "MISSED"
    return (f"{name:<34}{len(times_ms):>6}" + "".join(f"{c:>10.1f}" for c in cells)
            + f"{'< ' + format(target_ms, 'g'):>10}  {verdict}")


def merge_parts(config: ClickHouseConfig) -> float:
    """Merge every table's parts, as background merges eventually would, so reads are timed on settled
    tables rather than during the merge storm that follows a bulk load (on each shard: a Distributed table
    has no parts of its own). Returns the seconds it took."""
    started = time.perf_counter()
    for table in ("events", "sessions", "visitor_leads", "leads", "visitors_by_lead", "leads_by_account"):
        clickhouse.on_each_shard(config, f"OPTIMIZE TABLE {clickhouse.local_table(config, table)} FINAL")
    return time.perf_counter() - started


def measure_reads(client, lead_ids: Sequence[str], events: int, profile_samples: int = PROFILE_SAMPLES) -> None:
    """Time the Lead Profile for random leads and the funnel over the whole site, and print the table."""
    sample = random.Random(SEED).choices(lead_ids, k=profile_samples)
    for lead_id in sample[:5]:  # warm-up: first-query costs (connection, caches) are not what we measure
        lead_profile(client, SITE, lead_id)
    profile_ms = timed(partial(lead_profile, client, SITE, lead_id) for lead_id in sample)
    funnel = client.execute(FUNNEL_SQL, {"site_id": SITE})[0]
    funnel_ms = timed([partial(client.execute, FUNNEL_SQL, {"site_id": SITE})] * FUNNEL_RUNS)
    load = os.getloadavg()[0]
    print()
    print(f"ClickHouse reads over {events:,} events, in ms (load average {load:.1f} on {os.cpu_count()} CPUs)")
    print(f"{'query':<34}{'runs':>6}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}{'p99 goal':>10}")
    print(report_line("lead profile (5 sessions + events)", profile_ms, PROFILE_TARGET_MS))
    print(report_line("4-step funnel (windowFunnel)", funnel_ms, FUNNEL_TARGET_MS))
    print(f"funnel visitors: / {funnel[0]:,} -> /pricing {funnel[1]:,} -> form_submit {funnel[2]:,} "
          f"-> identify {funnel[3]:,}", flush=True)


def run_profile_bench(settings: Settings, events: int = 10_000_000, profile_samples: int = PROFILE_SAMPLES) -> int:
    bench = replace(settings, clickhouse_database=f"{settings.clickhouse_database}_bench")
    clickhouse.connect(settings.clickhouse(), database="default").execute(f"DROP DATABASE IF EXISTS {bench.clickhouse_database}")
    clickhouse.migrate(bench.clickhouse(), verbose=False)
    client = clickhouse.connect(bench.clickhouse())
    print(f"Generating {events:,} events into {bench.clickhouse_database} ...", flush=True)
    started = time.perf_counter()
    data = generate(client, events)
    load_s = time.perf_counter() - started
    print(f"Loaded {data.events:,} events, {data.sessions:,} sessions, {data.visitors:,} visitors and "
          f"{len(data.leads):,} leads in {load_s:.1f} s ({data.events / load_s:,.0f} events/s)", flush=True)
    print(f"Merged the tables' parts (OPTIMIZE FINAL) in {merge_parts(bench.clickhouse()):.1f} s", flush=True)
    measure_reads(client, data.leads, data.events, profile_samples)
    return 0
