"""The board processor: LeadBoards on `board.commands`, one card at a time, in each card's order.

A thin adapter around the pure stage machine (processors/boards.py) on the shared `ProcessorRunner`: state
is one `CardState` blob per card (under the board store's card key), committed with the partition's
watermark; the board views, the live feed, the board versions and command results are written by the
board store in the same transaction. So a move is in Redis exactly when its card state is, and the stage
change record on `board.stage-changes` (produced before the commit, deterministic ids) is collapsed by
ClickHouse if a replay produces it again.

Inputs, all keyed by card: the lead processor's facts updates, rule moves and merges (`CardUpdate`), and
people's commands from the API (`BoardCommand`). A merge is two hops, each in its card's own order: the
absorbed card retires (it leaves the boards) and hands its state over; the survivor merges it once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from processors.board_store import BoardStore
from processors.boards import (OWN_FACTS, CardState, Cause, FactsUpdate, MoveRequest, Shown, ViewChange,
                               apply_command, apply_move, fold_updates, merge_cards, view_changes)
from processors.runtime.decoded import DecodedStates
from processors.runtime.ingest import Message
from processors.runtime.producer import Outputs
from processors.runtime.runner import Step, decode_batch
from processors.runtime.state import StateStore
from processors.site_definitions import SiteDefinitionsCache
from schemas.boards import BoardCommand, CardUpdate, CommandResult, StageChange
from schemas.records import digest
from schemas.topics import BOARD_COMMANDS, BOARD_STAGE_CHANGES, decode_board_input

UPDATE_IDS_KEPT = 64


@dataclass
class _Card:
    key: str
    partition: int
    loaded: bytes | None
    state: CardState
    shown: Shown | None = None  # derived from `state` by the last facts update, kept for the next one


@dataclass
class _Batch:
    step: Step
    cards: dict[tuple[str, str], _Card] = field(default_factory=dict)
    stage_changes: dict[str, list[StageChange]] = field(default_factory=lambda: defaultdict(list))
    views: dict[str, list[ViewChange]] = field(default_factory=lambda: defaultdict(list))
    results: list[CommandResult] = field(default_factory=list)


class BoardProcessor:
    name = "board"

    def __init__(self, partitions: int, store: StateStore, boards: BoardStore, sites: SiteDefinitionsCache):
        self.partitions = partitions
        self.store = store
        self.board_store = boards
        self.sites = sites
        self.decoded: DecodedStates[tuple[CardState, Shown | None]] = DecodedStates()  # large account cards

    async def step(self, messages: Sequence[Message], received_ms: int) -> Step:
        records = decode_batch(messages, decode_board_input, self.name)
        await self.sites.prepare(record.site_id for _, record in records)
        wanted: dict[str, int] = {}
        for _, record in records:
            if isinstance(record, BoardCommand) and record.definitions_version:
                wanted[record.site_id] = max(wanted.get(record.site_id, 0), record.definitions_version)
        await self.sites.catch_up(wanted)
        batch = _Batch(Step(Outputs(self.partitions)))
        wanted = {(r.site_id, r.card_id): p for p, r in records}
        keys = {self.board_store.card_state_key(site, card): (site, card) for site, card in wanted}
        loaded = await self.store.load(list(keys))
        for key, (site, card_id) in keys.items():
            blob = loaded.get(key)
            known = self.decoded.get(key, blob) if blob else None
            if known is not None:
                batch.cards[site, card_id] = _Card(key, wanted[site, card_id], blob, known[0].copy(), known[1])
            else:
                state = CardState.from_json(blob) if blob else CardState(card_id, site)
                batch.cards[site, card_id] = _Card(key, wanted[site, card_id], blob, state)
        for _, record in records:
            self._apply(record, batch, received_ms)
        self._finish(batch)
        return batch.step

    async def tick(self, clocks: dict[int, int]) -> Step | None:
        return None  # cards move on facts and commands; time triggers live in the lead processor's hourly pass

    def _apply(self, record: BoardCommand | CardUpdate, batch: _Batch, now_ms: int) -> None:
        card = batch.cards[record.site_id, record.card_id]
        boards = self.sites[record.site_id].boards
        before = card.state
        if isinstance(record, BoardCommand):
            # the request's own time, not the time of this batch: a replay (or a rebuild) gives the same board
            card.state, result, changes, views = apply_command(boards, before, record, record.ts_ms or now_ms)
            batch.results.append(result)
        elif record.update_id in before.command_ids:
            return  # a re-sent update (its producer replayed a batch): acted on already
        elif record.kind == "facts":
            cause = Cause(record.actor, record.ts_ms, rule_id=record.rule_id, event_id=record.event_id)
            update = FactsUpdate(cause, record.lead_id, record.tags, record.score, record.title, record.activity_ms,
                                 record.left)
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
        else:
            card.state, changes, views = self._take_over(record, before, boards)
        if isinstance(record, BoardCommand) or record.kind not in ("facts", "account_tag"):
            card.shown = None  # only a facts update derives the new state's
        if not isinstance(record, BoardCommand):
            card.state.command_ids = [*card.state.command_ids, record.update_id][-UPDATE_IDS_KEPT:]
        batch.stage_changes[record.site_id] += changes
        batch.views[record.site_id] += views

    def _retire(self, record: CardUpdate, card: CardState, boards, batch: _Batch):
        """This card folds into `into_card_id`: it leaves the boards here, and its state goes there."""
        if card.merged_into or card.account_card_id == record.into_card_id:
            return card, [], []
        cause = Cause(record.actor, record.ts_ms, event_id=record.event_id)
        _, retired, _, views = merge_cards(boards, CardState(record.into_card_id, card.site_id), card, cause)
        handover = CardUpdate("cu_" + digest(record.update_id, "handover"), card.site_id, record.into_card_id,
                              "handover", record.actor, card_state=card.to_json().decode(), event_id=record.event_id,
                              ts_ms=record.ts_ms)
        batch.step.outputs.add(BOARD_COMMANDS, record.into_card_id.encode(), handover.to_json())
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

    def _finish(self, batch: _Batch) -> None:
        for card in batch.cards.values():
            blob = card.state.to_json()
            if blob != card.loaded:
                batch.step.partition(card.partition).states[card.key] = blob
                self.decoded.put(card.key, blob, (card.state, card.shown))  # this batch is done with it
        for changes in batch.stage_changes.values():
            for change in changes:
                batch.step.outputs.add(BOARD_STAGE_CHANGES, change.card_id.encode(), change.to_json())
        store, stage_changes, views, results = self.board_store, dict(batch.stage_changes), dict(batch.views), batch.results
        if stage_changes or views or results:
            def write(pipe) -> None:
                for site in stage_changes.keys() | views.keys():
                    store.queue_changes(pipe, site, stage_changes.get(site, []), views.get(site, []))
                for result in results:
                    store.queue_command_result(pipe, result)
            batch.step.also = write
