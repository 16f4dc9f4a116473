"""Identity stitching: the pure core that maps visitors to leads and emits every link, merge and refusal.

Rules (see DESIGN.md, "Hard parts"):
- Every visitor belongs to exactly one lead. A new visitor gets an anonymous lead whose id is a hash of
  (site_id, visitor_id); a known lead's id is a hash of (site_id, normalised email). Ids are therefore
  functions of the evidence, not of arrival order.
- An identifying event (IDENTIFYING_TYPES with an email; enrichment has already copied ?email= /
  ?lb_email= and campaign recipients into `email`) claims its visitor for the email's lead. Forms
  (`form_submit`, `identify`) are declarations; email links (`email_click`, `email_open`) only show that
  someone opened a message, which may have been forwarded, so they are weaker claims.
- A visitor on an anonymous lead takes any claim: the anonymous lead is merged into the known one (all
  its visitors move, history included: `lead_merged` + `visitor_linked`). Emails on other event types are
  ignored: a shared URL may carry someone else's.
- Two known contacts are never merged. A visitor on known lead A claimed for B follows its strongest
  claim (`_claim`): any form beats any link, the newest form wins (a shared computer), the earliest link
  wins (it was the one that found the visitor anonymous), ties go to the larger email. If B wins the
  visitor moves from then on, history stays with A (`merge_refused`, "visitor_repointed"); else it stays
  (`merge_refused`, "older_identity" for a form, "link_on_known_visitor" for a link, whose event stays
  with A). Since the visitor always follows its strongest claim, the final visitor -> lead graph does not
  depend on the order in which identifies arrive.
- A claim's time is its event time capped at its arrival time: an event dated in the future (clients
  may be up to a day ahead) cannot outrank identifies that really happened later.
- A lead lists at most `max_visitors` visitors (LeadRecord.visitor_count counts all): further visitors
  still resolve to it, but its record, and every query built from it, stays bounded.
- Illegal visitor ids and emails are refused with an `id_refused` event. An identify from an illegal
  visitor id still reaches the email's lead, without linking the (shared, meaningless) visitor id.
- Bot events and events from hosting networks (a datacenter row of the IP-range table, or a cloud or
  hosting provider's network: processors/networks.py) are excluded: no lead, no account, no identity event.
  So are events that may not identify their visitor (no marketing consent: `may_identify`, decided at
  enrichment by schemas.privacy): they never create, link, merge or touch a lead, and having no lead id
  they never reach the lead feed (rules, cards, segments).

State lives in an `IdentityStore`; the adapter backs `InMemoryIdentityStore` with a Redis reader
(prefetched from `keys_needed`) and writes `changes()` back in one transaction.
"""

from __future__ import annotations

import functools
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from processors.accounts import AccountsContext, account_for
from schemas.identity import (
    ACCOUNT_LINKED,
    ID_REFUSED,
    LEAD_CREATED,
    LEAD_MERGED,
    MERGE_REFUSED,
    VISITOR_LINKED,
    IdentityEvent,
    IdentityKind,
    LeadRecord,
    VisitorLink,
)
from schemas.records import digest

LINK_TYPES: frozenset[str] = frozenset(("email_click", "email_open"))
IDENTIFYING_TYPES: frozenset[str] = frozenset(("form_submit", "identify")) | LINK_TYPES
DEFAULT_MAX_VISITORS = 1000
"""Visitors listed per lead: keeps a lead record (and the SQL built from it) far below Kafka's 1 MB message
and ClickHouse's 256 KiB query limits even with 128-character visitor ids."""
REPOINTED, OLDER_IDENTITY, LINK_ON_KNOWN_VISITOR = "visitor_repointed", "older_identity", "link_on_known_visitor"
PLACEHOLDER_VALUES: frozenset[str] = frozenset(
    ("null", "undefined", "guest", "anonymous", "none", "unknown", "0", "-1", "test", "nil", "nan",
     "false", "true", "[object object]")
)
MAX_ID_LENGTH = 128
MAX_EMAIL_LENGTH = 254
_MAX_LOCAL_LENGTH = 64
_MAX_LABEL_LENGTH = 63
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~.")
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_RESERVED_TLDS = frozenset(("test", "example", "invalid", "localhost", "local"))
_RESERVED_DOMAINS = ("example.com", "example.net", "example.org")
_MAX_AUDIT_LENGTH = 256

