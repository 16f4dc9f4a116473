"""Fault tests on the cluster stack (`leadstream stack up --cluster`): three Kafka brokers, a Redis primary with
a replica, ClickHouse on two shards. Each test runs the demo's rules and board on paced traffic, injects one fault
mid-stream, and must end with exactly what an uninterrupted run of the same traffic stores; it prints what
the fault cost (seconds of stall, records replayed).

The uninterrupted run is made once per session and shared: every test's traffic is the same.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import pytest

from leadstream import stack
from leadstream.runner import Role, wait_for
from schemas.settings import Settings
from sinks.clickhouse import connect
from tests.api_keys import SERVER_SECRET
from tests.integration.conftest import namespace, roles  # noqa: F401 - `roles` is a fixture used here
from tests.integration.test_board_recovery import (apply_demo_rules, assert_each_move_recorded_once,
                                                   assert_owners_consistent, automation_snapshot, board_snapshot,
                                                   comparable, moves_recorded_differently, stage_changes,
                                                   traffic_records)
from tests.integration.test_fault_injection import PacedProducer, snapshot, wait_complete

AUTOMATION_TABLES = ("lead_state", "rule_executions", "stage_changes")
VISITORS = 800  # about 6,000 events
PRODUCE_CHUNKS, PRODUCE_PACE_S = 40, 1.0  # about a minute of traffic: a fault a third of the way in is mid-stream


def cluster_up() -> Settings:
    """The cluster stack, started if it is not up, and its settings read afresh (a Redis failover moves the
    primary)."""
    settings = stack.cluster_settings(replace(Settings.from_env(), server_secret=SERVER_SECRET))
    stack.up(settings, cluster=True)
    return settings


@pytest.fixture
def cluster() -> Settings:
    return cluster_up()


def cluster_server(settings: Settings, name: str) -> stack.Server:
    return next(server for server in stack.servers(settings, cluster=True) if server.name == name)


class ProgressWatch(threading.Thread):
    """Counts ClickHouse's events per raw partition five times a second: the longest time a partition's count
    stood still while traffic was still coming in is the stall a fault cost (a fault may stop some partitions
    only; the uninterrupted run's longest, between chunks of traffic, is the baseline)."""

    def __init__(self, settings: Settings):
        super().__init__(daemon=True)
        self.settings, self.samples, self.done = settings, [], threading.Event()

    def run(self) -> None:
        client = connect(self.settings.clickhouse())
        counts: dict[int, int] = {}
        while not self.done.is_set():
            try:
                counts = dict(client.execute("SELECT raw_partition, count() FROM events GROUP BY raw_partition"))
            except Exception:  # noqa: BLE001 - nothing readable (a shard down): nothing new seen stored
                client.disconnect()
            self.samples.append((time.monotonic(), counts))
            self.done.wait(0.2)

    def longest_stall(self, since: float, until: float) -> float:
        last_change: dict[int, float] = {}
        last_count: dict[int, int] = {}
        longest = 0.0
        for at, counts in self.samples:
            if not since <= at <= until:
                continue
            for partition in range(self.settings.partitions):
                seen = counts.get(partition, 0)
                if seen != last_count.get(partition):
                    last_change[partition], last_count[partition] = at, seen
                longest = max(longest, at - last_change[partition])
        return longest


def outcome(settings: Settings) -> dict[str, list]:
    """What a run stores, as two runs of the same traffic must agree on it: events, dead letters, sessions,
    identity graph (test_fault_injection's snapshot), leads, rule executions and the board (test_board_recovery's);
    and which lead merged into which (`merged into`: to name a firing's merged family). Stage changes are checked
    as the SIGKILL board test checks them, each move recorded once and the last one where the card is: the path
    of an account card, which hears several leads' updates, follows how their partitions interleaved."""
    automation, board, changes = automation_snapshot(settings), board_snapshot(settings), stage_changes(settings)
    assert_each_move_recorded_once(changes, board)
    assert moves_recorded_differently(settings) == []
    assert_owners_consistent(board, settings.partitions)
    merged_into = connect(settings.clickhouse()).execute(
        "SELECT lead_id, merged_into FROM lead_state FINAL WHERE merged_into != ''")
    return {**snapshot(settings), "lead state": automation["leads"], "rule executions": automation["executions"],
            "board": sorted((stage, card) for stage, cards in comparable(board).items()
                                                               for card in cards),
            "merged into": sorted(merged_into)}


def refired_in_a_merged_family(got: dict[str, list], want: dict[str, list]) -> list[tuple]:
    """The firings one run has and the other lacks whose rule the other run fired for the same merged family
    (a lead and every lead merged into it). A rule fired once per lead is not fired again on a lead that
    absorbed one that fired it, if the absorbed lead's record reaches the survivor first; how the lead
    processor's partitions interleave decides that, so either run (the faulted one or the uninterrupted one)
    may have fired the rule a second time in the family (README "Scaling out": a known gap)."""
    survivor = dict(got["merged into"])

    def family(lead: str) -> str:
        while lead in survivor:
            lead = survivor[lead]
        return lead

    def beyond(one: list[tuple], other: list[tuple]) -> list[tuple]:
        fired = {(rule, family(lead)) for _, rule, lead in other}
        extra = set(map(repr, one)) - set(map(repr, other))
        return [row for row in one if repr(row) in extra and (row[1], family(row[2])) in fired]

    return beyond(got["rule executions"], want["rule executions"]) + beyond(want["rule executions"],
                                                                           got["rule executions"])


def assert_same_outcome(got: dict[str, list], want: dict[str, list]) -> None:
    """Equal, table by table; firings that differ only by a rule fired a second time in a merged family, in
    either run (see `refired_in_a_merged_family`), make the test an expected failure, reported as such, never
    a pass."""
    refired = refired_in_a_merged_family(got, want)
    known = set(map(repr, refired))
    for name in want:  # rows compared by repr: some hold lists (tags)
        got_rows, want_rows = ([row for row in rows if name != "rule executions" or repr(row) not in known]
                               for rows in (got[name], want[name]))
        missing, extra = set(map(repr, want_rows)) - set(map(repr, got_rows)), \
            set(map(repr, got_rows)) - set(map(repr, want_rows))
        assert got_rows == want_rows, (
            f"{name}: {len(got_rows)} rows, want {len(want_rows)}; {len(missing)} missing {sorted(missing)[:3]}, "
            f"{len(extra)} extra {sorted(extra)[:3]}")
    if refired:
        pytest.xfail(f"everything else equal, but {len(refired)} rules fired a second time in a merged lead family "
                     f"in one of the two runs: {refired[:3]}")


@dataclass
class Run:
    outcome: dict[str, list]
    stall_s: float  # the longest time no event was stored, from the fault until the traffic ended


def start_roles(settings: Settings, workers: tuple[str, ...] = ("worker",)) -> dict[str, Role]:
    started = {name: Role(settings, name, "worker", "--name", name).start() for name in workers}
    return {**started, "sink": Role(settings, "sink", "sink").start()}


def run_with_fault(settings: Settings, roles: list, fault: Callable[[dict[str, Role]], None] = lambda running: None,
                 workers: tuple[str, ...] = ("worker",)) -> Run:
    """The demo's rules and board, paced traffic through the workers and a sink; `fault(running roles)` once a
    third of the events are stored."""
    assert apply_demo_rules(settings) == 0
    records, valid = traffic_records(VISITORS)
    running = start_roles(settings, workers)
    roles += running.values()
    watch, producer = ProgressWatch(settings), PacedProducer(settings, records, PRODUCE_CHUNKS, PRODUCE_PACE_S)
    watch.start()
    producer.start()
    wait_for(settings, "SELECT count() FROM events", valid // 3, 240, roles)
    fault_at = time.monotonic()
    fault(running)  # may replace roles in `running` (restarted with other settings): those are stopped at the end too
    roles += [role for role in running.values() if role not in roles]
    producer.join()
    assert producer.error is None, producer.error
    stall = watch.longest_stall(fault_at, time.monotonic())
    wait_complete(settings, len(records), list(running.values()), more_tables=AUTOMATION_TABLES)
    watch.done.set()
    time.sleep(2)  # anything doubled would land now
    return Run(outcome(settings), stall)


@pytest.fixture(scope="session")
def uninterrupted() -> Run:
    settings = cluster_up()
    started: list[Role] = []
    try:
        with namespace(settings) as calm:
            run = run_with_fault(calm, started)
    finally:
        for role in started:
            role.stop()
    assert len(run.outcome["rule executions"]) > 50
    print(f"\nuninterrupted run: longest stall {run.stall_s:.1f} s (the baseline: traffic comes in chunks)")
    return run
