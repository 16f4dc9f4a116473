"""The lead processor on the shared runtime without servers (the in-memory store on the Redis twin, the
memory producer, a clock the test holds): rules fire once per lead across replays and batch boundaries,
merges hand state over once, every change reaches the board processor's feed, the hourly pass runs as the
lead's declared timer, an unchanged lead is not written again, webhooks are queued in the commit, and
versions come from the runtime's clock."""

from __future__ import annotations

import asyncio
from dataclasses import replace
import time

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

import redis.asyncio as aioredis

from processors import lead_processor
from processors.lead_processor import LeadProcessor
from processors.raw_processor import merge_notice
from processors.rules import SEEN_EVENTS, LeadState, RuleSet
from processors.runtime.ingest import Message
from processors.runtime.producer import MemoryProducer, Outputs
from processors.runtime.runner import ProcessorRunner
from processors.runtime.state import MemoryStateStore
from processors.site_definitions import SiteDefinitionsCache, SiteSetup
from processors.webhooks import QueuedWebhook, WebhookQueue
from schemas.boards import CardUpdate
from schemas.definitions import load_definitions
from schemas.events import EnrichedEvent, ForwardedEvent
from schemas.identity import IdentityEvent
from schemas.rules import LeadHandover, LeadSnapshot, MergeNotice, RuleExecution
from schemas.topics import BOARD_COMMANDS, EVENTS_DLQ, LEADS_ACTIVITY, LEADS_STATE, RULE_EXECUTIONS, Headers
from tests.twins import Clock, produced, records, states, values

NOW = int(time.time() * 1000)
RULES = """
rules:
- id: viewed-pricing
  when: {event: pageview, url: "*/pricing*"}
  then: [{add_tag: Consideration}, {add_score: 40}]
- id: hot
  when: {score_at_least: 60}
  then: [{add_tag: Decision}]
boards:
- id: pipeline
  name: Pipeline
  card: account
  stages:
  - {id: new, name: New, entry: true}
  - {id: consideration, name: Consideration, when_tag: Consideration}
  - {id: decision, name: Decision, when_tag: Decision}
"""


def setup(definitions, version: int) -> SiteSetup:
    """As the definitions store would hand them out: every rule at the site's version."""
    rules = [rule.model_copy(update={"version": version}) for rule in definitions.rules]
    return SiteSetup(version, RuleSet.compile(rules, version), tuple(definitions.boards))


class NoDefinitionsStore:
    async def load(self, site):  # every site the tests use is already in the cache
        raise AssertionError(f"unexpected load of {site}")


def processor_runner(store: MemoryStateStore | None = None, webhooks: WebhookQueue | None = None
                     ) -> tuple[ProcessorRunner, MemoryStateStore, MemoryProducer]:
    definitions = load_definitions(RULES, "rules.yaml")
    cache = SiteDefinitionsCache(NoDefinitionsStore())  # type: ignore[arg-type]
    cache.sites["s"] = setup(definitions, 1)
    store = store or MemoryStateStore(processor="lead")
    producer = MemoryProducer(EVENTS_DLQ)
    run = ProcessorRunner(LeadProcessor(cache, webhooks, "ls"), store, producer, 4, EVENTS_DLQ, clock_us=Clock(NOW))
    return run, store, producer


Record = tuple[bytes, Headers]  # a record of leads.activity as the lead processor reads it: value, headers


def event(i: int, lead: str = "lead_a", url: str = "https://acme.com/pricing") -> Record:
    fields = dict.fromkeys(f for f in EnrichedEvent.__dataclass_fields__)
    record = {name: "" for name in fields} | {
        "event_id": f"e{i}", "site_id": "s", "type": "pageview", "ts_ms": NOW + i, "received_ms": NOW + i,
        "visitor_id": "v1", "url": url, "is_bot": False, "properties": "{}", "extra": "{}", "raw_partition": 0,
        "raw_offset": i, "is_late": False, "lead_id": lead, "network_asn": 0, "may_identify": True}
    return orjson.dumps(record), LEADS_ACTIVITY.headers(EnrichedEvent)