Key = tuple[str, str]  # (site_id, visitor_id | email | lead_id)


class IdentityInput(Protocol):
    """The attributes of an enriched event the resolver reads (schemas.events.EnrichedEvent fits)."""

    @property
    def site_id(self) -> str: ...
    @property
    def event_id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def ts_ms(self) -> int: ...
    @property
    def received_ms(self) -> int: ...
    @property
    def visitor_id(self) -> str: ...
    @property
    def email(self) -> str | None: ...
    @property
    def is_bot(self) -> bool: ...
    @property
    def network_kind(self) -> str: ...
    @property
    def network_org(self) -> str: ...
    @property
    def network_domain(self) -> str: ...
    @property
    def may_identify(self) -> bool: ...


class IdentityReader(Protocol):
    def get_visitor_lead(self, site_id: str, visitor_id: str) -> VisitorLink | None: ...
    def get_lead(self, site_id: str, lead_id: str) -> LeadRecord | None: ...


class IdentityStore(IdentityReader, Protocol):
    """Identity-graph state. Leads are keyed by (site_id, lead_id) so a tenant's data stays under its
    own keys. `put_lead` takes ownership of the record."""

    def set_visitor_lead(self, site_id: str, visitor_id: str, link: VisitorLink) -> None: ...
    def put_lead(self, lead: LeadRecord) -> None: ...


@dataclass(slots=True)
class IdentityChanges:
    """Everything written since the store was created: the exact set of keys to write back."""

    visitors: dict[Key, VisitorLink] = field(default_factory=dict)
    leads: dict[Key, LeadRecord] = field(default_factory=dict)


_V = TypeVar("_V")


class InMemoryIdentityStore:
    """A dict store that reads through to an optional backing reader (e.g. Redis, prefetched per batch)
    and records its writes, so the adapter can persist exactly `changes()` atomically. Use one per batch."""

    __slots__ = ("_backing", "_visitors", "_leads", "_changes")

    def __init__(self, backing: IdentityReader | None = None) -> None:
        self._backing = backing
        self._visitors: dict[Key, VisitorLink | None] = {}
        self._leads: dict[Key, LeadRecord | None] = {}
        self._changes = IdentityChanges()

    @staticmethod
    def _read(cache: dict[Key, _V | None], key: Key, fetch: Callable[[str, str], _V | None] | None) -> _V | None:
        if key in cache:
            return cache[key]
        value = cache[key] = fetch(*key) if fetch is not None else None
        return value

    def get_visitor_lead(self, site_id: str, visitor_id: str) -> VisitorLink | None:
        return self._read(self._visitors, (site_id, visitor_id), self._backing and self._backing.get_visitor_lead)

    def get_lead(self, site_id: str, lead_id: str) -> LeadRecord | None:
        return self._read(self._leads, (site_id, lead_id), self._backing and self._backing.get_lead)

    def set_visitor_lead(self, site_id: str, visitor_id: str, link: VisitorLink) -> None:
        self._visitors[site_id, visitor_id] = self._changes.visitors[site_id, visitor_id] = link

    def put_lead(self, lead: LeadRecord) -> None:
        key = (lead.site_id, lead.lead_id)
        self._leads[key] = self._changes.leads[key] = lead

    def changes(self) -> IdentityChanges:
        return IdentityChanges(dict(self._changes.visitors), dict(self._changes.leads))


@functools.lru_cache(maxsize=131072)
def anonymous_lead_id(site_id: str, visitor_id: str) -> str:
    return "lead_" + digest("anonymous", site_id, visitor_id)


@functools.lru_cache(maxsize=131072)
def known_lead_id(site_id: str, email: str) -> str:
    """`email` must already be normalised (see normalise_email)."""
    return "lead_" + digest("email", site_id, email)


