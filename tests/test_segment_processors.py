"""Segments in the running processors, on the runtime's in-memory twins (the state store on the Redis twin,
the memory producer, a clock the test holds): the lead processor's membership is the same whatever the
batch boundaries and replays, a window member leaves by the lead's timer with no new event, a merge moves
membership to the survivor once, the account processor evaluates account segments, a board that imports a
segment gets exactly its members' cards (keeping or archiving those that leave), the import step gives a
board created after its members exist their cards, and a bare visitor never gets a card."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import redis.asyncio as aioredis

from processors.account_processor import AccountProcessor
from processors.board_processor import BoardProcessor
from processors.board_store import BoardStore
from processors.lead_processor import LeadProcessor
from processors.rules import RuleSet
from processors.runtime.ingest import Message
from processors.runtime.producer import MemoryProducer, Outputs
from processors.runtime.runner import ProcessorRunner, StaleBatch
from processors.runtime.state import MemoryStateStore
from processors.segments import GRACE_MS, SegmentSet
from processors.site_definitions import SiteDefinitionsCache, SiteSetup
from schemas.boards import CardUpdate, CardView, StageChange
from schemas.definitions import load_definitions
from schemas.events import EnrichedEvent
from schemas.identity import IdentityEvent
from schemas.redis_keys import RedisKeys
from schemas.rules import LeadSnapshot
from schemas.segments import AccountLeadFacts, DefinitionsMark, SegmentBackfill, SegmentChange
from schemas.topics import (BOARD_COMMANDS, BOARD_STAGE_CHANGES, EVENTS_DLQ, LEADS_ACTIVITY, LEADS_STATE,
                            SEGMENTS_ACCOUNT_LEADS, SEGMENTS_CHANGES, Topic, partition_for_key)
from tests.test_rules import DAY_MS, HOUR_MS, SITE, T0, event
from tests.twins import Clock, records, values

NOW = T0 + 400 * DAY_MS  # the runtime's wall clock: every event of these tests is in its past
KEYS = RedisKeys("ls")
PRICING = "https://acme.com/pricing"
DEFINITIONS = """
segments:
- id: pricing-twice
  name: Viewed pricing twice in 14 days
  if: [{count: {event: pageview, url: "*/pricing*"}, within: 14d, op: gt, value: 1}]
- id: busy
  name: Three events in a day
  if: [{count: {event: any}, within: 1d, op: between, value: [3, 5]}]
- id: known-busy
  name: Known and busy
  if: [{in_segment: busy}, {field: lead.known, op: is, value: true}]
- id: pricing-companies
  name: Companies with two leads who viewed pricing
  of: account
  if: [{count: {leads: [{count: {event: pageview, url: "*/pricing*"}, within: 14d, op: gt, value: 0}]}, op: gt,
        value: 1}]
"""


def site(text: str = DEFINITIONS, version: int = 1) -> SiteSetup:
    """As the definitions store hands them out: every entry at the site's version."""
    definitions = load_definitions(text, "site.yaml")
    segments = [segment.model_copy(update={"version": version}) for segment in definitions.segments]
    rules = [rule.model_copy(update={"version": version}) for rule in definitions.rules]
    return SiteSetup(version, RuleSet.compile(rules, version), tuple(definitions.boards),
                     SegmentSet.compile(segments, version))


class Definitions:
    """A definitions store that holds one site's setup at a time (what a reload after an edit reads)."""

    def __init__(self) -> None:
        self.setup: SiteSetup | None = None

    async def site_version(self, site_id: str) -> int:
        return self.setup.version if self.setup else 0


class Sites(SiteDefinitionsCache):
    """The cache the processors of one worker share, loading from `Definitions`."""

    def __init__(self, setup: SiteSetup) -> None:
        self.definitions = Definitions()
        super().__init__(self.definitions)  # type: ignore[arg-type]
        self.edit(setup)
        self.sites[SITE] = setup

    def edit(self, setup: SiteSetup) -> None:
        """The site's definitions change in the store; the cache sees them when it reloads."""
        self.definitions.setup = setup

    async def _load(self, site_id: str) -> None:
        self.sites[site_id] = self.definitions.setup


