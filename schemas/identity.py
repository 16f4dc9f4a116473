"""Identity-graph records: the auditable identity events and the state the resolver keeps per visitor and lead.

They travel on the `identity` topics and live in Redis (see schemas.records for the JSON round trip).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from schemas.records import JsonRecord

IdentityKind = Literal[
    "visitor_linked", "lead_merged", "merge_refused", "id_refused", "lead_created", "account_linked"
]
VISITOR_LINKED: IdentityKind = "visitor_linked"
LEAD_MERGED: IdentityKind = "lead_merged"
MERGE_REFUSED: IdentityKind = "merge_refused"
ID_REFUSED: IdentityKind = "id_refused"
LEAD_CREATED: IdentityKind = "lead_created"
ACCOUNT_LINKED: IdentityKind = "account_linked"


@dataclass(slots=True, frozen=True)
class IdentityEvent(JsonRecord):
    """One link, merge, refusal or creation in the identity graph, caused by exactly one input event.

    Meaning per kind (downstream re-keys behaviour from these):
    - lead_created: `lead_id` now exists (anonymous when `email` is empty), first seen on `visitor_id`.
    - visitor_linked: `visitor_id` moved from `from_lead_id` to `lead_id`, history included: re-key the
      visitor's past events to `lead_id`.
    - lead_merged: anonymous `from_lead_id` was merged into `lead_id`; all its history belongs to `lead_id`.
    - merge_refused: `visitor_id` (on `from_lead_id`) identified as another known contact `lead_id`; no
      history moves. `reason` says whether the visitor now points to `lead_id` ("visitor_repointed"),
      stayed because a newer form already holds it ("older_identity"), or stayed because an email link
      never moves a visitor that a form or an earlier link identified ("link_on_known_visitor": nothing
      changed, and `lead_id` may not exist).
    - id_refused: an illegal visitor id or email; the refused value is in `visitor_id` or `email` and
      `reason` is "<field>:<problem>".
    - account_linked: `lead_id` belongs to account `account_domain`; `reason` is the hint source.
    """

    identity_event_id: str
    site_id: str
    kind: IdentityKind
    event_id: str
    ts_ms: int
    visitor_id: str = ""
    lead_id: str = ""
    from_lead_id: str = ""
    email: str = ""
    account_domain: str = ""
    reason: str = ""


@dataclass(slots=True, frozen=True)
class VisitorLink(JsonRecord):
    """Where a visitor's new events go, and the claim that put it there: `since_ts_ms` is the time of the
    identify that set the link (its event time, capped at its arrival), `by_link` whether that identify was
    an email link rather than a form. Stored so that a late-arriving weaker claim cannot take the visitor
    away from a stronger one (order independence; see processors.identity)."""

    lead_id: str
    since_ts_ms: int
    by_link: bool = False


@dataclass(slots=True)
class LeadRecord(JsonRecord):
    """A lead as stored in the identity graph. Mutable so the resolver can update it in place within a batch
    (it copies what it loads before touching it).

    `visitors` lists at most the resolver's cap (a setting, 1,000 by default) of the lead's visitors, so
    that a lead with thousands of (possibly forged) visitor ids keeps a bounded record; `visitor_count`
    counts all of them. The list is complete exactly when `visitor_count == len(visitors)`; the visitor ->
    lead links (and `visitor_leads`) always are."""

    lead_id: str
    site_id: str
    email: str = ""  # '' while anonymous
    visitors: list[str] = field(default_factory=list)  # kept sorted
    account_domain: str = ""
    merged_into: str = ""  # '' unless merged away into another lead
    first_ts_ms: int = 0
    last_ts_ms: int = 0
    created_event_id: str = ""
    visitor_count: int = 0

    def __post_init__(self) -> None:
        # records written before the count existed (and hand-built ones) list every visitor they have
        if self.visitor_count < len(self.visitors):
            self.visitor_count = len(self.visitors)

    def copy(self) -> LeadRecord:
        """Independent copy (own visitors list); explicit because dataclasses.replace is slow on the hot path."""
        return LeadRecord(
            self.lead_id, self.site_id, self.email, list(self.visitors), self.account_domain,
            self.merged_into, self.first_ts_ms, self.last_ts_ms, self.created_event_id, self.visitor_count,
        )


@dataclass(slots=True)
class LeadRow(LeadRecord):
    """A lead upsert on `identity.leads`: the lead as stored, at the version it was written (rows of one
    lead collapse by version in ClickHouse)."""

    version: int = 0

    @classmethod
    def of(cls, lead: LeadRecord, version: int) -> LeadRow:
        return cls(lead.lead_id, lead.site_id, lead.email, lead.visitors, lead.account_domain, lead.merged_into,
                   lead.first_ts_ms, lead.last_ts_ms, lead.created_event_id, lead.visitor_count, version)


@dataclass(slots=True, frozen=True)
class VisitorLeadRow(JsonRecord):
    """A visitor's owner from `since_ts_ms` on, on `identity.visitors` (see VisitorLink)."""

    site_id: str
    visitor_id: str
    since_ts_ms: int
    lead_id: str
    version: int
