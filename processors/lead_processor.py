"""The lead processor: workflow automation on `leads.activity`, one lead at a time, in each lead's order.

A thin adapter around the pure rule engine (processors/rules.py) on the shared `ProcessorRunner`. Declared
state: one `LeadState` per lead (`leads`), committed with the partition's watermark; its timer is the
hourly pass (each lead's next hour with something to do, run by the runtime on the partition's stream
clock), never a scan of all leads. Records on the feed say what they are (`record-type`, see
schemas/topics.py); each kind has its handler in `_apply_to`.

Per record of the feed:
- an event runs the site's rules (bots never get here: the raw processor keeps them off the feed);
- a known lead's creation or an account link tells the rules who the lead is;
- a merge (arriving on the absorbed lead's feed, after its last event) retires the absorbed lead and
  hands its state to the survivor as a `LeadHandover`, which the survivor's partition merges once;
- an event for a retired lead (in flight during its merge) is forwarded to the survivor.
Outputs: `leads.changes` (every tag/score/property change), `leads.state` (the lead's current state),
`rules.executions`, card updates for the board processor on `board.commands`, and webhooks queued in the same
transaction as the state (so a firing is enqueued exactly when it is committed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import orjson

from processors.rules import (NO_COMPANIES, CompanyCards, LeadState, Outcome, apply_event, hour_start, hourly_pass,
                              merge, next_due_ms, set_identity)
from processors.runtime.batch import Batch
from processors.runtime.ingest import Message
from processors.runtime.runner import decode_batch
from processors.runtime.state import StateSpec
from processors.site_definitions import SiteDefinitionsCache, SiteSetup
from processors.webhooks import WebhookQueue
from schemas.boards import CardUpdate, account_card_id, lead_card_id
from schemas.events import EnrichedEvent
from schemas.identity import ACCOUNT_LINKED, LEAD_CREATED, LEAD_MERGED, IdentityEvent
from schemas.records import digest
from schemas.redis_keys import RedisKeys
from schemas.rules import LeadHandover, LeadSnapshot
from schemas.topics import BOARD_COMMANDS, LEADS_ACTIVITY, LEADS_CHANGES, LEADS_STATE, RULE_EXECUTIONS

Record = EnrichedEvent | IdentityEvent | LeadHandover


def _record_id(record: Record) -> str:
    if isinstance(record, LeadHandover):
        return record.handover_id
    if isinstance(record, IdentityEvent):
        return record.identity_event_id
    return record.event_id


def _on_boards(state: LeadState) -> bool:
    """Whether the lead's cards have heard of it: a function of its state alone, so that what the boards
    hear does not depend on where a batch began."""
    return bool(state.last_activity_ms or state.tags)


def _subject(record: Record) -> tuple[str, str]:
    """(site, lead) whose state a record changes: the lead whose feed it arrived on."""
    if isinstance(record, LeadHandover):
        return record.site_id, record.to_lead_id
    if isinstance(record, IdentityEvent):
        return record.site_id, record.from_lead_id if record.kind == LEAD_MERGED else record.lead_id
    return record.site_id, record.lead_id


@dataclass
class _Lead:
    """One lead's state through a batch, and what the board should hear of the record being applied."""

    key: str
    state: LeadState
    cause_id: str = ""  # the record being applied: what a card update it causes is named after
    card_actor: str = "system"
    card_rule_id: str = ""
    card_event_id: str = ""
    card_ts_ms: int = 0


