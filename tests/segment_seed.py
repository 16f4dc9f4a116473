"""Segments with members, for the segment API, query and page tests: definitions to PUT, and ClickHouse rows
written as the sinks write them (membership changes, lead snapshots, leads, company cards, sessions), so the
tests do not need the processors that produce them.

Site acme. Membership (`segment_membership`) holds what the lead processor would have emitted, including
rows that must not show: a visitor who is neither known nor has an account (not a lead), a lead that left,
and a lead merged away whose membership row is older than its merge.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from schemas.companies import Company
from schemas.rules import LeadSnapshot
from schemas.segments import SegmentChange
from sinks.table_sink import TABLES

Insert = Callable[[str, Sequence[str], list[Sequence]], Any]

SITE = "acme"
HOUR_MS = 3_600_000
NOW_MS = int(time.time() * 1000)

PRICING = {"id": "pricing-viewers", "name": "Viewed pricing twice in 14 days",
           "if": [{"count": {"event": "pageview", "url": "*/pricing*"}, "within": "14d", "op": "gt", "value": 1}]}
ENGAGED = {"id": "engaged", "name": "Score 10+", "if": [{"field": "lead.score", "op": "gt", "value": 9}]}
COMPANIES = {"id": "active-companies", "name": "Companies with a known contact", "of": "account",
             "if": [{"any_lead": [{"field": "lead.known", "op": "is", "value": True}]}]}
SEGMENTS = (PRICING, ENGAGED, COMPANIES)

# lead id -> (email, account, tags, score, hours since last seen, merged into)
LEADS: dict[str, tuple[str, str, list[str], int, float, str]] = {
    "lead-ann": ("ann@acme.com", "acme.com", ["Consideration"], 40, 5, ""),
    "lead-bob": ("bob@globex.com", "globex.com", ["Consideration", "Decision"], 40, 1, ""),
    "lead-anon": ("", "acme.com", ["=SUM(A1)"], 5, 2, ""),
    "lead-visitor": ("", "", [], 20, 0.5, ""),
    "lead-gone": ("cy@initech.com", "initech.com", [], 15, 3, ""),
    "lead-merged": ("", "acme.com", [], 30, 6, "lead-ann"),
}
# segment -> (member, kind, entered then left?) in change order
MEMBERSHIP: dict[str, list[tuple[str, str, bool]]] = {
    "pricing-viewers": [("lead-ann", "lead", False), ("lead-bob", "lead", False), ("lead-anon", "lead", False),
                        ("lead-visitor", "lead", False), ("lead-gone", "lead", True), ("lead-merged", "lead", False)],
    "engaged": [("lead-ann", "lead", False), ("lead-bob", "lead", False), ("lead-gone", "lead", False)],
    "active-companies": [("acme.com", "account", False), ("globex.com", "account", False),
                         ("initech.com", "account", True)],
}
CARDS = (Company("acme.com", "Acme Corporation", updated_ms=1), Company("globex.com", "Globex", updated_ms=1))

# What the lists show, in order (ties by member id).
PRICING_BY_SCORE = ["lead-ann", "lead-bob", "lead-anon"]
PRICING_BY_LAST_SEEN = ["lead-bob", "lead-anon", "lead-ann"]
COMPANIES_BY_SCORE = ["acme.com", "globex.com"]
COMPANIES_BY_LAST_SEEN = ["globex.com", "acme.com"]
COUNTS = {"pricing-viewers": 3, "engaged": 3, "active-companies": 2}

MEMBERSHIP_COLUMNS = tuple(f.name for f in dataclasses.fields(SegmentChange))
LEAD_COLUMNS = ("lead_id", "site_id", "email", "visitors", "account_domain", "merged_into", "first_ts_ms",
                "last_ts_ms", "version")
LINK_COLUMNS = ("site_id", "visitor_id", "since_ts_ms", "lead_id", "version")
SESSION_COLUMNS = ("session_id", "site_id", "visitor_id", "start_ms", "end_ms", "channel", "is_bot", "merged_into",
                   "version")


def last_seen_ms(lead_id: str) -> int:
    return NOW_MS - int(LEADS[lead_id][4] * HOUR_MS)


def changes(segment_id: str, members: list[tuple[str, str, bool]], site_id: str = SITE,
            start_ms: int = NOW_MS - 48 * HOUR_MS) -> list[SegmentChange]:
    """Each member enters (one minute apart); those marked leave an hour later."""
    made = []
    for index, (member, kind, leaves) in enumerate(members):
        entered_ms = start_ms + index * 60_000
        made.append(SegmentChange(site_id, segment_id, member, True, entered_ms, "event:e", 1, kind, 1,  # type: ignore[arg-type]
                                  f"seg-{segment_id}-{member}-1"))
        if leaves:
            made.append(SegmentChange(site_id, segment_id, member, False, entered_ms + HOUR_MS, "window", 1, kind, 2,  # type: ignore[arg-type]
                                      f"seg-{segment_id}-{member}-2"))
    return made


def snapshot(lead_id: str, site_id: str = SITE, version: int = 1) -> LeadSnapshot:
    email, account, tags, score, _, merged_into = LEADS[lead_id]
    return LeadSnapshot(site_id, lead_id, email, account, tags, "{}", score, "{}", NOW_MS - 72 * HOUR_MS,
                        last_seen_ms(lead_id), merged_into, version)


def insert_membership(insert: Insert, rows: list[SegmentChange]) -> None:
    insert("segment_membership", MEMBERSHIP_COLUMNS, [dataclasses.astuple(row) for row in rows])


def insert_snapshots(insert: Insert, snapshots: list[LeadSnapshot]) -> None:
    spec = TABLES["lead_state"]
    insert("lead_state", spec.columns, [spec.to_row(s.to_json()) for s in snapshots])


def seed_members(insert: Insert) -> None:
    """The dataset above: membership (each change twice, as a replay writes it), lead snapshots, leads (and
    through them leads_by_account), company cards, and two sessions of Ann's (referral, then email)."""
    rows = [row for segment_id, members in MEMBERSHIP.items() for row in changes(segment_id, members)]
    insert_membership(insert, rows + rows)
    insert_snapshots(insert, [snapshot(lead_id) for lead_id in LEADS])
    insert("leads", LEAD_COLUMNS, [
        (lead_id, SITE, email, [f"v-{lead_id}"], account, merged, NOW_MS - 72 * HOUR_MS, last_seen_ms(lead_id), 1)
        for lead_id, (email, account, _, _, _, merged) in LEADS.items()])
    spec = TABLES["companies"]
    insert("companies", spec.columns, [spec.to_row(card.to_json()) for card in CARDS])
    insert("visitor_leads", LINK_COLUMNS, [(SITE, "v-lead-ann", 0, "lead-ann", 1)])
    insert("sessions", SESSION_COLUMNS, [
        ("s-ann-1", SITE, "v-lead-ann", NOW_MS - 30 * HOUR_MS, NOW_MS - 29 * HOUR_MS, "referral", 0, "", 1),
        ("s-ann-2", SITE, "v-lead-ann", NOW_MS - 6 * HOUR_MS, NOW_MS - 5 * HOUR_MS, "organic", 0, "", 1),
        ("s-ann-2", SITE, "v-lead-ann", NOW_MS - 6 * HOUR_MS, NOW_MS - 5 * HOUR_MS, "email", 0, "", 2),
        ("s-ann-bot", SITE, "v-lead-ann", NOW_MS - 4 * HOUR_MS, NOW_MS - 4 * HOUR_MS, "paid", 1, "", 1),
    ])


def seed_many(insert: Insert, segment_id: str, count: int) -> list[str]:
    """`count` known leads in `segment_id` (scores 0-9, so many tie); returns their ids by score, highest
    first, ties by id (the list's order)."""
    leads = [f"lead-many-{i:05d}" for i in range(count)]
    insert_membership(insert, [SegmentChange(SITE, segment_id, lead_id, True, NOW_MS - HOUR_MS, "event:e", 1, "lead",
                                             1, f"seg-many-{lead_id}") for lead_id in leads])
    insert_snapshots(insert, [LeadSnapshot(SITE, lead_id, f"{lead_id}@many.example", "many.example", [], "{}", i % 10,
                                           "{}", NOW_MS - HOUR_MS, NOW_MS - i, "", 1)
                              for i, lead_id in enumerate(leads)])
    return sorted(leads, key=lambda lead_id: (-(int(lead_id[-5:]) % 10), lead_id))