class Worker:
    """The lead, account and board processors of one worker on one Redis twin, each with its own runner;
    `pump` carries every output to the processor that reads it until nothing is left."""

    def __init__(self, setup: SiteSetup, partitions: int = 4) -> None:
        self.sites = Sites(setup)
        self.store = MemoryStateStore(processor="lead")
        self.producer = MemoryProducer(EVENTS_DLQ)
        self.clock = Clock(NOW)
        self.partitions = partitions

        def runner(processor: Any, name: str) -> ProcessorRunner:
            return ProcessorRunner(processor, MemoryStateStore(self.store.redis, processor=name), self.producer,
                                   partitions, EVENTS_DLQ, clock_us=self.clock)

        board_store = BoardStore(aioredis.Redis(), "ls")  # never connects: its writes go to the batch
        self.runners = {
            LEADS_ACTIVITY.name: runner(LeadProcessor(self.sites, None, "ls"), "lead"),
            SEGMENTS_ACCOUNT_LEADS.name: runner(AccountProcessor(self.sites, "ls"), "account"),
            BOARD_COMMANDS.name: runner(BoardProcessor(board_store, self.sites, "ls"), "board"),
        }
        self.offsets: dict[tuple[str, int], int] = {}
        self.seen = 0  # outputs already carried on

    @property
    def lead(self) -> ProcessorRunner:
        return self.runners[LEADS_ACTIVITY.name]

    def messages(self, topic: Topic, items: list[tuple[bytes | None, bytes, list]], partition: int) -> list[Message]:
        first = self.offsets.get((topic.name, partition), 0)
        self.offsets[(topic.name, partition)] = first + len(items)
        return [Message(partition, first + i, key, value, headers) for i, (key, value, headers) in enumerate(items)]

    async def feed(self, items: list[tuple[bytes, bytes, list]]) -> None:
        """Records for the lead processor, all on partition 0 (one stream clock), as one batch."""
        await self.lead.process(self.messages(LEADS_ACTIVITY, items, 0))

    async def pump(self) -> None:
        """Deliver what the processors produced to the processors that read it, batch by batch, until quiet."""
        while self.seen < len(self.producer.sent):
            outputs = self.producer.sent[self.seen]
            self.seen += 1
            for (topic, partition), items in sorted(outputs.records.items()):
                if topic in self.runners and items:
                    await self.runners[topic].process(self.messages(_topic(topic), items, partition))

    async def tick(self, advance_ms: int = 0) -> None:
        """The timers, with the wall clock moved on by `advance_ms` (a quiet partition's stream clock follows)."""
        for runner in self.runners.values():
            await runner.tick(list(range(self.partitions)))
        self.clock.now_ms += advance_ms
        for runner in self.runners.values():
            await runner.tick(list(range(self.partitions)))
        await self.pump()

    def produced(self, topic: Topic) -> list:
        return [record for outputs in self.producer.sent for record in records(outputs, topic)] \
            if topic.types else [topic.record.from_json(v) for outputs in self.producer.sent  # type: ignore[union-attr]
                                 for v in values(outputs, topic)]

    def changes(self) -> list[tuple]:
        return [(c.segment_id, c.member_id, c.entered, c.ts_ms - T0, c.cause) for c in self.produced(SEGMENTS_CHANGES)]

    def board(self, board_id: str) -> dict[str, CardView]:
        return {card: CardView.from_json(view)
                for card, view in self.store.redis.hash(KEYS.board_cards(SITE, board_id)).items()}


def _topic(name: str) -> Topic:
    return {LEADS_ACTIVITY.name: LEADS_ACTIVITY, SEGMENTS_ACCOUNT_LEADS.name: SEGMENTS_ACCOUNT_LEADS,
            BOARD_COMMANDS.name: BOARD_COMMANDS}[name]


def pageview(event_id: str, ts_ms: int, lead: str = "lead-a", url: str = "https://acme.com/blog") -> tuple:
    record = event(event_id, ts_ms=ts_ms, url=url, lead_id=lead)
    return record.lead_id.encode(), record.to_json(), LEADS_ACTIVITY.headers(EnrichedEvent)


def identity(kind: str, lead: str, ts_ms: int, from_lead: str = "", **fields: Any) -> tuple:
    change = IdentityEvent(f"ie-{kind}-{lead}-{from_lead}-{ts_ms}", SITE, kind, f"e-{kind}", ts_ms, visitor_id="v",
                           lead_id=lead, from_lead_id=from_lead, **fields)
    subject = from_lead if kind == "lead_merged" else lead
    return subject.encode(), change.to_json(), LEADS_ACTIVITY.headers(IdentityEvent)


def known(lead: str, ts_ms: int = T0) -> tuple:
    return identity("lead_created", lead, ts_ms, email=f"{lead}@acme.com")


