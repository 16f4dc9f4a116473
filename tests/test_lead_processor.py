"""The lead processor on the shared runtime without servers: rules fire once per lead across replays and
batch boundaries, merges hand state over once, and every change reaches the board processor's feed."""

from __future__ import annotations

import asyncio
import time

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.lead_processor import LeadProcessor
from processors.rules import RuleSet
from processors.runtime.ingest import Message
from processors.runtime.producer import MemoryProducer, Outputs
from processors.runtime.runner import ProcessorRunner
from processors.runtime.state import MemoryStateStore
from processors.site_definitions import SiteDefinitionsCache, SiteSetup
from schemas.boards import CardUpdate
from schemas.definitions import load_definitions
from schemas.events import EnrichedEvent
from schemas.identity import IdentityEvent
from schemas.rules import LeadSnapshot, RuleExecution
from schemas.topics import BOARD_COMMANDS, LEADS_ACTIVITY, LEADS_STATE, RULE_EXECUTIONS

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


def processor_runner(store: MemoryStateStore | None = None
                     ) -> tuple[ProcessorRunner, MemoryStateStore, MemoryProducer]:
    definitions = load_definitions(RULES, "rules.yaml")
    cache = SiteDefinitionsCache(NoDefinitionsStore())  # type: ignore[arg-type]
    cache.sites["s"] = setup(definitions, 1)
    store = store or MemoryStateStore()
    producer = MemoryProducer()
    return ProcessorRunner(LeadProcessor(4, store, cache, None, "ls"), store, producer), store, producer


def event(i: int, lead: str = "lead_a", url: str = "https://acme.com/pricing") -> bytes:
    fields = dict.fromkeys(f for f in EnrichedEvent.__dataclass_fields__)
    record = {name: "" for name in fields} | {
        "event_id": f"e{i}", "site_id": "s", "type": "pageview", "ts_ms": NOW + i, "received_ms": NOW + i,
        "visitor_id": "v1", "url": url, "is_bot": False, "properties": "{}", "extra": "{}", "raw_partition": 0,
        "raw_offset": i, "is_late": False, "lead_id": lead, "network_asn": 0, "may_identify": True}
    return orjson.dumps(record)


def identity(kind: str, lead: str, from_lead: str = "", **fields) -> bytes:
    return IdentityEvent(f"ie-{kind}-{lead}-{from_lead}", "s", kind, "e0", NOW, visitor_id="v1", lead_id=lead,
                         from_lead_id=from_lead, **fields).to_json()


def feed(values: list[bytes], first_offset: int = 0) -> list[Message]:
    return [Message(0, first_offset + i, None, v) for i, v in enumerate(values)]


def executions(outputs: Outputs) -> list[str]:
    return [RuleExecution.from_json(v).rule_id for v in outputs.values(RULE_EXECUTIONS)]


async def test_a_rule_fires_once_and_its_chain_runs_in_the_same_pass():
    run, store, producer = processor_runner()
    outputs = await run.process(feed([identity("account_linked", "lead_a", account_domain="acme.com"),
                                      event(1), event(2)]))
    assert executions(outputs) == ["viewed-pricing"]  # per_lead: the second pricing view fires nothing
    second = await run.process(feed([event(3), event(4)], first_offset=3))
    assert executions(second) == []
    snapshot = LeadSnapshot.from_json(outputs.values(LEADS_STATE)[-1])
    assert snapshot.tags == ["Consideration"] and snapshot.score == 40 and snapshot.account_domain == "acme.com"
    updates = [CardUpdate.from_json(v) for v in outputs.values(BOARD_COMMANDS)]
    assert {(u.card_id, u.kind) for u in updates} >= {("lead:lead_a", "merge"), ("account:acme.com", "facts")}
    facts = [u for u in updates if u.kind == "facts" and u.card_id == "account:acme.com"][-1]
    assert facts.tags == ["Consideration"] and facts.actor == "rule:viewed-pricing@1"


