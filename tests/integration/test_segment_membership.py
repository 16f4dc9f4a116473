"""Segments on the real stack (Kafka, ClickHouse 18.16, Redis; `leadstream worker` and `leadstream sink`
processes): an event makes a lead enter a segment (a row in ClickHouse `segment_membership`, a change on
`segments.changes`) and the hourly pass makes it leave with no new event of it; a board importing a segment
gets exactly its members' cards, also a board created after they became members (the import step, through
the backfill job, with history for a segment created after the events); a worker SIGKILLed mid-stream
leaves the same membership history as an uninterrupted run."""

from __future__ import annotations

import asyncio
import random
import time

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition

from leadstream.admin import apply_definitions_text, publish_ip_table
from leadstream.runner import Role, produce, start_workers, wait_drained, wait_for
from processors.board_store import BoardStore
from processors.definitions_store import DefinitionsStore
from processors.runtime.ingest import consumer as kafka_consumer
from processors.segment_backfill import backfill_status
from schemas.segments import SegmentChange
from schemas.topics import SEGMENTS_CHANGES
from sinks.clickhouse import connect
from tests.integration.conftest import namespace

pytestmark = pytest.mark.integration

SITE = "it"
HOUR_MS = 3_600_000
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
SINK_TABLES = ("lead_state", "stage_changes", "segment_membership")
MEMBERS_SQL = """
SELECT member_id FROM segment_membership
WHERE site_id = %(site)s AND segment_id = %(segment)s
GROUP BY member_id HAVING argMax(entered, (ts_ms, seq)) = 1 ORDER BY member_id"""


def raw(event_id: str, visitor: str, ts_ms: int, path: str = "/", kind: str = "pageview", ip: str = "192.0.2.7",
        **extra) -> tuple:
    event = {"event_id": event_id, "site_id": SITE, "type": kind, "visitor_id": visitor, "ts": ts_ms,
             "url": f"https://example.com{path}", "ip": ip, "user_agent": CHROME, **extra}
    return visitor.encode(), orjson.dumps(event)


def apply(settings, text: str) -> None:
    assert apply_definitions_text(settings, text, "site.yaml", SITE, "segments") == 0


def rows(settings, sql: str, **params) -> list[tuple]:
    return connect(settings.clickhouse()).execute(sql, params)


