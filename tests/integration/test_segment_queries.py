"""Segment membership in SQL, proven on ClickHouse 18.16 and on chdb (a current ClickHouse, in process):
the analyst queries of docs/queries.md ("Segments", each with its expected rows), the queries the API runs
(api.segment_members, quoted verbatim in "The segments API's queries"), and a property: walking a members
list page by page, whatever the page size, sort and data, gives every current lead member once, in order.

Analyst dataset (site "demo", each change loaded twice as a replay writes it; a row of site "other" must
never show): in pricing-viewers Ada entered, left a day later and came back, Bob entered, Cyd stayed 4 hours;
in known-contacts Ada and Eve entered; in webinar, long ago, Ada stayed 16 days and Bob entered.
The API's dataset is tests/segment_seed.py (site acme).
"""

from __future__ import annotations

import itertools
import re
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api import lead_profile as lp
from api import segment_members as sm
from schemas.rules import LeadSnapshot
from schemas.segments import SegmentChange
from sinks import clickhouse
from tests import segment_seed as seed
from tests.integration.test_lead_profile import DOCS, SEGMENT_SECTIONS, ChdbClient

SITE = "demo"
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
BASE_MS = (int(time.time()) // 86_400 - 3) * DAY_MS
ANALYST, API = SEGMENT_SECTIONS


def _utc_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp() * 1000)


def _change(segment_id: str, member: str, seq: int, ts_ms: int, cause: str = "event:e", site_id: str = SITE
            ) -> SegmentChange:
    return SegmentChange(site_id, segment_id, member, seq % 2 == 1, ts_ms, cause, 1, "lead", seq,
                         f"seg-{segment_id}-{member}-{seq}")


CHANGES = [
    _change("pricing-viewers", "lead-ada", 1, BASE_MS + 1 * HOUR_MS),
    _change("pricing-viewers", "lead-bob", 1, BASE_MS + 2 * HOUR_MS),
    _change("pricing-viewers", "lead-ada", 2, BASE_MS + 25 * HOUR_MS, "window"),
    _change("pricing-viewers", "lead-cyd", 1, BASE_MS + 26 * HOUR_MS),
    _change("pricing-viewers", "lead-cyd", 2, BASE_MS + 30 * HOUR_MS, "window"),
    _change("pricing-viewers", "lead-ada", 3, BASE_MS + 50 * HOUR_MS),
    _change("known-contacts", "lead-ada", 1, BASE_MS + 1 * HOUR_MS, "identity:i-ada"),
    _change("known-contacts", "lead-eve", 1, BASE_MS + 49 * HOUR_MS),
    _change("webinar", "lead-ada", 1, _utc_ms("2024-12-20T00:00:00")),
    _change("webinar", "lead-ada", 2, _utc_ms("2025-01-05T00:00:00"), "hour:1736035200000"),
    _change("webinar", "lead-bob", 1, _utc_ms("2024-12-31T00:00:00")),
    _change("webinar", "lead-eve", 1, _utc_ms("2025-01-01T00:00:01")),
    _change("pricing-viewers", "lead-x", 1, BASE_MS + 1 * HOUR_MS, site_id="other"),
]


def _day(hours: int) -> str:
    return datetime.fromtimestamp((BASE_MS + hours * HOUR_MS) / 1000, tz=timezone.utc).date().isoformat()


# The rows of the "Segments" section's queries (by their `### ` heading) on the dataset, on both engines.
EXPECTED_ROWS: dict[str, list[tuple]] = {
    "Members of each segment now": [("known-contacts", 2), ("pricing-viewers", 2), ("webinar", 2)],
    "Membership over time: entries, exits and members per day": [
        ("known-contacts", _day(0), 1, 0, 1), ("known-contacts", _day(48), 1, 0, 2),
        ("pricing-viewers", _day(0), 2, 0, 2), ("pricing-viewers", _day(24), 1, 2, 1),
        ("pricing-viewers", _day(48), 1, 0, 2),
    ],
    "How long members stay": [("pricing-viewers", 2, 14.0, 24.0), ("webinar", 1, 384.0, 384.0)],
    "Why members entered and left": [
        ("known-contacts", "entered", "event", 1), ("known-contacts", "entered", "identity", 1),
        ("pricing-viewers", "entered", "event", 4), ("pricing-viewers", "left", "window", 2),
    ],
    "Who was in a segment at a given time": [("lead-ada",), ("lead-bob",)],
}


