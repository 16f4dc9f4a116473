"""The board stage machine: readable examples first, then properties.

`BoardModel` plays the board store's part (a view per card and one column set per stage, maintained from
ViewChanges exactly as the store maintains its Redis columns), so the properties check what a board shows,
not only the card states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.boards import (
    NOTES_KEPT,
    VIEW_LEAD_IDS,
    Cause,
    CardState,
    FactsUpdate,
    MoveRequest,
    Shown,
    ViewChange,
    apply_command,
    apply_move,
    belongs_on,
    decide,
    delete_stage,
    fold_updates,
    merge_cards,
)
from schemas.boards import BoardCommand, BoardDefinition, CommandResult, StageChange, account_card_id, lead_card_id

SITE = "site-1"
TAGS = ["Consideration", "Decision", "Other"]
PIPELINE = BoardDefinition.model_validate({
    "id": "pipeline", "name": "Sales pipeline", "card": "account", "stages": [
        {"id": "new", "name": "New", "entry": True},
        {"id": "consideration", "name": "Consideration", "when_tag": "Consideration"},
        {"id": "decision", "name": "Decision", "when_tag": "Decision"},
        {"id": "sql", "name": "Sales qualified", "when_score_at_least": 80},
        {"id": "customer", "name": "Customer"},
    ]})
LEADS = BoardDefinition.model_validate({
    "id": "leads", "name": "Leads", "card": "lead", "stages": [
        {"id": "engaged", "name": "Engaged", "when_tag": "Consideration"},
        {"id": "hot", "name": "Hot", "when_score_at_least": 60},
    ]})  # no entry stage: a lead enters only once it meets a stage
BOARDS = [PIPELINE, LEADS]
STAGE_IDS = [s.id for s in PIPELINE.stages]
LEAD_IDS = ["a", "b", "c", "d"]


def apply_updates(boards, card: CardState, updates) -> tuple[CardState, list[StageChange], list[ViewChange]]:
    """`fold_updates` without the derived `Shown`, which a caller keeping nothing between calls drops."""
    after, changes, views, _ = fold_updates(boards, card, updates)
    return after, changes, views


def cause(ts_ms: int = 1_000, actor: str = "rule:r@1", reason: str = "") -> Cause:
    return Cause(actor, ts_ms, rule_id="r" if actor.startswith("rule:") else "", event_id=f"e{ts_ms}", reason=reason)


def facts(tags: list[str] | None = None, score: int | None = None, lead_id: str = "", ts_ms: int = 1_000,
          **extra: object) -> FactsUpdate:
    return FactsUpdate(cause(ts_ms), lead_id, tags, score, activity_ms=ts_ms, **extra)  # type: ignore[arg-type]


def account(domain: str = "acme.com") -> CardState:
    return CardState(account_card_id(domain), SITE)


def lead(lead_id: str) -> CardState:
    return CardState(lead_card_id(lead_id), SITE)


def command(card: CardState, kind: str, command_id: str = "c1", board: str = "pipeline", **extra: object
            ) -> BoardCommand:
    return BoardCommand(command_id, SITE, board, card.card_id, kind, "user:ann", **extra)  # type: ignore[arg-type]


@dataclass
class BoardModel:
    """What the board store shows, maintained from ViewChanges the way it maintains Redis."""

    views: dict[tuple[str, str], object] = field(default_factory=dict)
    columns: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def apply(self, changes: list[ViewChange]) -> None:
        for change in changes:
            if change.left_stage:
                self.columns.setdefault((change.board_id, change.left_stage), set()).discard(change.card_id)
            if change.view is None:
                self.views.pop((change.board_id, change.card_id), None)
            else:
                self.views[change.board_id, change.card_id] = change.view
                self.columns.setdefault((change.board_id, change.view.stage_id), set()).add(change.card_id)

    def check_consistent(self) -> None:
        """Every shown card sits in exactly the column of its view."""
        for (board_id, card_id), view in self.views.items():
            homes = [stage for (b, stage), ids in self.columns.items() if b == board_id and card_id in ids]
            assert homes == [view.stage_id]  # type: ignore[attr-defined]
        shown = {(b, c) for (b, _), ids in self.columns.items() for c in ids}
        assert shown == set(self.views)


def check_moves(changes: list[StageChange]) -> None:
    """Per card and board: seq counts 1, 2, 3, ... and each change starts where the previous one ended."""
    last: dict[tuple[str, str], StageChange] = {}
    for change in changes:
        previous = last.get((change.board_id, change.card_id))
        assert change.seq == (previous.seq + 1 if previous else 1)
        assert change.from_stage == (previous.to_stage if previous else "")
        assert change.from_stage != change.to_stage
        last[change.board_id, change.card_id] = change
    assert len({c.stage_change_id for c in changes}) == len(changes)


# -- examples ---------------------------------------------------------------------------------------------

def test_a_card_enters_the_entry_stage_then_moves_right_as_tags_arrive():
    card, changes, views = apply_updates(BOARDS, account(), [facts([], 10, lead_id="l1")])
    assert [(c.board_id, c.from_stage, c.to_stage, c.seq) for c in changes] == [("pipeline", "", "new", 1)]
    assert [(v.board_id, v.view.stage_id, v.view.lead_ids) for v in views] == [("pipeline", "new", ["l1"])]
    card, changes, _ = apply_updates(BOARDS, card, [facts(["Consideration"], 10, lead_id="l1", ts_ms=2_000)])
    assert [(c.from_stage, c.to_stage, c.seq, c.actor, c.event_id, c.ts_ms) for c in changes] == [
        ("new", "consideration", 2, "rule:r@1", "e2000", 2_000)]
    assert card.places["pipeline"].entered_stage_ms == 2_000


def test_a_card_whose_facts_already_meet_a_later_stage_enters_there_in_one_move():
    card, changes, _ = apply_updates(BOARDS, account(), [facts(["Decision", "Consideration"], lead_id="l1")])
    assert [(c.from_stage, c.to_stage) for c in changes] == [("", "decision")]
    assert card.stage_on("pipeline") == "decision"


def test_a_board_without_entry_stage_takes_a_lead_only_once_it_meets_a_stage():
    card, changes, _ = apply_updates(BOARDS, lead("l1"), [facts(["Other"], 10)])
    assert [(c.board_id, c.to_stage) for c in changes] == [("pipeline", "new")]
    card, changes, _ = apply_updates(BOARDS, card, [facts(None, 70, ts_ms=2_000)])
    assert [(c.board_id, c.from_stage, c.to_stage) for c in changes] == [("leads", "", "hot")]


def test_automation_never_moves_a_card_back():
    card, _, _ = apply_updates(BOARDS, account(), [facts(["Decision"], lead_id="l1")])
    card, changes, views = apply_updates(BOARDS, card, [facts(["Consideration"], lead_id="l1", ts_ms=2_000)])
    assert changes == [] and card.stage_on("pipeline") == "decision"
    assert [v.view.tags for v in views] == [["Consideration"]]  # the view follows the facts, the stage does not
    _, decision, changes, _ = apply_move(BOARDS, card, "pipeline", MoveRequest(cause(), "new"))
    assert (decision.code, changes) == ("stage_regression", [])


def test_an_account_card_shows_the_union_of_its_leads_tags_and_their_best_score():
    card, _, _ = apply_updates(BOARDS, account(), [
        facts(["Other"], 30, lead_id="l1"), facts(["Consideration"], 85, lead_id="l2"), facts(["Mine"])])
    assert (card.tags, card.score, card.lead_ids, card.stage_on("pipeline")) == (
        ["Consideration", "Mine", "Other"], 85, ["l1", "l2"], "sql")
    card, _, views = apply_updates(BOARDS, card, [facts(lead_id="l2", left=True, ts_ms=2_000)])
    assert (card.tags, card.score, card.stage_on("pipeline")) == (["Mine", "Other"], 30, "sql")
    assert views[0].view.lead_count == 1


def test_a_person_moves_back_only_with_force_and_a_reason():
    card, _, _ = apply_updates(BOARDS, account(), [facts(["Decision"], lead_id="l1")])
    _, result, changes, _ = apply_command(BOARDS, card, command(card, "move", to_stage="new"), 5_000)
    assert (result.ok, result.code, changes) == (False, "stage_regression", [])
    _, result, _, _ = apply_command(BOARDS, card, command(card, "move", "c2", to_stage="new", force=True), 5_000)
    assert result.code == "stage_regression"  # force without a reason
    moved, result, changes, views = apply_command(
        BOARDS, card, command(card, "move", "c3", to_stage="new", force=True, reason="wrong company"), 5_000)
    assert result.ok and result.stage_change_id == changes[0].stage_change_id
    assert [(c.from_stage, c.to_stage, c.actor, c.reason, c.seq) for c in changes] == [
        ("decision", "new", "user:ann", "wrong company", 2)]
    assert views[0].left_stage == "decision" and views[0].view.stage_id == "new"
    _, result, changes, _ = apply_command(BOARDS, moved, command(moved, "move", "c4", to_stage="customer"), 6_000)
    assert result.ok and changes[0].to_stage == "customer"  # forward freely, also to a stage without condition


def test_moves_to_the_same_stage_or_an_unknown_one_change_nothing():
    card, _, _ = apply_updates(BOARDS, account(), [facts([], lead_id="l1")])
    _, result, changes, views = apply_command(BOARDS, card, command(card, "move", to_stage="new"), 5_000)
    assert (result.ok, result.code, changes, views) == (True, "noop", [], [])
    _, result, _, _ = apply_command(BOARDS, card, command(card, "move", "c2", to_stage="won"), 5_000)
    assert (result.ok, result.code) == (False, "unknown_stage")
    _, result, _, _ = apply_command(BOARDS, card, command(card, "move", "c3", board="nope", to_stage="new"), 5_000)
    assert result.code == "unknown_board"


def test_a_retried_command_acts_once():
    card, _, _ = apply_updates(BOARDS, account(), [facts([], lead_id="l1")])
    once, result, changes, _ = apply_command(BOARDS, card, command(card, "note", text="call back"), 5_000)
    assert result.ok and changes == [] and once.places["pipeline"].notes_count == 1
    twice, result, _, views = apply_command(BOARDS, once, command(card, "note", text="call back"), 6_000)
    assert (result.code, views, twice) == ("noop", [], once)


def test_notes_are_bounded_and_owner_and_archive_edit_the_card():
    card, _, _ = apply_updates(BOARDS, account(), [facts([], lead_id="l1")])
    for i in range(NOTES_KEPT + 5):
        card, _, _, views = apply_command(BOARDS, card, command(card, "note", f"n{i}", text=f"note {i}"), 1_000 + i)
    assert views[0].view.notes_count == NOTES_KEPT + 5 and len(views[0].notes) == NOTES_KEPT
    assert views[0].notes[-1].text == f"note {NOTES_KEPT + 4}"
    _, result, _, _ = apply_command(BOARDS, card, command(card, "note", "blank", text="  "), 9_000)
    assert result.code == "empty_note"
    card, _, _, views = apply_command(BOARDS, card, command(card, "owner", "o1", text="ann"), 9_000)
    assert views[0].view.owner == "ann" and views[0].notes is None
    card, _, _, _ = apply_command(BOARDS, card, command(card, "archive", "a1"), 9_000)
    card, changes, _ = apply_updates(BOARDS, card, [facts(["Decision"], lead_id="l1", ts_ms=9_500)])
    assert changes == [] and card.stage_on("pipeline") == "new"  # archived: no automatic move
    _, decision, _, _ = apply_move(BOARDS, card, "pipeline", MoveRequest(cause(), "decision"))
    assert decision.code == "archived"
    _, result, changes, _ = apply_command(BOARDS, card, command(card, "move", "m1", to_stage="decision"), 9_900)
    assert result.ok and len(changes) == 1  # a person still can
    card, _, _, _ = apply_command(BOARDS, card, command(card, "unarchive", "a2"), 10_000)
    card, changes, _ = apply_updates(BOARDS, card, [facts(["Decision"], lead_id="l1", ts_ms=10_500)])
    assert [c.to_stage for c in changes] == ["decision"]


def test_add_by_hand_puts_an_account_in_the_entry_stage():
    card = account("globex.io")
    card, result, changes, views = apply_command(BOARDS, card, command(card, "add", text="Globex"), 5_000)
    assert result.ok and [(c.to_stage, c.actor) for c in changes] == [("new", "user:ann")]
    assert views[0].view.title == "Globex"
    _, result, _, _ = apply_command(BOARDS, card, command(card, "add", "c2"), 6_000)
    assert result.code == "noop"
    _, result, _, _ = apply_command(BOARDS, card, command(card, "add", "c3", board="leads"), 6_000)
    assert result.code == "wrong_card_kind"


def test_a_lead_joining_an_account_leaves_the_account_boards_only():
    person, _, _ = apply_updates(BOARDS, lead("l1"), [facts(["Decision", "Consideration"], 40)])
    company, _, _ = apply_updates(BOARDS, account(), [facts([], 10, lead_id="l2")])
    assert (person.stage_on("pipeline"), person.stage_on("leads"), company.stage_on("pipeline")) == (
        "decision", "engaged", "new")
    company, person, changes, views = merge_cards(BOARDS, company, person, cause(3_000, "system"))
    assert [(c.card_id, c.from_stage, c.to_stage) for c in changes] == [("account:acme.com", "new", "decision")]
    assert (company.lead_ids, company.tags) == (["l1", "l2"], ["Consideration", "Decision"])
    assert sorted((v.board_id, v.card_id, v.view is None) for v in views) == [
        ("pipeline", "account:acme.com", False), ("pipeline", "lead:l1", True)]
    assert person.stage_on("leads") == "engaged" and person.account_card_id == "account:acme.com"
    _, changes, views = apply_updates(BOARDS, person, [facts(["Decision"], 90, ts_ms=4_000)])
    assert [(c.board_id, c.to_stage) for c in changes] == [("leads", "hot")]
    assert [v.board_id for v in views] == ["leads"]
    assert merge_cards(BOARDS, company, person, cause(5_000)) == (company, person, [], [])  # replayed merge


def test_an_anonymous_lead_merged_into_a_known_one_becomes_a_tombstone():
    anonymous, _, _ = apply_updates(BOARDS, lead("anon"), [facts(["Consideration"], 10)])
    known, _, _ = apply_updates(BOARDS, lead("known"), [facts([], 5)])
    known, anonymous, changes, views = merge_cards(BOARDS, known, anonymous, cause(2_000, "system"))
    assert sorted((c.board_id, c.from_stage, c.to_stage) for c in changes) == [
        ("leads", "", "engaged"), ("pipeline", "new", "consideration")]
    assert anonymous.merged_into == "lead:known" and not any(belongs_on(board, anonymous) for board in BOARDS)
    assert all(v.view is None for v in views if v.card_id == "lead:anon")
    assert apply_updates(BOARDS, anonymous, [facts(["Decision"])])[1] == []
    _, result, _, _ = apply_command(BOARDS, anonymous, command(anonymous, "move", to_stage="decision"), 3_000)
    assert result.code == "card_merged"


def test_a_hand_over_without_facts_does_not_put_a_card_with_none_on_a_board():
    """The board processor hands a retired card's places over without its facts (the lead's own updates bring
    those): reaching a known lead's card before its first update, it must not make that card enter a board."""
    known, anonymous = lead("known"), lead("anon")
    known, anonymous, changes, _ = merge_cards(BOARDS, known, anonymous, cause(2_000, "system"))
    assert changes == [] and known.stage_on("pipeline") == "" and anonymous.merged_into == "lead:known"


