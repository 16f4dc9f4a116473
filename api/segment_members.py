"""Segment members read model: who is in a segment now, a page at a time, and how many, from ClickHouse
`segment_membership` (every time a member entered or left: migration 0012) joined with what a person
scans in a list.

A member is in a segment while its newest change (by `(ts_ms, seq)`) entered it. A lead segment's members
are shown with their lead's current state from `lead_state` (email, account, score, tags, last seen) and
their first and latest session's channel from `sessions`; an account segment's members with their company
card's name (`companies`) and their current leads' count, highest score and latest activity (an account's
score is its best lead's: the same 0-100 scale as a lead's, where a sum would rank big companies first
whatever their interest).

Only leads count (DESIGN, "lead"): a lead member whose lead is neither a known contact nor has an account
is a visitor and is left out of pages and counts alike.

Pages are cut by a cursor, never an offset: rows are ordered by (sort value descending, member id), and a
cursor is the last row's pair, so a page starts right after it even while members come and go; a member
whose sort value changed between two pages may be seen twice or not at all, no other. Each page reads the
segment's current members in full (the sort needs every one's value), bounded like every API read by
`max_execution_time` and `max_memory_usage` (api.analytics).

Every SQL text is a module-level constant: docs/queries.md quotes them, and its tests check they match.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timezone
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from textwrap import indent
from typing import Any, Literal

import orjson

from api.lead_profile import ACCOUNT_LINKS_SQL, OWNED_TABLE, QueryClient, owned_table, ownership_by_lead
from schemas.segments import MemberKind

Sort = Literal["score", "last_seen"]
SORTS: tuple[Sort, ...] = ("score", "last_seen")
MAX_PAGE = 500  # members per page of the API's list
EXPORT_PAGE = 2_000  # members per page of a CSV export: each page reads the whole segment, so fewer is faster
MAX_SORT_VALUE = 2**64 - 1  # the first page starts "after" the largest UInt64: every value is below it
MAX_CURSOR_CHARS = 400

# The current members of segment %(segment_id)s.
_CURRENT_MEMBERS = """SELECT member_id
FROM segment_membership
WHERE site_id = %(site_id)s AND segment_id = %(segment_id)s
GROUP BY member_id
HAVING argMax(entered, (ts_ms, seq)) = 1"""

# A lead (a lead_state row group) that is a lead by the definition: not merged away, known or with an account.
_IS_LEAD = ("argMax(merged_into, version) = ''"
            " AND (argMax(email, version) != '' OR argMax(account_domain, version) != '')")

# Per segment of %(segment_ids)s, its current members; lead members only if they are leads.
MEMBER_COUNTS_SQL = f"""SELECT segment_id, count() AS members
FROM (
    SELECT segment_id, member_id, argMax(of, (ts_ms, seq)) AS member_kind
    FROM segment_membership
    WHERE site_id = %(site_id)s AND segment_id IN %(segment_ids)s
    GROUP BY segment_id, member_id
    HAVING argMax(entered, (ts_ms, seq)) = 1
)
WHERE member_kind = 'account' OR member_id IN (
    SELECT lead_id
    FROM lead_state
    WHERE site_id = %(site_id)s AND lead_id IN (
        SELECT member_id FROM segment_membership
        WHERE site_id = %(site_id)s AND segment_id IN %(segment_ids)s AND of = 'lead'
    )
    GROUP BY lead_id
    HAVING {_IS_LEAD}
)
GROUP BY segment_id"""

# One page of a lead segment's members, ordered by %(sort)s ('score' or 'last_seen') descending, then lead
# id, starting after the cursor (%(after_value)s, %(after_id)s).
LEAD_MEMBERS_SQL = f"""SELECT lead_id, latest_email, latest_account_domain, latest_tags, latest_score,
       latest_last_activity_ms, sort_value
FROM (
    SELECT lead_id,
           argMax(email, version) AS latest_email,
           argMax(account_domain, version) AS latest_account_domain,
           argMax(tags, version) AS latest_tags,
           argMax(score, version) AS latest_score,
           argMax(last_activity_ms, version) AS latest_last_activity_ms,
           if(%(sort)s = 'score', toUInt64(greatest(latest_score, 0)), latest_last_activity_ms) AS sort_value
    FROM lead_state
    WHERE site_id = %(site_id)s AND lead_id IN (
{indent(_CURRENT_MEMBERS, ' ' * 8)}
    )
    GROUP BY lead_id
    HAVING {_IS_LEAD}
)
WHERE sort_value < %(after_value)s OR (sort_value = %(after_value)s AND lead_id > %(after_id)s)
ORDER BY sort_value DESC, lead_id
LIMIT %(limit)s"""

# One page of an account segment's members (domains), as LEAD_MEMBERS_SQL. ClickHouse 18.16 joins one
# table per SELECT, hence the nesting: members, their leads' figures, their company cards.
ACCOUNT_MEMBERS_SQL = f"""SELECT member_id, company_name, leads, top_score, last_seen_ms,
       if(%(sort)s = 'score', toUInt64(greatest(top_score, 0)), last_seen_ms) AS sort_value