def load_dataset(insert) -> None:
    seed.insert_membership(insert, CHANGES + CHANGES)
    seed.seed_members(insert)


def _rows(client, sql: str) -> list[tuple]:
    return [tuple(row) for row in client.execute(sql)]


def documented(section: str) -> dict[str, str]:
    """A `## ` section's ```sql blocks by their `### ` heading (or, without one, by their position)."""
    body = next(part for part in re.split(r"^## ", DOCS.read_text(), flags=re.M) if part.startswith(section + "\n"))
    headed = re.findall(r"^### (.+?)$(.*?)(?=^### |\Z)", body, flags=re.M | re.S)
    if headed:
        return {heading: re.search(r"```sql\n(.*?)```", text, flags=re.S)[1] for heading, text in headed}
    return {str(i): block for i, block in enumerate(re.findall(r"```sql\n(.*?)```", body, flags=re.S))}


def _normalised(sql: str) -> str:
    return " ".join(sql.split())


def _module_queries() -> dict[str, str]:
    """The SQL constants api.segment_members defines (not the one it borrows from api.lead_profile)."""
    return {name: getattr(sm, name) for name in dir(sm) if name.endswith("_SQL") and not hasattr(lp, name)}


# ---------------------------------------------------------------------------------------------- checks


def check_analyst_queries(client) -> None:
    queries = documented(ANALYST)
    assert set(queries) == set(EXPECTED_ROWS)
    for heading, expected in EXPECTED_ROWS.items():
        assert (heading, _rows(client, queries[heading])) == (heading, expected)


def walk(client, segment_id: str, of: str, sort: str, limit: int, site_id: str = seed.SITE) -> list[str]:
    ids, cursor = [], None
    while True:
        page = sm.members_page(client, site_id, segment_id, of, sort, limit, cursor)  # type: ignore[arg-type]
        assert len(page.members) <= limit
        ids += [m.lead_id if isinstance(m, sm.LeadMember) else m.domain for m in page.members]
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


def check_api_queries(client) -> None:
    assert sm.member_counts(client, seed.SITE, [*seed.COUNTS, "none"]) == seed.COUNTS | {"none": 0}
    assert sm.member_counts(client, seed.SITE, []) == {}
    for limit in (1, 2, 50):
        assert walk(client, "pricing-viewers", "lead", "score", limit) == seed.PRICING_BY_SCORE
        assert walk(client, "pricing-viewers", "lead", "last_seen", limit) == seed.PRICING_BY_LAST_SEEN
        assert walk(client, "active-companies", "account", "score", limit) == seed.COMPANIES_BY_SCORE
        assert walk(client, "active-companies", "account", "last_seen", limit) == seed.COMPANIES_BY_LAST_SEEN
    ann = sm.members_page(client, seed.SITE, "pricing-viewers", "lead", "score", 1).members[0]
    assert (ann.lead_id, ann.first_channel, ann.last_channel, ann.tags) == ("lead-ann", "referral", "email",
                                                                          ("Consideration",))
    assert sm.members_page(client, SITE, "no-such", "lead").members == ()


# ---------------------------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def chdb_client():
    from chdb import session as chdb_session

    sess = chdb_session.Session()
    client = ChdbClient(sess)
    client.execute("CREATE DATABASE segments")
    client.execute("USE segments")
    client.execute("SET output_format_json_quote_64bit_integers = 0")
    for _, path in clickhouse.migration_files():
        for statement in clickhouse.split_statements(path.read_text()):
            client.execute(statement.rstrip(";"))
    load_dataset(client.insert)
    yield client
    sess.cleanup()


@pytest.fixture(scope="module")
def ch_client(stack_settings):
    """One fresh database on the real ClickHouse 18.16 for this module, with the dataset loaded."""
    settings = replace(stack_settings, clickhouse_database=f"lstest_seg_{uuid.uuid4().hex[:8]}")
    clickhouse.migrate(settings.clickhouse(), verbose=False)
    client = clickhouse.connect(settings.clickhouse())
    load_dataset(lambda table, columns, rows: clickhouse.insert_columnar(client, table, columns, rows))
    yield client
    client.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")