def test_deleting_a_stage_moves_its_cards_one_stage_left():
    card, _, _ = apply_updates(BOARDS, account(), [facts(["Decision"], lead_id="l1")])
    edited = PIPELINE.model_copy(update={"stages": [s for s in PIPELINE.stages if s.id != "decision"]})
    moved, changes, views = delete_stage(PIPELINE, edited, card, cause(9_000, "user:ann"))
    assert [(c.from_stage, c.to_stage, c.reason, c.seq) for c in changes] == [
        ("decision", "consideration", "stage decision deleted", 2)]
    assert [(v.left_stage, v.view.stage_id) for v in views] == [("decision", "consideration")]
    assert delete_stage(PIPELINE, edited, moved, cause(9_500)) == (moved, [], [])


def test_a_stage_deleted_command_moves_the_card_by_the_board_it_carries_and_acts_once():
    """The API's command after a board edit: the board processor already has the edited board; the command
    carries the board as it was, which says where the card goes."""
    card, _, _ = apply_updates(BOARDS, account(), [facts(["Decision"], lead_id="l1")])
    edited = PIPELINE.model_copy(update={"stages": [s for s in PIPELINE.stages if s.id != "decision"]})
    deleted = command(card, "stage_deleted", "sd-1", board_before=PIPELINE.model_dump_json(exclude_unset=True),
                      definitions_version=7)
    moved, result, changes, views = apply_command([edited, LEADS], card, deleted, 9_000)
    assert (result.ok, result.code, result.stage_change_id) == (True, "", changes[0].stage_change_id)
    assert [(c.from_stage, c.to_stage, c.actor, c.reason) for c in changes] == [
        ("decision", "consideration", "user:ann", "stage decision deleted")]
    assert [(v.left_stage, v.view.stage_id) for v in views if v.board_id == "pipeline"] == [
        ("decision", "consideration")]
    assert apply_command([edited, LEADS], moved, deleted, 9_500)[1:] == (
        CommandResult("sd-1", SITE, "pipeline", card.card_id, True, "noop", "already applied"), [], [])
    elsewhere, _, _ = apply_updates(BOARDS, account("initech.com"), [facts(["Consideration"], lead_id="l2")])
    _, result, changes, _ = apply_command([edited, LEADS], elsewhere, command(elsewhere, "stage_deleted", "sd-2",
                                          board_before=deleted.board_before), 9_000)
    assert (result.ok, result.code, changes) == (True, "noop", [])


