"""The board processor: LeadBoards on `board.commands`, one card at a time, in each card's order.

A thin adapter around the pure stage machine (processors/boards.py) on the shared `ProcessorRunner`.
Declared state: one `CardState` per card (`cards`), committed with the partition's watermark and kept
decoded between batches (a busy account card with thousands of leads is decoded once, not in every batch);
no timers (time triggers live in the lead processor's hourly pass). The board views, the live feed, the
board versions and command results are queued by the board store in the same transaction. So a move is in Redis exactly when its card state is, and the stage
change record on `board.stage-changes` (produced before the commit, deterministic ids) is collapsed by
ClickHouse if a replay produces it again.

Inputs, all keyed by card: the lead processor's facts updates (with the lead's memberships of imported
segments), rule moves and merges, the account processor's account memberships (`CardUpdate`), and people's
commands from the API (`BoardCommand`). A merge is two hops, each in its card's own order: the
absorbed card retires (it leaves the boards) and hands its state over; the survivor merges it once.

Hand-over (processors/handover.py): a card entering a stage with `assign` and no owner gets one (round-robin
turns are declared state too, `turns`, per board and input partition, committed with the cards), a rule's
assign_owner sets the card's owner, and every stage change of a board with `on_stage_change` queues one signed
`stage.changed` webhook (id derived from the stage change) in the same commit, through the webhook queue that
rule webhooks use: a move is committed exactly when its webhook is queued.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import orjson

from processors.board_store import BoardStore
from processors.erasure_ledger import LedgerView
from processors.boards import (OWN_FACTS, CardState, Cause, FactsUpdate, MoveRequest, Shown, ViewChange,
                               apply_command, apply_move, fold_updates, merge_cards, view_changes)
from processors.handover import (STAGE_CHANGED, CardAccount, Turns, assign_by_rule, assign_on_entry,
                                 card_account_domain, stage_changed_payload, wants_webhook)
from processors.runtime.batch import Batch
from processors.runtime.ingest import Message
from processors.runtime.runner import decode_batch
from processors.runtime.state import StateSpec
from processors.site_definitions import SiteDefinitionsCache
from processors.webhooks import WebhookQueue
from schemas.boards import BoardCommand, BoardDefinition, CardUpdate, CommandResult, StageChange
from schemas.companies import NO_COMPANIES, CompanyCards
from schemas.records import digest
from schemas.rules import WebhookRequest
from schemas.redis_keys import RedisKeys
from schemas.topics import BOARD_COMMANDS, BOARD_STAGE_CHANGES

UPDATE_IDS_KEPT = 64


@dataclass
class Card:
    """A card as the board processor holds it: its stored state, and what its boards show of it (derived
    from the state by the last facts update, kept with it for the next one; never stored)."""

    state: CardState
    shown: Shown | None = None

    def copy(self) -> Card:
        return Card(self.state.copy(), self.shown)


def card_spec(prefix: str) -> StateSpec[Card]:
    return StateSpec("card", RedisKeys(prefix).card_state, lambda card: card.state.to_json(),
                     lambda blob: Card(CardState.from_json(blob)), keep_decoded=True, copy=Card.copy)


def turns_spec(prefix: str) -> StateSpec[Turns]:
    return StateSpec("board-turns", RedisKeys(prefix).board_turns, orjson.dumps, orjson.loads)


def _round_robin(board: BoardDefinition) -> bool:
    return any(stage.assign is not None and stage.assign.round_robin for stage in board.stages)


@dataclass
class _Effects:
    """What a batch's records did to the boards, per site."""

    stage_changes: dict[str, list[StageChange]] = field(default_factory=lambda: defaultdict(list))
    views: dict[str, list[ViewChange]] = field(default_factory=lambda: defaultdict(list))
    results: list[CommandResult] = field(default_factory=list)


def _erased(ledger, record: BoardCommand | CardUpdate) -> bool:
    kind, _, lead_id = record.card_id.partition(":")
    if kind == "lead" and ledger.drops(record.site_id, lead_id=lead_id):
        return True
    return isinstance(record, CardUpdate) and bool(record.lead_id) and ledger.drops(record.site_id,
                                                                                     lead_id=record.lead_id)