def employee(lead: str, domain: str = "acme.com", ts_ms: int = T0) -> tuple:
    return identity("account_linked", lead, ts_ms, account_domain=domain)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# ---- membership through batches, replays and the timer ----

class CrashingStore(MemoryStateStore):
    """A store whose next commit fails when `crash_next` is set: a worker that died after producing a
    batch's outputs and before committing it. The batch is computed and produced again."""

    crash_next = False

    async def commit(self, commits, writes=None, fence=None, guards=None) -> bool:
        if self.crash_next:
            self.crash_next = False
            return False
        return await super().commit(commits, writes, fence, guards)


@st.composite
def lead_feeds(draw: Any) -> tuple[list[tuple], list[int], set[int]]:
    """Records of three leads on one partition as the raw processor delivers them: the partition's clock
    only moves forward and each event is at most the grace behind it (or a re-delivery of an earlier one);
    identity changes now and then. Returns the records, where batches end and which batches crash before their commit."""
    items, clock = [], T0
    for i in range(draw(st.integers(1, 24))):
        clock += draw(st.sampled_from((0, 60_000, HOUR_MS, 6 * HOUR_MS, DAY_MS, 5 * DAY_MS, 15 * DAY_MS)))
        lead = draw(st.sampled_from(("lead-a", "lead-b", "lead-c")))
        kind = draw(st.sampled_from(("pricing", "pricing", "blog", "again", "known", "account")))
        if kind == "again" and items:
            items.append(draw(st.sampled_from(items)))
        elif kind == "known":
            items.append(known(lead, clock))
        elif kind == "account":
            items.append(employee(lead, draw(st.sampled_from(("acme.com", "beta.com"))), clock))
        else:
            url = PRICING if kind == "pricing" else "https://acme.com/blog"
            items.append(pageview(f"e{i}", clock - draw(st.integers(0, GRACE_MS)), lead, url))
    cuts = sorted(set(draw(st.lists(st.integers(1, len(items)), max_size=8))))
    crashes = set(draw(st.lists(st.integers(0, len(cuts)), max_size=3)))
    return items, cuts, crashes


def membership_history(items: list[tuple], cuts: list[int], crashes: set[int] = frozenset()
                       ) -> dict[str, list[bytes]]:
    """The lead processor over `items` cut at `cuts`, its timers run after every batch, then 20 days on;
    the batches numbered in `crashes` crash before their commit once. Every change as ClickHouse keeps it
    (one row per key), per member in order (the order Kafka keeps: one member's changes share a partition)."""
    async def go() -> list[SegmentChange]:
        worker = Worker(site())
        store = worker.lead.store = CrashingStore(worker.store.redis, processor="lead")
        start = 0
        for number, end in enumerate([*cuts, len(items)]):
            if end > start:
                batch = worker.messages(LEADS_ACTIVITY, items[start:end], 0)
                store.crash_next = number in crashes
                try:
                    await worker.lead.process(batch)
                except StaleBatch:  # produced, not committed: computed again from the same state
                    await worker.lead.process(batch)
                await worker.lead.tick([0])
            start = end
        await worker.lead.tick([0])
        worker.clock.now_ms += 20 * DAY_MS  # 20 quiet days: the partition's stream clock follows the wall clock
        await worker.lead.tick([0])
        return worker.produced(SEGMENTS_CHANGES)

    rows: dict[tuple, SegmentChange] = {}
    for change in run(go()):
        rows.setdefault((change.segment_id, change.member_id, change.ts_ms, change.seq), change)
    history: dict[str, list[bytes]] = {}
    for change in rows.values():
        history.setdefault(change.member_id, []).append(change.to_json())
    return history


@given(lead_feeds())
@settings(max_examples=40, deadline=None)
def test_membership_is_the_same_whatever_the_batch_boundaries_and_replays(feed):
    items, cuts, crashes = feed
    whole = membership_history(items, [])
    assert membership_history(items, cuts) == whole
    assert membership_history(items, cuts, crashes) == whole  # replayed batches: the same rows, collapsed