def test_replaying_the_same_input_rederives_the_same_stage_changes():
    updates = [facts(["Consideration"], lead_id="l1"), facts(["Decision"], 90, lead_id="l1", ts_ms=2_000)]
    first = apply_updates(BOARDS, account(), updates)
    assert apply_updates(BOARDS, account(), updates) == first
    assert apply_updates(BOARDS, first[0], updates)[1:] == ([], [])  # facts are absolute: nothing left to do


def test_lead_cards_take_facts_of_their_own_lead_only():
    with pytest.raises(ValueError):
        apply_updates(BOARDS, lead("l1"), [facts(["X"], lead_id="l2")])


# -- properties ---------------------------------------------------------------------------------------------

tag_sets = st.lists(st.sampled_from(TAGS), unique=True, max_size=3)
lead_updates = st.builds(
    lambda lead_id, tags, score, ts: facts(tags, score, lead_id=lead_id, ts_ms=ts),
    st.sampled_from(["l1", "l2", ""]), st.none() | tag_sets, st.none() | st.integers(0, 100),
    st.integers(0, 10_000),
)


def automatic_index(card: CardState) -> int:
    """Where the facts alone put the card on PIPELINE (its entry stage if nothing is met)."""
    tags, met = set(card.tags), 0
    for i, stage in enumerate(PIPELINE.stages):
        if (stage.when_tag and stage.when_tag in tags) or (
                stage.when_score_at_least is not None and card.score >= stage.when_score_at_least):
            met = i
    return met