def identity_event_id(site_id: str, cause_event_id: str, kind: str, subject: str) -> str:
    """Deterministic, so a replayed input event re-emits identical identity events (sinks dedup)."""
    return "ie_" + digest(site_id, cause_event_id, kind, subject)


@functools.lru_cache(maxsize=131072)
def visitor_id_problem(visitor_id: str) -> str:
    """'' for a usable visitor id, else why not. Ids are not normalised: they are opaque cookie values."""
    folded = visitor_id.strip().lower()
    if not folded:
        return "empty"
    if folded in PLACEHOLDER_VALUES:
        return "placeholder"
    if len(visitor_id) > MAX_ID_LENGTH:
        return "too_long"
    if not visitor_id.isprintable():
        return "control_characters"
    return ""


def _valid_local_part(local: str) -> bool:
    return (
        0 < len(local) <= _MAX_LOCAL_LENGTH
        and local[0] != "."
        and local[-1] != "."
        and ".." not in local
        and all(c in _LOCAL_CHARS for c in local)
    )


def _ascii_domain(domain: str) -> str:
    """The domain in ASCII (IDNA for internationalised names), or '' if it is not a valid host name.
    Hand-written label checks instead of a regex: linear time whatever the input."""
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return ""
    labels = domain.split(".")
    if len(labels) < 2 or labels[-1].isdigit():
        return ""
    for label in labels:
        if not (0 < len(label) <= _MAX_LABEL_LENGTH) or label[0] == "-" or label[-1] == "-":
            return ""
        if not all(c in _LABEL_CHARS for c in label):
            return ""
    return domain


def _is_reserved_domain(domain: str) -> bool:
    """RFC 2606 / 6761 names: placeholder addresses, never a person."""
    return domain.rpartition(".")[2] in _RESERVED_TLDS or any(
        domain == reserved or domain.endswith("." + reserved) for reserved in _RESERVED_DOMAINS
    )


@functools.lru_cache(maxsize=131072)
def normalise_email(raw: str) -> tuple[str, str]:
    """(normalised email, '') or ('', problem). Lower-cased and trimmed; the domain is stored in ASCII so
    that `bücher.de` and `xn--bcher-kva.de` are one contact. Quoted local parts are not accepted."""
    email = raw.strip().lower()
    if not email:
        return "", "empty"
    if email in PLACEHOLDER_VALUES:
        return "", "placeholder"
    if len(email) > MAX_EMAIL_LENGTH:
        return "", "too_long"
    local, at, domain = email.rpartition("@")
    domain = _ascii_domain(domain) if at else ""
    if not domain or not _valid_local_part(local) or len(domain) > MAX_EMAIL_LENGTH - len(local) - 1:
        return "", "malformed"
    if _is_reserved_domain(domain):
        return "", "reserved_domain"
    return f"{local}@{domain}", ""


def _classify(event: IdentityInput) -> tuple[str, str, str, str]:
    """(exclusion, visitor problem, normalised identifying email, email problem) of one event."""
    if event.network_kind == "hosting":
        return "datacenter", "", "", ""
    if event.is_bot:
        return "bot", "", "", ""
    if not event.may_identify:
        return "no_consent", "", "", ""
    visitor_problem = visitor_id_problem(event.visitor_id or "")
    if event.email and event.type in IDENTIFYING_TYPES:
        email, email_problem = normalise_email(event.email)
        return "", visitor_problem, email, email_problem
    return "", visitor_problem, "", ""


@dataclass(slots=True, frozen=True)
class KeysNeeded:
    visitors: list[Key]
    leads: list[Key]


def keys_needed(events: Iterable[IdentityInput]) -> KeysNeeded:
    """The store keys `resolve` will read for these events, for one batched prefetch (e.g. one MGET).

    The only other reads are the leads that the fetched visitor links point to (known leads of
    returning visitors) and, for those that were merged away, the lead they merged into: prefetch
    `link.lead_id` for each loaded link, then `merged_into` of those, or let the reader load them lazily.
    Keys are deduplicated, in first-use order.
    """
    visitors: dict[Key, None] = {}
    leads: dict[Key, None] = {}
    for event in events:
        exclusion, visitor_problem, email, _ = _classify(event)
        if exclusion:
            continue
        site_id = event.site_id
        if not visitor_problem:
            visitors[site_id, event.visitor_id] = None
            leads[site_id, anonymous_lead_id(site_id, event.visitor_id)] = None
        if email:
            leads[site_id, known_lead_id(site_id, email)] = None
    return KeysNeeded(list(visitors), list(leads))