def identity(kind: str, lead: str, from_lead: str = "", **fields) -> Record:
    change = IdentityEvent(f"ie-{kind}-{lead}-{from_lead}", "s", kind, "e0", NOW, visitor_id="v1", lead_id=lead,
                           from_lead_id=from_lead, **fields)
    return change.to_json(), LEADS_ACTIVITY.headers(IdentityEvent)


def feed(records: list[Record], first_offset: int = 0) -> list[Message]:
    return [Message(0, first_offset + i, None, value, headers) for i, (value, headers) in enumerate(records)]


def executions(outputs: Outputs) -> list[str]:
    return [RuleExecution.from_json(v).rule_id for v in values(outputs, RULE_EXECUTIONS)]


async def test_a_rule_fires_once_and_its_chain_runs_in_the_same_pass():
    run, store, producer = processor_runner()
    outputs = await run.process(feed([identity("account_linked", "lead_a", account_domain="acme.com"),
                                      event(1), event(2)]))
    assert executions(outputs) == ["viewed-pricing"]  # per_lead: the second pricing view fires nothing
    second = await run.process(feed([event(3), event(4)], first_offset=3))
    assert executions(second) == []
    snapshot = LeadSnapshot.from_json(values(outputs, LEADS_STATE)[-1])
    assert snapshot.tags == ["Consideration"] and snapshot.score == 40 and snapshot.account_domain == "acme.com"
    updates = records(outputs, BOARD_COMMANDS)
    assert all(isinstance(u, CardUpdate) for u in updates)  # typed as card updates by their header
    assert {(u.card_id, u.kind) for u in updates} >= {("lead:lead_a", "merge"), ("account:acme.com", "facts")}
    facts = [u for u in updates if u.kind == "facts" and u.card_id == "account:acme.com"][-1]
    assert facts.tags == ["Consideration"] and facts.actor == "rule:viewed-pricing@1"


async def test_replaying_a_batch_changes_nothing():
    run, store, producer = processor_runner()
    batch = feed([event(1), event(2, url="https://acme.com/blog")])
    await run.process(batch)
    before = states(store)
    assert await run.process(batch) is None and states(store) == before


async def test_a_merge_hands_the_anonymous_leads_state_to_the_known_lead_once():
    run, store, producer = processor_runner()
    await run.process(feed([event(1, lead="lead_anon")]))
    merged = await run.process(feed([identity("lead_merged", "lead_known", from_lead="lead_anon")], first_offset=1))
    handovers = produced(merged, LEADS_ACTIVITY)
    assert len(handovers) == 1
    taken = await run.process(feed(handovers + handovers + [event(5, lead="lead_known")], first_offset=2))
    snapshot = LeadSnapshot.from_json(values(taken, LEADS_STATE)[-1])
    assert snapshot.lead_id == "lead_known" and snapshot.tags == ["Consideration"] and snapshot.score == 40
    assert executions(taken) == []  # the known lead inherited the firing: viewing pricing again fires nothing


async def test_an_event_in_flight_for_a_merged_lead_goes_to_the_survivor():
    run, store, producer = processor_runner()
    await run.process(feed([event(1, lead="lead_anon", url="https://acme.com/blog")]))
    await run.process(feed([identity("lead_merged", "lead_known", from_lead="lead_anon")], first_offset=1))
    late = await run.process(feed([event(9, lead="lead_anon")], first_offset=2))
    forwarded = records(late, LEADS_ACTIVITY)
    assert [(r.event_id, r.lead_id) for r in forwarded] == [("e9", "lead_known")]
    assert all(isinstance(r, EnrichedEvent) for r in forwarded)


def notice(survivor: str = "lead_known", absorbed: str = "lead_anon", merged_at_ms: int = NOW) -> Record:
    """The raw processor's notice of `identity("lead_merged", survivor, from_lead=absorbed)`, received at NOW
    (`merged_at_ms`: the merging event's own time)."""
    merge = replace(IdentityEvent.from_json(identity("lead_merged", survivor, from_lead=absorbed)[0]), ts_ms=merged_at_ms)
    return merge_notice(merge, NOW).to_json(), LEADS_ACTIVITY.headers(MergeNotice)