@given(st.permutations(TAGS), st.integers(0, 3))
def test_forward_only_whatever_the_order_of_tag_arrivals(order, how_many):
    card, seen, all_changes = account(), [], []
    arrived: list[str] = []
    for i, tag in enumerate(order[:how_many] or order[:1]):
        arrived.append(tag)
        card, changes, _ = apply_updates(BOARDS, card, [facts(list(arrived), lead_id="l1", ts_ms=i)])
        all_changes += changes
        seen.append(STAGE_IDS.index(card.stage_on("pipeline")))
    assert seen == sorted(seen)
    assert seen[-1] == automatic_index(card)  # the rightmost stage met, whatever the order
    check_moves(all_changes)


@given(st.lists(lead_updates, max_size=12))
def test_the_stage_is_the_furthest_any_step_reached_and_every_move_is_recorded_once(updates):
    card, model, all_changes, furthest = account(), BoardModel(), [], 0
    for update in updates:
        card, changes, views = apply_updates(BOARDS, card, [update])
        model.apply(views)
        all_changes += changes
        furthest = max(furthest, automatic_index(card))
        assert STAGE_IDS.index(card.stage_on("pipeline")) == furthest
    check_moves(all_changes)
    model.check_consistent()


left_or_update = lead_updates | st.builds(lambda lead_id: facts(lead_id=lead_id, left=True), st.sampled_from(["l1", "l2"]))