@dataclass(slots=True, frozen=True)
class IdentityResult:
    """`lead_ids` and `exclusions` are aligned with the input events. A lead id is '' for excluded
    events (`exclusions` says "bot", "datacenter" or "no_consent") and for events whose visitor id was
    refused without a usable email. `touched_leads` are the leads this call read or wrote, in first-use order."""

    lead_ids: list[str]
    exclusions: list[str]
    identity_events: list[IdentityEvent]
    touched_leads: list[LeadRecord]


def resolve(events: Sequence[IdentityInput], store: IdentityStore, accounts: AccountsContext,
            max_visitors: int = DEFAULT_MAX_VISITORS) -> IdentityResult:
    """Resolve a batch in order. Same outputs and final store state whether called once per batch or
    once per event, because all state lives in `store` and every id is derived from the evidence.
    `max_visitors` caps each lead's visitor list (see LeadRecord)."""
    resolution = _Resolution(store, accounts, max_visitors)
    lead_ids: list[str] = []
    exclusions: list[str] = []
    for event in events:
        lead_id, exclusion = resolution.apply(event)
        lead_ids.append(lead_id)
        exclusions.append(exclusion)
    touched = list(resolution.leads.values())
    for lead in touched:
        store.put_lead(lead)
    return IdentityResult(lead_ids, exclusions, resolution.emitted, touched)


def claim_time(event: IdentityInput) -> int:
    """When an identify counts as having happened: its event time, but never later than its arrival."""
    return min(event.ts_ms, event.received_ms)


def _claim(by_link: bool, ts_ms: int, email: str) -> tuple[int, int, str]:
    """The rank of a claim on a visitor; a visitor of a known lead follows its highest-ranked claim. Forms
    outrank links; the newest form and the earliest link win; ties go to the larger email."""
    return (0, -ts_ms, email) if by_link else (1, ts_ms, email)


