"""Chaos on the real stack: while demo-like traffic flows, the worker and each sink are SIGKILLed at over
twenty seeded random points and restarted, Redis is SIGKILLed once and ClickHouse stopped for 30 s. The
run must end with exactly what an uninterrupted run of the same traffic stores: the same event rows and
dead letters (each raw offset once), the same sessions and the same identity graph.

This test kills the stack's own Redis and ClickHouse: it restarts them through the stack code, and its
`finally` leaves both up whatever happens, so the tests after it find a healthy stack.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from random import Random

import pytest

from leadstream import stack
from leadstream.runner import Role, count, produce, wait_drained, wait_for
from leadstream.traffic import TrafficGenerator
from schemas.topics import EVENTS_RAW
from sinks.clickhouse import connect
from tests.integration.conftest import namespace
from tests.integration.test_crash_and_rebalance import SESSION_FIELDS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 20261126
NOW_MS = int(time.time() * 1000)
RAW_TABLES = "events,dlq"
GRAPH_TABLES = "sessions,visitor_leads,leads"
ROLE_KILLS = {"worker": 8, "sink-raw": 7, "sink-graph": 7}
CLICKHOUSE_OUTAGE_S = 30
PRODUCE_CHUNKS = 30
PRODUCE_PACE_S = 3.0  # the traffic is spread over the whole chaos loop, so every kill lands mid-stream


def traffic() -> list[tuple[bytes, bytes]]:
    return list(TrafficGenerator(visitors=3000, seed=SEED % 1000, site_ids=("it",), now_ms=NOW_MS,
                                 start_ms=NOW_MS - 14 * 86_400_000).events())


def start_roles(settings) -> dict[str, Role]:
    return {
        "worker": Role(settings, "worker", "worker").start(),
        "sink-raw": Role(settings, "sink-raw", "sink", "--tables", RAW_TABLES).start(),
        "sink-graph": Role(settings, "sink-graph", "sink", "--tables", GRAPH_TABLES).start(),
    }


def wait_complete(settings, sent: int, roles: list[Role], more_tables: tuple[str, ...] = ()) -> None:
    """Every raw message an event or a dead letter, then every table's sink caught up (these tables' and
    `more_tables`')."""
    wait_for(settings, "SELECT (SELECT count() FROM events) + (SELECT count() FROM dlq WHERE topic = %(topic)s)",
             sent, 240, roles, {"topic": settings.topic(EVENTS_RAW.name)}, label="events + dead letters")
    wait_drained(settings, timeout_s=240, roles=roles,
                 sink_tables=(*RAW_TABLES.split(","), *GRAPH_TABLES.split(","), *more_tables))


def snapshot(settings) -> dict[str, list[tuple]]:
    """What two runs of the same traffic must agree on, row for row: no version, receive time or
    close flag (those follow the wall clock, not the input). An event row keeps the session id it was
    given when processed; a replay after a crash may give it the id its session has since merged into, so
    events are compared by their session's current id (one `merged_into` hop, as analysts read it).
    The graph is compared as it ends, not as it got there: which of two visitors on different partitions
    created a shared lead (its `created_event_id`, the identity events naming that event) depends on how
    the partitions interleaved, in any two runs."""
    ch = connect(settings.clickhouse())
    queries = {
        "dead letters": "SELECT raw_partition, raw_offset, reason, raw FROM dlq",
        "sessions": f"SELECT {', '.join(SESSION_FIELDS)}, merged_into FROM sessions FINAL",
        "visitor leads": "SELECT visitor_id, since_ts_ms, argMax(lead_id, version) FROM visitor_leads"
                         " GROUP BY visitor_id, since_ts_ms",
        "leads": "SELECT lead_id, email, arrayStringConcat(arraySort(visitors), ' '), account_domain, merged_into,"
                 " first_ts_ms FROM leads FINAL",
    }
    tables = {name: sorted(ch.execute(sql)) for name, sql in queries.items()}
    merged_into = dict(ch.execute("SELECT session_id, merged_into FROM sessions FINAL WHERE merged_into != ''"))
    tables["events"] = sorted(
        (partition, offset, event_id, visitor_id, merged_into.get(session_id, session_id), lead_id, is_late)
        for partition, offset, event_id, visitor_id, session_id, lead_id, is_late in ch.execute(
            "SELECT raw_partition, raw_offset, event_id, visitor_id, session_id, lead_id, is_late FROM events"))
    return tables