@given(st.lists(left_or_update, max_size=16))
def test_facts_derived_step_by_step_are_the_facts_derived_afresh(updates):
    """The board processor keeps a card's `Shown` from one update to the next instead of folding every lead's facts
    again: the results are the same as deriving them from scratch, and so is the `Shown` it keeps."""
    kept_card, fresh_card, shown = account(), account(), None
    for update in updates:
        kept_card, kept_changes, kept_views, shown = fold_updates(BOARDS, kept_card, [update], shown)
        fresh_card, fresh_changes, fresh_views = apply_updates(BOARDS, fresh_card, [update])
        assert (kept_card, kept_changes, kept_views) == (fresh_card, fresh_changes, fresh_views)
        fresh = Shown(fresh_card)
        assert (shown.tags, shown.score, shown.lead_count, shown.first_lead_ids) == (
            fresh.tags, fresh.score, fresh.lead_count, fresh.first_lead_ids)


def test_an_account_view_lists_its_first_leads_in_order_and_counts_all():
    card = account()
    for n in reversed(range(VIEW_LEAD_IDS + 5)):
        card, _, views = apply_updates(BOARDS, card, [facts(["Consideration"], lead_id=f"l{n:03d}")])
    assert views[-1].view.lead_ids == [f"l{n:03d}" for n in range(VIEW_LEAD_IDS)]
    assert views[-1].view.lead_count == VIEW_LEAD_IDS + 5
    assert list(CardState.from_json(card.to_json()).facts) == sorted(card.facts)