class BoardProcessor:
    name = "board"
    timers = None  # cards move on facts and commands; time triggers live in the lead processor's hourly pass

    def __init__(self, boards: BoardStore, sites: SiteDefinitionsCache, prefix: str,
                 webhooks: WebhookQueue | None = None, companies: CompanyCards = NO_COMPANIES, erasure_key: str = ""):
        self.ledger = LedgerView(prefix, erasure_key)
        self.board_store = boards
        self.sites = sites
        self.cards = card_spec(prefix)
        self.turns = turns_spec(prefix)
        self.webhooks = webhooks  # where stage.changed webhooks are queued (None: not sent, e.g. in unit tests)
        self.companies = companies  # the company cards: account.country for assignment, the webhook's account

    async def step(self, batch: Batch, messages: Sequence[Message]) -> None:
        records = decode_batch(messages, BOARD_COMMANDS, self.name)
        ledger = await self.ledger.of(batch)
        if ledger:  # an erased person's card never comes back (a replay, a rebuild from board.commands)
            kept = [(p, r) for p, r in records if not _erased(ledger, r)]
            self.ledger.count(self.name, len(records) - len(kept))
            records = kept
        await self.sites.prepare(record.site_id for _, record in records)
        definitions_wanted: dict[str, int] = {}
        for _, record in records:  # a record made under newer definitions waits until this worker has them
            if record.definitions_version:
                definitions_wanted[record.site_id] = max(definitions_wanted.get(record.site_id, 0),
                                                         record.definitions_version)
        await self.sites.catch_up(definitions_wanted)
        wanted = {self.cards.key(r.site_id, r.card_id): (p, r.site_id, r.card_id) for p, r in records}
        turns_wanted = {self.turns.key(site, board.id, partition): partition
                        for partition, site in {(p, r.site_id) for p, r in records}
                        for board in self.sites[site].boards if _round_robin(board)}
        await batch.load((self.cards, {key: partition for key, (partition, _, _) in wanted.items()}),
                         (self.turns, turns_wanted))
        cards = {key: batch.get(self.cards, key) or Card(CardState(card_id, site))
                 for key, (_, site, card_id) in wanted.items()}
        effects = _Effects()
        for partition, record in records:
            self._apply(record, cards[self.cards.key(record.site_id, record.card_id)], effects, batch, partition)
        for key, card in cards.items():
            batch.put(self.cards, key, card)
        for site_changes in effects.stage_changes.values():
            for change in site_changes:
                batch.outputs.add(BOARD_STAGE_CHANGES, change.card_id.encode(), change.to_json())
        for site in effects.stage_changes.keys() | effects.views.keys():
            self.board_store.queue_changes(batch.writes, site, effects.stage_changes.get(site, []),
                                           effects.views.get(site, []))
        for result in effects.results:
            self.board_store.queue_command_result(batch.writes, result)

    def _apply(self, record: BoardCommand | CardUpdate, card: Card, effects: _Effects, batch: Batch,
               partition: int = 0) -> None:
        boards = self.sites[record.site_id].boards
        before = card.state
        if isinstance(record, BoardCommand):
            # the request's own time, not the time of this batch: a replay (or a rebuild) gives the same board
            card.state, result, changes, views = apply_command(boards, before, record, record.ts_ms or batch.now_ms)
            effects.results.append(result)
        elif record.update_id in before.command_ids:
            return  # a re-sent update (its producer replayed a batch): acted on already
        elif record.kind in ("facts", "segment"):  # a lead's facts; an account's own segment memberships
            cause = Cause(record.actor, record.ts_ms, rule_id=record.rule_id, event_id=record.event_id)
            update = FactsUpdate(cause, record.lead_id, record.tags, record.score, record.title, record.activity_ms,
                                 record.left, record.segments)
            card.state, changes, views, card.shown = fold_updates(boards, before, [update], card.shown)
        elif record.kind == "account_tag":
            own = set(before.facts[OWN_FACTS]["tags"]) if OWN_FACTS in before.facts else set()
            tags = own - set(record.tags or ()) if record.left else own | set(record.tags or ())
            cause = Cause(record.actor, record.ts_ms, rule_id=record.rule_id, event_id=record.event_id)
            card.state, changes, views, card.shown = fold_updates(boards, before,
                                                                  [FactsUpdate(cause, OWN_FACTS, sorted(tags))], card.shown)
        elif record.kind == "move":
            cause = Cause(record.actor, record.ts_ms, rule_id=record.rule_id, event_id=record.event_id)
            card.state, _, changes, views = apply_move(boards, before, record.board_id,
                                                       MoveRequest(cause, record.to_stage))
        elif record.kind == "merge":
            card.state, changes, views = self._retire(record, before, boards, batch)
        elif record.kind == "assign":
            card.state, views = assign_by_rule(boards, before, record.owner)
            changes = []
        else:
            card.state, changes, views = self._take_over(record, before, boards)
        if isinstance(record, BoardCommand) or record.kind not in ("facts", "segment", "account_tag"):
            card.shown = None  # only a facts update derives the new state's
        if not isinstance(record, BoardCommand):
            card.state.command_ids = [*card.state.command_ids, record.update_id][-UPDATE_IDS_KEPT:]
        if changes:
            views = self._hand_over(record.site_id, card, changes, views, batch, partition)
        effects.stage_changes[record.site_id] += changes
        effects.views[record.site_id] += views

    def _hand_over(self, site: str, card: Card, changes: list[StageChange], views: list[ViewChange], batch: Batch,
                   partition: int) -> list[ViewChange]:
        """Owners for cards entering assigning stages (with this partition's turns), then one stage.changed
        webhook per change on a board that asks for them; returns the views, showing new owners."""
        setup = self.sites[site]
        domain = card_account_domain(card.state)
        company = self.companies.get(domain) if domain else None
        keys = {board.id: self.turns.key(site, board.id, partition) for board in setup.boards if _round_robin(board)}
        turns = {board: batch.get(self.turns, key) or {} for board, key in keys.items()}
        state, new_turns, views, assigned = assign_on_entry(
            setup.boards, card.state, changes, turns, CardAccount(domain, company.country if company else ""), views)
        if assigned:
            card.state = state
            for board, key in keys.items():
                if new_turns.get(board, {}) != turns[board]:
                    batch.put(self.turns, key, new_turns[board])
        if self.webhooks is None:
            return views
        owners = {owner.id: owner for owner in setup.owners}
        shown = None
        for change in changes:
            board = setup.board(change.board_id)
            if board is None or board.on_stage_change is None or not wants_webhook(board, change):
                continue
            shown = shown or card.shown or Shown(card.state)
            hook = board.on_stage_change
            request = WebhookRequest(
                "wh_" + digest(change.stage_change_id, STAGE_CHANGED), site, hook.webhook, hook.secret_env,
                stage_changed_payload(board, change, card.state, shown, owners, company), rule_id=change.rule_id,
                ts_ms=change.ts_ms, event_type=STAGE_CHANGED, board_id=board.id)
            self.webhooks.queue_enqueue(batch.writes, request, batch.now_ms)
        return views

    def _retire(self, record: CardUpdate, card: CardState, boards, batch: Batch):
        """This card folds into `into_card_id`: it leaves the boards here, and its state goes there."""
        if card.merged_into or card.account_card_id == record.into_card_id:
            return card, [], []
        cause = Cause(record.actor, record.ts_ms, event_id=record.event_id)
        _, retired, _, views = merge_cards(boards, CardState(record.into_card_id, card.site_id), card, cause)
        handover = CardUpdate("cu_" + digest(record.update_id, "handover"), card.site_id, record.into_card_id,
                              "handover", record.actor, card_state=card.to_json().decode(), event_id=record.event_id,
                              ts_ms=record.ts_ms)
        batch.outputs.add(BOARD_COMMANDS, record.into_card_id.encode(), handover.to_json(), record_type=CardUpdate)
        return retired, [], [v for v in views if v.card_id == card.card_id]

    @staticmethod
    def _take_over(record: CardUpdate, card: CardState, boards):
        """The survivor takes a retired card's places (the further-right stage, owner, notes). Not its facts:
        the lead processor sends the survivor those itself, in the lead's own order, while a handover may
        arrive after a newer update (or after the lead has left again) and would bring stale tags back."""
        absorbed = CardState.from_json(record.card_state)
        absorbed.facts = {}
        cause = Cause(record.actor, record.ts_ms, event_id=record.event_id)
        survivor, _, changes, _ = merge_cards(boards, card, absorbed, cause)
        survivor.facts = dict(card.facts)  # merge_cards copied the card: these are the facts it had
        return survivor, changes, view_changes(boards, card, survivor)