FROM (
    SELECT member_id, leads, top_score, last_seen_ms
    FROM (
{indent(_CURRENT_MEMBERS, ' ' * 8)}
    ) AS members
    ANY LEFT JOIN (
        SELECT latest_account_domain AS member_id, count() AS leads, max(latest_score) AS top_score,
               max(latest_last_activity_ms) AS last_seen_ms
        FROM (
            SELECT lead_id,
                   argMax(account_domain, version) AS latest_account_domain,
                   argMax(score, version) AS latest_score,
                   argMax(last_activity_ms, version) AS latest_last_activity_ms
            FROM lead_state
            WHERE site_id = %(site_id)s AND lead_id IN (
                SELECT lead_id
                FROM leads_by_account
                WHERE site_id = %(site_id)s AND account_domain IN (
{indent(_CURRENT_MEMBERS, ' ' * 20)}
                )
                GROUP BY lead_id
                HAVING argMax(merged_into, version) = ''
            )
            GROUP BY lead_id
            HAVING argMax(merged_into, version) = ''
        )
        GROUP BY member_id
    ) AS accounts USING member_id
) AS member_accounts
ANY LEFT JOIN (
    SELECT domain AS member_id, argMax(name, updated_ms) AS company_name
    FROM companies
    WHERE domain IN (
{indent(_CURRENT_MEMBERS, ' ' * 8)}
    )
    GROUP BY domain
) AS cards USING member_id
WHERE sort_value < %(after_value)s OR (sort_value = %(after_value)s AND member_id > %(after_id)s)
ORDER BY sort_value DESC, member_id
LIMIT %(limit)s"""

# Per lead of the external table of ownership intervals (the Account Panel's, api.lead_profile.owned_table),
# the channel of its first and of its latest session (a session belongs to the lead that owned its visitor
# when it started), bots and sessions merged away left out.
MEMBER_CHANNELS_SQL = f"""SELECT lead_id,
       argMin(session_channel, (start_ms, session_id)) AS first_channel,
       argMax(session_channel, (start_ms, session_id)) AS last_channel
FROM (
    SELECT visitor_id, session_id, start_ms, argMax(channel, version) AS session_channel
    FROM sessions
    PREWHERE site_id = %(site_id)s AND visitor_id IN (SELECT visitor_id FROM {OWNED_TABLE})
    GROUP BY visitor_id, session_id, start_ms
    HAVING argMax(merged_into, version) = '' AND argMax(is_bot, version) = 0
) AS member_sessions
ALL INNER JOIN (
    SELECT lead_id, visitor_id, since_ts_ms, until_ts_ms FROM {OWNED_TABLE}
) AS ownership USING visitor_id
WHERE start_ms >= since_ts_ms AND start_ms < until_ts_ms
GROUP BY lead_id"""


@dataclass(frozen=True, slots=True)
class LeadMember:
    """A lead segment's member as a list shows it. `name`: the email of a known contact, else "Anonymous
    lead" and the end of its id (as its card is titled)."""

    lead_id: str
    name: str
    email: str
    known: bool
    account_domain: str
    score: int
    tags: tuple[str, ...]
    last_seen_ms: int
    first_channel: str
    last_channel: str


@dataclass(frozen=True, slots=True)
class AccountMember:
    """An account segment's member: `leads`, `score` (the highest of its leads') and `last_seen_ms` over its
    current leads; `company_name` from its company card ('' without one)."""

    domain: str
    company_name: str
    leads: int
    score: int
    last_seen_ms: int


Member = LeadMember | AccountMember


@dataclass(frozen=True, slots=True)
class MembersPage:
    """`next_cursor`: pass it back for the next page; None after the last."""

    members: tuple[Member, ...]
    next_cursor: str | None


# ---------------------------------------------------------------------------------------------- cursors


class BadCursor(ValueError):
    """A cursor this module did not make, or made for another sort."""


def encode_cursor(sort: Sort, value: int, member_id: str) -> str:
    """Opaque to callers: base64url of [sort, value, member id]."""
    return base64.urlsafe_b64encode(orjson.dumps([sort, value, member_id])).decode().rstrip("=")