async def handover_of_an_anonymous_lead_that_viewed_pricing(run: ProcessorRunner) -> list[Record]:
    await run.process(feed([event(1, lead="lead_anon")], first_offset=0))
    merged = await run.process(feed([identity("lead_merged", "lead_known", from_lead="lead_anon")], first_offset=1))
    return produced(merged, LEADS_ACTIVITY)


@given(st.integers(0, 4), st.booleans(), st.lists(st.integers(1, 4), min_size=1, max_size=6))
@settings(max_examples=40)
def test_what_follows_a_merge_does_not_depend_on_when_the_handover_arrives(arrives_after, notice_first, cuts):
    """The survivor's feed has the notice, then its own records (a pricing view among them); the hand-over
    arrives somewhere among them (or, rarely, ahead of the notice). The survivor ends the same, and never
    fires the rule the absorbed lead fired, wherever the hand-over fell and however the feed was cut."""
    def run_with(position: int, first: bool) -> tuple[list[str], bytes, list]:
        async def go():
            run, store, producer = processor_runner()
            handover = await handover_of_an_anonymous_lead_that_viewed_pricing(run)
            own = [event(10 + i, lead="lead_known", url=url) for i, url in enumerate(
                ["https://acme.com/blog", "https://acme.com/pricing", "https://acme.com/", "https://acme.com/pricing"])]
            survivor_feed = ([notice()] + own[:position] + handover + own[position:] if first
                             else handover + [notice()] + own)
            fired, offset, cards = [], 2, []
            for size in cuts + [len(survivor_feed)]:
                chunk = feed(survivor_feed[offset - 2:offset - 2 + size], first_offset=offset)
                if chunk:
                    outputs = await run.process(chunk)
                    fired += executions(outputs)
                    cards += [(u.card_id, u.kind, u.tags, u.score) for u in records(outputs, BOARD_COMMANDS)]
                offset += size
            state = store.redis.get(run.processor.leads.key("s", "lead_known"))
            return fired, state, cards
        return asyncio.run(go())

    fired, state, cards = run_with(arrives_after, notice_first)
    assert fired == [] and "Consideration" in LeadState.from_json(state).tags
    assert LeadState.from_json(state).awaiting == [] and LeadState.from_json(state).held == []
    assert (fired, state, cards) == run_with(0, True)  # the hand-over first: nothing to hold


async def test_a_hand_over_ahead_of_a_repeated_notice_does_not_leave_the_survivor_waiting():
    """A replayed raw batch can put a merge's notice on the survivor's feed again, after that merge's hand-over.
    The hand-over, which came while the survivor waited for another merge, was applied, not held: the repeated
    notice finds that merge done, and the wait ends with the other hand-over."""
    run, store, producer = processor_runner()
    await run.process(feed([event(1, lead="anon_1"), event(2, lead="anon_2")]))
    merges = await run.process(feed([identity("lead_merged", "lead_known", from_lead="anon_1"),
                                     identity("lead_merged", "lead_known", from_lead="anon_2")], first_offset=2))
    first, second = [(value, headers) for value, headers in produced(merges, LEADS_ACTIVITY)
                     if headers == LEADS_ACTIVITY.headers(LeadHandover)]
    survivor_feed = [notice(absorbed="anon_1"), second, notice(absorbed="anon_2"),
                     event(10, lead="lead_known", url="https://acme.com/blog"), first]
    outputs = await run.process(feed(survivor_feed, first_offset=4))
    state = LeadState.from_json(store.redis.get(run.processor.leads.key("s", "lead_known")))
    assert state.awaiting == [] and state.held == []
    assert sorted(state.merged_from) == ["anon_1", "anon_2"] and state.last_activity_ms == NOW + 10
    assert executions(outputs) == []  # both absorbed leads fired viewed-pricing: not again


