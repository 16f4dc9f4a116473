"""History for new counts, read from `events` on current ClickHouse (chdb): a lead backfilled from it
ends in the same membership as a lead that counted the same events live; the membership table's DDL and
its current-members query run there too (tests/integration/test_segment_history.py runs both on 18.16)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from processors.conditions import url_matcher
from processors.segment_history import backfill_records, glob_regex, history_queries
from processors.segments import on_backfill
from schemas.events import EnrichedEvent
from schemas.segments import SegmentChange
from sinks import clickhouse
from tests.integration.test_lead_profile import ChdbClient
from tests.test_rules import DAY_MS, HOUR_MS, SITE, T0, event
from tests.test_segments import Lead, segments

EVENT_COLUMNS = tuple(f.name for f in dataclasses.fields(EnrichedEvent))
MEMBERSHIP_COLUMNS = tuple(f.name for f in dataclasses.fields(SegmentChange))
CURRENT_MEMBERS_SQL = """
SELECT member_id FROM segment_membership
WHERE site_id = %(site_id)s AND segment_id = %(segment_id)s
GROUP BY member_id HAVING argMax(entered, (ts_ms, seq)) = 1 ORDER BY member_id"""

BEFORE = segments({"id": "all", "if": []})
AFTER = segments(
    {"id": "all", "if": []},
    {"id": "pricing-twice", "if": [{"count": {"event": "pageview", "url": "*/PRICING*", "utm_source": "News"},
                                    "within": "14d", "op": "gt", "value": 1}]},
    {"id": "sessions", "if": [{"count": {"event": "any", "distinct": "session"}, "within": "3d", "op": "gt",
                               "value": 2}]}, version=2)


def history_events() -> list[EnrichedEvent]:
    made = []
    for lead in range(6):
        for i in range(lead + 1):
            url = "https://acme.com/pricing/pro" if i % 2 == 0 else "https://acme.com/blog"
            made.append(event(f"l{lead}-e{i}", ts_ms=T0 + i * 20 * HOUR_MS, url=url, utm_source="news",
                              session_id=f"l{lead}-s{i}", lead_id=f"lead-{lead}", received_ms=T0 + 30 * DAY_MS))
    made.append(event("bot", ts_ms=T0, url="https://acme.com/pricing", is_bot=True, lead_id="lead-0"))
    made.append(event("old", ts_ms=T0 - 30 * DAY_MS, url="https://acme.com/pricing", lead_id="lead-5"))
    return made


def in_window(lead: Lead) -> dict[str, list[list[Any]]]:
    state = lead.state.segments
    kept = {key: [entry for entry in entries if entry[0] + AFTER.counters[key].window_ms > state.clock_ms]
            for key, entries in state.counters.items()}
    return {key: entries for key, entries in kept.items() if entries}


def run_history(client: Any, insert: Any) -> None:
    insert("events", EVENT_COLUMNS, [dataclasses.astuple(e) for e in history_events()])
    as_of = T0 + 6 * 20 * HOUR_MS
    queries = history_queries(AFTER, BEFORE, SITE, as_of)
    assert len(queries) == 2
    rows = {key: [tuple(row) for row in client.execute(sql, params)] for key, (sql, params) in queries.items()}
    leads = [f"lead-{n}" for n in range(7)]
    records = {r.lead_id: r for r in backfill_records(AFTER, SITE, as_of, leads, rows)}
    assert sorted(records) == leads and records["lead-6"].counters == {}
    for n in range(6):
        backfilled = Lead(AFTER, lead_id=f"lead-{n}")
        backfilled.see(event("now", ts_ms=as_of, url="https://acme.com/"))
        backfilled._take(on_backfill(AFTER, backfilled.state, records[f"lead-{n}"]))
        live = Lead(AFTER, lead_id=f"lead-{n}")
        live.see(*sorted((e for e in history_events() if e.lead_id == f"lead-{n}" and not e.is_bot),
                         key=lambda e: e.ts_ms), event("now", ts_ms=as_of, url="https://acme.com/"))
        assert backfilled.members() == live.members(), n
        assert in_window(backfilled) == in_window(live), n
    assert Lead(AFTER, lead_id="lead-4").members() == []

    changes = [SegmentChange(SITE, "s", f"lead-{n}", entered, T0 + seq, "event:e", 2, "lead", seq, f"c{n}{seq}")
               for n in range(3) for seq, entered in enumerate([True, False, True][: n + 1], start=1)]
    insert("segment_membership", MEMBERSHIP_COLUMNS, [dataclasses.astuple(c) for c in changes + changes[:2]])
    assert client.execute(CURRENT_MEMBERS_SQL, {"site_id": SITE, "segment_id": "s"}) == [("lead-0",), ("lead-2",)]


@pytest.mark.parametrize("glob", ["*/pricing*", "https://acme.com/p?icing", "*[!x]ricing", "*/a+b(c).html", "*[0-9]"])
def test_globs_match_the_same_urls_in_clickhouse_and_in_python(glob):
    from chdb import session as chdb_session

    urls = ["https://acme.com/pricing", "https://ACME.com/Pricing/pro", "https://acme.com/xricing", "https://a.com/a+b(c).html",
            "https://acme.com/page2", "https://acme.com/"]
    sess = chdb_session.Session()
    try:
        client = ChdbClient(sess)
        found = client.execute("SELECT arrayFilter(u -> match(lowerUTF8(u), %(re)s), %(urls)s)", {"re": glob_regex(glob), "urls": urls})
    finally:
        sess.cleanup()
    assert list(found[0][0]) == [url for url in urls if url_matcher(glob)(url)]


def test_history_on_current_clickhouse():
    from chdb import session as chdb_session

    sess = chdb_session.Session()
    try:
        client = ChdbClient(sess)
        client.execute("CREATE DATABASE seg")
        client.execute("USE seg")
        client.execute("SET output_format_json_quote_64bit_integers = 0")
        for _, path in clickhouse.migration_files():
            for statement in clickhouse.split_statements(path.read_text()):
                client.execute(statement.rstrip(";"))
        run_history(client, client.insert)
    finally:
        sess.cleanup()