def decode_cursor(cursor: str | None, sort: Sort) -> tuple[int, str]:
    """(sort value, member id) to start after; the start of the list for None."""
    if cursor is None:
        return MAX_SORT_VALUE, ""
    if len(cursor) > MAX_CURSOR_CHARS:
        raise BadCursor("cursor too long")
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError) as err:
        raise BadCursor("not a cursor of this list") from err
    if not (isinstance(decoded, list) and len(decoded) == 3 and decoded[0] in SORTS
            and type(decoded[1]) is int and 0 <= decoded[1] <= MAX_SORT_VALUE and isinstance(decoded[2], str)):
        raise BadCursor("not a cursor of this list")
    if decoded[0] != sort:
        raise BadCursor(f"a cursor of the list sorted by {decoded[0]}, not {sort}")
    return decoded[1], decoded[2]


# ---------------------------------------------------------------------------------------------- reads


def member_counts(client: QueryClient, site_id: str, segment_ids: Iterable[str]) -> dict[str, int]:
    """Current members per segment (0 for a segment without any), lead members only if they are leads."""
    wanted = tuple(sorted(set(segment_ids)))
    if not wanted:
        return {}
    counts = dict.fromkeys(wanted, 0)
    counts.update(client.execute(MEMBER_COUNTS_SQL, {"site_id": site_id, "segment_ids": wanted}))
    return counts


def members_page(client: QueryClient, site_id: str, segment_id: str, of: MemberKind, sort: Sort = "score",
                 limit: int = 50, cursor: str | None = None) -> MembersPage:
    """The segment's current members after `cursor`, at most `limit`, by `sort` (highest first). Arguments
    are checked first: a bad limit, sort or cursor is a ValueError and never a query."""
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}")
    if not 1 <= limit <= EXPORT_PAGE:
        raise ValueError(f"limit must be 1..{EXPORT_PAGE}")
    after_value, after_id = decode_cursor(cursor, sort)
    params = {"site_id": site_id, "segment_id": segment_id, "sort": sort, "after_value": after_value,
              "after_id": after_id, "limit": limit + 1}
    if of == "lead":
        rows = client.execute(LEAD_MEMBERS_SQL, params)
        members: list[Member] = list(lead_members(rows[:limit], member_channels(client, site_id,
                                                                               [row[0] for row in rows[:limit]])))
    else:
        rows = client.execute(ACCOUNT_MEMBERS_SQL, params)
        members = [AccountMember(domain, name, leads, int(score), last_seen)
                   for domain, name, leads, score, last_seen, _ in rows[:limit]]
    more = len(rows) > limit
    next_cursor = encode_cursor(sort, rows[limit - 1][-1], rows[limit - 1][0]) if more else None
    return MembersPage(tuple(members), next_cursor)


def lead_members(rows: Iterable[tuple], channels: dict[str, tuple[str, str]]) -> Iterator[LeadMember]:
    """LEAD_MEMBERS_SQL's rows as members, with their (first, last) channels."""
    for lead_id, email, account_domain, tags, score, last_seen_ms, _ in rows:
        first_channel, last_channel = channels.get(lead_id, ("", ""))
        yield LeadMember(lead_id, email or f"Anonymous lead {lead_id[-6:]}", email, bool(email), account_domain,
                         int(score), tuple(tags), last_seen_ms, first_channel, last_channel)


def member_channels(client: QueryClient, site_id: str, lead_ids: list[str]) -> dict[str, tuple[str, str]]:
    """lead id -> (channel of its first session, of its latest), for the leads that have sessions."""
    if not lead_ids:
        return {}
    links = client.execute(ACCOUNT_LINKS_SQL, {"site_id": site_id, "lead_ids": tuple(lead_ids)})
    owned = ownership_by_lead(links, set(lead_ids))
    if not any(owned.values()):
        return {}
    return {lead_id: (first, last) for lead_id, first, last in
            client.execute(MEMBER_CHANNELS_SQL, {"site_id": site_id}, external_tables=[owned_table(owned)])}


# ---------------------------------------------------------------------------------------------- CSV

LEAD_CSV_HEADER = ("lead_id", "name", "email", "known", "account", "score", "tags", "last_seen", "first_channel",
                   "last_channel")
ACCOUNT_CSV_HEADER = ("domain", "company_name", "leads", "score", "last_seen")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """A value as a CSV cell a spreadsheet will not run: text starting like a formula gets a leading `'`
    (emails, tags and company names come from visitors and forms)."""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_row(member: Member) -> tuple[str, ...]:
    """A member as a row under LEAD_CSV_HEADER or ACCOUNT_CSV_HEADER; times as UTC ISO 8601 ('' for never)."""
    if isinstance(member, LeadMember):
        values: tuple[Any, ...] = (member.lead_id, member.name, member.email, str(member.known).lower(),
                                   member.account_domain, member.score, "; ".join(member.tags),
                                   iso_time(member.last_seen_ms), member.first_channel, member.last_channel)
    else:
        values = (member.domain, member.company_name, member.leads, member.score, iso_time(member.last_seen_ms))
    return tuple(csv_cell(value) for value in values)


def iso_time(ms: int) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