def test_a_member_enters_on_an_event_and_leaves_by_the_timer_when_its_window_runs_out():
    worker = Worker(site())
    run(worker.feed([employee("lead-a"), pageview("e1", T0, url=PRICING), pageview("e2", T0 + HOUR_MS, url=PRICING)]))
    assert worker.changes() == [("pricing-twice", "lead-a", True, HOUR_MS, "event:e2")]
    entered = worker.produced(SEGMENTS_CHANGES)[0]
    assert (entered.seq, entered.version, entered.of, entered.account_domain) == (1, 1, "lead", "acme.com")
    key = worker.lead.processor.leads.key(SITE, "lead-a")
    due = worker.store.redis.zset(KEYS.due("lead", 0))[key]
    assert due == T0 + 14 * DAY_MS + GRACE_MS  # e1 leaves the window at T0 + 14d; the pass runs after the grace
    snapshot = LeadSnapshot.from_json(values(worker.producer.sent[0], LEADS_STATE)[-1])
    assert snapshot.segments == ["pricing-twice"]

    run(worker.tick(14 * DAY_MS))  # two quiet weeks: no new event
    assert worker.changes()[1:] == [("pricing-twice", "lead-a", False, 14 * DAY_MS, "window")]
    run(worker.tick(DAY_MS))  # (e2's window runs out too: the account segment's lead filter hears of it)
    assert key not in worker.store.redis.zset(KEYS.due("lead", 0))  # nothing left to do
    assert len(worker.changes()) == 2


def test_a_state_rule_naming_a_segment_sees_the_change_in_the_same_record():
    setup = site(DEFINITIONS + """
rules:
- id: hot
  when: {score_at_least: 0}
  if: [{in_segment: pricing-twice}]
  then: [{add_tag: Hot}]
""")
    worker = Worker(setup)
    run(worker.feed([employee("lead-a"), pageview("e1", T0, url=PRICING), pageview("e2", T0 + 1, url=PRICING)]))
    snapshot = LeadSnapshot.from_json(values(worker.producer.sent[0], LEADS_STATE)[-1])
    assert snapshot.tags == ["Hot"] and snapshot.segments == ["pricing-twice"]


def test_a_merge_moves_membership_to_the_survivor_once():
    worker = Worker(site())
    run(worker.feed([employee("anon"), pageview("e1", T0, "anon", PRICING), pageview("e2", T0 + 1, "anon", PRICING),
                     known("known"), pageview("e3", T0 + 2, "known")]))
    run(worker.feed([identity("lead_merged", "known", T0 + 3, from_lead="anon")]))
    [handover] = [record for record in worker.produced(LEADS_ACTIVITY)]
    again = (b"known", handover.to_json(), LEADS_ACTIVITY.headers(type(handover)))
    run(worker.feed([again, again]))  # the handover re-sent: taken once
    assert worker.changes() == [
        ("pricing-twice", "anon", True, 1, "event:e2"),
        ("pricing-twice", "anon", False, 3, "merged:known"),
        ("busy", "known", True, 3, "merge:anon"),  # its own event and the two it took over: three in a day
        ("known-busy", "known", True, 3, "merge:anon"),
        ("pricing-twice", "known", True, 3, "merge:anon"),
    ]
    run(worker.feed([pageview("e4", T0 + 4, "anon", PRICING)]))  # in flight during the merge: to the survivor
    run(worker.pump())
    assert len(worker.changes()) == 5


def test_a_bare_visitor_is_in_no_segment_until_it_is_a_lead():
    worker = Worker(site())
    run(worker.feed([pageview("e1", T0, url=PRICING), pageview("e2", T0 + 1, url=PRICING)]))
    assert worker.changes() == [] and worker.produced(BOARD_COMMANDS) == []
    run(worker.feed([known("lead-a", T0 + 2)]))  # its history counts once it is a lead
    assert worker.changes() == [("pricing-twice", "lead-a", True, 2, f"identity:ie-lead_created-lead-a--{T0 + 2}")]


# ---- account segments ----

def test_the_account_processor_enters_and_leaves_account_segments():
    worker = Worker(site())
    run(worker.feed([employee("lead-a"), employee("lead-b"), pageview("e1", T0, "lead-a", PRICING)]))
    run(worker.pump())
    assert [c for c in worker.changes() if c[1] == "acme.com"] == []  # one lead viewed pricing: not yet
    run(worker.feed([pageview("e2", T0 + HOUR_MS, "lead-b", PRICING)]))
    run(worker.pump())
    accounts = [c for c in worker.produced(SEGMENTS_CHANGES) if c.of == "account"]
    assert [(c.segment_id, c.member_id, c.entered, c.cause) for c in accounts] == [
        ("pricing-companies", "acme.com", True, "lead:lead-b")]
    run(worker.feed([employee("lead-b", "beta.com", T0 + 2 * HOUR_MS)]))  # lead-b moves to another company
    run(worker.pump())
    accounts = [c for c in worker.produced(SEGMENTS_CHANGES) if c.of == "account"]
    assert [(c.member_id, c.entered, c.seq) for c in accounts] == [("acme.com", True, 1), ("acme.com", False, 2)]
    state = worker.store.redis.get(KEYS.account_state(SITE, "acme.com"))
    assert state is not None and b"lead-b" not in state