def uninterrupted_run(settings, records, roles: list[Role]) -> dict[str, list[tuple]]:
    roles += start_roles(settings).values()
    asyncio.run(produce(settings, records))
    wait_complete(settings, len(records), roles)
    return snapshot(settings)


class PacedProducer(threading.Thread):
    """Sends the traffic in chunks, a pause between them, alongside the chaos loop."""

    def __init__(self, settings, records, chunks: int = PRODUCE_CHUNKS, pace_s: float = PRODUCE_PACE_S):
        super().__init__(daemon=True)
        self.settings, self.records, self.error = settings, records, None
        self.chunks, self.pace_s = chunks, pace_s

    def run(self) -> None:
        size = -(-len(self.records) // self.chunks)
        try:
            for start in range(0, len(self.records), size):
                asyncio.run(produce(self.settings, self.records[start:start + size]))
                time.sleep(self.pace_s)
        except Exception as err:  # re-raised by the test after join
            self.error = err


def stack_server(settings, name: str) -> stack.Server:
    return next(server for server in stack.servers(settings) if server.name == name)


def kill_redis(settings) -> None:
    """SIGKILL, no shutdown save: only what the append-only file already holds survives."""
    redis = stack_server(settings, "redis")
    pid = redis.pid()
    os.kill(pid, signal.SIGKILL)
    while redis.pid() == pid:
        time.sleep(0.05)
    time.sleep(1)
    redis.up()


def stop_clickhouse(settings) -> None:
    clickhouse = stack_server(settings, "clickhouse")
    clickhouse.down()
    time.sleep(CLICKHOUSE_OUTAGE_S)
    clickhouse.up()


def chaos_plan(rng: Random) -> list[str]:
    """The roles to kill in a shuffled order, Redis and ClickHouse in the middle third (mid-stream)."""
    plan = [role for role, kills in ROLE_KILLS.items() for _ in range(kills)]
    rng.shuffle(plan)
    third = len(plan) // 3
    plan.insert(rng.randint(third, 2 * third), "redis")
    plan.insert(rng.randint(third, 2 * third), "clickhouse")
    return plan


def test_kills_and_outages_end_with_what_an_uninterrupted_run_stores(stack_settings, roles):
    records = traffic()
    assert len(records) > 20_000
    with namespace(stack_settings) as calm:
        want = uninterrupted_run(calm, records, roles)
        for role in roles:
            role.stop()
        roles.clear()
    assert len(want["leads"]) > 1000 and any(email for _, email, *_ in want["leads"])

    rng = Random(SEED)
    survived: list[str] = []
    with namespace(stack_settings) as chaotic:
        running = start_roles(chaotic)
        roles += running.values()
        producer = PacedProducer(chaotic, records)
        started = time.monotonic()
        producer.start()
        try:
            for target in chaos_plan(rng):
                time.sleep(rng.uniform(0.5, 3.0))
                if target == "redis":
                    kill_redis(chaotic)
                elif target == "clickhouse":
                    stop_clickhouse(chaotic)
                else:
                    running[target].kill()
                    time.sleep(rng.uniform(0.2, 1.5))
                    running[target].start()
                survived.append(f"{time.monotonic() - started:5.1f}s {target}")
        finally:  # whatever failed, the stack is left up for the tests that follow
            for name in ("redis", "clickhouse"):
                stack_server(chaotic, name).up()
        producer.join()
        assert producer.error is None, producer.error
        print(f"chaos: {len(survived)} kills and outages in {time.monotonic() - started:.0f} s:", *survived,
              sep="\n  ")

        wait_complete(chaotic, len(records), roles)
        time.sleep(2)  # anything doubled would land now
        got = snapshot(chaotic)
        assert count(chaotic, "SELECT count() FROM events") + count(chaotic, "SELECT count() FROM dlq") == len(records)
        for name in want:
            missing, extra = set(want[name]) - set(got[name]), set(got[name]) - set(want[name])
            assert got[name] == want[name], (
                f"{name}: {len(got[name])} rows, want {len(want[name])}, {len(missing)} differ; "
                f"missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
    assert sum(1 for entry in survived if entry.endswith(tuple(ROLE_KILLS))) >= 20