@given(st.lists(lead_updates, max_size=12), st.sets(st.integers(1, 11)), st.sets(st.integers(0, 12)))
def test_the_same_board_whatever_the_batch_boundaries_and_json_round_trips(updates, cuts, round_trips):
    whole, whole_changes, whole_views = apply_updates(BOARDS, account(), updates)
    whole_model = BoardModel()
    whole_model.apply(whole_views)
    card, changes, model = account(), [], BoardModel()
    bounds = [0, *sorted(c for c in cuts if c < len(updates)), len(updates)]
    for start, end in zip(bounds, bounds[1:]):
        if start in round_trips:
            card = CardState.from_json(card.to_json())
        card, batch_changes, views = apply_updates(BOARDS, card, updates[start:end])
        changes += batch_changes
        model.apply(views)
    assert card == whole and changes == whole_changes and model.views == whole_model.views
    model.check_consistent()


@given(st.lists(st.tuples(st.sampled_from(LEAD_IDS), tag_sets, st.integers(0, 100)), min_size=1, max_size=4),
       st.lists(st.tuples(st.sampled_from(LEAD_IDS), st.sampled_from([*LEAD_IDS, "acme"])), max_size=6))
def test_a_merge_never_duplicates_a_card(lead_facts, merges):
    cards = {"acme": account()}

    def card_of(card_id: str) -> CardState:
        return cards["acme" if card_id.startswith("account:") else card_id.partition(":")[2]]

    model, all_changes = BoardModel(), []
    for lead_id, tags, score in lead_facts:
        cards[lead_id], changes, views = apply_updates(BOARDS, cards.get(lead_id, lead(lead_id)), [facts(tags, score)])
        model.apply(views)
        all_changes += changes
    stages_before = {key: view.stage_id for key, view in model.views.items()}
    for absorbed_id, survivor_id in merges:
        survivor, absorbed = cards.get(survivor_id), cards.get(absorbed_id)
        if survivor is None or absorbed is None or survivor_id == absorbed_id:
            continue
        if survivor.merged_into or absorbed.merged_into or survivor.account_card_id or absorbed.account_card_id:
            continue  # the caller resolves these first: merges go to the card that now shows the lead
        cards[survivor_id], cards[absorbed_id], changes, views = merge_cards(BOARDS, survivor, absorbed, cause(50_000))
        model.apply(views)
        all_changes += changes
    model.check_consistent()
    check_moves(all_changes)
    for board in BOARDS:
        shown = [card_of(card_id) for (b, card_id) in model.views if b == board.id]
        shown_leads = [lead_id for card in shown for lead_id in card.lead_ids]
        assert len(shown_leads) == len(set(shown_leads)) and not any(card.merged_into for card in shown)
        for (b, card_id), stage in stages_before.items():  # whoever shows a lead now is at least as far right
            holder = card_of(card_id)
            while b == board.id and (holder.merged_into or (board.card == "account" and holder.account_card_id)):
                holder = card_of(holder.merged_into or holder.account_card_id)
            if b == board.id:
                assert board.stage_index(holder.stage_on(board.id)) >= board.stage_index(stage)