def test_a_merge_within_an_account_moves_its_lead_without_the_account_leaving_and_entering_again():
    worker = Worker(site())
    run(worker.feed([employee("anon"), employee("lead-b"), employee("known"), pageview("e1", T0, "anon", PRICING),
                     pageview("e2", T0 + 1, "lead-b", PRICING)]))
    run(worker.pump())
    run(worker.feed([identity("lead_merged", "known", T0 + 2, from_lead="anon")]))
    run(worker.pump())
    accounts = [(c.member_id, c.entered, c.cause) for c in worker.produced(SEGMENTS_CHANGES) if c.of == "account"]
    assert accounts == [("acme.com", True, "lead:lead-b")]  # anon's pricing view now counts as known's
    state = worker.store.redis.get(KEYS.account_state(SITE, "acme.com"))
    assert b'"anon"' not in state and b'"known"' in state

    run(worker.feed([employee("lead-c", "beta.com"), pageview("e3", T0 + 3, "lead-c", PRICING),
                     identity("lead_merged", "lead-c", T0 + 4, from_lead="lead-b")]))
    run(worker.pump())  # lead-b (acme.com) merged into beta.com's one lead: acme.com has one pricing lead left
    accounts = [(c.member_id, c.entered) for c in worker.produced(SEGMENTS_CHANGES) if c.of == "account"]
    assert accounts == [("acme.com", True), ("acme.com", False)]
    assert b'"lead-b"' not in worker.store.redis.get(KEYS.account_state(SITE, "acme.com"))


def test_an_account_update_sent_again_changes_nothing():
    worker = Worker(site())
    run(worker.feed([employee("lead-a"), employee("lead-b"), pageview("e1", T0, "lead-a", PRICING),
                     pageview("e2", T0 + 1, "lead-b", PRICING)]))
    updates = worker.produced(SEGMENTS_ACCOUNT_LEADS)
    assert all(isinstance(u, AccountLeadFacts) for u in updates)
    items = [(u.account_domain.encode(), u.to_json(), []) for u in updates]
    account = worker.runners[SEGMENTS_ACCOUNT_LEADS.name]
    partition = partition_for_key(b"acme.com", 4)
    run(account.process(worker.messages(SEGMENTS_ACCOUNT_LEADS, items, partition)))
    run(account.process(worker.messages(SEGMENTS_ACCOUNT_LEADS, items, partition)))  # the lead processor replayed
    assert [(c.member_id, c.entered) for c in worker.produced(SEGMENTS_CHANGES) if c.of == "account"] == [
        ("acme.com", True)]


# ---- boards that import a segment ----

BOARDS = """
boards:
- id: pricing
  name: Pricing viewers
  card: lead
  import: {segment: pricing-twice}
  stages: [{id: new, name: New, entry: true}, {id: hot, name: Hot, when_tag: Hot}]
- id: archived-on-leave
  name: Archive when they leave
  card: lead
  import: {segment: pricing-twice}
  on_leave: archive
  stages: [{id: new, name: New, entry: true}]
- id: companies
  name: Pricing companies
  card: account
  import: {segment: pricing-companies}
  stages: [{id: new, name: New, entry: true}]
- id: everyone
  name: Every lead
  card: lead
  stages: [{id: new, name: New, entry: true}]
"""


