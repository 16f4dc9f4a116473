"""Retention: each ClickHouse table with a retention setting keeps its rows that many days, then loses them.

How, depends on the server (`supports_ttl`, from its version):
- A server with table TTL (ClickHouse 19.6 and later): each table's `TTL <date> + toIntervalDay(N)` is set
  from the settings (`ttl_statements`). `leadstream migrate` reconciles them on every run (a numbered
  migration runs once; a setting may change), and so does every retention run; the server then drops
  expired rows in its own background merges.
- ClickHouse 18.16 (no TTL): a retention run deletes them. A monthly partition entirely older than the
  cutoff is dropped (instant, nothing rewritten: `partitions_to_drop`); the rows left older than the
  cutoff, in the month that straddles it, go with one `ALTER TABLE … DELETE WHERE` mutation, only when
  there are any and no earlier mutation of the table is still running. The sinks run it once a day for
  every retained table (`RetentionJob`); `leadstream retention run` runs it at once.

Every run leaves one row per table in `retention_runs` (migration 0013): what was done, when, and up to
which date. It is the record that retention happened, and how sink processes that share tables keep to
once a day between them.

The age of a row is its event time (`RETAINED`): an event is kept N days from when it happened, not from
when it arrived. Tables not in RETAINED hold current state (leads, lead_state, visitor_leads, the lookups,
companies, segment_membership: a member's "entered" row is its membership) and are kept until erased.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Sequence

from clickhouse_driver import Client

from schemas.privacy import RetentionPolicy
from schemas.settings import ClickHouseConfig
from sinks import clickhouse

log = logging.getLogger(__name__)

TTL_SINCE = (19, 6)  # the first ClickHouse release with table TTL


@dataclass(frozen=True, slots=True)
class Retained:
    """A table retention applies to: the Date expression a row's age is measured on, and whether the
    table is partitioned by its month (toYYYYMM of that date), so whole months can be dropped."""

    date: str
    monthly: bool = True


RETAINED: dict[str, Retained] = {
    "events": Retained("event_date"),
    "sessions": Retained("start_date"),
    "identity_events": Retained("event_date"),
    "lead_changes": Retained("ts_date"),
    "rule_executions": Retained("ts_date"),
    "webhook_deliveries": Retained("ts_date"),
    "dlq": Retained("received_date"),
    "stage_changes": Retained("toDate(intDiv(ts_ms, 1000))", monthly=False),
}

ONCE_A_DAY_S = 24 * 3600
_RECENT_RUN_S = 20 * 3600  # a run of a table this recent (by any process) makes another unnecessary
_TTL_CLAUSE = re.compile(r"\bTTL\s+(.+?)(?:\s+SETTINGS\s|$)", re.DOTALL)


def supports_ttl(version: str) -> bool:
    """Whether a server of this version (`SELECT version()`: "18.16.1", "24.8.4.13") has table TTL."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return (major, minor) >= TTL_SINCE


def ttl_expression(table: str, days: int) -> str:
    return f"{RETAINED[table].date} + toIntervalDay({days})"


def current_ttl(engine_full: str) -> str:
    """The TTL expression in a table's `system.tables.engine_full` ('' for none)."""
    found = _TTL_CLAUSE.search(engine_full)
    return found.group(1).strip() if found else ""


def _normalised(expression: str) -> str:
    return re.sub(r"\s+", "", expression)


def ttl_statements(policy: RetentionPolicy, engines: dict[str, str]) -> list[tuple[str, str, str]]:
    """(table, action, statement) for every retained table whose TTL differs from the policy, given each
    existing table's `engine_full`: `ttl` sets or changes one, `ttl_removed` removes one (0 days)."""
    changes = []
    for table in RETAINED:
        if table not in engines:
            continue
        days = policy.days.get(table, 0)
        have = current_ttl(engines[table])
        if days and _normalised(have) != _normalised(ttl_expression(table, days)):
            changes.append((table, "ttl", f"ALTER TABLE {table} MODIFY TTL {ttl_expression(table, days)}"))
        elif not days and have:
            changes.append((table, "ttl_removed", f"ALTER TABLE {table} REMOVE TTL"))
    return changes