async def test_two_notices_naming_one_absorbed_lead_by_two_merge_ids_end_with_its_one_hand_over():
    """A raw batch computed twice (a zombie's outputs, then its new owner's) may name one merge by two ids; the
    survivor waits for the absorbed lead, not for an id, so that lead's one hand-over ends the wait."""
    run, store, producer = processor_runner()
    handover = await handover_of_an_anonymous_lead_that_viewed_pricing(run)
    value, headers = notice()
    renamed = replace(MergeNotice.from_json(value), notice_id="mn_other", handover_id="ho_other")
    await run.process(feed([notice(), (renamed.to_json(), headers),
                            event(10, lead="lead_known", url="https://acme.com/blog"), *handover], first_offset=2))
    state = LeadState.from_json(store.redis.get(run.processor.leads.key("s", "lead_known")))
    assert state.awaiting == [] and state.held == [] and state.last_activity_ms == NOW + 10


async def test_a_lead_stops_waiting_after_max_held_records(monkeypatch):
    monkeypatch.setattr(lead_processor, "MAX_HELD", 2)
    run, store, producer = processor_runner()
    held = await run.process(feed([notice(), event(1, lead="lead_known", url="https://acme.com/blog"),
                                   event(2, lead="lead_known")]))
    assert executions(held) == [] and len(LeadState.from_json(
        store.redis.get(run.processor.leads.key("s", "lead_known"))).held) == 2
    released = await run.process(feed([event(3, lead="lead_known", url="https://acme.com/blog")], first_offset=3))
    assert executions(released) == ["viewed-pricing"]  # the held pricing view, in its turn
    state = LeadState.from_json(store.redis.get(run.processor.leads.key("s", "lead_known")))
    assert state.awaiting == [] and state.held == [] and state.score == 40


async def test_a_lead_stops_waiting_when_the_stream_passes_its_hold_time():
    run, store, producer = processor_runner()
    assert executions(await run.process(feed([notice(), event(1, lead="lead_known")]))) == []
    key = run.processor.leads.key("s", "lead_known")
    assert LeadState.from_json(store.redis.get(key)).awaiting_until_ms == NOW + lead_processor.HOLD_MS
    assert await run.tick([0]) is None  # the stream clock starts at the last event's time
    run.clock_us.now_ms = NOW + lead_processor.HOLD_MS + 60_000  # the hand-over never came
    outputs = await run.tick([0])
    assert executions(outputs) == ["viewed-pricing"]
    assert LeadState.from_json(store.redis.get(key)).held == []


async def test_old_traffic_running_through_the_stream_clock_does_not_end_the_wait_before_the_hand_over():
    """A backlog, a replay or old traffic moves the stream clock far past the merging event's own time within
    seconds; the wait counts from when the merge was received, so it still ends with the hand-over, and the
    rule the absorbed lead fired is not fired again."""
    run, store, producer = processor_runner()
    handover = await handover_of_an_anonymous_lead_that_viewed_pricing(run)
    ten_days_ago = NOW - 10 * 24 * 3_600_000
    held = await run.process(feed([notice(merged_at_ms=ten_days_ago), event(10, lead="lead_known")], first_offset=2))
    assert executions(held) == []
    assert await run.tick([0]) is None  # the stream clock (NOW + 10) is days past the merge's own time
    released = await run.process(feed(handover, first_offset=4))
    assert executions(released) == []
    state = LeadState.from_json(store.redis.get(run.processor.leads.key("s", "lead_known")))
    assert state.awaiting == [] and state.held == [] and "Consideration" in state.tags


