"""The lead processor: workflow automation and segment membership on `leads.activity`, one lead at a time,
in each lead's order.

A thin adapter around two pure cores, the rule engine (processors/rules.py) and segment membership
(processors/segments.py), on the shared `ProcessorRunner`. Declared state: one `LeadState` per lead
(`leads`; its segment state inside), committed with the partition's watermark; its timer is the hourly
pass (each lead's next hour with something to do for its rules or its segments' windows, run by the
runtime on the partition's stream clock), never a scan of all leads. Records on the feed say what they are
(`record-type`, see schemas/topics.py); each kind has its handler in `_apply_to`.

Per record of the feed, the rules first, then the segments (with the lead from before and after the rules):
- an event runs the site's rules (bots never get here: the raw processor keeps them off the feed) and
  counts in the segments' event counts;
- a known lead's creation or an account link tells the rules and the segments who the lead is;
- a merge (arriving on the absorbed lead's feed, after its last event) retires the absorbed lead (it leaves
  its segments) and hands its state to the survivor as a `LeadHandover`, which the survivor's partition
  merges once (the survivor takes its counted events and enters what it now qualifies for);
- a `MergeNotice` (the raw processor's, on the survivor's feed with the merge) makes the survivor hold what
  it hears next until the hand-over arrives, so that a rule the absorbed lead fired once is not fired again
  however the partitions interleave (at most MAX_HELD records or HOLD_MS of stream time);
- an event or a backfill for a retired lead (in flight during its merge) is forwarded to the survivor;
- a `SegmentBackfill` (a segment or a board importing one was applied) brings history for new counts and
  re-evaluates the lead; its cards hear its facts again (the import step, actor `import`);
- a `DefinitionsMark`: the site's definitions are at least at its version from here on;
- a `TagByHand` (a person's tag through the API) adds or removes the tag (processors.rules.tag_by_hand): the
  rules settle, the segments follow, and the cards hear of it with the person as the cause.
When a record changes memberships and some state rule names a segment, the rules settle again (bounded like
a rule chain), so such a rule sees the change in the same record.
Outputs: `leads.changes` (every tag/score/property change), `leads.state` (the lead's current state and
segments), `rules.executions`, `segments.changes` (every entry and exit), `segments.account-leads` (what
its account's segments need of the lead, for the account processor), card updates for the board processor
on `board.commands`, and webhooks queued in the same transaction as the state (so a firing is enqueued
exactly when it is committed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import orjson

from processors import segments
from processors.erasure_ledger import LedgerView
from processors.rules import (MAX_CHAIN_DEPTH, LeadState, Outcome, apply_event, hour_start, hourly_pass, merge,
                              next_due_ms, set_identity, settle, tag_by_hand)
from processors.runtime.batch import Batch
from processors.runtime.ingest import Message
from processors.runtime.runner import decode_batch
from processors.runtime.state import StateSpec
from processors.site_definitions import SiteDefinitionsCache, SiteSetup
from processors.webhooks import WebhookQueue
from schemas.boards import CardUpdate, account_card_id, lead_card_id
from schemas.companies import NO_COMPANIES, CompanyCards
from schemas.erasure import Ledger
from schemas.events import EnrichedEvent, ForwardedEvent
from schemas.identity import ACCOUNT_LINKED, LEAD_CREATED, LEAD_MERGED, IdentityEvent
from schemas.records import digest
from schemas.redis_keys import RedisKeys
from schemas.rules import LeadHandover, LeadSnapshot, MergeNotice, TagByHand
from schemas.segments import DefinitionsMark, SegmentBackfill
from schemas.topics import (BOARD_COMMANDS, LEADS_ACTIVITY, LEADS_CHANGES, LEADS_STATE, RECORD_TYPE_HEADER,
                            RULE_EXECUTIONS, SEGMENTS_ACCOUNT_LEADS, SEGMENTS_CHANGES)

log = logging.getLogger(__name__)

Record = EnrichedEvent | IdentityEvent | LeadHandover | SegmentBackfill | TagByHand
IMPORT_ACTOR = "import"  # what a card entering a board by the import step (a backfill) records as its cause
MAX_HELD = 200  # records a lead holds for a hand-over at most; the next one ends the wait
HOLD_MS = 15 * 60_000
"""Stream time a lead waits for a hand-over at most (it comes one hop after its notice), counted from when the
merge was received, not from the merging event's own time: a backlog, a replay or old traffic moves the
stream clock through hours of event time in seconds, and the wait would end before the hop."""


def _record_id(record: Record) -> str:
    if isinstance(record, LeadHandover):
        return record.handover_id
    if isinstance(record, MergeNotice):
        return record.notice_id
    if isinstance(record, IdentityEvent):
        return record.identity_event_id
    if isinstance(record, SegmentBackfill):
        return record.backfill_id
    if isinstance(record, TagByHand):
        return record.command_id
    return record.event_id


def _on_boards(state: LeadState) -> bool:
    """Whether the lead's cards have heard of it: it is a lead (known, or an account is known: a bare
    visitor never gets a card) and it has acted. A function of its state alone, so that what the boards hear
    does not depend on where a batch began."""
    return bool(state.last_activity_ms or state.tags) and segments.is_lead(state)


def _subject(record: Record) -> tuple[str, str]:
    """(site, lead) whose state a record changes: the lead whose feed it arrived on."""
    if isinstance(record, LeadHandover):
        return record.site_id, record.to_lead_id
    if isinstance(record, IdentityEvent):
        return record.site_id, record.from_lead_id if record.kind == LEAD_MERGED else record.lead_id
    return record.site_id, record.lead_id


def _erased(ledger: Ledger, record: Record) -> bool:
    site, lead = _subject(record)
    if ledger.drops(site, lead_id=lead):
        return True
    if isinstance(record, IdentityEvent):
        return ledger.drops(site, record.visitor_id, record.lead_id) or ledger.drops(site, lead_id=record.from_lead_id)
    if isinstance(record, (LeadHandover, MergeNotice)):
        return ledger.drops(site, lead_id=record.from_lead_id)
    if isinstance(record, EnrichedEvent):
        return ledger.drops(site, record.visitor_id)
    return False


def _redelivered(lead: _Lead, event: EnrichedEvent) -> bool:
    """Whether the lead had this event already, by its raw offset: the raw processor writes a lead's events
    of one raw partition in offset order, so one at or below the highest offset seen is a second delivery
    (a replay of the raw processor, e.g. after a Redis failover lost its last commits; the lead's last few
    event ids, `LeadState.seen`, may not reach back that far)."""
    if event.raw_offset < 0:  # no raw position (an event not read from the raw topic): nothing to compare
        return False
    if lead.raw_marks is None:
        lead.raw_marks = dict(lead.state.raw_marks)
    partition = str(event.raw_partition)
    if event.raw_offset <= lead.raw_marks.get(partition, -1):
        return True
    lead.raw_marks[partition] = event.raw_offset
    return False


def _facts(state: LeadState) -> tuple:
    """What the rules may change that segments read besides counts: tags, score, properties."""
    return tuple(state.tags), state.score, state.properties


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
    tell_boards: bool = False  # the cards hear the lead's facts after this record, changed or not
    raw_marks: dict[str, int] | None = None  # LeadState.raw_marks through the batch (None: not read yet)


class LeadProcessor:
    name = "lead"

    def __init__(self, sites: SiteDefinitionsCache, webhooks: WebhookQueue | None, prefix: str,
                 companies: CompanyCards = NO_COMPANIES, erasure_key: str = ""):
        self.ledger = LedgerView(prefix, erasure_key)
        self.sites = sites
        self.webhooks = webhooks
        self.companies = companies  # what `account.*` conditions read (updated in place by the worker)
        self.leads = StateSpec("lead", RedisKeys(prefix).lead_state, LeadState.to_json, LeadState.from_json)
        self.timers = self.leads  # the hourly pass, per lead: when it next has something to do

    async def step(self, batch: Batch, messages: Sequence[Message]) -> None:
        decoded = decode_batch(messages, LEADS_ACTIVITY, self.name)
        await self.sites.prepare(record.site_id for _, record in decoded)
        wanted: dict[str, int] = {}  # what was written for newer definitions waits until this worker has them
        for _, record in decoded:
            if isinstance(record, (SegmentBackfill, DefinitionsMark)):
                wanted[record.site_id] = max(wanted.get(record.site_id, 0), record.version)
        await self.sites.catch_up(wanted)
        records = [(partition, record) for partition, record in decoded if not isinstance(record, DefinitionsMark)]
        ledger = await self.ledger.of(batch)
        if ledger:  # an erased person's records (their lead, a lead merged into or out of theirs, their visitors)
            kept = [(p, r) for p, r in records if not _erased(ledger, r)]
            self.ledger.count(self.name, len(records) - len(kept))
            records = kept
        subjects = {self.leads.key(site, lead): (partition, site, lead)
                    for partition, record in records for site, lead in (_subject(record),)}
        await batch.load((self.leads, {key: partition for key, (partition, _, _) in subjects.items()}))
        leads = {key: _Lead(key, batch.get(self.leads, key) or LeadState(lead_id, site_id))
                 for key, (_, site_id, lead_id) in subjects.items()}
        async for partition, record in batch.paced(records):
            self._apply(record, leads, batch)
            if isinstance(record, EnrichedEvent):  # the stream clock of the hourly pass: event time
                batch.advance_clock(partition, record.ts_ms)
        self._finish(leads.values(), batch)

    async def on_timer(self, batch: Batch, partition: int, key: str, state: LeadState, now_ms: int) -> None:
        """The hourly pass of a due lead: segment windows that ran out (evaluated with the facts from before
        the pass), then time triggers and score decay, then the segments again if the pass changed facts."""
        if (await self.ledger.of(batch)).drops(state.site_id, lead_id=state.lead_id):
            batch.schedule(key, None)  # erased (its state is being deleted): no pass, no output
            return
        await self.sites.prepare([state.site_id])
        setup = self.sites[state.site_id]
        cause = f"hour:{now_ms}"
        lead = _Lead(key, state, cause)
        if state.awaiting and now_ms >= state.awaiting_until_ms:
            log.warning("lead %s waited %d min for %s: it stops waiting", state.lead_id, HOLD_MS // 60_000,
                        state.awaiting)
            self._release(lead, {key: lead}, batch)
            state = lead.state
            lead.cause_id = cause
        self._segments(lead, state, segments.on_hour(setup.segments, state, now_ms, self.companies), cause,
                       now_ms, batch)
        before_pass = lead.state
        self._take(lead, hourly_pass(setup.rules, before_pass, now_ms, self.companies), batch)
        if _facts(lead.state) != _facts(before_pass):
            self._segments(lead, before_pass, segments.on_change(setup.segments, lead.state, cause, self.companies),
                           cause, now_ms, batch)
        self._tell_boards(lead, state, batch)
        self._finish([lead], batch)

    def _apply(self, record: Record | MergeNotice, leads: dict[str, _Lead], batch: Batch,
               held: bool = False) -> None:
        """A record in its lead's order (`held`: again, after its lead held it); an event delivered again is
        dropped; while the lead awaits a merge's hand-over, the record is held (see `_expect`) — except a
        hand-over, awaited or not: held, it would sit unseen behind a notice of its own merge that a replay
        repeats after it, and the wait would never end."""
        lead = leads[self.leads.key(*_subject(record))]
        if type(record) is EnrichedEvent and not held and _redelivered(lead, record):
            return
        if isinstance(record, MergeNotice):
            self._expect(lead, record)
            return
        awaited = isinstance(record, LeadHandover) and _awaits(lead.state, record)
        if lead.state.awaiting and not isinstance(record, LeadHandover):
            if len(lead.state.held) < MAX_HELD:
                self._hold(lead, record)
                return
            log.warning("lead %s held %d records waiting for %s: it stops waiting", lead.state.lead_id,
                        MAX_HELD, lead.state.awaiting)
            self._release(lead, leads, batch)
        self._apply_now(record, lead, batch)
        if awaited:
            state = lead.state.copy()
            state.awaiting = [w for w in state.awaiting if w not in (record.from_lead_id, record.handover_id)]
            lead.state = state
            if not state.awaiting:
                self._release(lead, leads, batch)

    @staticmethod
    def _expect(lead: _Lead, notice: MergeNotice) -> None:
        """A merge's notice: what the survivor hears from now on waits for the absorbed lead's hand-over, so
        that it sees the absorbed lead's firings (a rule fired once per lead does not fire again) however the
        lead feed's partitions interleave. Nothing to wait for when the hand-over came first, or when told
        twice."""
        state = lead.state
        if notice.from_lead_id in state.merged_from or _awaits(state, notice) or state.merged_into:
            return
        state = state.copy()
        state.awaiting.append(notice.from_lead_id)
        state.awaiting_until_ms = max(state.awaiting_until_ms, max(notice.ts_ms, notice.received_ms) + HOLD_MS)
        lead.state = state

    @staticmethod
    def _hold(lead: _Lead, record: Record) -> None:
        state = lead.state.copy()
        type_name = LEADS_ACTIVITY.headers(type(record))[0][1].decode()
        state.held.append([type_name, record.to_json().decode()])
        lead.state = state

    def _release(self, lead: _Lead, leads: dict[str, _Lead], batch: Batch) -> None:
        """The wait is over (its hand-overs came, or it ran out): the held records, in their order."""
        held = lead.state.held
        state = lead.state.copy()
        state.awaiting, state.awaiting_until_ms, state.held = [], 0, []
        lead.state = state
        for type_name, value in held:
            self._apply(LEADS_ACTIVITY.decode(value.encode(), [(RECORD_TYPE_HEADER, type_name.encode())]), leads,
                        batch, held=True)

    def _apply_now(self, record: Record, lead: _Lead, batch: Batch) -> None:
        before = lead.state
        lead.cause_id = _record_id(record)
        lead.card_actor, lead.card_rule_id, lead.card_event_id, lead.card_ts_ms = "system", "", "", 0
        lead.tell_boards = False
        self._apply_to(lead, record, batch)
        self._tell_boards(lead, before, batch)

    def _apply_to(self, lead: _Lead, record: Record, batch: Batch) -> None:
        setup = self.sites[record.site_id]
        state = lead.state
        companies = self.companies
        if isinstance(record, (EnrichedEvent, SegmentBackfill, TagByHand)) and state.merged_into:
            self._forward(record, state.merged_into, batch)
        elif isinstance(record, TagByHand):
            self._take(lead, tag_by_hand(setup.rules, state, record.tag, record.present, record.ts_ms,
                                         record.command_id, companies, record.actor), batch)
            if _facts(lead.state) != _facts(state):
                cause = f"user:{record.command_id}"
                self._segments(lead, state, segments.on_change(setup.segments, lead.state, cause, companies),
                               cause, record.ts_ms, batch)
        elif isinstance(record, EnrichedEvent):
            self._take(lead, apply_event(setup.rules, state, record, companies), batch)
            self._segments(lead, state, segments.on_event(setup.segments, state, lead.state, record, companies),
                           f"event:{record.event_id}", segments.event_time(record), batch)
            if not lead.card_event_id:  # no rule acted: what the cards hear (a segment entered, activity) is still
                lead.card_event_id = record.event_id  # this event's doing, and their stage changes say so
        elif isinstance(record, SegmentBackfill):
            if state != LeadState(state.lead_id, state.site_id):  # a lead this processor never had: nothing to redo
                lead.card_actor, lead.tell_boards = IMPORT_ACTOR, True
                self._segments(lead, state, segments.on_backfill(setup.segments, state, record, companies),
                               f"definitions:{record.version}", record.as_of_ms, batch, refresh=True)
        elif isinstance(record, LeadHandover):
            absorbed = LeadState.from_json(record.state)
            self._take(lead, merge(setup.rules, state, absorbed, record.ts_ms, record.event_id, companies), batch)
            cause = f"merge:{absorbed.lead_id}"
            self._segments(lead, state, segments.on_merge(setup.segments, state, lead.state, absorbed, cause,
                                                          record.ts_ms, companies), cause, record.ts_ms, batch,
                           absorbed=absorbed)
        elif record.kind == LEAD_CREATED and record.email:
            self._take(lead, set_identity(setup.rules, state, record.ts_ms, email=record.email,
                                          event_id=record.event_id, companies=companies), batch)
            self._identity_changed(lead, state, record, setup, batch)
        elif record.kind == ACCOUNT_LINKED and record.account_domain != state.account_domain:
            self._link_account(lead, record, setup, batch)
        elif record.kind == LEAD_MERGED and not state.merged_into:
            self._retire(lead, record, setup, batch)

    @staticmethod
    def _forward(record: EnrichedEvent | SegmentBackfill | TagByHand, survivor: str, batch: Batch) -> None:
        """In flight while its lead merged: the survivor's rules and segments get it."""
        if isinstance(record, (SegmentBackfill, TagByHand)):
            record = replace(record, lead_id=survivor)
        else:
            record.lead_id = survivor
        record_type = ForwardedEvent if isinstance(record, EnrichedEvent) else type(record)
        batch.outputs.add(LEADS_ACTIVITY, survivor.encode(), record.to_json(), record_type=record_type)

    def _identity_changed(self, lead: _Lead, before: LeadState, record: IdentityEvent, setup: SiteSetup,
                          batch: Batch) -> None:
        cause = f"identity:{record.identity_event_id}"
        outcome = segments.on_identity(setup.segments, before, lead.state, record.ts_ms, cause, self.companies)
        self._segments(lead, before, outcome, cause, record.ts_ms, batch)

    def _link_account(self, lead: _Lead, record: IdentityEvent, setup: SiteSetup, batch: Batch) -> None:
        """The lead's card folds into its account's card (and leaves a previous account's card)."""
        before = lead.state
        self._take(lead, set_identity(setup.rules, before, record.ts_ms, account_domain=record.account_domain,
                                      event_id=record.event_id, companies=self.companies), batch)
        self._identity_changed(lead, before, record, setup, batch)
        actor = "system"
        if before.account_domain:
            self._card(batch, account_card_id(before.account_domain), "facts", actor, record, lead_id=before.lead_id,
                       left=True)
        self._card(batch, lead_card_id(before.lead_id), "merge", actor, record,
                   into_card_id=account_card_id(record.account_domain))

    def _retire(self, lead: _Lead, record: IdentityEvent, setup: SiteSetup, batch: Batch) -> None:
        """This (anonymous) lead merged into `record.lead_id`: everything it had goes there, once. It leaves
        its segments here; the survivor enters them when it takes the handover, and tells the account this
        lead belonged to in the same update (so the account does not hear of the merge twice)."""
        absorbed = lead.state
        for change in segments.on_retire(setup.segments, absorbed, record.lead_id, record.ts_ms):
            batch.outputs.add(SEGMENTS_CHANGES, change.member_id.encode(), change.to_json())
        handover = LeadHandover("ho_" + digest(record.identity_event_id), absorbed.site_id, absorbed.lead_id,
                                record.lead_id, absorbed.to_json().decode(), record.event_id, record.ts_ms)
        batch.outputs.add(LEADS_ACTIVITY, record.lead_id.encode(), handover.to_json(), record_type=LeadHandover)
        lead.state = LeadState(absorbed.lead_id, absorbed.site_id, merged_into=record.lead_id,
                               raw_marks=absorbed.raw_marks)  # a replayed event of it is not forwarded
        if absorbed.account_domain:
            self._card(batch, account_card_id(absorbed.account_domain), "facts", "system", record,
                       lead_id=absorbed.lead_id, left=True)
        self._card(batch, lead_card_id(absorbed.lead_id), "merge", "system", record,
                   into_card_id=lead_card_id(record.lead_id))

    def _segments(self, lead: _Lead, before: LeadState, outcome: segments.SegmentOutcome, cause: str, ts_ms: int,
                  batch: Batch, refresh: bool = False, absorbed: LeadState | None = None) -> None:
        """Takes a segment outcome: the lead's new segment state, its entries and exits, what its account must
        hear (`absorbed`: the lead it just merged, see segments.account_facts); then, if memberships changed and a state rule names a segment, the rules settle again (and the
        segments follow what that changed), at most MAX_CHAIN_DEPTH times."""
        setup = self.sites[lead.state.site_id]
        for depth in range(1, MAX_CHAIN_DEPTH + 1):
            if outcome.state is not lead.state.segments:
                if lead.state is before:  # the rules changed nothing: the record's state is still `before`
                    lead.state = before.copy()
                lead.state.segments = outcome.state
            for change in outcome.changes:
                batch.outputs.add(SEGMENTS_CHANGES, change.member_id.encode(), change.to_json())
            self._tell_accounts(before, lead.state, outcome, cause,
                                outcome.state.clock_ms if outcome.state else ts_ms, setup, batch, refresh, absorbed)
            if not outcome.changes or not setup.rules.state_reads_segments:
                return
            before, refresh, absorbed = lead.state, False, None
            self._take(lead, settle(setup.rules, before, ts_ms, f"{cause}#{depth}", self.companies), batch)
            if _facts(lead.state) == _facts(before):
                return
            outcome = segments.on_change(setup.segments, lead.state, cause, self.companies)

    def _tell_accounts(self, before: LeadState, after: LeadState, outcome: segments.SegmentOutcome, cause: str,
                       ts_ms: int, setup: SiteSetup, batch: Batch, refresh: bool = False,
                       absorbed: LeadState | None = None) -> None:
        """What the lead's accounts' segments need of it (only on a site with segments: the backfill that
        follows a site's first segment tells every account then)."""
        if setup.segments.empty:
            return
        for update in segments.account_facts(before, after, outcome, cause, ts_ms, setup.version, refresh,
                                             absorbed):
            batch.outputs.add(SEGMENTS_ACCOUNT_LEADS, update.account_domain.encode(), update.to_json())

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
                lead.card_actor = (f"rule:{change.rule_id}@{change.rule_version}" if change.rule_id
                                   else change.actor or "system")
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
        for request in outcome.card_owners:  # the lead's cards, wherever boards show them
            cards = [lead_card_id(request.lead_id)]
            if request.account_domain:
                cards.append(account_card_id(request.account_domain))
            for card_id in cards:
                update = CardUpdate("cu_" + digest(request.request_id, card_id), request.site_id, card_id, "assign",
                                    f"rule:{request.rule_id}@{request.rule_version}", lead_id=request.lead_id,
                                    rule_id=request.rule_id, event_id=request.event_id, ts_ms=request.ts_ms,
                                    owner=request.owner)
                batch.outputs.add(BOARD_COMMANDS, card_id.encode(), update.to_json(), record_type=CardUpdate)

    def _card(self, batch: Batch, card_id: str, kind: str, actor: str, record: IdentityEvent, **fields) -> None:
        update = CardUpdate("cu_" + digest(record.identity_event_id, card_id, kind), record.site_id, card_id, kind,
                            actor, event_id=record.event_id, ts_ms=record.ts_ms, **fields)
        batch.outputs.add(BOARD_COMMANDS, card_id.encode(), update.to_json(), record_type=CardUpdate)

    def _finish(self, leads: Iterable[_Lead], batch: Batch) -> None:
        """Per lead whose state changed: its state, its next due hour (rules or segment windows) and its
        snapshot."""
        version = batch.version()
        for lead in leads:
            if lead.raw_marks is not None and lead.raw_marks != lead.state.raw_marks:
                lead.state = lead.state.copy()
                lead.state.raw_marks = lead.raw_marks
            state = lead.state
            if state == LeadState(state.lead_id, state.site_id):
                continue  # a lead this processor never had, and nothing happened to it
            batch.put(self.leads, lead.key, state)
            if not batch.changed(lead.key):
                continue
            setup = self.sites[state.site_id]
            due = [d for d in (next_due_ms(setup.rules, state), segments.next_due_ms(setup.segments, state),
                               state.awaiting_until_ms if state.awaiting else 0) if d]
            batch.schedule(lead.key, min(due, default=None))
            snapshot = LeadSnapshot(
                state.site_id, state.lead_id, state.email, state.account_domain, sorted(state.tags),
                orjson.dumps(state.tags).decode(), state.score, orjson.dumps(state.properties).decode(),
                state.first_ts_ms, state.last_activity_ms, state.merged_into, version,
                state.segments.member_of() if state.segments is not None else [],
            )
            batch.outputs.add(LEADS_STATE, state.lead_id.encode(), snapshot.to_json())

    def _tell_boards(self, lead: _Lead, before: LeadState, batch: Batch) -> None:
        """After each record, not once per batch, so the cards hear the same updates however the feed was
        cut into batches (and a replay gives the same stage changes). They hear of a new lead, changed tags,
        score or memberships of imported segments, activity once an hour (every single pageview would only
        churn the board), and everything after a backfill (the import step)."""
        after = lead.state
        if after.merged_into or not _on_boards(after):
            return  # retired, not a lead, or not active yet (e.g. only its email is known so far): no card
        imported = self.sites[after.site_id].imported_segments
        if (not lead.tell_boards and _on_boards(before) and before.tags.keys() == after.tags.keys()
                and before.score == after.score and before.account_domain == after.account_domain
                and hour_start(before.last_activity_ms) == hour_start(after.last_activity_ms)
                and _members(before, imported) == _members(after, imported)):
            return
        self._facts(lead, _members(after, imported), batch)

    def _facts(self, lead: _Lead, members: list[str], batch: Batch) -> None:
        state = lead.state
        if state.email:
            title = state.email
        else:  # an anonymous employee of its account (a bare visitor has no card)
            title = f"Anonymous lead {state.lead_id[-6:]} at {state.account_domain}"
        cards = [(lead_card_id(state.lead_id), title)]
        if state.account_domain:
            cards.append((account_card_id(state.account_domain), state.account_domain))
        version = self.sites[state.site_id].version
        for card_id, card_title in cards:
            update = CardUpdate(
                "cu_" + digest(card_id, state.lead_id, lead.cause_id),
                state.site_id, card_id, "facts", lead.card_actor, lead_id=state.lead_id, tags=sorted(state.tags),
                score=state.score, title=card_title, activity_ms=state.last_activity_ms, rule_id=lead.card_rule_id,
                event_id=lead.card_event_id, ts_ms=lead.card_ts_ms or state.last_activity_ms, segments=members,
                definitions_version=version,
            )
            batch.outputs.add(BOARD_COMMANDS, card_id.encode(), update.to_json(), record_type=CardUpdate)


def _awaits(state: LeadState, merge: MergeNotice | LeadHandover) -> bool:
    """Whether the lead waits for this merge's hand-over. It waits for the absorbed lead, whichever merge id
    brings it (a raw batch computed twice may name the same merge twice); states written before that hold
    the hand-over's id."""
    return merge.from_lead_id in state.awaiting or merge.handover_id in state.awaiting


def _members(state: LeadState, imported: frozenset[str]) -> list[str]:
    """The lead's memberships of the segments some board of its site imports."""
    if state.segments is None or not imported:
        return []
    return [segment for segment in state.segments.member_of() if segment in imported]