def cutoff_date(today: date, days: int) -> date:
    """Rows dated before this day are older than `days` days."""
    return today - timedelta(days=days)


def partitions_to_drop(partitions: Sequence[str], cutoff: date) -> list[str]:
    """The monthly partitions (ids like '202401') whose every day is before the cutoff."""
    first_kept_month = cutoff.year * 100 + cutoff.month
    return sorted(p for p in partitions if p.isdigit() and len(p) == 6 and int(p) < first_kept_month)


@dataclass(frozen=True, slots=True)
class RunRow:
    """One row of `retention_runs`."""

    table_name: str
    days: int
    cutoff: date
    action: str  # ttl | ttl_removed | ttl_kept | dropped | deleted | dropped_and_deleted | nothing | pending
    partitions: list[str]
    rows: int  # rows older than the cutoff when the run looked (dropped or deleted)
    ts_ms: int


RUN_COLUMNS = ("table_name", "days", "cutoff", "action", "partitions", "rows", "ts_ms")


def _engines(client: Client) -> dict[str, str]:
    rows = client.execute("SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()")
    return {name: engine for name, engine in rows}


def reconcile_ttl(client: Client, policy: RetentionPolicy, tables: Sequence[str] | None = None) -> list[RunRow]:
    """Set each retained table's TTL from the policy (a server with TTL only). Returns what changed."""
    today = datetime.now(timezone.utc).date()
    wanted = set(RETAINED if tables is None else tables)
    done = []
    for table, action, statement in ttl_statements(policy, _engines(client)):
        if table in wanted:
            client.execute(statement)
            days = policy.days.get(table, 0)
            done.append(RunRow(table, days, cutoff_date(today, days), action, [], 0, _now_ms()))
    return done


def _delete_old_rows(client: Client, table: str, days: int, today: date, name: str = "") -> RunRow:
    """The 18.16 way: drop whole months older than the cutoff, then one mutation for the straddling month.
    `name`: the table's name on this server, when it is not `table` (a shard's local table)."""
    spec, cutoff = RETAINED[table], cutoff_date(today, days)
    params = {"table": name or table, "cutoff": cutoff.isoformat()}
    table = name or table
    pending = client.execute("SELECT count() FROM system.mutations WHERE database = currentDatabase() "
                             "AND table = %(table)s AND is_done = 0", params)[0][0]
    if pending:
        return RunRow(table, days, cutoff, "pending", [], 0, _now_ms())
    old_sql = f"SELECT count() FROM {table} WHERE {spec.date} < toDate(%(cutoff)s)"
    rows = client.execute(old_sql, params)[0][0]
    dropped: list[str] = []
    if rows and spec.monthly:
        partitions = [p for (p,) in client.execute(
            "SELECT DISTINCT partition FROM system.parts WHERE database = currentDatabase() AND table = %(table)s "
            "AND active", params)]
        dropped = partitions_to_drop(partitions, cutoff)
        for partition in dropped:
            client.execute(f"ALTER TABLE {table} DROP PARTITION {partition}")
    left = client.execute(old_sql, params)[0][0] if dropped else rows
    if left:
        client.execute(f"ALTER TABLE {table} DELETE WHERE {spec.date} < toDate(%(cutoff)s)", params)
    return RunRow(spec_name(table), days, cutoff, _action(bool(dropped), bool(left)), dropped, rows, _now_ms())


def spec_name(name: str) -> str:
    """The retained table a shard's local table belongs to."""
    return name.removesuffix("_local") if name.removesuffix("_local") in RETAINED else name


def _action(dropped: bool, deleted: bool) -> str:
    return {(False, False): "nothing", (True, False): "dropped", (False, True): "deleted",
            (True, True): "dropped_and_deleted"}[(dropped, deleted)]