async def test_a_replay_of_the_raw_processor_counts_nothing_twice_however_far_back_it_goes():
    """After a Redis failover the raw processor replays what its lost commits covered, so a lead hears its
    events again after many newer ones (more than the ids it remembers): the raw offsets tell them apart. An
    event forwarded from a lead merged away may come below those offsets, and counts."""
    run, store, producer = processor_runner()
    each = load_definitions("""
rules:
- id: read-a-page
  once: per_event
  when: {event: pageview}
  then: [{add_score: 1}]
""", "rules.yaml")
    run.processor.sites.sites["s"] = setup(each, 4)
    first = [event(i, url="https://acme.com/blog") for i in range(SEEN_EVENTS + 8)]
    assert len(executions(await run.process(feed(first)))) == SEEN_EVENTS + 8
    again = await run.process(feed(first[2:], first_offset=len(first)))  # the raw processor's replay
    assert executions(again) == []
    forwarded = orjson.dumps(orjson.loads(event(1000)[0]) | {"raw_offset": 3}), LEADS_ACTIVITY.headers(ForwardedEvent)
    late = await run.process(feed([forwarded], first_offset=2 * len(first)))
    assert executions(late) == ["read-a-page"]
    state = LeadState.from_json(store.redis.get(run.processor.leads.key("s", "lead_a")))
    assert state.score == SEEN_EVENTS + 9 and state.raw_marks == {"0": SEEN_EVENTS + 7}
    offset = 2 * len(first) + 1
    await run.process(feed([identity("lead_merged", "lead_known", from_lead="lead_a")], first_offset=offset))
    replayed = await run.process(feed(first[:4] + [event(SEEN_EVENTS + 8)], first_offset=offset + 1))
    assert [r.event_id for r in records(replayed, LEADS_ACTIVITY)] == [f"e{SEEN_EVENTS + 8}"]  # only the new one


async def test_score_reaching_the_threshold_chains_into_the_state_rule():
    run, store, producer = processor_runner()
    twice = load_definitions(RULES.replace("add_score: 40", "add_score: 70"), "rules.yaml")
    run.processor.sites.sites["s"] = setup(twice, 2)
    outputs = await run.process(feed([event(1)]))
    assert executions(outputs) == ["viewed-pricing", "hot"]
    assert LeadSnapshot.from_json(values(outputs, LEADS_STATE)[-1]).tags == ["Consideration", "Decision"]


@given(st.lists(st.tuples(st.sampled_from(["lead_a", "lead_b", "lead_c"]),
                          st.sampled_from(["/pricing", "/blog", "/features/x", "/", "known", "account"]),
                          st.integers(0, 3 * 3_600_000)), min_size=1, max_size=25),
       st.lists(st.integers(1, 6), min_size=1, max_size=25))
@settings(max_examples=60)
def test_the_same_feed_gives_the_same_outputs_whatever_the_batch_boundaries(events, cuts):
    """Rule firings, lead changes and every card update (what the board processor sees) do not depend on how
    the feed was cut into batches, nor on replays of a batch."""
    def record(i: int, lead: str, what: str, offset: int) -> Record:
        """A pageview, or an identity change (the lead's email becomes known; it joins an account)."""
        if what == "known":
            return identity("lead_created", lead, email=f"{lead}@acme.com")
        if what == "account":
            return identity("account_linked", lead, account_domain=f"{lead}.example")
        value, headers = event(i, lead, f"https://acme.com{what}")
        return orjson.dumps(orjson.loads(value) | {"ts_ms": NOW + offset}), headers

    records = [record(i, *e) for i, e in enumerate(events)]

    def run_in(batches: list[int], replay: bool) -> dict:
        async def go():
            run, _, producer = processor_runner()
            offset = 0
            for size in batches + [len(records)]:
                chunk = feed(records[offset:offset + size], first_offset=offset)
                if chunk:
                    await run.process(chunk)
                    if replay:
                        await run.process(chunk)
                offset += size
            per_topic: dict[str, list[bytes]] = {}
            for outputs in producer.sent:
                for (topic, partition), items in sorted(outputs.records.items()):
                    per_topic.setdefault(f"{topic}/{partition}", []).extend((v, h) for _, v, h in items)
            return {t: v for t, v in per_topic.items() if not t.startswith("leads.state")}  # one per lead per batch
        return asyncio.run(go())

    assert run_in(cuts, replay=False) == run_in([len(records)], replay=False) == run_in(cuts, replay=True)


