"""Retention on the local ClickHouse 18.16 (no table TTL): the retention run drops the months older than
each table's cutoff, deletes the rest of the older rows with one mutation, keeps everything newer, logs
what it did, and the sinks' daily job keeps to one run a day."""

from __future__ import annotations

import asyncio
import time
from datetime import date, datetime, timedelta, timezone

import pytest

from schemas.privacy import RetentionPolicy
from sinks import clickhouse
from sinks.retention import RetentionJob, run_retention, supports_ttl

pytestmark = pytest.mark.integration



def _today() -> date:
    """Today in UTC when the test runs (not when the module was collected: a suite can cross midnight)."""
    return datetime.now(timezone.utc).date()


def _ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, 12, tzinfo=timezone.utc).timestamp() * 1000)


def _wait_for_mutations(client, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    pending = "SELECT count() FROM system.mutations WHERE database = currentDatabase() AND is_done = 0"
    while client.execute(pending)[0][0]:
        assert time.monotonic() < deadline, "a retention mutation did not finish"
        time.sleep(0.2)


def test_the_retention_run_drops_old_months_deletes_older_rows_and_keeps_the_rest(settings) -> None:
    client = clickhouse.connect(settings.clickhouse())
    assert not supports_ttl(client.execute("SELECT version()")[0][0])  # the local server is 18.16
    days = 100
    today = _today()
    cutoff = today - timedelta(days=days)
    ages = {"ancient": 400, "month_old": days + 40, "just_older": days + 1, "just_newer": days - 1, "recent": 1}
    rows = [(name, "s", _ms(today - timedelta(days=age))) for name, age in ages.items()]
    clickhouse.insert_columnar(client, "events", ("event_id", "site_id", "ts_ms"), rows)
    clickhouse.insert_columnar(client, "dlq", ("reason", "received_ms"),
                               [("bad_json", ts) for _, _, ts in rows])
    policy = RetentionPolicy({"events": days, "dlq": 1, "identity_events": days})
    sharded = settings.clickhouse()  # as the CLI passes it: the rows go on each shard when there are shards

    done = {row.table_name: row for row in run_retention(client, policy, sharded=sharded)}
    _wait_for_mutations(client)

    assert set(done) == {"events", "dlq", "identity_events"}  # tables with days; identity_events is empty
    assert done["events"].rows == 3 and done["events"].cutoff == cutoff
    old_months = sorted({f"{d.year}{d.month:02d}" for d in (today - timedelta(days=400), today - timedelta(days=days + 40))
                         if (d.year, d.month) < (cutoff.year, cutoff.month)})
    assert done["events"].partitions == old_months
    assert done["identity_events"].action == "nothing"
    assert sorted(r[0] for r in client.execute("SELECT event_id FROM events")) == ["just_newer", "recent"]
    assert client.execute("SELECT count() FROM dlq")[0][0] == 1  # one day: only the recent letter
    logged = client.execute("SELECT table_name, action, rows FROM retention_runs ORDER BY table_name")
    assert [(t, n) for t, _, n in logged] == [("dlq", 4), ("events", 3), ("identity_events", 0)]

    assert run_retention(client, policy, force=False, sharded=sharded) == []  # the sinks' daily run: done today
    again = {row.table_name: row.action for row in run_retention(client, policy, sharded=sharded)}
    assert again == {"events": "nothing", "dlq": "nothing", "identity_events": "nothing"}
    client.disconnect()


async def test_the_sinks_daily_job_runs_at_start_and_logs_its_run(settings) -> None:
    client = clickhouse.connect(settings.clickhouse())
    today = _today()
    clickhouse.insert_columnar(client, "sessions", ("session_id", "site_id", "visitor_id", "start_ms", "version"),
                               [("old", "s", "v", _ms(today - timedelta(days=90)), 1),
                                ("new", "s", "v", _ms(today), 1)])
    stop = asyncio.Event()
    job = asyncio.create_task(RetentionJob(settings.clickhouse(), RetentionPolicy({"sessions": 30})).run(stop))
    deadline = time.monotonic() + 60
    while not client.execute("SELECT count() FROM retention_runs")[0][0]:
        assert time.monotonic() < deadline, "the job did not run"
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(job, 10)
    _wait_for_mutations(client)
    assert [r[0] for r in client.execute("SELECT session_id FROM sessions")] == ["new"]
    client.disconnect()
