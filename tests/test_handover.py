"""Hand-over to sales, without servers: the assignment core (round robin fair and the same however the cards
are cut into batches or replayed; by account country/domain), owners and assign_owner validation, the
stage.changed body, and the board processor queueing one webhook per stage change with the turns committed
beside the cards (the runtime's in-memory store on the Redis twin)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from processors.board_processor import BoardProcessor
from processors.board_store import BoardStore
from processors.boards import BoardPlace, CardState, Cause, FactsUpdate, Shown, fold_updates
from processors.handover import (CardAccount, assign_by_rule, assign_on_entry, pick_owner, stage_changed_payload,
                                 wants_webhook)
from processors.rules import LeadState, RuleSet, apply_event, tag_by_hand
from processors.runtime.producer import MemoryProducer
from processors.runtime.runner import ProcessorRunner
from processors.site_definitions import SiteDefinitionsCache, SiteSetup
from processors.webhooks import QueuedWebhook, WebhookQueue, board_webhook_problems, WebhookTargets
from schemas.boards import BoardDefinition, Owner, StageAssign, StageChange
from schemas.companies import Company
from schemas.definitions import DefinitionsError, load_definitions, owner_problems
from schemas.redis_keys import RedisKeys
from schemas.rules import Rule
from schemas.topics import BOARD_STAGE_CHANGES, EVENTS_DLQ
from tests.test_board_processor import feed
from tests.test_lead_processor import NoDefinitionsStore
from tests.twins import Clock, RecordingStore, values

NOW = int(time.time() * 1000)
SITE = "s"
KEYS = RedisKeys("ls")
OWNERS = (Owner(id="ann", name="Ann", email="ann@example.com"), Owner(id="bob", name="Bob", email="bob@example.com"),
          Owner(id="cy", name="Cy", email="cy@example.com"))
BOARD = BoardDefinition.model_validate({
    "id": "pipeline", "name": "Pipeline", "card": "account",
    "on_stage_change": {"webhook": "https://crm.example/hook", "secret_env": "CRM"},
    "stages": [
        {"id": "new", "name": "New", "entry": True, "assign": {"round_robin": ["ann", "bob", "cy"]}},
        {"id": "decision", "name": "Decision", "when_tag": "Decision",
         "assign": {"by": "account.country", "map": {"nl": "ann", "DE": "bob"}, "default": "cy"}},
    ]})


def _entering(card_id: str) -> tuple[CardState, list[StageChange], list]:
    card = CardState(card_id, SITE)
    after, changes, views, _ = fold_updates([BOARD], card, [FactsUpdate(Cause("system", NOW), "l-" + card_id)])
    return after, changes, views


def _assign_all(card_ids: list[str], chunks: list[int]) -> tuple[dict[str, str], dict]:
    """Cards enter one after another; the turns carry over between chunks as the committed state would."""
    turns: dict = {}
    owners: dict[str, str] = {}
    start = 0
    for size in [*chunks, len(card_ids)]:
        chunk_turns = {board: dict(t) for board, t in turns.items()}  # what a batch loads from the commit
        for card_id in card_ids[start:start + size]:
            card, changes, views = _entering(card_id)
            card, chunk_turns, _, assigned = assign_on_entry([BOARD], card, changes, chunk_turns, CardAccount(), views)
            owners[card_id] = card.places["pipeline"].owner
        turns, start = chunk_turns, start + size
        if start >= len(card_ids):
            break
    return owners, turns


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.lists(st.integers(1, 7), max_size=8))
def test_round_robin_is_fair_and_the_same_whatever_the_batches(count, chunks):
    cards = [f"account:c{i}.com" for i in range(count)]
    at_once, turns = _assign_all(cards, [])
    in_batches, turns_batched = _assign_all(cards, chunks)
    assert in_batches == at_once and turns_batched == turns == {"pipeline": {"new": count}}
    counts = Counter(at_once.values())
    assert max(counts.values()) - min(counts.get(o, 0) for o in ("ann", "bob", "cy")) <= 1
    assert [at_once[c] for c in cards[:3]] == ["ann", "bob", "cy"][:count]


@given(st.integers(0, 1000))
def test_a_replayed_batch_takes_the_same_turns(turn):
    assign = StageAssign(round_robin=["ann", "bob"])
    first = pick_owner(assign, "new", {"new": turn}, CardAccount())
    assert pick_owner(assign, "new", {"new": turn}, CardAccount()) == first
    assert first == (["ann", "bob"][turn % 2], {"new": turn + 1})


def test_by_country_and_domain_with_default_case_insensitive():
    assign = BOARD.stages[1].assign
    assert pick_owner(assign, "decision", {}, CardAccount("a.nl", "NL"))[0] == "ann"
    assert pick_owner(assign, "decision", {}, CardAccount("a.de", "de"))[0] == "bob"
    assert pick_owner(assign, "decision", {}, CardAccount("a.fr", "FR"))[0] == "cy"
    assert pick_owner(assign, "decision", {}, CardAccount())[0] == "cy"
    by_domain = StageAssign(by="account.domain", map={"Acme.com": "ann"})
    assert pick_owner(by_domain, "x", {}, CardAccount("acme.com", ""))[0] == "ann"
    assert pick_owner(by_domain, "x", {}, CardAccount("other.com", "")) == ("", {})


def test_an_owned_card_keeps_its_owner_and_the_view_shows_a_new_one():
    card, changes, views = _entering("account:acme.com")
    after, turns, new_views, assigned = assign_on_entry([BOARD], card, changes, {}, CardAccount(), views)
    assert assigned == [("pipeline", "ann")] and [v.view.owner for v in new_views] == ["ann"]
    assert card.places["pipeline"].owner == ""  # the argument is not changed
    owned = after.copy()
    moved, changes2, views2, _ = fold_updates([BOARD], owned, [FactsUpdate(Cause("system", NOW), "l", ["Decision"])])
    again, _, _, assigned2 = assign_on_entry([BOARD], moved, changes2, turns, CardAccount("acme.com", "DE"), views2)
    assert assigned2 == [] and again.places["pipeline"].owner == "ann"


LADDER = BoardDefinition.model_validate({
    "id": "ladder", "name": "Ladder", "card": "account",
    "stages": [
        {"id": "new", "name": "New", "entry": True},
        {"id": "warm", "name": "Warm", "when_score_at_least": 10},
        {"id": "decision", "name": "Decision", "when_score_at_least": 20, "assign": {"round_robin": ["ann"]}},
        {"id": "qualified", "name": "Qualified", "when_score_at_least": 30},
    ]})


def _owner_after(scores: list[int]) -> str:
    """A card fed these scores, one update each, assigning after every update as the board processor does."""
    card, turns = CardState("account:acme.com", SITE), {}
    for score in scores:
        card, changes, views, _ = fold_updates([LADDER], card, [FactsUpdate(Cause("system", NOW), "l", score=score)])
        card, turns, _, _ = assign_on_entry([LADDER], card, changes, turns, CardAccount(), views)
    return card.places["ladder"].owner


def test_a_card_that_jumps_past_an_assigning_stage_gets_its_owner():
    assert _owner_after([35]) == "ann"  # entered straight into Qualified
    assert _owner_after([5, 35]) == "ann"  # New -> Qualified in one move
    assert _owner_after([5, 15]) == ""  # not there yet


def test_a_move_back_before_the_assigning_stage_assigns_nothing():
    card = CardState("account:acme.com", SITE, places={"ladder": BoardPlace("warm", NOW, 3)})
    back = StageChange(SITE, "ladder", card.card_id, "qualified", "warm", "user:key-1", seq=3)
    assert assign_on_entry([LADDER], card, [back], {}, CardAccount(), [])[3] == []


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.data())
def test_whether_a_card_gets_an_owner_does_not_depend_on_which_updates_it_heard(scores, data):
    """An account card hears its leads' updates in an order (and with gaps) that depends on how the lead
    processor's partitions interleaved; scores only rise here, so any subsequence ending with the last score
    must leave the card owned exactly when the full sequence does."""
    rising = sorted(scores)
    heard = sorted(data.draw(st.lists(st.sampled_from(rising), max_size=len(rising)))) + [rising[-1]]
    assert bool(_owner_after(heard)) == bool(_owner_after(rising))


def test_a_rule_assign_owner_replaces_the_owner_on_every_board_the_card_is_on():
    card = CardState("account:acme.com", SITE, places={"pipeline": BoardPlace("new", NOW, 1, owner="ann")})
    after, views = assign_by_rule([BOARD], card, "bob")
    assert after.places["pipeline"].owner == "bob" and views[0].view.owner == "bob"
    off_board = CardState("account:x.com", SITE)
    assert assign_by_rule([BOARD], off_board, "bob")[1] == []


def test_assign_and_on_stage_change_validation():
    for bad, message in (({"round_robin": ["ann"], "by": "account.country", "default": "x"}, "exactly one"),
                         ({"by": "account.country"}, "needs a map"),
                         ({"round_robin": ["ann"], "default": "bob"}, "go with by"),
                         ({"by": "account.city", "default": "a"}, "account.country"),
                         ({"round_robin": []}, "at least 1")):
        with pytest.raises(ValidationError, match=message):
            StageAssign.model_validate(bad)
    with pytest.raises(ValidationError, match="names no stage of this board: nope"):
        BoardDefinition.model_validate({**BOARD.content(), "on_stage_change": {
            "webhook": "https://crm.example/h", "secret_env": "CRM", "to": ["nope"]}})
    problems = board_webhook_problems("s", [("boards[0]", BoardDefinition.model_validate({
        **BOARD.content(), "on_stage_change": {"webhook": "http://127.0.0.1/h", "secret_env": "LEADSTREAM_REDIS_URL"}})
    )], WebhookTargets.parse(""))
    assert len(problems) == 2 and "secret_env" in problems[0] and "webhook" in problems[1]


def test_assign_owner_action_is_validated_against_the_sites_owners():
    rule = Rule.model_validate({"id": "hot", "when": {"event": "form_submit"}, "then": [{"assign_owner": "dan"}]})
    assert owner_problems([("rules[0] (id: hot)", rule)], [("boards[0]", BOARD)], ["ann", "bob"], unknown_ok=False) == [
        "rules[0] (id: hot): then[0].assign_owner: no owner 'dan'", "boards[0]: stages[0].assign: no owner 'cy'",
        "boards[0]: stages[1].assign: no owner 'cy'"]
    assert owner_problems([("r", rule)], [], ["dan"], unknown_ok=False) == []
    with pytest.raises(ValidationError, match="exactly one of"):
        Rule.model_validate({"id": "x", "when": {"event": "form_submit"},
                             "then": [{"assign_owner": "ann", "add_tag": "Hot"}]})
    with pytest.raises(DefinitionsError, match=r"owners\[0\] \(id: ann\): email"):
        load_definitions("owners:\n  - {id: ann, name: Ann, email: not-an-address}\n", "o.yaml")
    assert load_definitions("owners:\n  - {id: ann, name: Ann, email: ann@example.com}\n", "o.yaml").owners[0].id == "ann"


def test_the_assign_owner_action_asks_for_the_owner_and_a_tag_by_hand_names_its_actor():
    rules = RuleSet.compile([Rule.model_validate({"id": "hot", "version": 3, "when": {"tag": "Hot"},
                                                  "then": [{"assign_owner": "ann"}]})], 3)
    state = LeadState("l1", SITE, account_domain="acme.com")
    out = tag_by_hand(rules, state, "Hot", True, NOW, "tag_1", actor="user:key-1")
    [change] = out.changes
    assert (change.kind, change.name, change.actor, change.rule_id) == ("tag_added", "Hot", "user:key-1", "")
    [request] = out.card_owners
    assert (request.owner, request.rule_id, request.account_domain) == ("ann", "hot", "acme.com")
    assert tag_by_hand(rules, out.state, "Hot", True, NOW, "tag_2").changes == []  # already tagged


def test_stage_changed_body_names_board_card_stages_cause_account_and_owner():
    card, changes, _ = _entering("account:acme.nl")
    card.places["pipeline"].owner = "ann"
    body = stage_changed_payload(BOARD, changes[0], card, Shown(card), {o.id: o for o in OWNERS},
                                 Company("acme.nl", "Acme BV", industry="Software", country="NL"))
    assert body["board"] == {"id": "pipeline", "name": "Pipeline"} and body["from_stage"] is None
    assert body["to_stage"] == {"id": "new", "name": "New"} and body["cause"]["actor"] == "system"
    assert body["account"]["name"] == "Acme BV" and body["account"]["country"] == "NL"
    assert body["owner"] == {"id": "ann", "name": "Ann", "email": "ann@example.com"}
    assert wants_webhook(BOARD, changes[0])
    filtered = BoardDefinition.model_validate({**BOARD.content(), "on_stage_change": {
        "webhook": "https://crm.example/h", "secret_env": "CRM", "to": ["decision"]}})
    assert not wants_webhook(filtered, changes[0])


def _runner(store: RecordingStore | None = None):
    sites = SiteDefinitionsCache(NoDefinitionsStore())  # type: ignore[arg-type]
    sites.sites[SITE] = SiteSetup(1, RuleSet.compile([]), (BOARD,), owners=OWNERS)
    store = store or RecordingStore(processor="board")
    redis = aioredis.Redis()  # never connects: writes go to the batch
    board = BoardProcessor(BoardStore(redis, "ls"), sites, "ls", WebhookQueue(redis, "ls"),
                           {"c1.nl": Company("c1.nl", "C1", country="NL")})
    return ProcessorRunner(board, store, MemoryProducer(EVENTS_DLQ), 4, EVENTS_DLQ,
                           clock_us=Clock(NOW)), store


async def test_the_board_processor_assigns_and_queues_one_webhook_per_stage_change_once():
    from schemas.boards import CardUpdate

    def facts(update_id: str, card_id: str, tags: list[str]) -> CardUpdate:
        return CardUpdate(update_id, SITE, card_id, "facts", "rule:r@1", lead_id="l-" + card_id, tags=tags, score=1,
                          title=card_id, activity_ms=NOW, rule_id="r", event_id="e-" + update_id, ts_ms=NOW)

    run, store = _runner()
    records = [facts(f"u{i}", f"account:c{i}.nl", []) for i in range(6)] + [facts("d1", "account:c1.nl", ["Decision"])]
    messages = feed(*records)
    out = await run.process(messages)
    changes = [StageChange.from_json(v) for v in values(out, BOARD_STAGE_CHANGES)]
    assert len(changes) == 7
    queued = {k: QueuedWebhook.from_json(v) for k, v in store.redis.hash(KEYS.webhook_requests).items()}
    assert len(queued) == 7 and {q.board_id for q in queued.values()} == {"pipeline"}
    bodies = [orjson.loads(q.body) for q in queued.values()]
    assert {b["type"] for b in bodies} == {"stage.changed"} and {b["board_id"] for b in bodies} == {"pipeline"}
    owners = Counter(b["data"]["owner"]["id"] for b in bodies if b["data"]["to_stage"]["id"] == "new")
    # each partition of board.commands takes its own turns: fair within the number of partitions
    assert sum(owners.values()) == 6 and max(owners.values()) - min(owners.get(o, 0) for o in "ann bob cy".split()) <= 4
    decision = next(b for b in bodies if b["data"]["to_stage"]["id"] == "decision")
    assert decision["data"]["from_stage"]["id"] == "new" and decision["data"]["account"]["country"] == "NL"
    turns = sum(orjson.loads(v)["new"] for k, v in store.redis.strings.items() if ":board-turns:" in k)
    assert turns == 6
    restarted, _ = _runner(store)  # a new worker reads the same offsets again (its commit is in the store)
    assert await restarted.process(messages) is None  # skipped: nothing moved, assigned or queued twice
    assert len(store.redis.hash(KEYS.webhook_requests)) == 7
    assert sum(orjson.loads(v)["new"] for k, v in store.redis.strings.items() if ":board-turns:" in k) == 6


async def test_a_tag_by_hand_on_the_lead_feed_reaches_rules_changes_and_cards_with_the_person_as_actor():
    from schemas.boards import CardUpdate
    from schemas.identity import ACCOUNT_LINKED
    from schemas.rules import LeadChange, TagByHand
    from schemas.topics import BOARD_COMMANDS, LEADS_ACTIVITY, LEADS_CHANGES
    from tests.test_lead_processor import event, feed, identity
    from tests.test_lead_processor import processor_runner as lead_runner

    run, _, _ = lead_runner()
    cache = run.processor.sites
    cache.sites["s"] = replace(cache.sites["s"], rules=RuleSet.compile([Rule.model_validate({
        "id": "hand-over", "version": 1, "when": {"tag": "Decision"}, "then": [{"assign_owner": "ann"}]})], 1))
    await run.process(feed([event(1), identity(ACCOUNT_LINKED, "lead_a", account_domain="acme.com")]))
    tag = TagByHand("tag_1", "s", "lead_a", "Decision", True, "user:key-k1", NOW + 5)
    out = await run.process(feed([(tag.to_json(), LEADS_ACTIVITY.headers(TagByHand))] * 2, first_offset=2))
    [change] = [LeadChange.from_json(v) for v in values(out, LEADS_CHANGES)]  # the retried record acts once
    assert (change.kind, change.name, change.actor) == ("tag_added", "Decision", "user:key-k1")
    updates = [CardUpdate.from_json(v) for v in values(out, BOARD_COMMANDS)]
    facts = [u for u in updates if u.kind == "facts"]
    assert facts and {u.actor for u in facts} == {"user:key-k1"} and all("Decision" in u.tags for u in facts)
    assigned = sorted((u.card_id, u.owner) for u in updates if u.kind == "assign")
    assert assigned == [("account:acme.com", "ann"), ("lead:lead_a", "ann")]


def test_a_boards_stage_changed_webhook_counts_as_one_of_the_sites_webhook_actions():
    from schemas.definitions import limit_problems
    from schemas.settings import DefinitionLimits

    limits = DefinitionLimits(rules=10, boards=10, webhook_actions=1)
    assert limit_problems([], 1, [], 0, limits, (1, 0)) == []
    assert limit_problems([], 2, [], 1, limits, (2, 1)) == [
        "a site has at most 1 webhook actions (LEADSTREAM_MAX_WEBHOOK_ACTIONS_PER_SITE); this would make 2"]