def test_a_board_importing_a_segment_gets_exactly_its_members_cards():
    worker = Worker(site(DEFINITIONS + BOARDS))
    run(worker.feed([
        employee("lead-a"), pageview("a1", T0, "lead-a", PRICING), pageview("a2", T0 + 1, "lead-a", PRICING),
        known("lead-b"), pageview("b1", T0 + 2, "lead-b", PRICING),  # a lead, but viewed pricing once
        employee("lead-c"), pageview("c1", T0 + 3, "lead-c", PRICING), pageview("c2", T0 + 4, "lead-c", PRICING),
        pageview("d1", T0 + 5, "visitor-d", PRICING), pageview("d2", T0 + 6, "visitor-d", PRICING),  # not a lead
    ]))
    run(worker.pump())
    assert sorted(worker.board("pricing")) == ["lead:lead-a", "lead:lead-c"]
    assert sorted(worker.board("everyone")) == ["lead:lead-a", "lead:lead-b", "lead:lead-c"]  # leads, no visitor
    assert sorted(worker.board("companies")) == ["account:acme.com"]  # two of its leads viewed pricing
    entered = {c.card_id: c for c in worker.produced(BOARD_STAGE_CHANGES) if c.board_id == "pricing"}
    assert {c.to_stage for c in entered.values()} == {"new"}
    # no rule acted on the second view, yet it made the lead a member: the card's arrival names that event
    assert {card: c.event_id for card, c in entered.items()} == {"lead:lead-a": "a2", "lead:lead-c": "c2"}

    run(worker.tick(15 * DAY_MS))  # their windows run out: both leave the segment
    pricing, archive = worker.board("pricing"), worker.board("archived-on-leave")
    assert sorted(pricing) == ["lead:lead-a", "lead:lead-c"]  # kept where they are, marked
    assert all(view.left_segment and not view.archived for view in pricing.values())
    assert all(view.left_segment and view.archived for view in archive.values())

    run(worker.feed([pageview("a3", T0 + 30 * DAY_MS, "lead-a", PRICING),
                     pageview("a4", T0 + 30 * DAY_MS + 1, "lead-a", PRICING)]))  # lead-a is back
    run(worker.pump())
    assert not worker.board("pricing")["lead:lead-a"].left_segment
    assert not worker.board("archived-on-leave")["lead:lead-a"].archived
    assert worker.board("archived-on-leave")["lead:lead-c"].archived


def test_the_import_step_gives_a_board_created_after_its_members_their_cards():
    worker = Worker(site())
    run(worker.feed([employee("lead-a"), pageview("a1", T0, "lead-a", PRICING), pageview("a2", T0 + 1, "lead-a", PRICING),
                     employee("lead-b"), pageview("b1", T0 + 2, "lead-b", PRICING),
                     pageview("b2", T0 + 3, "lead-b", PRICING)]))
    run(worker.pump())
    worker.sites.edit(site(DEFINITIONS + BOARDS, version=2))  # the boards are applied; the backfill follows
    mark = DefinitionsMark("dm-2", SITE, 2)
    backfills = [SegmentBackfill(f"bf-{lead}", SITE, lead, 2, {}, T0 + 4) for lead in ("lead-a", "lead-b", "lead-z")]
    run(worker.feed([(None, mark.to_json(), LEADS_ACTIVITY.headers(DefinitionsMark)),
                     *((b.lead_id.encode(), b.to_json(), LEADS_ACTIVITY.headers(SegmentBackfill)) for b in backfills)]))
    run(worker.pump())
    assert worker.sites[SITE].version == 2  # the mark made the worker load the new definitions
    assert sorted(worker.board("pricing")) == ["lead:lead-a", "lead:lead-b"]
    assert sorted(worker.board("companies")) == ["account:acme.com"]  # the account processor told its card
    imported = [c for c in worker.produced(BOARD_STAGE_CHANGES) if c.board_id in ("pricing", "companies")]
    assert {c.actor for c in imported} == {"import"} and len(imported) == 3
    assert worker.store.redis.get(KEYS.lead_state(SITE, "lead-z")) is None  # a lead it never had: left alone
    updates = [u for u in worker.produced(BOARD_COMMANDS) if isinstance(u, CardUpdate) and u.kind == "segment"]
    assert [(u.card_id, u.segments) for u in updates] == [("account:acme.com", ["pricing-companies"])]
    assert [c for c in worker.changes() if c[4].startswith("definitions:")] == []  # nothing changed membership


def test_a_card_update_waits_for_the_definitions_it_was_made_with():
    """A facts update made under newer definitions (a board that now imports a segment) makes the board
    processor load them before it decides, so the card is judged by the import it was sent for."""
    old, new = site(DEFINITIONS, version=1), site(DEFINITIONS + BOARDS, version=2)
    worker = Worker(old)
    board = worker.runners[BOARD_COMMANDS.name]
    update = CardUpdate("u1", SITE, "lead:lead-x", "facts", "system", lead_id="lead-x", tags=[], score=0,
                        activity_ms=T0, ts_ms=T0, segments=[], definitions_version=2)
    worker.sites.edit(new)
    run(board.process(worker.messages(BOARD_COMMANDS, [(b"lead:lead-x", update.to_json(),
                                                        BOARD_COMMANDS.headers(CardUpdate))], 0)))
    assert worker.sites[SITE].version == 2
    assert list(worker.board("everyone")) == ["lead:lead-x"] and worker.board("pricing") == {}
