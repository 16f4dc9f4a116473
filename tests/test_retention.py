"""Retention without the local server: the plan's pure parts, then the TTL DDL on current ClickHouse (chDB),
which must also expire rows. The 18.16 way (drops and a DELETE mutation) is tested on the real server in
tests/integration/test_retention.py."""

from __future__ import annotations

from datetime import date, timedelta

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.privacy import RetentionPolicy
from schemas.settings import Settings
from sinks import clickhouse
from sinks.retention import (
    RETAINED,
    current_ttl,
    cutoff_date,
    partitions_to_drop,
    supports_ttl,
    ttl_expression,
    ttl_statements,
)
from sinks.table_sink import TABLES


def test_defaults_cover_raw_events_dead_letters_and_identity_events() -> None:
    days = Settings().retention().days
    assert days == {"events": 395, "sessions": 395, "identity_events": 395, "lead_changes": 395,
                    "rule_executions": 395, "webhook_deliveries": 90, "dlq": 30, "stage_changes": 0}
    assert set(days) == set(RETAINED) and set(RETAINED) <= set(TABLES) | {"webhook_deliveries"}  # (no sink)
    with pytest.raises(ValueError):
        RetentionPolicy({"events": -1})


def test_ttl_support_is_told_by_the_version() -> None:
    assert not supports_ttl("18.16.1") and not supports_ttl("19.5.4.22")
    assert supports_ttl("19.6.2.11") and supports_ttl("24.8.4.13") and supports_ttl("26.9.2.1")


def test_a_month_is_dropped_only_when_all_of_it_is_older_than_the_cutoff() -> None:
    cutoff = date(2025, 3, 15)
    assert partitions_to_drop(["202502", "202503", "202412", "202504", "tuple()"], cutoff) == ["202412", "202502"]
    assert partitions_to_drop(["202502"], date(2025, 3, 1)) == ["202502"]  # all of February is before March 1st


@given(st.dates(min_value=date(2001, 1, 1), max_value=date(2100, 1, 1)), st.integers(1, 5000))
def test_a_dropped_month_holds_no_day_on_or_after_the_cutoff(today: date, days: int) -> None:
    cutoff = cutoff_date(today, days)
    months = {f"{(cutoff + timedelta(d)).year}{(cutoff + timedelta(d)).month:02d}" for d in range(-70, 70)}
    for partition in partitions_to_drop(sorted(months), cutoff):
        year, month = int(partition[:4]), int(partition[4:])
        next_month = date(year + month // 12, month % 12 + 1, 1)
        assert next_month <= cutoff  # its last day is before the cutoff
    assert len(partitions_to_drop(sorted(months), cutoff)) == len([m for m in months if int(m) < cutoff.year * 100 +
                                                                    cutoff.month])


def test_ttl_statements_change_only_what_differs() -> None:
    engines = {"events": "MergeTree PARTITION BY toYYYYMM(event_date) ORDER BY x SETTINGS index_granularity = 8192",
               "dlq": "MergeTree ORDER BY x TTL received_date + toIntervalDay(30) SETTINGS index_granularity = 8192",
               "sessions": "ReplacingMergeTree(version) ORDER BY x TTL start_date + toIntervalDay(9)"}
    policy = RetentionPolicy({"events": 395, "dlq": 30, "sessions": 0})
    assert current_ttl(engines["dlq"]) == "received_date + toIntervalDay(30)"
    assert ttl_statements(policy, engines) == [
        ("events", "ttl", "ALTER TABLE events MODIFY TTL event_date + toIntervalDay(395)"),
        ("sessions", "ttl_removed", "ALTER TABLE sessions REMOVE TTL"),
    ]


def _engines(sess) -> dict[str, str]:
    rows = orjson.loads(sess.query("SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()",
                                   "JSON").bytes())["data"]
    return {row["name"]: row["engine_full"] for row in rows}


def test_the_ttl_ddl_runs_on_current_clickhouse_and_expires_rows() -> None:
    from chdb import session as chdb_session

    sess = chdb_session.Session()
    try:
        sess.query("CREATE DATABASE retention")
        sess.query("USE retention")
        for _, path in clickhouse.migration_files():
            for statement in clickhouse.split_statements(path.read_text()):
                sess.query(statement.rstrip(";"))
        assert supports_ttl(sess.query("SELECT version()", "CSV").bytes().decode().strip().strip('"'))
        policy = Settings().retention()
        for _, _, statement in ttl_statements(policy, _engines(sess)):
            sess.query(statement)
        engines = _engines(sess)
        for table, spec in RETAINED.items():
            days = policy.days[table]
            assert (current_ttl(engines[table]) == ttl_expression(table, days)) if days else \
                not current_ttl(engines[table])
        assert ttl_statements(policy, engines) == []  # the next migrate changes nothing

        shorter = RetentionPolicy({**policy.days, "events": 30, "dlq": 0})
        assert [(t, a) for t, a, _ in ttl_statements(shorter, engines)] == [("events", "ttl"), ("dlq", "ttl_removed")]
        for _, _, statement in ttl_statements(shorter, engines):
            sess.query(statement)
        assert ttl_statements(shorter, _engines(sess)) == []

        old_ms, new_ms = (int((date.today() - timedelta(days=age)).strftime("%s")) * 1000 for age in (40, 2))
        sess.query(f"INSERT INTO events (event_id, site_id, ts_ms) VALUES ('old', 's', {old_ms}), ('new', 's', {new_ms})")
        sess.query("OPTIMIZE TABLE events FINAL")  # a merge applies the TTL now instead of in the background
        assert sess.query("SELECT event_id FROM events", "CSV").bytes().split() == [b'"new"']
    finally:
        sess.cleanup()
