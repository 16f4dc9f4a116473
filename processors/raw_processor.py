"""The raw processor: events.raw in; enriched events, dead letters, sessions, identity and the lead feed out.

A pure step (enrich -> sessionize -> resolve identity) run by the shared `ProcessorRunner`, which owns the
order of effects (skip applied offsets, produce, compare-and-set commit). Declared state: one sessionizer
state per visitor (`visitors`: partition-owned, expiring when idle, its timer the idle-close deadline) and
the identity graph (global, written in the same transaction). Only identity takes the graph's lock — from
resolving through produce and commit, fenced so that a holder whose lease ran out commits nothing — so
several workers enrich and sessionize in parallel and take turns just for that part.

Outputs keep per-key order: events, dead letters and sessions stay on the raw message's partition (the
sinks deduplicate by raw offset); identity rows and the lead feed are keyed by visitor and lead.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import orjson

from processors import identity, sessionize
from processors.accounts import AccountsContext
from processors.companies import queue_wanted
from processors.enrich import Limits, enrich_batch
from processors.erasure_ledger import LedgerView
from processors.identity import IdentityChanges, InMemoryIdentityStore
from processors.identity_store import IdentityGraphStore
from processors.lookup_tables import LookupTables
from processors.runtime.batch import Batch
from processors.runtime.cost import METER
from processors.runtime.ingest import Message
from processors.runtime.producer import Outputs
from processors.runtime.state import StateSpec
from schemas.dead_letter import DeadLetter, Rejection
from schemas.erasure import Ledger
from schemas.events import EnrichedEvent
from schemas.identity import ACCOUNT_LINKED, LEAD_CREATED, LEAD_MERGED, IdentityEvent, LeadRow, VisitorLeadRow
from schemas.privacy import DEFAULT_PRIVACY, PrivacyPolicy
from schemas.records import digest
from schemas.redis_keys import RedisKeys
from schemas.rules import MergeNotice, handover_id
from schemas.topics import (EVENTS_DLQ, EVENTS_ENRICHED, IDENTITY, IDENTITY_LEADS, IDENTITY_VISITORS,
                            LEADS_ACTIVITY, SESSIONS)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawProcessorConfig:
    raw_topic: str  # full name, recorded in each dead letter
    session_policy: sessionize.SessionPolicy
    limits: Limits
    visitor_state_ttl_ms: int | None = None  # idle visitors' state expires (None: never)
    max_visitors_per_lead: int = identity.DEFAULT_MAX_VISITORS
    resolve_companies: bool = False  # queue new account domains without a company card for the provider
    privacy: PrivacyPolicy = DEFAULT_PRIVACY  # IP truncation and consent, applied at enrichment
    erasure_key: str = ""  # LEADSTREAM_ERASURE_KEY (empty: the generated one in Redis)


class RawEventsProcessor:
    name = "raw-events"

    def __init__(self, config: RawProcessorConfig, identity_graph: IdentityGraphStore, prefix: str,
                 tables: LookupTables):
        self.config = config
        self.identity = identity_graph
        self.prefix = prefix
        self.tables = tables
        self.visitors = StateSpec("visitor", RedisKeys(prefix).visitor_state, sessionize.dump_state,
                                  sessionize.load_state, ttl_ms=config.visitor_state_ttl_ms)
        self.timers = self.visitors  # the idle-close deadline of each visitor's earliest open session
        self.ledger = LedgerView(prefix, config.erasure_key)

    async def step(self, batch: Batch, messages: Sequence[Message]) -> None:
        with METER.measure("enrich", len(messages)):
            results = enrich_batch([m.value for m in messages], batch.now_ms, self.config.limits, self.tables.networks,
                                   self.config.privacy)
        accepted: list[tuple[Message, EnrichedEvent]] = []
        rejected: dict[int, Rejection] = {}
        ledger = await self.ledger.of(batch)
        erased = 0
        for i, (message, result) in enumerate(zip(messages, results)):
            if isinstance(result, Rejection):
                if ledger and _erased_raw(ledger, message.value):
                    erased += 1  # not even a dead letter: it would keep what the person sent
                    continue
                rejected[i] = result
            elif ledger and ledger.drops(result.site_id, result.visitor_id, email=result.email or ""):
                erased += 1  # an erased person's event: dropped, not a dead letter (it would keep their data)
            else:
                result.raw_partition, result.raw_offset = message.partition, message.offset
                accepted.append((message, result))

        self.ledger.count(self.name, erased)
        await METER.measured("sessionize", self._sessionize(batch, accepted, messages, rejected), len(accepted))
        accepted = [(m, e) for m, e in accepted if e.raw_offset >= 0]  # duplicates went to the DLQ
        sites = {event.site_id for _, event in accepted}  # until the commit: each site's global graph
        batch.fence = await batch.hold(self.identity.locked(sites))
        changes, feed = await METER.measured("identity", self._resolve_identity(batch, accepted), len(accepted))
        with METER.measure("serialize", len(messages)):
            self._add_events_and_dead_letters(messages, accepted, rejected, batch.now_ms, feed, batch.outputs)
        self.identity.write(batch, changes)
        wanted = self._companies_wanted(feed)
        if wanted:
            queue_wanted(batch.writes, self.prefix, wanted, batch.now_ms)

    def _companies_wanted(self, feed: dict[str, list[IdentityEvent]]) -> set[str]:
        """Accounts linked in this batch that have no company card yet, for the provider (if one is set)."""
        if not self.config.resolve_companies:
            return set()
        companies = self.tables.companies
        return {change.account_domain for changes in feed.values() for change in changes
                if change.kind == ACCOUNT_LINKED and companies.get(change.account_domain) is None}

    async def on_timer(self, batch: Batch, partition: int, key: str, state: sessionize.VisitorState,
                       now_ms: int) -> None:
        """Close the sessions whose idle deadline passed on the partition's stream clock."""
        if (await self.ledger.of(batch)).drops(state.site_id, state.visitor_id):
            batch.schedule(key, None)  # erased (its state is being deleted): no session row
            return
        policy = self.config.session_policy
        state, upserts = sessionize.close_idle(state, now_ms, policy)
        batch.put(self.visitors, key, state)
        batch.schedule(key, sessionize.next_deadline(state, policy))
        for session in upserts:
            batch.outputs.add(SESSIONS, session.visitor_id.encode(), session.to_json(), partition)

    async def _sessionize(self, batch: Batch, accepted, messages, rejected: dict[int, Rejection]) -> None:
        by_visitor: dict[str, list[EnrichedEvent]] = defaultdict(list)
        partition_of: dict[str, int] = {}
        for message, event in accepted:
            key = self.visitors.key(event.site_id, event.visitor_id)
            by_visitor[key].append(event)
            partition_of[key] = message.partition
        await batch.load((self.visitors, partition_of))

        policy = self.config.session_policy
        duplicate_ids: set[tuple[int, int]] = set()
        for key, events in by_visitor.items():
            result = sessionize.apply(batch.get(self.visitors, key), events, policy)
            for event, session_id, late, duplicate in zip(events, result.session_ids, result.late, result.duplicate):
                event.session_id, event.is_late = session_id, late
                if duplicate:
                    duplicate_ids.add((event.raw_partition, event.raw_offset))
            batch.put(self.visitors, key, result.state)
            batch.schedule(key, sessionize.next_deadline(result.state, policy))
            for session in result.upserts:
                batch.outputs.add(SESSIONS, session.visitor_id.encode(), session.to_json(), partition_of[key])

        if duplicate_ids:
            index_of = {(m.partition, m.offset): i for i, m in enumerate(messages)}
            for _, event in accepted:
                coords = (event.raw_partition, event.raw_offset)
                if coords in duplicate_ids:
                    rejected[index_of[coords]] = Rejection("duplicate_event", f"event_id {event.event_id!r} was already received")
                    event.raw_offset = -1  # not emitted as an enriched event

        for _, event in accepted:
            if event.raw_offset >= 0 and not event.is_late:
                batch.advance_clock(event.raw_partition, event.ts_ms)

    async def _resolve_identity(self, batch: Batch, accepted) -> tuple[IdentityChanges, dict[str, list[IdentityEvent]]]:
        """Stamp lead ids; emit identity events, lead upserts and visitor->lead rows. Returns the graph
        changes to commit and, per event id, the identity changes the lead feed must carry after it."""
        outputs = batch.outputs
        events = [e for _, e in accepted]
        graph = await self.identity.prefetch(batch, events)
        view = InMemoryIdentityStore(graph)
        result = identity.resolve(events, view, AccountsContext(self.tables.companies), self.config.max_visitors_per_lead)
        for event, lead_id in zip(events, result.lead_ids):
            event.lead_id = lead_id
        changes = view.changes()
        version = batch.version()  # under the identity lock: rows of one lead are versioned in commit order
        feed: dict[str, list[IdentityEvent]] = defaultdict(list)
        for ev in result.identity_events:
            outputs.add(IDENTITY, ev.visitor_id.encode(), ev.to_json())
            if on_lead_feed(ev):
                feed[ev.event_id].append(ev)
        for (site_id, visitor_id), link in changes.visitors.items():
            since = _owner_since(graph, site_id, visitor_id, link)
            if since is not None:
                row = VisitorLeadRow(site_id, visitor_id, since, link.lead_id, version)
                outputs.add(IDENTITY_VISITORS, visitor_id.encode(), row.to_json())
        for lead in changes.leads.values():
            outputs.add(IDENTITY_LEADS, lead.lead_id.encode(), LeadRow.of(lead, version).to_json())
        return changes, feed

    def _add_events_and_dead_letters(self, messages, accepted, rejected, received_ms: int,
                                     feed: dict[str, list[IdentityEvent]], outputs: Outputs) -> None:
        """Enriched events and dead letters keep raw-offset order per partition: the sinks rely on it.
        The lead feed carries the identity changes each human event caused, then the event, keyed by lead
        (so a form that identifies a lead is seen by the rules as coming from a known lead); a merge also
        puts a `MergeNotice` on the survivor's feed, ahead of its records that follow the merge."""
        for i, message in enumerate(messages):
            rejection = rejected.get(i)
            if rejection is not None:
                letter = DeadLetter(
                    reason=rejection.reason, message=rejection.message, raw=message.value or b"",
                    topic=self.config.raw_topic, partition=message.partition, offset=message.offset,
                    received_ms=received_ms,
                )
                outputs.add(EVENTS_DLQ, None, letter.to_json(), message.partition)
        for message, event in accepted:
            value = event.to_json()
            outputs.add(EVENTS_ENRICHED, event.visitor_id.encode(), value, message.partition)
            for change in feed.get(event.event_id, ()):
                outputs.add(LEADS_ACTIVITY, lead_feed_key(change), change.to_json(), record_type=IdentityEvent)
                if change.kind == LEAD_MERGED:
                    notice = merge_notice(change, event.received_ms)
                    outputs.add(LEADS_ACTIVITY, notice.lead_id.encode(), notice.to_json(), record_type=MergeNotice)
            if event.lead_id:  # humans only: bots and datacenter traffic never reach the automation processors
                outputs.add(LEADS_ACTIVITY, event.lead_id.encode(), value, record_type=EnrichedEvent)