async def test_replaying_a_batch_changes_nothing():
    run, store, producer = processor_runner()
    batch = feed([event(1), event(2, url="https://acme.com/blog")])
    await run.process(batch)
    before = dict(store.values)
    assert await run.process(batch) is None and store.values == before


async def test_a_merge_hands_the_anonymous_leads_state_to_the_known_lead_once():
    run, store, producer = processor_runner()
    await run.process(feed([event(1, lead="lead_anon")]))
    merged = await run.process(feed([identity("lead_merged", "lead_known", from_lead="lead_anon")], first_offset=1))
    handovers = [v for v in merged.values(LEADS_ACTIVITY)]
    assert len(handovers) == 1
    taken = await run.process(feed(handovers + handovers + [event(5, lead="lead_known")], first_offset=2))
    snapshot = LeadSnapshot.from_json(taken.values(LEADS_STATE)[-1])
    assert snapshot.lead_id == "lead_known" and snapshot.tags == ["Consideration"] and snapshot.score == 40
    assert executions(taken) == []  # the known lead inherited the firing: viewing pricing again fires nothing


async def test_an_event_in_flight_for_a_merged_lead_goes_to_the_survivor():
    run, store, producer = processor_runner()
    await run.process(feed([event(1, lead="lead_anon", url="https://acme.com/blog")]))
    await run.process(feed([identity("lead_merged", "lead_known", from_lead="lead_anon")], first_offset=1))
    late = await run.process(feed([event(9, lead="lead_anon")], first_offset=2))
    forwarded = [orjson.loads(v) for v in late.values(LEADS_ACTIVITY)]
    assert [(r["event_id"], r["lead_id"]) for r in forwarded] == [("e9", "lead_known")]


async def test_score_reaching_the_threshold_chains_into_the_state_rule():
    run, store, producer = processor_runner()
    twice = load_definitions(RULES.replace("add_score: 40", "add_score: 70"), "rules.yaml")
    run.processor.sites.sites["s"] = setup(twice, 2)
    outputs = await run.process(feed([event(1)]))
    assert executions(outputs) == ["viewed-pricing", "hot"]
    assert LeadSnapshot.from_json(outputs.values(LEADS_STATE)[-1]).tags == ["Consideration", "Decision"]


@given(st.lists(st.tuples(st.sampled_from(["lead_a", "lead_b", "lead_c"]),
                          st.sampled_from(["/pricing", "/blog", "/features/x", "/", "known", "account"]),
                          st.integers(0, 3 * 3_600_000)), min_size=1, max_size=25),
       st.lists(st.integers(1, 6), min_size=1, max_size=25))
@settings(max_examples=60)
def test_the_same_feed_gives_the_same_outputs_whatever_the_batch_boundaries(events, cuts):
    """Rule firings, lead changes and every card update (what the board processor sees) do not depend on how
    the feed was cut into batches, nor on replays of a batch."""
    def record(i: int, lead: str, what: str, offset: int) -> bytes:
        """A pageview, or an identity change (the lead's email becomes known; it joins an account)."""
        if what == "known":
            return identity("lead_created", lead, email=f"{lead}@acme.com")
        if what == "account":
            return identity("account_linked", lead, account_domain=f"{lead}.example")
        return orjson.dumps(orjson.loads(event(i, lead, f"https://acme.com{what}")) | {"ts_ms": NOW + offset})

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
                    per_topic.setdefault(f"{topic}/{partition}", []).extend(v for _, v in items)
            return {t: v for t, v in per_topic.items() if not t.startswith("leads.state")}  # wall-clock versions
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
    assert await run.tick([0], wall_now_ms=NOW) is None  # the clock starts at the last event's time
    outputs = await run.tick([0], wall_now_ms=NOW + 3 * 3_600_000)  # three quiet hours later
    assert executions(outputs) == ["gone-quiet"]
    assert LeadSnapshot.from_json(outputs.values(LEADS_STATE)[-1]).tags == []
    assert await run.tick([0], wall_now_ms=NOW + 5 * 3_600_000) is None  # fired once: nothing due any more