@given(st.sampled_from(STAGE_IDS), st.sampled_from(STAGE_IDS), st.booleans(), st.sampled_from(["", "  ", "dup"]))
def test_a_person_moves_backward_only_with_force_and_a_reason(start, target, force, reason):
    card, _, _, _ = apply_command(BOARDS, account(), command(account(), "move", "c0", to_stage=start), 1_000)
    after, result, changes, _ = apply_command(
        BOARDS, card, command(card, "move", to_stage=target, force=force, reason=reason), 2_000)
    backward = STAGE_IDS.index(target) < STAGE_IDS.index(start)
    if target == start:
        assert (result.ok, result.code, changes) == (True, "noop", [])
    elif backward and not (force and reason.strip()):
        assert (result.ok, result.code, changes) == (False, "stage_regression", [])
        assert after.stage_on("pipeline") == start
    else:
        assert result.ok and [(c.from_stage, c.to_stage, c.seq) for c in changes] == [(start, target, 2)]
    assert decide(PIPELINE, card, MoveRequest(cause(), target)).code == (
        "stage_regression" if backward else "noop" if target == start else "")  # automation: forward only


@given(st.sampled_from(STAGE_IDS), st.sets(st.sampled_from(STAGE_IDS), max_size=len(STAGE_IDS) - 1))
def test_deleting_stages_rehomes_cards_with_one_stage_change(start, deleted):
    card, _, _, _ = apply_command(BOARDS, account(), command(account(), "move", to_stage=start), 1_000)
    kept = [s for s in PIPELINE.stages if s.id not in deleted]
    edited = PIPELINE.model_copy(update={"stages": kept})
    after, changes, views = delete_stage(PIPELINE, edited, card, cause(2_000, "user:ann"))
    if start not in deleted:
        assert (after, changes, views) == (card, [], [])
        return
    left = [s.id for s in PIPELINE.stages[:STAGE_IDS.index(start)] if s.id not in deleted]
    expected = left[-1] if left else kept[0].id
    assert [(c.from_stage, c.to_stage, c.seq) for c in changes] == [(start, expected, 2)]
    assert [(v.left_stage, v.view.stage_id) for v in views] == [(start, expected)]


@given(st.lists(lead_updates, max_size=6))
def test_card_state_json_round_trip_is_stable(updates):
    card, _, _ = apply_updates(BOARDS, account(), updates)
    card, _, _, _ = apply_command(BOARDS, card, command(card, "note", text="hello"), 1)
    assert CardState.from_json(card.to_json()) == card
    assert CardState.from_json(card.to_json()).to_json() == card.to_json()


@given(st.lists(st.one_of(
    lead_updates.map(lambda update: ("facts", update)),
    st.sampled_from(["note", "owner", "archive", "unarchive"]).map(lambda kind: ("command", kind)),
    st.sampled_from(STAGE_IDS).map(lambda stage: ("move", stage)),
    st.sampled_from(LEAD_IDS).map(lambda lead_id: ("merge", lead_id))), max_size=10))
def test_the_stage_machine_never_changes_the_card_it_is_given(operations):
    """Card copies share what is only ever replaced (facts, notes): each step leaves its input as it was."""
    card = account()
    for n, (kind, what) in enumerate(operations):
        given_json = card.to_json()
        if kind == "facts":
            after, _, _ = apply_updates(BOARDS, card, [what])
        elif kind == "command":
            after, _, _, _ = apply_command(BOARDS, card, command(card, what, f"c{n}", text=f"text {n}"), n)
        elif kind == "move":
            after, _, _, _ = apply_move(BOARDS, card, "pipeline", MoveRequest(cause(n, "user:ann"), what))
        else:
            absorbed, _, _ = apply_updates(BOARDS, lead(what), [facts(["Decision"], 50, lead_id=what, ts_ms=n)])
            absorbed_json = absorbed.to_json()
            after, _, _, _ = merge_cards(BOARDS, card, absorbed, cause(n))
            assert absorbed.to_json() == absorbed_json
        assert card.to_json() == given_json
        card = after