def _delete_on_shards(config: ClickHouseConfig, table: str, days: int, today: date) -> RunRow:
    """`_delete_old_rows` on each shard's local table, told as one run of the table."""
    runs = []
    for shard in clickhouse.shard_configs(config):
        client = clickhouse.connect(shard)
        try:
            runs.append(_delete_old_rows(client, table, days, today, clickhouse.local_table(config, table)))
        finally:
            client.disconnect()
    if any(run.action == "pending" for run in runs):
        return RunRow(table, days, runs[0].cutoff, "pending", [], 0, _now_ms())
    dropped = sorted({partition for run in runs for partition in run.partitions})
    deleted = any(run.action in ("deleted", "dropped_and_deleted") for run in runs)
    return RunRow(table, days, runs[0].cutoff, _action(bool(dropped), deleted), dropped,
                  sum(run.rows for run in runs), _now_ms())


def _recently_run(client: Client) -> set[str]:
    since = _now_ms() - _RECENT_RUN_S * 1000
    return {table for (table,) in client.execute(
        "SELECT DISTINCT table_name FROM retention_runs WHERE ts_ms >= %(since)s", {"since": since})}


def run_retention(client: Client, policy: RetentionPolicy, tables: Sequence[str] | None = None,
                  force: bool = True, sharded: ClickHouseConfig | None = None) -> list[RunRow]:
    """One retention run over `tables` (default: every retained table), logged in `retention_runs`.
    `force=False` skips the tables some process ran in the last 20 hours (the sinks' daily run).
    `sharded`: the config of sharded tables (the client's), whose rows are deleted on each shard."""
    wanted = [t for t in (RETAINED if tables is None else tables) if t in RETAINED]
    if not force:
        recent = _recently_run(client)
        wanted = [t for t in wanted if t not in recent]
    if not wanted:
        return []
    version = client.execute("SELECT version()")[0][0]
    today = datetime.now(timezone.utc).date()
    if sharded is not None and sharded.cluster and supports_ttl(version):
        raise NotImplementedError("table TTL on sharded tables: set it on each shard's <table>_local by hand "
                                  "(README, Scaling out); the 18.16 way (drop and delete) is what runs here")
    if supports_ttl(version):
        changed = {row.table_name: row for row in reconcile_ttl(client, policy, wanted)}
        done = [changed.get(t) or RunRow(t, policy.days.get(t, 0), cutoff_date(today, policy.days.get(t, 0)),
                                         "ttl_kept", [], 0, _now_ms()) for t in wanted]
    else:
        existing = _engines(client)
        done = [_delete_on_shards(sharded, t, policy.days[t], today) if sharded is not None and sharded.cluster
                else _delete_old_rows(client, t, policy.days[t], today)
                for t in wanted if policy.days.get(t, 0) and t in existing]
    clickhouse.insert_columnar(client, "retention_runs", RUN_COLUMNS,
                               [[getattr(row, c) for c in RUN_COLUMNS] for row in done])
    return done


def _now_ms() -> int:
    return int(time.time() * 1000)


class RetentionJob:
    """The sinks' daily retention run: at start, then every day, over every retained table (webhook
    deliveries too, which no sink writes). Each sink process runs one; `retention_runs` keeps them to one
    run a day between them."""

    def __init__(self, config: ClickHouseConfig, policy: RetentionPolicy):
        self.config = config
        self.policy = policy

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                for row in await asyncio.to_thread(self._run_once):
                    log.info("retention: %s keeps %d days (rows before %s): %s %s", row.table_name, row.days,
                             row.cutoff, row.action, f"{row.rows} rows" if row.rows else "")
            except Exception as err:  # noqa: BLE001 - retention must never stop the sink; tomorrow's run retries
                log.error("retention run failed, retried tomorrow: %s", err)
            try:
                await asyncio.wait_for(stop.wait(), ONCE_A_DAY_S)
            except asyncio.TimeoutError:
                pass

    def _run_once(self) -> list[RunRow]:
        client = clickhouse.connect(self.config)
        try:
            return run_retention(client, self.policy, force=False, sharded=self.config)
        finally:
            client.disconnect()