def _erased_raw(ledger: Ledger, raw: bytes | None) -> bool:
    """Whether a message refused at validation names an erased person (site with visitor id or email)."""
    try:
        fields = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return False
    if not isinstance(fields, dict) or not isinstance(fields.get("site_id"), str):
        return False
    visitor, email = fields.get("visitor_id"), fields.get("email")
    return ledger.drops(fields["site_id"], visitor if isinstance(visitor, str) else "",
                        email=email if isinstance(email, str) else "")


def on_lead_feed(change: IdentityEvent) -> bool:
    """Whether the lead processor acts on this identity change, which then goes on the lead feed: a known
    lead's creation gives it its email, a merge moves a lead's state, an account link moves its card.
    Everything else (an anonymous lead's creation, visitors linked or re-pointed, refused merges) changes
    nothing there: the `identity` topic has it, and the feed would only carry it to be decoded and dropped."""
    if not change.lead_id:
        return False
    return change.kind in (LEAD_MERGED, ACCOUNT_LINKED) or (change.kind == LEAD_CREATED and bool(change.email))


def lead_feed_key(change: IdentityEvent) -> bytes:
    """A merge travels with the absorbed lead's records (after its last event), everything else with the
    lead it names — so each lead's feed is in order."""
    return (change.from_lead_id if change.kind == LEAD_MERGED else change.lead_id).encode()


def merge_notice(merge: IdentityEvent, received_ms: int) -> MergeNotice:
    """The survivor's notice of a merge (schemas.rules.MergeNotice): ahead of its records that follow it."""
    return MergeNotice("mn_" + digest(merge.identity_event_id), merge.site_id, merge.lead_id, merge.from_lead_id,
                       handover_id(merge.identity_event_id), merge.ts_ms, received_ms)


def _owner_since(graph, site_id: str, visitor_id: str, link) -> int | None:
    """From when a visitor's events belong to its new lead, for the `visitor_leads` row (None: no new row).

    A new visitor, or one leaving an anonymous lead, takes its whole history along (0). A visitor moving
    from one known contact to another (a shared computer) changes owner from the identify on.
    """
    previous = graph.visitors.get((site_id, visitor_id))
    if previous is None:
        return 0
    if previous.lead_id == link.lead_id:
        return None
    previous_lead = graph.leads.get((site_id, previous.lead_id))
    return link.since_ts_ms if previous_lead is not None and previous_lead.email else 0