class LeadProcessor:
    name = "lead"

    def __init__(self, sites: SiteDefinitionsCache, webhooks: WebhookQueue | None, prefix: str,
                 companies: CompanyCards = NO_COMPANIES):
        self.sites = sites
        self.webhooks = webhooks
        self.companies = companies  # what `account.*` conditions read (updated in place by the worker)
        self.leads = StateSpec("lead", RedisKeys(prefix).lead_state, LeadState.to_json, LeadState.from_json)
        self.timers = self.leads  # the hourly pass, per lead: when it next has something to do

    async def step(self, batch: Batch, messages: Sequence[Message]) -> None:
        records = decode_batch(messages, LEADS_ACTIVITY, self.name)
        await self.sites.prepare(record.site_id for _, record in records)
        subjects = {self.leads.key(site, lead): (partition, site, lead)
                    for partition, record in records for site, lead in (_subject(record),)}
        await batch.load((self.leads, {key: partition for key, (partition, _, _) in subjects.items()}))
        leads = {key: _Lead(key, batch.get(self.leads, key) or LeadState(lead_id, site_id))
                 for key, (_, site_id, lead_id) in subjects.items()}
        for partition, record in records:
            self._apply(record, leads, batch)
            if isinstance(record, EnrichedEvent):  # the stream clock of the hourly pass: event time
                batch.advance_clock(partition, record.ts_ms)
        self._finish(leads.values(), batch)

    async def on_timer(self, batch: Batch, partition: int, key: str, state: LeadState, now_ms: int) -> None:
        """The hourly pass of a due lead: time triggers and score decay."""
        await self.sites.prepare([state.site_id])
        lead = _Lead(key, state, f"hour:{now_ms}")
        self._take(lead, hourly_pass(self.sites[state.site_id].rules, state, now_ms, self.companies), batch)
        self._tell_boards(lead, state, batch)
        self._finish([lead], batch)

    def _apply(self, record: Record, leads: dict[str, _Lead], batch: Batch) -> None:
        lead = leads[self.leads.key(*_subject(record))]
        before = lead.state
        lead.cause_id = _record_id(record)
        lead.card_actor, lead.card_rule_id, lead.card_event_id, lead.card_ts_ms = "system", "", "", 0
        self._apply_to(lead, record, batch)
        self._tell_boards(lead, before, batch)

    def _apply_to(self, lead: _Lead, record: Record, batch: Batch) -> None:
        setup = self.sites[record.site_id]
        state = lead.state
        if isinstance(record, EnrichedEvent):
            if state.merged_into:  # in flight while its lead merged: the survivor's rules see it
                record.lead_id = state.merged_into
                batch.outputs.add(LEADS_ACTIVITY, state.merged_into.encode(), record.to_json(),
                                  record_type=EnrichedEvent)
                return
            self._take(lead, apply_event(setup.rules, state, record, self.companies), batch)
        elif isinstance(record, LeadHandover):
            absorbed = LeadState.from_json(record.state)
            self._take(lead, merge(setup.rules, state, absorbed, record.ts_ms, record.event_id, self.companies), batch)
        elif record.kind == LEAD_CREATED and record.email:
            self._take(lead, set_identity(setup.rules, state, record.ts_ms, email=record.email,
                                          event_id=record.event_id, companies=self.companies), batch)
        elif record.kind == ACCOUNT_LINKED and record.account_domain != state.account_domain:
            self._link_account(lead, record, setup, batch)
        elif record.kind == LEAD_MERGED and not state.merged_into:
            self._retire(lead, record, batch)

    def _link_account(self, lead: _Lead, record: IdentityEvent, setup: SiteSetup, batch: Batch) -> None:
        """The lead's card folds into its account's card (and leaves a previous account's card)."""
        before = lead.state
        self._take(lead, set_identity(setup.rules, before, record.ts_ms, account_domain=record.account_domain,
                                      event_id=record.event_id, companies=self.companies), batch)
        actor = "system"
        if before.account_domain:
            self._card(batch, account_card_id(before.account_domain), "facts", actor, record, lead_id=before.lead_id,
                       left=True)
        self._card(batch, lead_card_id(before.lead_id), "merge", actor, record,
                   into_card_id=account_card_id(record.account_domain))

    def _retire(self, lead: _Lead, record: IdentityEvent, batch: Batch) -> None:
        """This (anonymous) lead merged into `record.lead_id`: everything it had goes there, once."""
        absorbed = lead.state
        handover = LeadHandover("ho_" + digest(record.identity_event_id), absorbed.site_id, absorbed.lead_id,
                                record.lead_id, absorbed.to_json().decode(), record.event_id, record.ts_ms)
        batch.outputs.add(LEADS_ACTIVITY, record.lead_id.encode(), handover.to_json(), record_type=LeadHandover)
        lead.state = LeadState(absorbed.lead_id, absorbed.site_id, merged_into=record.lead_id)
        if absorbed.account_domain:
            self._card(batch, account_card_id(absorbed.account_domain), "facts", "system", record,
                       lead_id=absorbed.lead_id, left=True)
        self._card(batch, lead_card_id(absorbed.lead_id), "merge", "system", record,
                   into_card_id=lead_card_id(record.lead_id))

    def _take(self, lead: _Lead, outcome: Outcome, batch: Batch) -> None:
        lead.state = outcome.state
        for change in outcome.changes:
            batch.outputs.add(LEADS_CHANGES, change.lead_id.encode(), change.to_json())
            if change.on == "account" and change.kind in ("tag_added", "tag_removed"):
                card_id = account_card_id(change.account_domain or lead.state.account_domain)
                update = CardUpdate("cu_" + digest(change.change_id, card_id), change.site_id, card_id, "account_tag",
                                    f"rule:{change.rule_id}@{change.rule_version}", tags=[change.name],
                                    left=change.kind == "tag_removed", rule_id=change.rule_id,
                                    event_id=change.event_id, ts_ms=change.ts_ms)
                batch.outputs.add(BOARD_COMMANDS, card_id.encode(), update.to_json(), record_type=CardUpdate)
            if change.kind != "property_set":
                lead.card_actor = f"rule:{change.rule_id}@{change.rule_version}" if change.rule_id else "system"
                lead.card_rule_id, lead.card_event_id, lead.card_ts_ms = change.rule_id, change.event_id, change.ts_ms
        for execution in outcome.executions:
            batch.outputs.add(RULE_EXECUTIONS, execution.lead_id.encode(), execution.to_json())
        if self.webhooks is not None:  # queued in the commit: a firing's webhook is enqueued exactly when it is
            for request in outcome.webhooks:
                self.webhooks.queue_enqueue(batch.writes, request, batch.now_ms)
        setup = self.sites[lead.state.site_id]
        for move in outcome.card_moves:
            board = setup.board(move.board)
            card_id = (account_card_id(lead.state.account_domain)
                       if board is not None and board.card == "account" and lead.state.account_domain
                       else lead_card_id(lead.state.lead_id))
            update = CardUpdate("cu_" + digest(move.request_id, card_id), move.site_id, card_id, "move",
                                f"rule:{move.rule_id}@{move.rule_version}", lead_id=move.lead_id,
                                board_id=move.board, to_stage=move.stage, rule_id=move.rule_id,
                                event_id=move.event_id, ts_ms=move.ts_ms)
            batch.outputs.add(BOARD_COMMANDS, card_id.encode(), update.to_json(), record_type=CardUpdate)

    def _card(self, batch: Batch, card_id: str, kind: str, actor: str, record: IdentityEvent, **fields) -> None:
        update = CardUpdate("cu_" + digest(record.identity_event_id, card_id, kind), record.site_id, card_id, kind,
                            actor, event_id=record.event_id, ts_ms=record.ts_ms, **fields)
        batch.outputs.add(BOARD_COMMANDS, card_id.encode(), update.to_json(), record_type=CardUpdate)

    def _finish(self, leads: Iterable[_Lead], batch: Batch) -> None:
        """Per lead whose state changed: its state, its next due hour and its snapshot."""
        version = batch.version()
        for lead in leads:
            state = lead.state
            batch.put(self.leads, lead.key, state)
            if not batch.changed(lead.key):
                continue
            batch.schedule(lead.key, next_due_ms(self.sites[state.site_id].rules, state))
            snapshot = LeadSnapshot(
                state.site_id, state.lead_id, state.email, state.account_domain, sorted(state.tags),
                orjson.dumps(state.tags).decode(), state.score, orjson.dumps(state.properties).decode(),
                state.first_ts_ms, state.last_activity_ms, state.merged_into, version,
            )
            batch.outputs.add(LEADS_STATE, state.lead_id.encode(), snapshot.to_json())

    def _tell_boards(self, lead: _Lead, before: LeadState, batch: Batch) -> None:
        """After each record, not once per batch, so the cards hear the same updates however the feed was
        cut into batches (and a replay gives the same stage changes). They hear of a new lead, changed tags
        or score, and activity once an hour: every single pageview would only churn the board."""
        after = lead.state
        if after.merged_into or not _on_boards(after):
            return  # retired, or not active yet (e.g. only its email is known so far): no card until it acts
        if (_on_boards(before) and before.tags.keys() == after.tags.keys() and before.score == after.score
                and before.account_domain == after.account_domain
                and hour_start(before.last_activity_ms) == hour_start(after.last_activity_ms)):
            return
        self._facts(lead, batch)

    def _facts(self, lead: _Lead, batch: Batch) -> None:
        state = lead.state
        cards = [(lead_card_id(state.lead_id), state.email or f"Anonymous lead {state.lead_id[-6:]}")]
        if state.account_domain:
            cards.append((account_card_id(state.account_domain), state.account_domain))
        for card_id, title in cards:
            update = CardUpdate(
                "cu_" + digest(card_id, state.lead_id, lead.cause_id),
                state.site_id, card_id, "facts", lead.card_actor, lead_id=state.lead_id, tags=sorted(state.tags),
                score=state.score, title=title, activity_ms=state.last_activity_ms, rule_id=lead.card_rule_id,
                event_id=lead.card_event_id, ts_ms=lead.card_ts_ms or state.last_activity_ms,
            )
            batch.outputs.add(BOARD_COMMANDS, card_id.encode(), update.to_json(), record_type=CardUpdate)