async def test_the_hourly_pass_fires_time_triggers_for_due_leads_once():
    run, store, producer = processor_runner()
    quiet = load_definitions("""
rules:
- id: viewed-pricing
  when: {event: pageview, url: "*/pricing*"}
  then: [{add_tag: Consideration}]
- id: gone-quiet
  when: {inactive_for: 2h}
  then: [{remove_tag: Consideration}]
""", "rules.yaml")
    run.processor.sites.sites["s"] = setup(quiet, 3)
    await run.process(feed([event(1)]))
    key = run.processor.leads.key("s", "lead_a")
    due = store.redis.zset(store.keys.due("lead", 0))
    assert list(due) == [key] and due[key] > NOW + 2 * 3_600_000  # the lead's declared timer: its next hour
    assert await run.tick([0]) is None  # the clock starts at the last event's time
    run.clock_us.now_ms = NOW + 3 * 3_600_000  # three quiet hours later
    outputs = await run.tick([0])
    assert executions(outputs) == ["gone-quiet"]
    assert LeadSnapshot.from_json(values(outputs, LEADS_STATE)[-1]).tags == []
    run.clock_us.now_ms = NOW + 5 * 3_600_000
    assert await run.tick([0]) is None  # fired once: nothing due any more
    assert store.redis.zset(store.keys.due("lead", 0)) == {}


async def test_a_record_that_changes_nothing_writes_no_state_and_no_snapshot():
    run, store, producer = processor_runner()
    await run.process(feed([event(1)]))
    before = states(store)
    # a visitor re-pointed to the lead it already had: nothing of the lead changes
    outputs = await run.process(feed([identity("visitor_linked", "lead_a", from_lead="lead_a")], first_offset=1))
    assert values(outputs, LEADS_STATE) == [] and states(store) == before
    assert (await store.partition_marks([0]))[0][0] == 1


async def test_snapshot_versions_come_from_the_runtimes_clock():
    run, store, producer = processor_runner()
    first = await run.process(feed([event(1)]))
    run.clock_us.now_ms = NOW + 5_000
    second = await run.process(feed([event(2, url="https://acme.com/blog")], first_offset=1))
    versions = [LeadSnapshot.from_json(v).version for v in values(first, LEADS_STATE) + values(second, LEADS_STATE)]
    assert versions == [NOW * 1000, (NOW + 5_000) * 1000]


async def test_a_firings_webhook_is_queued_in_its_commit_once():
    """The webhook goes into the batch's writes, so it lands with the firing's state — here in the twin —
    and a replay of the firing from scratch adds nothing (webhook ids are deterministic)."""
    hooked = load_definitions("""
rules:
- id: viewed-pricing
  when: {event: pageview, url: "*/pricing*"}
  then: [{add_tag: Consideration}, {webhook: {url: "https://crm.example/hook", secret_env: CRM_SECRET}}]
""", "rules.yaml")
    queue = WebhookQueue(aioredis.Redis(), "ls")  # never connects: the processor only queues into its writes
    run, store, _ = processor_runner(webhooks=queue)
    run.processor.sites.sites["s"] = setup(hooked, 2)
    await run.process(feed([event(1), event(2)]))
    [(webhook_id, raw)] = store.redis.hash(queue.requests_key).items()
    delivery = QueuedWebhook.from_json(raw)
    assert (delivery.rule_id, delivery.url, delivery.enqueued_ms) == ("viewed-pricing", "https://crm.example/hook", NOW)
    assert store.redis.zset(queue.due_key) == {webhook_id: NOW}

    store.redis.delete(store.keys.watermarks("lead"), run.processor.leads.key("s", "lead_a"))  # state lost
    again, _, _ = processor_runner(store, webhooks=queue)
    again.processor.sites.sites["s"] = setup(hooked, 2)
    again.clock_us.now_ms = NOW + 60_000
    assert executions(await again.process(feed([event(1), event(2)]))) == ["viewed-pricing"]  # fires again
    assert store.redis.hash(queue.requests_key) == {webhook_id: raw}  # ... and queues nothing new
    assert store.redis.zset(queue.due_key) == {webhook_id: NOW}


async def test_records_written_before_record_types_still_decode():
    """Upgrade path: a leads.activity record without a record-type header is read by its first field."""
    run, _, _ = processor_runner()
    untyped = [Message(0, i, None, value) for i, (value, _) in
               enumerate([identity("account_linked", "lead_a", account_domain="acme.com"), event(1)])]
    typed = feed([identity("account_linked", "lead_a", account_domain="acme.com"), event(1)])
    fresh, _, _ = processor_runner()
    assert (await run.process(untyped)).records == (await fresh.process(typed)).records