class TestPureCore:
    def test_docs_quote_every_query_the_api_runs_and_nothing_else(self):
        quoted = [_normalised(block) for block in documented(API).values()]
        assert sorted(quoted) == sorted(_normalised(sql) for sql in _module_queries().values())

    @given(st.sampled_from(sm.SORTS), st.integers(0, sm.MAX_SORT_VALUE), st.text(max_size=80))
    def test_a_cursor_decodes_to_what_it_encodes_and_only_for_its_sort(self, sort, value, member_id):
        cursor = sm.encode_cursor(sort, value, member_id)
        assert sm.decode_cursor(cursor, sort) == (value, member_id)
        other = next(s for s in sm.SORTS if s != sort)
        with pytest.raises(sm.BadCursor):
            sm.decode_cursor(cursor, other)

    @given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=60))
    def test_anything_else_is_a_bad_cursor_never_another_error(self, text):
        try:
            value, member_id = sm.decode_cursor(text, "score")
        except sm.BadCursor:
            return
        assert 0 <= value <= sm.MAX_SORT_VALUE and isinstance(member_id, str)

    @given(st.text(max_size=20))
    def test_csv_cells_never_start_like_a_formula(self, text):
        cell = sm.csv_cell(text)
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")) and cell.removeprefix("'") in (text, text[1:])

    def test_bad_arguments_are_refused_before_any_query(self):
        class NoServer:
            def execute(self, query, params=None, external_tables=None):
                raise AssertionError("no query expected")

        for kwargs in ({"limit": 0}, {"limit": sm.EXPORT_PAGE + 1}, {"sort": "name"}, {"cursor": "%%%"}):
            with pytest.raises(ValueError):
                sm.members_page(NoServer(), SITE, "s", "lead", **kwargs)  # type: ignore[arg-type]


PROPERTY_SITES = itertools.count()
MEMBER = st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans(), st.booleans(), st.booleans())


class TestOnChdb:
    def test_analyst_queries(self, chdb_client):
        check_analyst_queries(chdb_client)

    def test_api_queries(self, chdb_client):
        check_api_queries(chdb_client)

    @settings(max_examples=30, deadline=None)
    @given(st.lists(MEMBER, max_size=14), st.integers(1, 5), st.sampled_from(sm.SORTS))
    def test_pages_hold_every_current_lead_member_once_in_order(self, chdb_client, members, limit, sort):
        """members: (score, last seen, known, has an account, left) each; a page of any size, either sort."""
        site = f"prop-{next(PROPERTY_SITES)}"
        leads = [f"lead-{i:02d}" for i in range(len(members))]
        changes, snapshots = [], []
        for lead_id, (score, seen, known, account, left) in zip(leads, members):
            changes.append(_change("s", lead_id, 1, 1_000, site_id=site))
            if left:
                changes.append(_change("s", lead_id, 2, 2_000, site_id=site))
            snapshots.append(LeadSnapshot(site, lead_id, f"{lead_id}@x.example" if known else "",
                                          "x.example" if account else "", [], "{}", score, "{}", 1, seen, "", 1))
        if members:
            seed.insert_membership(chdb_client.insert, changes)
            seed.insert_snapshots(chdb_client.insert, snapshots)
        value = {"score": 0, "last_seen": 1}[sort]
        expected = sorted(((m[value], lead_id) for lead_id, m in zip(leads, members) if not m[4] and (m[2] or m[3])),
                          key=lambda pair: (-pair[0], pair[1]))
        assert walk(chdb_client, "s", "lead", sort, limit, site) == [lead_id for _, lead_id in expected]
        assert sm.member_counts(chdb_client, site, ["s"]) == {"s": len(expected)}


@pytest.mark.integration
class TestOnClickHouse18:
    def test_analyst_queries(self, ch_client):
        check_analyst_queries(ch_client)

    def test_api_queries(self, ch_client):
        check_api_queries(ch_client)