class _Resolution:
    """Working state of one `resolve` call: leads are copied out of the store on first use, mutated in
    place, and put back once at the end (one write per lead per batch, however many events it had)."""

    __slots__ = ("store", "accounts", "max_visitors", "links", "leads", "emitted")

    def __init__(self, store: IdentityStore, accounts: AccountsContext, max_visitors: int) -> None:
        if max_visitors < 1:
            raise ValueError(f"a lead must list at least one visitor, got max_visitors={max_visitors}")
        self.store = store
        self.accounts = accounts
        self.max_visitors = max_visitors
        self.links: dict[Key, VisitorLink | None] = {}
        self.leads: dict[Key, LeadRecord] = {}
        self.emitted: list[IdentityEvent] = []

    def apply(self, event: IdentityInput) -> tuple[str, str]:
        exclusion, visitor_problem, email, email_problem = _classify(event)
        if exclusion:
            return "", exclusion
        if email_problem:
            self.emit(ID_REFUSED, event, "email", email=_clip(event.email or ""), reason="email:" + email_problem)
        if visitor_problem:
            self.emit(
                ID_REFUSED, event, "visitor_id", visitor_id=_clip(event.visitor_id or ""),
                reason="visitor_id:" + visitor_problem,
            )
            if not email:
                return "", ""
            lead = self.ensure_lead(event, known_lead_id(event.site_id, email), email, [])
        else:
            lead = self.current_lead(event)
            if email:
                lead = self.identify(event, lead, email)
        self.touch(lead, event)
        return lead.lead_id, ""

    def current_lead(self, event: IdentityInput) -> LeadRecord:
        site_id, visitor_id = event.site_id, event.visitor_id
        link = self.link(site_id, visitor_id)
        if link is None:
            lead = self.ensure_lead(event, anonymous_lead_id(site_id, visitor_id), "", [visitor_id])
            self.set_link(site_id, visitor_id, VisitorLink(lead.lead_id, claim_time(event)))
            return lead
        lead = self.ensure_lead(event, link.lead_id, "", [visitor_id])
        return self.follow_merge(event, lead) if lead.merged_into else lead

    def identify(self, event: IdentityInput, current: LeadRecord, email: str) -> LeadRecord:
        """Apply the event's claim on its visitor for `email`; returns the lead the event itself belongs to."""
        site_id, visitor_id = event.site_id, event.visitor_id
        by_link, since = event.type in LINK_TYPES, claim_time(event)
        if not current.email:
            known = self.ensure_lead(event, known_lead_id(site_id, email), email, [])
            self.merge(event, current, known, VisitorLink(known.lead_id, since, by_link))
            return known
        link = self.link(site_id, visitor_id)
        assert link is not None  # current_lead() linked it
        stronger = _claim(by_link, since, email) > _claim(link.by_link, link.since_ts_ms, current.email)
        if email == current.email:
            if stronger:  # a repeated identify renews the claim, so an older, late one cannot win
                self.set_link(site_id, visitor_id, VisitorLink(current.lead_id, since, by_link))
            return current
        if stronger:
            known = self.ensure_lead(event, known_lead_id(site_id, email), email, [])
            self.move(visitor_id, current, known)
            self.set_link(site_id, visitor_id, VisitorLink(known.lead_id, since, by_link))
            reason, owner = REPOINTED, known
        elif by_link:  # a forwarded email: the click stays with the browser's known contact
            reason, owner = LINK_ON_KNOWN_VISITOR, current
        else:  # the form itself belongs to the contact it names, the visitor stays with the newer one
            reason, owner = OLDER_IDENTITY, self.ensure_lead(event, known_lead_id(site_id, email), email, [])
        self.emit(
            MERGE_REFUSED, event, visitor_id, visitor_id=visitor_id, lead_id=known_lead_id(site_id, email),
            from_lead_id=current.lead_id, email=email, reason=reason,
        )
        return owner

    def merge(self, event: IdentityInput, anonymous: LeadRecord, known: LeadRecord, link: VisitorLink) -> None:
        """Move an anonymous lead and all its visitors (with their history) into a known lead."""
        self.emit(
            LEAD_MERGED, event, anonymous.lead_id, visitor_id=event.visitor_id, lead_id=known.lead_id,
            from_lead_id=anonymous.lead_id, email=known.email,
        )
        for visitor_id in anonymous.visitors:
            self.set_link(event.site_id, visitor_id, link)
            self.enlist(known, visitor_id)
            self.emit(
                VISITOR_LINKED, event, visitor_id, visitor_id=visitor_id, lead_id=known.lead_id,
                from_lead_id=anonymous.lead_id, email=known.email,
            )
        known.visitor_count += anonymous.visitor_count  # unlisted ones follow on their next event
        anonymous.visitors, anonymous.visitor_count = [], 0
        anonymous.merged_into = known.lead_id
        known.first_ts_ms = min(known.first_ts_ms, anonymous.first_ts_ms)
        known.last_ts_ms = max(known.last_ts_ms, anonymous.last_ts_ms)
        if anonymous.account_domain and not known.account_domain:
            self.set_account(event, known, anonymous.account_domain, "merged_lead")

    def follow_merge(self, event: IdentityInput, merged: LeadRecord) -> LeadRecord:
        """A visitor a capped anonymous lead did not list still points at it after its merge: it joins the
        survivor now (counted there by the merge), history included. Its claim is the weakest kind, a link
        of now: the visitor never identified itself."""
        survivor = self.ensure_lead(event, merged.merged_into, "", [])
        site_id, visitor_id = event.site_id, event.visitor_id
        self.set_link(site_id, visitor_id, VisitorLink(survivor.lead_id, claim_time(event), True))
        self.enlist(survivor, visitor_id)
        self.emit(
            VISITOR_LINKED, event, visitor_id, visitor_id=visitor_id, lead_id=survivor.lead_id,
            from_lead_id=merged.lead_id, email=survivor.email,
        )
        return survivor

    def move(self, visitor_id: str, source: LeadRecord, target: LeadRecord) -> None:
        if visitor_id in source.visitors:
            source.visitors.remove(visitor_id)
        source.visitor_count -= 1
        target.visitor_count += 1
        self.enlist(target, visitor_id)

    def enlist(self, lead: LeadRecord, visitor_id: str) -> None:
        """List a visitor of `lead` while the list has room (`visitor_count` is the caller's business)."""
        visitors = lead.visitors
        at = bisect_left(visitors, visitor_id)
        if len(visitors) < self.max_visitors and (at == len(visitors) or visitors[at] != visitor_id):
            visitors.insert(at, visitor_id)

    def touch(self, lead: LeadRecord, event: IdentityInput) -> None:
        ts_ms = event.ts_ms
        if ts_ms < lead.first_ts_ms:
            lead.first_ts_ms = ts_ms
        if ts_ms > lead.last_ts_ms:
            lead.last_ts_ms = ts_ms
        if not lead.account_domain:
            self.find_account(lead, event)

    def find_account(self, lead: LeadRecord, event: IdentityInput) -> None:
        """Company email domain, else the company the event's network names; once set, an account sticks."""
        hint = account_for(lead.email.rpartition("@")[2], event.network_domain, event.network_kind,
                           event.network_org, self.accounts.organisations)
        if hint.domain:
            self.set_account(event, lead, hint.domain, hint.source)

    def set_account(self, event: IdentityInput, lead: LeadRecord, domain: str, source: str) -> None:
        lead.account_domain = domain
        self.emit(
            ACCOUNT_LINKED, event, lead.lead_id, visitor_id=event.visitor_id, lead_id=lead.lead_id,
            email=lead.email, account_domain=domain, reason=source,
        )

    def ensure_lead(self, event: IdentityInput, lead_id: str, email: str, visitors: list[str]) -> LeadRecord:
        """The working copy of a lead, created (with `email` and `visitors`) if the store has none. A stored
        list longer than the cap (written before the cap, or under a larger one) is cut back to it."""
        site_id = event.site_id
        lead = self.leads.get((site_id, lead_id))
        if lead is not None:
            return lead
        stored = self.store.get_lead(site_id, lead_id)
        if stored is not None:
            lead = stored.copy()
            del lead.visitors[self.max_visitors:]
        else:
            lead = LeadRecord(
                lead_id, site_id, email, visitors, "", "", event.ts_ms, event.ts_ms, event.event_id
            )
            self.emit(LEAD_CREATED, event, lead_id, visitor_id=event.visitor_id, lead_id=lead_id, email=email)
            self.find_account(lead, event)  # now, so that an email account beats one adopted in a merge
        self.leads[site_id, lead_id] = lead
        return lead

    def link(self, site_id: str, visitor_id: str) -> VisitorLink | None:
        key = (site_id, visitor_id)
        if key in self.links:
            return self.links[key]
        link = self.links[key] = self.store.get_visitor_lead(site_id, visitor_id)
        return link

    def set_link(self, site_id: str, visitor_id: str, link: VisitorLink) -> None:
        self.links[site_id, visitor_id] = link
        self.store.set_visitor_lead(site_id, visitor_id, link)

    def emit(self, kind: IdentityKind, event: IdentityInput, subject: str, **details: str) -> None:
        """Every identity event names a visitor: the one whose event caused it, unless `details` says which."""
        details.setdefault("visitor_id", _clip(event.visitor_id or ""))
        self.emitted.append(
            IdentityEvent(
                identity_event_id=identity_event_id(event.site_id, event.event_id, kind, subject),
                site_id=event.site_id,
                kind=kind,
                event_id=event.event_id,
                ts_ms=event.ts_ms,
                **details,
            )
        )


def _clip(value: str) -> str:
    """Refused values are kept for the audit trail, but never at unbounded size."""
    return value[:_MAX_AUDIT_LENGTH]
