"""Two workers, a rebalance, a SIGKILL mid-stream and a restart: ClickHouse must end with exactly the
sessions and identity graph that the pure cores compute for the same input, and every event once."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest

from leadstream.runner import Role, count, produce, wait_for
from leadstream.traffic import TrafficGenerator
from processors import identity, sessionize
from processors.accounts import AccountsContext
from processors.enrich import enrich_batch
from processors.identity import InMemoryIdentityStore
from processors.app import session_policy
from schemas.events import EnrichedEvent
from sinks.clickhouse import connect

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SESSION_FIELDS = ("session_id", "visitor_id", "session_index", "previous_session_id", "start_ms", "end_ms",
                  "event_count", "pageview_count", "landing_url", "exit_url", "channel", "email")


def _enriched(records) -> list[EnrichedEvent]:
    results = enrich_batch([value for _, value in records], int(time.time() * 1000))
    return [r for r in results if isinstance(r, EnrichedEvent)]


def expected_sessions(settings, events: list[EnrichedEvent]) -> set[tuple]:
    """Per visitor, in the order Kafka delivers them (one partition per visitor), through the pure core."""
    by_visitor: dict[tuple[str, str], list[EnrichedEvent]] = defaultdict(list)
    for event in events:
        by_visitor[event.site_id, event.visitor_id].append(event)
    current: dict[str, tuple] = {}
    for visitor_events in by_visitor.values():
        result = sessionize.apply(None, visitor_events, session_policy(settings))
        for s in result.upserts:
            if s.merged_into:
                current.pop(s.session_id, None)
            else:
                current[s.session_id] = tuple(getattr(s, f) for f in SESSION_FIELDS)
    return set(current.values())


def expected_graph(events: list[EnrichedEvent]) -> tuple[dict, dict]:
    store = InMemoryIdentityStore()
    identity.resolve(events, store, AccountsContext())
    changes = store.changes()
    visitor_lead = {v: link.lead_id for (_, v), link in changes.visitors.items()}
    lead_email = {lead.lead_id: lead.email for lead in changes.leads.values() if not lead.merged_into}
    return visitor_lead, lead_email


def test_two_workers_rebalance_and_sigkill_converge_to_the_pure_result(settings, roles):
    traffic = TrafficGenerator(visitors=600, seed=5, site_ids=("it",), malformed_ratio=0.0)
    records = list(traffic.events())
    events = _enriched(records)
    expected_events = len(events) - traffic.duplicates
    half = len(records) // 2

    sink = Role(settings, "sink", "sink").start()
    first = Role(settings, "worker-a", "worker", "--name", "a").start()
    roles += [sink, first]
    asyncio.run(produce(settings, records[:half]))
    wait_for(settings, "SELECT count() FROM events", half // 3, 180, roles)

    second = Role(settings, "worker-b", "worker", "--name", "b").start()  # rebalance: partitions move
    roles.append(second)
    asyncio.run(produce(settings, records[half:]))
    wait_for(settings, "SELECT count() FROM events", (half * 3) // 2, 240, roles)
    first.kill()  # SIGKILL mid-stream; its partitions go to b, then come back on restart
    time.sleep(2)
    first.start()

    wait_for(settings, "SELECT count() FROM events", expected_events, 300, roles)
    time.sleep(3)
    assert count(settings, "SELECT count() FROM events") == expected_events
    assert count(settings, "SELECT uniqExact(raw_partition, raw_offset) FROM events") == expected_events

    want_sessions = expected_sessions(settings, events)
    ch = connect(settings.clickhouse())
    deadline = time.monotonic() + 120
    while True:
        got = set(ch.execute(f"SELECT {', '.join(SESSION_FIELDS)} FROM sessions FINAL WHERE merged_into = ''"))
        if got == want_sessions or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(got) == len(want_sessions)
    assert got == want_sessions

    want_visitor_lead, want_lead_email = expected_graph(events)
    got_visitor_lead = dict(ch.execute(
        "SELECT visitor_id, argMax(lead_id, since_ts_ms) FROM visitor_leads FINAL GROUP BY visitor_id"))
    got_lead_email = dict(ch.execute("SELECT lead_id, email FROM leads FINAL WHERE merged_into = ''"))
    assert got_visitor_lead == want_visitor_lead
    assert got_lead_email == want_lead_email
    assert count(settings, "SELECT count() FROM leads FINAL WHERE email != '' AND merged_into = ''") > 10
