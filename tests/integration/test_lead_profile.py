"""Lead Profile read model, analyst queries (docs/queries.md) and the profile benchmark.

One small known dataset is loaded twice: into the real ClickHouse 18.16 server (integration tests) and into
chdb, an in-process current ClickHouse (plain tests), so every query is proven on both engines.

Dataset (site "demo"): lead-ada (ada@acme.com) owns visitors va1 and va2 with 7 sessions; lead-anon was
merged into her. lead-bob (acme.com too) and lead-cyd share the computer "vs": it was Bob's until Cyd
identified on it at SHARED_MS, in the middle of a session. Sites of their own hold a lead with 3,000 visitors
(BIG_SITE), leads merged away or moved (check_lookups_follow_merges_and_moves) and the property test's sessions.
"""

from __future__ import annotations

import itertools
import re
import time
import uuid
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any, Callable, Sequence

import orjson
import pytest
from clickhouse_driver.util.escape import escape_param, escape_params
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from api import lead_profile as lp
from api.app import create_app
from leadstream.bench_profile import percentile, run_profile_bench
from schemas.events import ID_MAX_CHARS
from sinks import clickhouse
from tests.api_keys import api_key

SITE = "demo"
HOUR_MS = 3_600_000
MINUTE_MS = 60_000
BASE_MS = (int(time.time()) // 86_400 - 3) * 86_400_000  # midnight UTC three days ago: inside "last 30 days"
SHARED_MS = BASE_MS + 30 * HOUR_MS
DOCS = Path(__file__).resolve().parents[2] / "docs" / "queries.md"

Insert = Callable[[str, Sequence[str], list[tuple]], None]

# (session id, visitor, start, channel, referrer, utm_source, utm_medium, utm_campaign, [(type, path), ...])
ADA_SESSIONS = [
    ("s-ada-1", "va2", BASE_MS, "organic", "https://www.google.com/", "", "", "",
     [("pageview", "/"), ("pageview", "/blog")]),
    ("s-ada-2", "va1", BASE_MS + 2 * HOUR_MS, "direct", "", "", "", "", [("pageview", "/blog/kafka")]),
    ("s-ada-3", "va1", BASE_MS + 4 * HOUR_MS, "social", "https://t.co/", "", "", "",
     [("pageview", "/"), ("pageview", "/about")]),
    ("s-ada-4", "va2", BASE_MS + 6 * HOUR_MS, "referral", "https://news.ycombinator.com/", "", "", "",
     [("pageview", "/"), ("pageview", "/pricing"), ("form_submit", "/pricing"), ("identify", "/pricing")]),
    ("s-ada-5", "va1", BASE_MS + 8 * HOUR_MS, "email", "", "newsletter", "email", "march", [("pageview", "/pricing")]),
    ("s-ada-6", "va2", BASE_MS + 10 * HOUR_MS, "organic", "https://www.bing.com/", "", "", "",
     [("pageview", "/docs"), ("pageview", "/docs/api")]),
    ("s-ada-7", "va1", BASE_MS + 12 * HOUR_MS, "paid", "https://www.google.com/", "google", "cpc", "spring",
     [("pageview", "/pricing"), ("pageview", "/signup"), ("custom", "/signup")]),
]
SHARED_SESSIONS = [
    ("s-bob-1", "vb", BASE_MS + 20 * HOUR_MS, "direct", "", "", "", "", [("pageview", "/")]),
    ("s-vs-1", "vs", SHARED_MS - 5 * HOUR_MS, "referral", "https://example.org/", "", "", "", [("pageview", "/docs")]),
    ("s-vs-3", "vs", SHARED_MS + 3 * HOUR_MS, "email", "", "digest", "email", "april", [("pageview", "/pricing")]),
]
# straddles SHARED_MS: the first event is Bob's, the identify and what follows are Cyd's
STRADDLING = ("s-vs-2", "vs", SHARED_MS - 10 * MINUTE_MS, "organic", "https://duckduckgo.com/", "", "", "",
              [("pageview", "/"), ("identify", "/"), ("pageview", "/pricing")])
SESSION_SPECS = ADA_SESSIONS + SHARED_SESSIONS + [STRADDLING]

EVENT_COLUMNS = ("event_id", "site_id", "type", "ts_ms", "visitor_id", "url", "url_path", "title", "name",
                 "channel", "email", "session_id", "referrer", "utm_source", "utm_medium", "utm_campaign",
                 "geo_country", "geo_region", "geo_city", "network_org", "network_kind", "network_domain", "ip")
# Where each visitor browses from: (geo_country, geo_region, geo_city, network_org, network_kind, network_domain,
# ip: the address's network part, as stored)
VISITOR_NETWORKS = {
    "va1": ("NL", "North Holland", "Amsterdam", "Acme", "business", "acme.com", "198.51.100.0"),  # Acme's office range
    "va2": ("DE", "Berlin", "Berlin", "Deutsche Telekom AG", "isp", "", "2001:db8:7::"),
    "vb": ("NL", "North Holland", "Amsterdam", "Acme", "business", "acme.com", "198.51.100.0"),
    "vs": ("GB", "England", "London", "GLOBEX", "business", "", "203.0.113.0"),
}
COMPANY_COLUMNS = ("domain", "name", "industry", "employees", "employees_min", "country", "website", "linkedin_url",
                   "logo_url", "source", "updated_ms")
LEAD_STATE_COLUMNS = ("site_id", "lead_id", "email", "account_domain", "tags", "tag_sources", "score", "properties",
                      "first_ts_ms", "last_activity_ms", "merged_into", "version")
SESSION_COLUMNS = ("session_id", "site_id", "visitor_id", "session_index", "start_ms", "end_ms", "duration_ms",
                   "event_count", "pageview_count", "landing_url", "exit_url", "referrer", "channel", "utm_source",
                   "utm_medium", "utm_campaign", "device", "browser", "os", "email", "merged_into", "version")


def _event_times(spec) -> list[int]:
    session_id, _, start, *_, steps = spec
    if session_id == "s-vs-2":
        return [start, SHARED_MS, SHARED_MS + 10 * MINUTE_MS]
    return [start + i * MINUTE_MS for i in range(len(steps))]


def _email(visitor: str, type_: str) -> str:
    if type_ not in ("identify", "form_submit"):
        return ""
    return "cyd@globex.com" if visitor == "vs" else "ada@acme.com"


_NUMERIC = {"session_index", "start_ms", "end_ms", "duration_ms", "event_count", "pageview_count", "version"}


def _session_row(**values: Any) -> tuple:
    defaults = {"site_id": SITE, "device": "desktop", "browser": "Chrome", "os": "Linux", "version": 2}
    return tuple({**defaults, **values}.get(column, 0 if column in _NUMERIC else "") for column in SESSION_COLUMNS)


def dataset_rows() -> dict[str, tuple[Sequence[str], list[tuple]]]:
    """Every table's rows, including superseded versions that only FINAL / argMax hide."""
    events, sessions = [], []
    for spec in SESSION_SPECS:
        session_id, visitor, start, channel, referrer, source, medium, campaign, steps = spec
        times = _event_times(spec)
        urls = [f"https://acme.com{path}" for _, path in steps]
        for i, ((type_, path), ts, url) in enumerate(zip(steps, times, urls)):
            events.append((f"{session_id}-e{i}", SITE, type_, ts, visitor, url, path, f"Acme {path}",
                           "signup_click" if type_ == "custom" else "", channel, _email(visitor, type_), session_id,
                           referrer, source, medium, campaign, *VISITOR_NETWORKS.get(visitor, ("",) * 7)))
        sessions.append(_session_row(
            session_id=session_id, visitor_id=visitor, start_ms=start, end_ms=times[-1],
            duration_ms=times[-1] - start,
            session_index=sum(1 for other in SESSION_SPECS if other[1] == visitor and other[2] <= start),
            event_count=len(steps), pageview_count=sum(t == "pageview" for t, _ in steps), landing_url=urls[0],
            exit_url=urls[-1], referrer=referrer, channel=channel, utm_source=source, utm_medium=medium,
            utm_campaign=campaign, email=next((_email(visitor, t) for t, _ in steps if _email(visitor, t)), ""),
        ))
    latest = dict(zip(SESSION_COLUMNS, next(s for s in sessions if s[0] == "s-ada-7")))
    superseded_start = BASE_MS + 2 * HOUR_MS - MINUTE_MS
    sessions += [
        _session_row(**latest | {"channel": "direct", "version": 1}),  # an older version of s-ada-7
        _session_row(session_id="s-ada-0", visitor_id="va1", start_ms=superseded_start, end_ms=superseded_start,
                     event_count=1, channel="direct", version=1),  # ... became s-ada-2: only its tombstone is current
        _session_row(session_id="s-ada-0", visitor_id="va1", start_ms=superseded_start, merged_into="s-ada-2",
                     version=3),
    ]
    ada_first, ada_last = BASE_MS, BASE_MS + 12 * HOUR_MS + 2 * MINUTE_MS
    leads = [
        ("lead-ada", SITE, "ada@acme.com", ["va1", "va2"], "acme.com", "", ada_first, ada_last, 2),
        ("lead-anon", SITE, "", ["va2"], "", "", ada_first, BASE_MS + 6 * HOUR_MS, 1),
        ("lead-anon", SITE, "", [], "", "lead-ada", ada_first, BASE_MS + 6 * HOUR_MS, 2),
        ("lead-bob", SITE, "bob@acme.com", ["vb"], "acme.com", "", BASE_MS + 20 * HOUR_MS,
         SHARED_MS - 10 * MINUTE_MS, 1),
        ("lead-cyd", SITE, "cyd@globex.com", ["vs"], "globex.com", "", SHARED_MS, SHARED_MS + 3 * HOUR_MS, 1),
    ]
    visitor_leads = [
        (SITE, "va1", 0, "lead-ada", 2), (SITE, "va2", 0, "lead-anon", 1), (SITE, "va2", 0, "lead-ada", 2),
        (SITE, "vb", 0, "lead-bob", 1), (SITE, "vs", 0, "lead-bob", 1), (SITE, "vs", SHARED_MS, "lead-cyd", 1),
    ]
    dlq = [("bad_json", "Expecting value", "{not json", "events.raw", 0, 1, BASE_MS),
           ("bad_json", "Expecting value", "[", "events.raw", 0, 2, BASE_MS + 1),
           ("missing_field", "event_id: field required", "{}", "events.raw", 1, 7, BASE_MS + 2),
           ("bad_json", "Expecting value", "{not json", "events.raw", 0, 3, BASE_MS + 3)]  # the same bytes again
    return {
        "events": (EVENT_COLUMNS, events),
        "sessions": (SESSION_COLUMNS, sessions),
        "leads": (("lead_id", "site_id", "email", "visitors", "account_domain", "merged_into", "first_ts_ms",
                   "last_ts_ms", "version"), leads),
        "visitor_leads": (("site_id", "visitor_id", "since_ts_ms", "lead_id", "version"), visitor_leads),
        "dlq": (("reason", "message", "raw", "topic", "raw_partition", "raw_offset", "received_ms"), dlq),
        "retention_runs": (("table_name", "days", "cutoff", "action", "partitions", "rows", "ts_ms"),
                           [("events", 395, date(2025, 1, 1), "nothing", [], 0, BASE_MS)]),
        "lead_state": (LEAD_STATE_COLUMNS, [
            (SITE, "lead-ada", "ada@acme.com", "acme.com", ["Consideration"], "{}", 15, "{}", ada_first, ada_last, "",
             1),
            (SITE, "lead-ada", "ada@acme.com", "acme.com", ["Consideration", "Decision"], "{}", 70, "{}", ada_first,
             ada_last, "", 2),  # the newer version
            ("other-site", "lead-bob", "", "", ["Elsewhere"], "{}", 99, "{}", 0, 0, "", 1)]),
        "companies": (COMPANY_COLUMNS, [
            ("acme.com", "Acme", "Software", "51-200", 51, "NL", "https://acme.com/", "", "", "file", BASE_MS),
            ("acme.com", "Acme B.V.", "Software", "201-500", 201, "NL", "https://acme.com/", "", "", "file",
             BASE_MS + 1),  # a newer version of the card
            ("globex.com", "Globex", "Logistics", "1001-5000", 1001, "GB", "", "", "", "provider:enrich.example",
             BASE_MS)]),
    }


def load_dataset(insert: Insert) -> None:
    for table, (columns, rows) in dataset_rows().items():
        for row in rows:  # one insert per row: each version lands in its own part, as in production
            insert(table, columns, [row])


# ---------------------------------------------------------------------------------------------- engines


class ChdbClient:
    """clickhouse_driver.Client's `execute` over a chdb session (current ClickHouse, in process). chdb takes
    no external tables: each one is a Memory table for the duration of the query."""

    def __init__(self, session) -> None:
        self.session = session

    def execute(
        self, query: str, params: dict[str, Any] | None = None, external_tables: list[dict] | None = None
    ) -> list[tuple]:
        if params is not None:
            query = query % escape_params(params, None)
        external_tables = external_tables or []
        for table in external_tables:
            columns = ", ".join(f"{name} {type_}" for name, type_ in table["structure"])
            self.session.query(f"CREATE TABLE {table['name']} ({columns}) ENGINE = Memory")
            if table["data"]:
                names = [name for name, _ in table["structure"]]
                self.insert(table["name"], names, [tuple(row[name] for name in names) for row in table["data"]])
        try:
            payload = self.session.query(query, "JSONCompact").bytes()
        finally:
            for table in external_tables:
                self.session.query(f"DROP TABLE {table['name']}")
        return [tuple(row) for row in orjson.loads(payload)["data"]] if payload else []

    def insert(self, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
        values = ", ".join("(" + ", ".join(str(escape_param(v, None)) for v in row) + ")" for row in rows)
        self.session.query(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}")


@pytest.fixture(scope="module")
def chdb_client():
    from chdb import session as chdb_session

    sess = chdb_session.Session()
    client = ChdbClient(sess)
    client.execute("CREATE DATABASE lp")
    client.execute("USE lp")
    client.execute("SET output_format_json_quote_64bit_integers = 0")
    for _, path in clickhouse.migration_files():
        for statement in clickhouse.split_statements(path.read_text()):
            client.execute(statement.rstrip(";"))
    load_dataset(client.insert)
    yield client
    sess.cleanup()


@pytest.fixture(scope="module")
def ch_settings(stack_settings):
    """One fresh database on the real ClickHouse 18.16 for this module, with the dataset loaded."""
    settings = replace(stack_settings, clickhouse_database=f"lstest_lp_{uuid.uuid4().hex[:8]}")
    clickhouse.migrate(settings.clickhouse(), verbose=False)
    client = clickhouse.connect(settings.clickhouse())
    load_dataset(lambda table, columns, rows: clickhouse.insert_columnar(client, table, columns, rows))
    yield settings
    admin = clickhouse.connect(settings.clickhouse(), database="default")
    for database in (settings.clickhouse_database, f"{settings.clickhouse_database}_bench"):
        admin.execute(f"DROP DATABASE IF EXISTS {database}")


@pytest.fixture(scope="module")
def ch_client(ch_settings):
    return clickhouse.connect(ch_settings.clickhouse())


# ------------------------------------------------------------------------------------- shared checks


def check_ada_profile(client) -> None:
    first = lp.lead_profile(client, SITE, "lead-ada")
    assert first is not None
    assert first.identity == lp.Identity("lead-ada", "ada@acme.com", True, ("va1", "va2"), "",
                                         BASE_MS, BASE_MS + 12 * HOUR_MS + 2 * MINUTE_MS)
    assert first.account == lp.Account("acme.com", 1)
    assert first.first_touch == lp.Touch(BASE_MS, "organic", "https://www.google.com/", "", "", "",
                                         "https://acme.com/", "va2", "s-ada-1")
    assert first.last_touch == lp.Touch(BASE_MS + 12 * HOUR_MS, "paid", "https://www.google.com/", "google", "cpc",
                                        "spring", "https://acme.com/pricing", "va1", "s-ada-7")
    assert first.session_count == 7
    assert [s.session_id for s in first.sessions] == ["s-ada-7", "s-ada-6", "s-ada-5", "s-ada-4", "s-ada-3"]
    assert first.has_more
    newest = first.sessions[0]
    assert (newest.channel, newest.session_index, newest.event_count) == ("paid", 4, 3)
    assert [(e.type, e.url, e.name) for e in newest.events] == [
        ("pageview", "https://acme.com/pricing", ""), ("pageview", "https://acme.com/signup", ""),
        ("custom", "https://acme.com/signup", "signup_click")]
    assert [e.ts_ms for e in newest.events] == sorted(e.ts_ms for e in newest.events)
    assert [e.type for e in first.sessions[3].events] == ["pageview", "pageview", "form_submit", "identify"]

    second = lp.lead_profile(client, SITE, "lead-ada", page=1)
    assert [s.session_id for s in second.sessions] == ["s-ada-2", "s-ada-1"]
    assert not second.has_more
    assert [e.title for e in second.sessions[1].events] == ["Acme /", "Acme /blog"]
    assert lp.lead_profile(client, SITE, "lead-ada", page=2).sessions == ()
    orjson.dumps(first)  # JSON-ready as is


def check_merged_and_shared(client) -> None:
    merged = lp.lead_profile(client, SITE, "lead-anon")
    assert (merged.identity.lead_id, merged.identity.merged_from) == ("lead-ada", "lead-anon")
    assert merged.session_count == 7
    assert lp.lead_profile(client, SITE, "no-such-lead") is None
    assert lp.lead_profile(client, "other-site", "lead-ada") is None

    bob = lp.lead_profile(client, SITE, "lead-bob")
    assert bob.identity.visitors == ("vb", "vs")
    assert [s.session_id for s in bob.sessions] == ["s-vs-2", "s-vs-1", "s-bob-1"]
    assert [e.type for e in bob.sessions[0].events] == ["pageview"]  # Cyd's part of the session is hers
    cyd = lp.lead_profile(client, SITE, "lead-cyd")
    assert (cyd.identity.visitors, cyd.account) == (("vs",), lp.Account("globex.com", 0))
    assert [s.session_id for s in cyd.sessions] == ["s-vs-3", "s-vs-2"]
    assert [e.type for e in cyd.sessions[1].events] == ["identify", "pageview"]
    assert cyd.first_touch.session_id == "s-vs-2"


def check_helpers(client) -> None:
    leads = lp.account_leads(client, SITE, "acme.com")
    assert [(a.lead_id, a.known, a.visitor_count) for a in leads] == [("lead-bob", True, 1), ("lead-ada", True, 2)]
    assert lp.leads_by_channel(client, SITE, "first") == {"direct": 1, "email": 1, "organic": 1}
    assert lp.leads_by_channel(client, SITE, "last") == {"email": 1, "organic": 1, "paid": 1}
    assert lp.account_places(client, SITE, "acme.com") == (  # vs was Bob's computer before Cyd's
        lp.Place("NL", "North Holland", "Amsterdam", 2, 8), lp.Place("DE", "Berlin", "Berlin", 1, 8),
        lp.Place("GB", "England", "London", 1, 5))
    assert lp.account_places(client, SITE, "nobody.example") == ()
    assert lp.account_networks(client, SITE, "acme.com") == (
        lp.Network("Acme", "business", 2, 8), lp.Network("Deutsche Telekom AG", "isp", 1, 8),
        lp.Network("GLOBEX", "business", 1, 5))
    assert lp.account_networks(client, SITE, "nobody.example") == ()


def check_account_panel(client) -> None:
    """The Account Panel of acme.com: its details with places and networks, and each lead with what it did
    (Bob's sessions on the shared computer until Cyd took it over: the one that straddles counts) and where
    it stands (Ada's newest tags and score; no rule touched Bob)."""
    panel = lp.account_panel(client, SITE, "acme.com")
    account = panel.account
    assert (account.known_leads, account.anonymous_leads, account.first_seen_ms) == (2, 0, BASE_MS)
    assert [p.city for p in account.places] == ["Amsterdam", "Berlin", "London"]
    assert [n.org for n in account.networks] == ["Acme", "Deutsche Telekom AG", "GLOBEX"]
    bob_first, bob_last = BASE_MS + 20 * HOUR_MS, SHARED_MS - 10 * MINUTE_MS
    assert panel.leads == (
        lp.PanelLead("lead-bob", "bob@acme.com", True, 1, bob_first, bob_last, first_channel="direct",
                     last_channel="organic", session_count=3, event_count=5, score=0, tags=()),
        lp.PanelLead("lead-ada", "ada@acme.com", True, 2, BASE_MS, BASE_MS + 12 * HOUR_MS + 2 * MINUTE_MS,
                     first_channel="organic", last_channel="paid", session_count=7, event_count=15, score=70,
                     tags=("Consideration", "Decision")),
    )
    assert panel.session_count == 10 and len(panel.sessions) == lp.PAGE_SIZE
    orjson.dumps(panel)
    nobody = lp.account_panel(client, SITE, "nobody.example")
    assert (nobody.leads, nobody.account.places, nobody.account.networks, nobody.sessions) == ((), (), (), ())


LEAD_COLUMNS = ("lead_id", "site_id", "email", "visitors", "account_domain", "merged_into", "first_ts_ms",
                "last_ts_ms", "version")
LINK_COLUMNS = ("site_id", "visitor_id", "since_ts_ms", "lead_id", "version")


def check_lookups_follow_merges_and_moves(client, insert: Insert) -> None:
    """leads_by_account and visitors_by_lead keep rows of leads merged away and of visitors that moved on;
    the readers see through them."""
    site = f"moves-{uuid.uuid4().hex[:6]}"
    insert("leads", LEAD_COLUMNS, [
        ("mv-merged", site, "", ["mvv"], "a.example", "", 1, 2, 1),
        ("mv-merged", site, "", [], "a.example", "mv-kept", 1, 2, 2),
        ("mv-kept", site, "kim@a.example", ["mvv"], "a.example", "", 1, 3, 1),
        ("mv-left", site, "", ["mvv"], "b.example", "", 1, 2, 1),
    ])
    insert("visitor_leads", LINK_COLUMNS, [(site, "mvv", 0, "mv-left", 1), (site, "mvv", 0, "mv-kept", 2)])
    assert (lp.account_size(client, site, "a.example"), lp.account_size(client, site, "b.example")) == (1, 1)
    assert [lead.lead_id for lead in lp.account_leads(client, site, "a.example")] == ["mv-kept"]
    assert lp.lead_profile(client, site, "mv-left").identity.visitors == ()
    kept = lp.lead_profile(client, site, "mv-merged")
    assert (kept.identity.lead_id, kept.identity.visitors, kept.account) == (
        "mv-kept", ("mvv",), lp.Account("a.example", 0))
    assert (kept.session_count, kept.first_touch, kept.sessions, kept.has_more) == (0, None, (), False)


BIG_SITE = "big"
BIG_VISITORS = 3_000  # of the longest ids: inlined in the SQL text, they would overflow max_query_size
HANDOVER_MS = BASE_MS + (BIG_VISITORS + 10) * MINUTE_MS


def load_big_lead(insert: Insert) -> list[str]:
    """lead-big: one session (one pageview) per visitor, a minute apart. Its first visitor's computer
    passed to lead-other at HANDOVER_MS, who had a session on it later: the site's newest. Returns
    lead-big's session ids, newest first."""
    visitors = [f"bv{i:04d}-".ljust(ID_MAX_CHARS, "x") for i in range(BIG_VISITORS)]
    starts = [(f"s-{i:04d}", visitor, BASE_MS + i * MINUTE_MS) for i, visitor in enumerate(visitors)]
    late = ("s-0000-late", visitors[0], HANDOVER_MS + HOUR_MS)
    insert("sessions", SESSION_COLUMNS, [
        _session_row(session_id=session_id, site_id=BIG_SITE, visitor_id=visitor, start_ms=start,
                     end_ms=start + 30_000, duration_ms=30_000, event_count=1, pageview_count=1, channel="direct")
        for session_id, visitor, start in starts + [late]])
    insert("events", EVENT_COLUMNS, [
        (f"{session_id}-e0", BIG_SITE, "pageview", start, visitor, "https://big.example/", "/", "Big", "", "direct",
         "", session_id, "", "", "", "", *("",) * 7) for session_id, visitor, start in starts + [late]])
    insert("visitor_leads", LINK_COLUMNS, [(BIG_SITE, visitor, 0, "lead-big", 1) for visitor in visitors]
           + [(BIG_SITE, visitors[0], HANDOVER_MS, "lead-other", 1)])
    insert("leads", LEAD_COLUMNS, [
        ("lead-big", BIG_SITE, "big@big.example", visitors[:1_000], "big.example", "", BASE_MS, HANDOVER_MS, 1),
        ("lead-other", BIG_SITE, "oz@big.example", visitors[:1], "big.example", "", HANDOVER_MS, HANDOVER_MS, 1),
    ])
    return [session_id for session_id, _, _ in reversed(starts)]


def docs_sql_blocks() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOCS.read_text(), flags=re.S)


# Its queries run over automation and board tables this dataset leaves empty: test_automation_queries.py
# runs them over a dataset of their own.
AUTOMATION_SECTION = "Workflow automation and LeadBoards"
SEGMENT_SECTIONS = ("Segments", "The segments API's queries")  # run over their own dataset (test_segment_queries.py)


def docs_sections() -> dict[str, list[str]]:
    """The ```sql blocks of docs/queries.md under each `## ` heading."""
    parts = re.split(r"^## (.+)$", DOCS.read_text(), flags=re.M)
    return {title: re.findall(r"```sql\n(.*?)```", body, flags=re.S) for title, body in zip(parts[1::2], parts[2::2])}


DOC_PARAMS = {"site_id": SITE, "lead_id": "lead-ada", "domain": "acme.com", "visitors": ("va1", "va2"),
              "from_ms": BASE_MS, "to_ms": BASE_MS + 24 * HOUR_MS, "offset": 0, "page_size": lp.PAGE_SIZE,
              "limit": lp.MAX_ACCOUNT_LEADS, "lead_ids": ("lead-ada",)}
DOC_OWNED = {"va1": [(0, lp.FOREVER_MS)], "va2": [(0, lp.FOREVER_MS)]}  # Ada's ownership


def run_docs_queries(client) -> list[int]:
    """Row count of every ```sql block of docs/queries.md outside AUTOMATION_SECTION and SEGMENT_SECTIONS;
    %(name)s parameters get DOC_PARAMS, and the external table `owned` Ada's ownership."""
    counts = []
    skipped = (AUTOMATION_SECTION, *SEGMENT_SECTIONS)
    for block in (b for title, blocks in docs_sections().items() if title not in skipped for b in blocks):
        params = DOC_PARAMS if "%(" in block else None
        counts.append(len(client.execute(block, params, external_tables=[lp.owned_table({"lead-ada": DOC_OWNED})])))
    return counts


# ---------------------------------------------------------------------------------------------- tests

PROPERTY_SITES = itertools.count()


def _normalised(sql: str) -> str:
    return " ".join(sql.split())


class TestPureCore:
    def test_docs_quote_every_module_query(self):
        docs = {_normalised(block) for block in docs_sql_blocks()}
        constants = [name for name in dir(lp) if name.endswith("_SQL")]
        assert len(constants) >= 7
        assert [name for name in constants if _normalised(getattr(lp, name)) not in docs] == []

    @given(st.lists(st.tuples(st.integers(0, 10**13), st.sampled_from("ABC")), min_size=1, max_size=6,
                    unique_by=lambda link: link[0]))
    def test_ownership_partitions_a_visitors_time(self, links):
        rows = [("v", since, lead) for since, lead in sorted(links)]
        owned = {lead: lp.ownership(rows, lead).get("v", []) for lead in "ABC"}
        probes = [0, 10**13 + 1] + [since for since, _ in links] + [since - 1 for since, _ in links if since]
        for ts in probes:
            owners = [lead for lead, intervals in owned.items() if any(a <= ts < b for a, b in intervals)]
            expected = max(((since, lead) for since, lead in sorted(links) if since <= ts), default=sorted(links)[0])[1]
            assert owners == [expected]

    def test_page_events_stay_inside_their_session_and_ownership(self):
        owned = {"v": [(0, 1_000)]}
        rows = [("s1", "v", 1, 900, 990, 90, 2, 2, "", "", "", "direct", "", "", "", "", "", ""),
                ("s0", "v", 0, 100, 200, 100, 1, 1, "", "", "", "direct", "", "", "", "", "", "")]
        page = [lp.ProfileSession(*row) for row in rows]
        events = [("v", ts, "pageview", f"u{ts}", "", "") for ts in (100, 150, 300, 900, 995, 1_000)]
        filled = lp.attach_events(page, events, owned)
        assert [[e.ts_ms for e in s.events] for s in filled] == [[900], [100, 150]]


    def test_owned_table_has_a_row_per_lead_and_interval(self):
        table = lp.owned_table({"B": {"v3": [(0, 4)]}, "A": {"v2": [(5, lp.FOREVER_MS)], "v1": [(0, 3), (7, 9)]}})
        assert [(row["lead_id"], row["visitor_id"], row["since_ts_ms"], row["until_ts_ms"])
                for row in table["data"]] == [("A", "v1", 0, 3), ("A", "v1", 7, 9), ("A", "v2", 5, lp.FOREVER_MS),
                                              ("B", "v3", 0, 4)]
        assert [name for name, _ in table["structure"]] == list(table["data"][0])

    def test_arguments_are_checked_before_any_query(self):
        class NoServer:
            def execute(self, query, params=None):
                raise AssertionError("no query expected")

        with pytest.raises(ValueError):
            lp.lead_profile(NoServer(), SITE, "lead-ada", page=-1)
        with pytest.raises(ValueError):
            lp.leads_by_channel(NoServer(), SITE, "middle")  # type: ignore[arg-type]

    def test_percentile_is_nearest_rank(self):
        times = [float(ms) for ms in range(1, 101)]
        assert [percentile(times, q) for q in (0.5, 0.95, 0.99, 1.0)] == [50.0, 95.0, 99.0, 100.0]
        assert percentile([7.0], 0.99) == 7.0


class TestOnChdb:
    """The same SQL on a current ClickHouse engine."""

    def test_profile(self, chdb_client):
        check_ada_profile(chdb_client)

    def test_merged_and_shared_computer(self, chdb_client):
        check_merged_and_shared(chdb_client)

    def test_helpers(self, chdb_client):
        check_helpers(chdb_client)

    def test_account_panel(self, chdb_client):
        check_account_panel(chdb_client)

    def test_docs_queries(self, chdb_client):
        counts = run_docs_queries(chdb_client)
        assert len(counts) >= 12 and all(counts), counts

    def test_lookups_follow_merges_and_moves(self, chdb_client):
        check_lookups_follow_merges_and_moves(chdb_client, chdb_client.insert)

    @settings(max_examples=40, deadline=None)
    @given(
        links=st.dictionaries(
            st.sampled_from(["v1", "v2", "v3"]),
            st.lists(st.tuples(st.integers(0, 100), st.sampled_from("ABC")), min_size=1, max_size=4,
                     unique_by=lambda link: link[0]),
            min_size=1),
        owners=st.sets(st.sampled_from("ABC"), min_size=1),
        sessions=st.lists(st.tuples(st.sampled_from(["v1", "v2", "v3"]), st.integers(0, 120), st.integers(0, 40)),
                          max_size=12),
        page_size=st.integers(1, 4),
    )
    def test_sql_pages_are_the_owned_sessions_newest_first(self, chdb_client, links, owners, sessions, page_size):
        """Whatever the ownership (one lead's, or an account's several leads' merged): the SQL totals and
        pages agree with filtering and sorting every session in Python."""
        site = f"prop-{next(PROPERTY_SITES)}"
        rows = [(visitor, since, lead) for visitor in sorted(links) for since, lead in sorted(links[visitor])]
        owned_by_lead = lp.ownership_by_lead(rows, owners)
        owned = lp.merge_intervals(owned_by_lead)
        specs = [(f"s{i:02d}", visitor, start, start + length) for i, (visitor, start, length) in enumerate(sessions)]
        if specs:
            chdb_client.insert("sessions", SESSION_COLUMNS, [
                _session_row(session_id=session_id, site_id=site, visitor_id=visitor, start_ms=start, end_ms=end,
                             channel=f"c{session_id}") for session_id, visitor, start, end in specs])
        expected = sorted(
            ((start, session_id) for session_id, visitor, start, end in specs
             if any(since <= end and start < until for since, until in owned.get(visitor, ()))), reverse=True)
        if not owned:
            return  # no ownership: the profile does not query sessions at all
        paged = []
        for page in range(len(expected) // page_size + 1):
            params = {"site_id": site, "offset": page * page_size, "page_size": page_size}
            count, oldest, newest, rows = chdb_client.execute(
                lp.SESSIONS_PAGE_SQL, params, external_tables=[lp.owned_table(owned_by_lead)])[0]
            assert count == len(expected)
            if expected:
                assert (oldest[0], newest[0]) == (expected[-1][1], expected[0][1])
            paged += [lp.ProfileSession(*row).session_id for row in rows]
        assert paged == [session_id for _, session_id in expected]


@pytest.mark.integration
class TestOnClickHouse18:
    def test_profile(self, ch_client):
        check_ada_profile(ch_client)

    def test_merged_and_shared_computer(self, ch_client):
        check_merged_and_shared(ch_client)

    def test_helpers(self, ch_client):
        check_helpers(ch_client)

    def test_account_panel(self, ch_client):
        check_account_panel(ch_client)

    def test_docs_queries_match_chdb(self, ch_client, chdb_client):
        counts = run_docs_queries(ch_client)
        assert all(counts), counts
        assert counts == run_docs_queries(chdb_client)

    def test_lookups_follow_merges_and_moves(self, ch_client):
        check_lookups_follow_merges_and_moves(
            ch_client, lambda table, columns, rows: clickhouse.insert_columnar(ch_client, table, columns, rows))

    def test_a_lead_with_thousands_of_visitors_pages_in_sql(self, ch_settings, ch_client):
        newest_first = load_big_lead(
            lambda table, columns, rows: clickhouse.insert_columnar(ch_client, table, columns, rows))
        api = TestClient(create_app(replace(ch_settings, api_keys=f"{BIG_SITE}:{api_key('big')}")))

        def page(number: int) -> dict:
            response = api.get(f"/v1/sites/{BIG_SITE}/leads/lead-big", params={"page": number},
                               headers={"X-API-Key": api_key("big")})
            assert response.status_code == 200, response.text
            return response.json()

        first = page(0)
        assert (first["session_count"], first["has_more"]) == (BIG_VISITORS, True)
        assert len(first["identity"]["visitors"]) == BIG_VISITORS
        assert first["account"] == {"domain": "big.example", "other_leads": 1}
        assert [s["session_id"] for s in first["sessions"]] == newest_first[:5]  # not lead-other's late session
        assert [len(s["events"]) for s in first["sessions"]] == [1] * 5
        assert (first["first_touch"]["session_id"], first["last_touch"]["session_id"]) == ("s-0000", "s-2999")
        last = page(BIG_VISITORS // lp.PAGE_SIZE - 1)
        assert ([s["session_id"] for s in last["sessions"]], last["has_more"]) == (newest_first[-5:], False)
        assert page(BIG_VISITORS // lp.PAGE_SIZE)["sessions"] == []

        pages = [lp.lead_profile(ch_client, BIG_SITE, "lead-big", page=number, page_size=1_000) for number in range(3)]
        walked = [session.session_id for profile in pages for session in profile.sessions]
        assert walked == newest_first
        assert lp.lead_profile(ch_client, BIG_SITE, "lead-other").session_count == 1

    def test_tiny_profile_bench(self, ch_settings, capsys):
        assert run_profile_bench(ch_settings, events=20_000, profile_samples=20) == 0
        out = capsys.readouterr().out
        assert "lead profile" in out and "funnel" in out and "p99" in out