def segment_changes_on_the_topic(settings) -> list[SegmentChange]:
    async def read() -> list[SegmentChange]:
        consumer = kafka_consumer(settings.kafka(), group=None)
        await consumer.start()
        try:
            partitions = [TopicPartition(settings.topic(SEGMENTS_CHANGES.name), p) for p in range(settings.partitions)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends, found = await consumer.end_offsets(partitions), []
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                for messages in (await consumer.getmany(timeout_ms=1000)).values():
                    found += [SegmentChange.from_json(m.value) for m in messages]
            return sorted(found, key=lambda change: (change.ts_ms, change.seq))
        finally:
            await consumer.stop()
    return asyncio.run(read())


def wait_until(check, timeout_s: float, roles, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        for role in roles:
            if not role.alive():
                raise RuntimeError(f"{role.name} exited:\n{role.log_tail()}")
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


WINDOW = """
segments:
- id: pricing-lately
  name: Viewed pricing in the last 2 hours
  if: [{count: {event: pageview, url: "*/pricing*"}, within: 2h, op: gt, value: 0}]
"""


def test_an_event_makes_a_lead_enter_and_the_hourly_pass_makes_it_leave(settings, roles):
    apply(settings, WINDOW)
    roles += [*start_workers(settings, "worker"), Role(settings, "sink", "sink").start()]
    now = int(time.time() * 1000)
    old = now - 5 * HOUR_MS  # its window ran out 3 hours ago: the hourly pass is due
    records = [raw("id-1", "ann", old, "/demo", "identify", email="ann@acme.io"),
               raw("pricing-1", "ann", old + 1000, "/pricing")]
    # other visitors' events of now, on every partition: the partitions' stream clocks are at the present
    records += [raw(f"now-{i}", f"passer-by-{i}", now) for i in range(40)]
    asyncio.run(produce(settings, records))

    def left() -> list[tuple]:
        found = rows(settings, "SELECT member_id, entered, ts_ms, cause, seq, version FROM segment_membership FINAL"
                               " WHERE site_id = %(site)s ORDER BY seq", site=SITE)
        return found if len(found) == 2 else []

    entered, gone = wait_until(left, 180, roles, "the lead to enter and leave pricing-lately")
    lead = entered[0]
    assert entered == (lead, 1, old + 1000, "event:pricing-1", 1, 1)
    assert gone == (lead, 0, old + 1000 + 2 * HOUR_MS, "window", 2, 1)  # when the 2 hours ran out, no event of its
    on_topic = [c for c in segment_changes_on_the_topic(settings) if c.segment_id == "pricing-lately"]
    assert [(c.member_id, c.entered, c.cause) for c in on_topic] == [(lead, True, "event:pricing-1"),
                                                                      (lead, False, "window")]
    assert rows(settings, MEMBERS_SQL, site=SITE, segment="pricing-lately") == []
    state = rows(settings, "SELECT email, segments FROM lead_state FINAL WHERE lead_id = %(lead)s", lead=lead)
    assert state == [("ann@acme.io", [])]


BOARDS = """
segments:
- id: pricing-twice
  name: Viewed pricing twice in 14 days
  if: [{count: {event: pageview, url: "*/pricing*"}, within: 14d, op: gt, value: 1}]
boards:
- id: imported
  name: Pricing viewers
  card: lead
  import: {segment: pricing-twice}
  stages: [{id: new, name: New, entry: true}]
- id: everyone
  name: Every lead
  card: lead
  stages: [{id: new, name: New, entry: true}]
"""
LATER = """
segments:
- id: seen-pricing
  name: Viewed the pricing page in 14 days (a count new to the leads' state when created)
  if: [{count: {event: pageview, url: "*/pricing"}, within: 14d, op: gt, value: 0}]
boards:
- id: later
  name: Created after its members
  card: lead
  import: {segment: pricing-twice}
  stages: [{id: new, name: New, entry: true}]
- id: history
  name: Members found in the history
  card: lead
  import: {segment: seen-pricing}
  stages: [{id: new, name: New, entry: true}]
"""


def cards(settings, board_id: str) -> dict[str, tuple]:
    """card id -> (stage, left_segment) of a board, from its live state in Redis."""
    async def read():
        client = aioredis.from_url(settings.redis_url)
        try:
            board = (await DefinitionsStore(client, settings.name("ls")).get_board(SITE, board_id)).board
            page = await BoardStore(client, settings.name("ls")).board(SITE, board, limit_per_stage=500)
        finally:
            await client.aclose()
        return {card.card_id: (column.stage_id, card.left_segment) for column in page.columns for card in column.cards}
    return asyncio.run(read())


def stage_change_actors(settings, board_id: str) -> set[str]:
    return {actor for (actor,) in rows(settings, "SELECT actor FROM stage_changes WHERE board_id = %(board)s",
                                       board=board_id)}


def test_a_board_importing_a_segment_gets_exactly_its_members_also_when_created_after_them(settings, roles):
    apply(settings, BOARDS)
    roles += [*start_workers(settings, "worker"), Role(settings, "sink", "sink").start()]
    now = int(time.time() * 1000)
    records = []
    for name, views in (("ann", 2), ("bob", 3), ("cid", 2), ("dee", 1)):  # four leads (known); dee viewed once
        records.append(raw(f"{name}-id", name, now - 60_000, "/demo", "identify", email=f"{name}@acme.io"))
        records += [raw(f"{name}-p{i}", name, now - 50_000 + i, "/pricing") for i in range(views)]
    for name in ("eve", "fay"):  # visitors: neither known nor of an account, pricing twice all the same
        records += [raw(f"{name}-p{i}", name, now - 40_000 + i, "/pricing") for i in range(2)]
    asyncio.run(produce(settings, records))
    wait_for(settings, "SELECT count() FROM events", len(records), 120, roles)
    wait_drained(settings, 120, roles, sink_tables=SINK_TABLES)

    members = {f"lead:{m}" for (m,) in rows(settings, MEMBERS_SQL, site=SITE, segment="pricing-twice")}
    leads = dict(rows(settings, "SELECT lead_id, email FROM lead_state FINAL WHERE merged_into = '' AND email != ''"))
    assert sorted(leads[card[len("lead:"):]] for card in members) == [
        "ann@acme.io", "bob@acme.io", "cid@acme.io"]
    assert set(cards(settings, "imported")) == members
    assert set(cards(settings, "everyone")) == {f"lead:{lead}" for lead in leads}  # the four leads, no visitor

    apply(settings, LATER)  # a board importing the members it already has, and a segment new to the history
    version = asyncio.run(DefinitionsStore(aioredis.from_url(settings.redis_url), settings.name("ls"))
                          .site_version(SITE))

    def backfilled():
        pending, done = asyncio.run(backfill_status(aioredis.from_url(settings.redis_url), settings.name("ls"), SITE))
        return done if pending is None and done is not None and done.version >= version else None

    done = wait_until(backfilled, 180, roles, "the segment backfill")
    assert (done.leads, done.history_rows) == (6, 6)  # every lead of the site, each with its newest pricing view
    wait_drained(settings, 120, roles, sink_tables=SINK_TABLES)
    assert set(cards(settings, "later")) == members
    assert stage_change_actors(settings, "later") == {"import"}
    seen = {f"lead:{m}" for (m,) in rows(settings, MEMBERS_SQL, site=SITE, segment="seen-pricing")}
    assert seen == set(cards(settings, "everyone"))  # the four leads; the visitors are in no segment
    assert set(cards(settings, "history")) == seen and stage_change_actors(settings, "history") == {"import"}
    causes = {cause for (cause,) in rows(settings, "SELECT cause FROM segment_membership WHERE segment_id ="
                                                   " 'seen-pricing'")}
    assert causes == {f"definitions:{version}"}


MERGE = """
segments:
- id: pricing-twice
  name: Viewed pricing twice in 14 days
  if: [{count: {event: pageview, url: "*/pricing*"}, within: 14d, op: gt, value: 1}]
- id: pricing-companies
  name: Companies with two leads who viewed pricing
  of: account
  if: [{count: {leads: [{count: {event: pageview, url: "*/pricing*"}, within: 14d, op: gt, value: 0}]}, op: gt,
        value: 1}]
"""
OFFICE = "cidr,domain,company_name,kind,country,region,city,asn\n198.51.100.0/29,acme.com,Acme,company,NL,,,AS64500"


def history(settings, of: str) -> list[tuple]:
    return rows(settings, "SELECT segment_id, member_id, entered, cause, seq FROM segment_membership FINAL"
                          " WHERE of = %(of)s ORDER BY ts_ms, segment_id, member_id, seq", of=of)


def test_a_merge_moves_membership_to_the_surviving_lead_once_and_an_account_enters_its_segment(settings, roles):
    """Two anonymous visitors from Acme's office are leads (they have an account); one viewed pricing twice
    (a member), the other once: two of Acme's leads viewed pricing, so the account is a member. Then the
    first one identifies, twice: its anonymous lead merges into the known one, which takes its membership
    once; the account, whose leads still qualify, stays a member without a new change."""
    apply(settings, MERGE)
    assert publish_ip_table(settings, OFFICE) == 0
    roles += [*start_workers(settings, "worker"), Role(settings, "sink", "sink").start()]
    now = int(time.time() * 1000)
    asyncio.run(produce(settings, [raw("warm-up", "warm-up", now - 90_000)]))
    wait_for(settings, "SELECT count() FROM events", 1, 120, roles)  # the worker runs ...
    time.sleep(1.5)  # ... and has the IP ranges (it polls the tables' versions every second)
    office = "198.51.100.3"
    asyncio.run(produce(settings, [raw("gus-p1", "gus", now - 60_000, "/pricing", ip=office),
                                   raw("gus-p2", "gus", now - 59_000, "/pricing/teams", ip=office),
                                   raw("hal-p1", "hal", now - 58_000, "/pricing", ip=office)]))
    wait_until(lambda: history(settings, "account") and history(settings, "lead"), 180, roles,
               "gus to enter pricing-twice and Acme pricing-companies")
    [(_, anonymous, _, _, _)] = history(settings, "lead")
    identify = raw("gus-id", "gus", now - 30_000, "/signup", "identify", ip=office, email="gus@acme.com")
    asyncio.run(produce(settings, [identify, identify]))  # sent twice: the merge is applied once

    def moved() -> list[tuple]:
        found = history(settings, "lead")
        return found if len(found) >= 3 else []

    wait_until(moved, 180, roles, "the membership to move to the known lead")
    wait_drained(settings, 120, roles, sink_tables=SINK_TABLES)
    [(known,)] = rows(settings, "SELECT lead_id FROM lead_state FINAL WHERE email = 'gus@acme.com'")
    assert history(settings, "lead") == [
        ("pricing-twice", anonymous, 1, "event:gus-p2", 1),
        ("pricing-twice", anonymous, 0, f"merged:{known}", 2),
        ("pricing-twice", known, 1, f"merge:{anonymous}", 1)]
    assert rows(settings, "SELECT count() FROM segment_membership WHERE member_id = %(known)s", known=known) == [(1,)]
    assert rows(settings, "SELECT segments FROM lead_state FINAL WHERE lead_id = %(known)s", known=known) == [
        (["pricing-twice"],)]
    [(segment, domain, entered, cause, seq)] = history(settings, "account")
    assert (segment, domain, entered, seq) == ("pricing-companies", "acme.com", 1, 1) and cause.startswith("lead:")
    assert rows(settings, MEMBERS_SQL, site=SITE, segment="pricing-companies") == [("acme.com",)]
    on_topic = segment_changes_on_the_topic(settings)
    assert sorted((c.segment_id, c.member_id, c.entered) for c in on_topic) == sorted(
        (segment, member, bool(entered)) for segment, member, entered, *_ in history(settings, "lead") + history(
            settings, "account"))


STREAM_SEGMENTS = """
segments:
- id: pricing-lately
  name: Viewed pricing twice in 30 minutes
  if: [{count: {event: pageview, url: "*/pricing*"}, within: 30m, op: gt, value: 1}]
- id: busy
  name: Four events in 20 minutes
  if: [{count: {event: any}, within: 20m, op: gt, value: 3}]
- id: busy-at-acme
  name: Busy, of Acme
  if: [{in_segment: busy}, {field: account.domain, op: is, value: acme.com}]
- id: pricing-companies
  name: Companies with two leads who viewed pricing
  of: account
  if: [{count: {leads: [{count: {event: pageview, url: "*/pricing*"}, within: 14d, op: gt, value: 0}]}, op: gt,
        value: 1}]
"""
DOMAINS = ("acme.com", "globex.io", "initech.net", "umbrella.org", "hooli.dev")


def stream_records(now: int) -> list[tuple]:
    """200 known leads of five companies, each with an identify and then 5-20 events over the 40 minutes
    before `now`, a third of them on pricing: members enter and leave by their own events (30- and 20-minute
    windows). A lead's history is a function of its own feed only when its events reach the lead processor
    in order and within the hourly pass's grace of its partition's clock, in any run: so no anonymous leads
    (a merge's handover and the absorbed lead's last events race across partitions, differently in two
    uninterrupted runs too) and less than an hour of traffic, for both runs."""
    rng = random.Random(7)
    records = []
    for n in range(200):
        visitor, ts = f"v{n:03d}", now - 40 * 60_000 + rng.randrange(3 * 60_000)
        records.append(raw(f"{visitor}-id", visitor, ts, "/signup", "identify", email=f"p{n}@{DOMAINS[n % 5]}"))
        for i in range(rng.randrange(5, 21)):
            ts += rng.randrange(10_000, 100_000)
            path = rng.choice(("/pricing", "/pricing/teams", "/", "/docs", "/blog", "/about"))
            records.append(raw(f"{visitor}-{i}", visitor, min(ts, now), path))
    return sorted(records, key=lambda record: orjson.loads(record[1])["ts"])  # stable: a visitor's in order


def run_traffic(settings, roles: list, kills: int, now: int) -> None:
    apply(settings, STREAM_SEGMENTS)
    records = stream_records(now)
    worker = Role(settings, "worker", "worker").start()
    roles += [worker, Role(settings, "sink", "sink").start()]
    asyncio.run(produce(settings, records))
    for kill in range(kills):
        wait_for(settings, "SELECT count() FROM events", len(records) * (kill + 1) // (kills + 2), 120, roles)
        time.sleep(1.5)  # into the middle of the lead and account processors' work
        worker.kill()
        worker.start()
    wait_for(settings, "SELECT count() FROM events", len(records), 240, roles)
    wait_drained(settings, timeout_s=240, roles=roles, sink_tables=SINK_TABLES)


def membership(settings) -> tuple[set[tuple], set[tuple]]:
    """Every lead's membership history as stored, and every account's current memberships."""
    history = set(rows(settings, "SELECT segment_id, member_id, entered, ts_ms, cause, seq, version FROM"
                                 " segment_membership FINAL WHERE of = 'lead'"))
    accounts = set(rows(settings, "SELECT segment_id, member_id FROM segment_membership WHERE of = 'account'"
                                  " GROUP BY segment_id, member_id HAVING argMax(entered, (ts_ms, seq)) = 1"))
    return history, accounts


@pytest.mark.slow
def test_a_sigkilled_worker_leaves_the_same_membership_history_as_an_uninterrupted_run(stack_settings, roles):
    now = int(time.time() * 1000)
    with namespace(stack_settings) as calm:
        run_traffic(calm, roles, kills=0, now=now)
        want_history, want_accounts = membership(calm)
        for role in roles:
            role.stop()
        roles.clear()
    assert len(want_history) > 20 and len({row[0] for row in want_history}) >= 2 and want_accounts

    with namespace(stack_settings) as crashed:
        run_traffic(crashed, roles, kills=2, now=now)
        time.sleep(2)  # anything doubled would land now
        history, accounts = membership(crashed)
        assert history == want_history, (sorted(history - want_history)[:5], sorted(want_history - history)[:5])
        assert accounts == want_accounts
        assert rows(crashed, "SELECT count() FROM segment_membership FINAL WHERE of = 'lead'") == [(len(history),)]
