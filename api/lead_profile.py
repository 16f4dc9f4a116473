"""Lead Profile and Account Panel read models: who a lead (or an account) is, where they came from, and
their click-stream 5 sessions at a time.

Read straight from ClickHouse in five queries, each narrowed by a primary key, so that a profile costs
the same on a site of any size:
1. `LEAD_SQL`: the lead (a lead id that was merged away resolves to the surviving lead); then
   `ACCOUNT_SIZE_SQL`: how many current leads its account has.
2. `LEAD_LINKS_SQL`: every visitor -> lead row of the visitors that point to the lead. A visitor belongs
   to a lead from its row's `since_ts_ms` until the visitor's next row (a shared computer that identified
   as a second contact has two rows), so ownership is a set of time intervals per visitor.
3. `SESSIONS_PAGE_SQL`: of the sessions that overlap one of those intervals, the count, the first and the
   last touch, and one page, cut in SQL: a lead may have thousands of visitors and tens of thousands of
   sessions. The intervals travel as the external table `owned` (OWNED_TABLE), not inlined in the SQL text,
   which ClickHouse caps at max_query_size (256 KiB).
4. `EVENTS_SQL`: the events of the page's sessions, by (site_id, visitor_id, ts_ms) range; each session
   shows the events inside its time span and inside the lead's ownership.
Everything between the queries is pure Python over their rows, so it is tested without a server.

The searches across the tables' keys ("the visitors of a lead", "the leads of an account") go through the
lookup tables `visitors_by_lead` and `leads_by_account` (migration 0008), keyed by lead and by account:
reading the whole site's rows instead put the profile's p99 over its 50 ms target at 10 M events, and grew
with the site.

The Account Panel (a LeadBoard card of an account) runs the same steps over the account's leads:
`MANUAL_ACCOUNT_SQL` (the name it was added under by hand), `ACCOUNT_TOTALS_SQL` (how many leads, known and
anonymous, and when they were active), `ACCOUNT_LEADS_SQL` (the most recently active ones, at most
`max_leads`: an account of a large company may have tens of thousands), `ACCOUNT_LINKS_SQL` (the links of
every visitor that ever pointed to one of those leads), then the same sessions and events queries. Each
listed lead's activity (first and last channel, sessions, events: `LEAD_ACTIVITY_SQL`, over the same
ownership) and standing (score and tags: `LEAD_STANDINGS_SQL`) come with it, so that a salesperson sees
who to open first. Its company card (schemas/companies.py) comes from Redis, passed in by the caller; where
the account's people browse from is `account_places` (`ACCOUNT_PLACES_SQL`) and through which networks
`account_networks` (`ACCOUNT_NETWORKS_SQL`).

The profile collapses row versions with argMax(column, version) ... GROUP BY key, not FINAL: a point
lookup reads a whole 8192-row granule per visitor, and ClickHouse 18.16 runs FINAL over every row read
before filtering, while argMax only aggregates the rows the WHERE clause keeps (2.5-4x faster, measured).

Every SQL text is a module-level constant: docs/queries.md quotes them, and its test checks they match.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from textwrap import fill, indent
from typing import Any, Collection, Iterable, Literal, Protocol, Sequence

from schemas.companies import Company

PAGE_SIZE = 5
MAX_ACCOUNT_LEADS = 1_000  # the default of setting api_max_account_leads
FOREVER_MS = 2**64 - 1  # open end of a visitor's last ownership interval (UInt64 max, as in the SQL)


class QueryClient(Protocol):
    """The part of clickhouse_driver.Client used here (tests pass a chdb-backed stand-in).

    `external_tables`: [{"name", "structure": [(column, type), ...], "data": [{column: value}, ...]}], sent
    beside the query as tables it can read."""

    def execute(
        self, query: str, params: dict[str, Any] | None = None, external_tables: list[dict] | None = None
    ) -> list[tuple]: ...


@dataclass(frozen=True, slots=True)
class Identity:
    """`merged_from` is the requested lead id when it had been merged into `lead_id`, else ''."""

    lead_id: str
    email: str
    known: bool
    visitors: tuple[str, ...]
    merged_from: str
    first_seen_ms: int
    last_seen_ms: int


@dataclass(frozen=True, slots=True)
class Account:
    domain: str
    other_leads: int


@dataclass(frozen=True, slots=True)
class Touch:
    """How the lead arrived in its first (or latest) session, across all of its visitors."""

    ts_ms: int
    channel: str
    referrer: str
    utm_source: str
    utm_medium: str
    utm_campaign: str
    landing_url: str
    visitor_id: str
    session_id: str


@dataclass(frozen=True, slots=True)
class ProfileEvent:
    ts_ms: int
    type: str
    url: str
    title: str
    name: str


@dataclass(frozen=True, slots=True)
class ProfileSession:
    """A session as SESSIONS_SQL selects it (its columns are these fields, in order) plus its events."""

    session_id: str
    visitor_id: str
    session_index: int
    start_ms: int
    end_ms: int
    duration_ms: int
    event_count: int
    pageview_count: int
    landing_url: str
    exit_url: str
    referrer: str
    channel: str
    utm_source: str
    utm_medium: str
    utm_campaign: str
    device: str
    browser: str
    os: str
    events: tuple[ProfileEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class LeadProfile:
    """The Lead Profile page; JSON-ready: orjson.dumps serialises it as it is."""

    identity: Identity
    account: Account | None
    first_touch: Touch | None
    last_touch: Touch | None
    session_count: int
    page: int
    page_size: int
    sessions: tuple[ProfileSession, ...]
    has_more: bool


@dataclass(frozen=True, slots=True)
class AccountLead:
    lead_id: str
    email: str
    known: bool
    visitor_count: int
    first_seen_ms: int
    last_seen_ms: int


Activity = tuple[str, str, int, int]  # a lead's first channel, last channel, sessions, events
Standing = tuple[int, tuple[str, ...]]  # a lead's score and tags


@dataclass(frozen=True, slots=True)
class PanelLead(AccountLead):
    """A lead as the Account Panel lists it: who (AccountLead), what it did over its whole ownership (the
    channel of its first and of its latest session, its sessions, the events in them) and where it stands
    (its score, 0..100, and its tags, as its Lead Profile shows them)."""

    first_channel: str = ""
    last_channel: str = ""
    session_count: int = 0
    event_count: int = 0
    score: int = 0
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AccountSession(ProfileSession):
    """A session of an account's click-stream, with the lead it belongs to."""

    lead_id: str = ""

    @classmethod
    def of(cls, session: ProfileSession, lead_id: str) -> "AccountSession":
        return cls(**{f.name: getattr(session, f.name) for f in fields(session)}, lead_id=lead_id)


@dataclass(frozen=True, slots=True)
class Place:
    """Where some of an account's people browse from (their events' geo fields), and how many."""

    country: str
    region: str
    city: str
    visitors: int
    events: int


@dataclass(frozen=True, slots=True)
class Network:
    """A network some of an account's people browse from (their events' network fields: the organisation
    that holds the address and its kind, `business`, `isp`, `education`, ...), and how many."""

    org: str
    kind: str
    visitors: int
    events: int


@dataclass(frozen=True, slots=True)
class AccountDetails:
    """`added_ms` is when the account was last added by hand, 0 when it comes only from leads' evidence.
    `company_name` is the name it was added under, else its company card's; `company` is the card (name,
    industry, employees, country, website, LinkedIn and logo URLs), None when nobody loaded one. `places`
    and `networks`: where and through which networks its people browse (the most seen first); with the
    card's country, its location."""

    domain: str
    company_name: str
    added_ms: int
    known_leads: int
    anonymous_leads: int
    first_seen_ms: int
    last_seen_ms: int
    company: Company | None = None
    places: tuple[Place, ...] = ()
    networks: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class AccountPanel:
    """The Account Panel of a LeadBoard card; JSON-ready like LeadProfile."""

    account: AccountDetails
    leads: tuple[PanelLead, ...]
    session_count: int
    page: int
    page_size: int
    sessions: tuple[AccountSession, ...]
    has_more: bool


# Each profile query reads a few granules: let them come from ClickHouse's cache of decompressed blocks
# (off by default, meant for short queries like these; measured ~25% faster on 10 M events).
# The session and event queries filter in PREWHERE: 18.16 does not move an IN condition there by itself,
# and reading the wide columns only for the rows that pass made them 25-40% faster (10 M events).
_SHORT_QUERY = "SETTINGS use_uncompressed_cache = 1"

_CURRENT_LEAD_ID = """SELECT if(argMax(merged_into, version) = '', lead_id, argMax(merged_into, version))
FROM leads
WHERE site_id = %(site_id)s AND lead_id = %(lead_id)s
GROUP BY lead_id"""

LEAD_SQL = f"""SELECT lead_id, argMax(email, version), argMax(account_domain, version),
       argMax(first_ts_ms, version), argMax(last_ts_ms, version)
FROM leads
WHERE site_id = %(site_id)s AND lead_id IN (
{indent(_CURRENT_LEAD_ID, ' ' * 4)}
)
GROUP BY lead_id
{_SHORT_QUERY}"""

# The current leads of account %(domain)s (the ones not merged away), from the account-keyed lookup.
_ACCOUNT_LEAD_IDS = """SELECT lead_id
FROM leads_by_account
WHERE site_id = %(site_id)s AND account_domain = %(domain)s
GROUP BY lead_id
HAVING argMax(merged_into, version) = ''"""

ACCOUNT_SIZE_SQL = f"""SELECT count()
FROM (
{indent(_ACCOUNT_LEAD_IDS, ' ' * 4)}
)
{_SHORT_QUERY}"""

LEAD_LINKS_SQL = f"""SELECT visitor_id, since_ts_ms, argMax(lead_id, version) AS owner
FROM visitor_leads
WHERE site_id = %(site_id)s
  AND visitor_id IN (SELECT visitor_id FROM visitors_by_lead WHERE site_id = %(site_id)s AND lead_id = %(lead_id)s)
GROUP BY visitor_id, since_ts_ms
ORDER BY visitor_id, since_ts_ms
{_SHORT_QUERY}"""

OWNED_TABLE = "owned"  # the external table of ownership intervals: one row per (lead, visitor, interval)
OWNED_STRUCTURE = [("lead_id", "String"), ("visitor_id", "String"), ("since_ts_ms", "UInt64"),
                   ("until_ts_ms", "UInt64")]

SESSION_COLUMNS = tuple(f.name for f in fields(ProfileSession) if f.name != "events")
_SESSION_KEY = ("session_id", "visitor_id", "start_ms")  # start_ms never changes for a session id


def _latest(column: str) -> str:
    """A session column as the owned-sessions subquery names it: its newest version's value (a distinct
    alias: `argMax(c, version) AS c` would make `c` refer to itself)."""
    return column if column in _SESSION_KEY else f"latest_{column}"


_LATEST_SESSION = ",\n           ".join(
    f"argMax({c}, version) AS {_latest(c)}" for c in SESSION_COLUMNS if c not in _SESSION_KEY)
_NEWEST_FIRST = f"s -> (tupleElement(s, {SESSION_COLUMNS.index('start_ms') + 1}), " \
                f"tupleElement(s, {SESSION_COLUMNS.index('session_id') + 1}))"  # a key for arrayReverseSort
# Of the sessions that overlap one of the intervals of `owned` (sessions superseded by a merge left out):
# how many, the oldest and the newest (the first and the last touch) and page %(offset)s / %(page_size)s of
# them sorted newest first. `session` is the whole row as a tuple, named where it first appears. One query,
# so the sessions' granules are read once: a second one for the totals cost as much again, and 18.16 has no
# window functions to count beside a LIMIT.
# The join gives a row for each interval a session overlaps: a session on a shared computer that changed
# hands twice during it overlaps two, hence uniqExact and groupUniqArray. (arrayExists over per-visitor
# arrays of intervals would need no deduplication, but ClickHouse 18.16 overlooks the columns a lambda
# reads when it prunes a subquery's columns.)
SESSIONS_PAGE_SQL = f"""SELECT uniqExact(visitor_id, session_id),
       argMin((
{fill(', '.join(_latest(c) for c in SESSION_COLUMNS), 100, initial_indent=' ' * 11, subsequent_indent=' ' * 11)}
       ) AS session, (start_ms, session_id)),
       argMax(session, (start_ms, session_id)),
       arraySlice(arrayReverseSort({_NEWEST_FIRST}, groupUniqArray(session)),
                  %(offset)s + 1, %(page_size)s)
FROM (
    SELECT {', '.join(_SESSION_KEY)},
           {_LATEST_SESSION}
    FROM sessions
    PREWHERE site_id = %(site_id)s AND visitor_id IN (SELECT visitor_id FROM {OWNED_TABLE})
    GROUP BY {', '.join(_SESSION_KEY)}
    HAVING argMax(merged_into, version) = ''
) AS lead_sessions
ALL INNER JOIN (SELECT visitor_id, since_ts_ms, until_ts_ms FROM {OWNED_TABLE}) AS ownership USING visitor_id
WHERE since_ts_ms <= latest_end_ms AND start_ms < until_ts_ms
{_SHORT_QUERY}"""

# Per lead of `owned`: its sessions (those that overlap one of its intervals), the events in them, and the
# channel of its first and of its latest session. The inner GROUP BY counts a session once per lead however
# many of the lead's intervals it overlaps (a shared computer that changed hands during it).
LEAD_ACTIVITY_SQL = f"""SELECT lead_id, count() AS session_count, sum(events) AS event_count,
       argMin(channel, (start_ms, session_id)) AS first_channel,
       argMax(channel, (start_ms, session_id)) AS last_channel
FROM (
    SELECT lead_id, visitor_id, session_id, start_ms, any(latest_event_count) AS events,
           any(latest_channel) AS channel
    FROM (
        SELECT session_id, visitor_id, start_ms, argMax(end_ms, version) AS latest_end_ms,
               argMax(event_count, version) AS latest_event_count, argMax(channel, version) AS latest_channel
        FROM sessions
        PREWHERE site_id = %(site_id)s AND visitor_id IN (SELECT visitor_id FROM {OWNED_TABLE})
        GROUP BY session_id, visitor_id, start_ms
        HAVING argMax(merged_into, version) = ''
    ) AS lead_sessions
    ALL INNER JOIN (SELECT lead_id, visitor_id, since_ts_ms, until_ts_ms FROM {OWNED_TABLE}) AS ownership
    USING visitor_id
    WHERE since_ts_ms <= latest_end_ms AND start_ms < until_ts_ms
    GROUP BY lead_id, visitor_id, session_id, start_ms
)
GROUP BY lead_id
{_SHORT_QUERY}"""

# The score and tags of leads %(lead_ids)s, as the Lead Profile shows them (api.automation_queries.lead_state).
LEAD_STANDINGS_SQL = f"""SELECT lead_id, argMax(score, version), argMax(tags, version)
FROM lead_state
WHERE site_id = %(site_id)s AND lead_id IN %(lead_ids)s
GROUP BY lead_id
{_SHORT_QUERY}"""

# Events stored for analytics only (no marketing consent: may_identify = 0) are not a lead's behaviour.
EVENTS_SQL = f"""SELECT visitor_id, ts_ms, type, url, title, name
FROM events
PREWHERE site_id = %(site_id)s AND visitor_id IN %(visitors)s AND ts_ms >= %(from_ms)s AND ts_ms <= %(to_ms)s
WHERE may_identify = 1
ORDER BY ts_ms, event_id
{_SHORT_QUERY}"""

# Where an account's people browse from: the geo fields of its current leads' visitors' events, the
# places with the most visitors first. Bots, events whose address had no location and events without
# marketing consent are left out.
ACCOUNT_PLACES_SQL = f"""SELECT geo_country, geo_region, geo_city, uniqExact(visitor_id) AS visitors, count() AS events
FROM events
PREWHERE site_id = %(site_id)s AND visitor_id IN (
    SELECT visitor_id FROM visitors_by_lead
    WHERE site_id = %(site_id)s AND lead_id IN (
{indent(_ACCOUNT_LEAD_IDS, ' ' * 8)}))
WHERE geo_country != '' AND is_bot = 0 AND may_identify = 1
GROUP BY geo_country, geo_region, geo_city
ORDER BY visitors DESC, events DESC, geo_country, geo_region, geo_city
LIMIT 5
{_SHORT_QUERY}"""

# Through which networks an account's people browse: the organisation that holds their addresses and its
# kind, the one with the most visitors first; the same events as ACCOUNT_PLACES_SQL.
ACCOUNT_NETWORKS_SQL = f"""SELECT network_org, network_kind, uniqExact(visitor_id) AS visitors, count() AS events
FROM events
PREWHERE site_id = %(site_id)s AND visitor_id IN (
    SELECT visitor_id FROM visitors_by_lead
    WHERE site_id = %(site_id)s AND lead_id IN (
{indent(_ACCOUNT_LEAD_IDS, ' ' * 8)}))
WHERE network_org != '' AND is_bot = 0 AND may_identify = 1
GROUP BY network_org, network_kind
ORDER BY visitors DESC, events DESC, network_org, network_kind
LIMIT 10
{_SHORT_QUERY}"""

ACCOUNT_LEADS_SQL = f"""SELECT lead_id, argMax(email, version), argMax(visitor_count, version),
       argMax(first_ts_ms, version), argMax(last_ts_ms, version) AS latest_last_ts_ms
FROM leads
WHERE site_id = %(site_id)s AND lead_id IN (
{indent(_ACCOUNT_LEAD_IDS, ' ' * 4)}
)
GROUP BY lead_id
ORDER BY latest_last_ts_ms DESC, lead_id
LIMIT %(limit)s"""

# One row, also for an account without leads (no GROUP BY): its known and its anonymous leads, when they
# were first and last active.
ACCOUNT_TOTALS_SQL = f"""SELECT countIf(latest_email != ''), countIf(latest_email = ''), min(latest_first_ts_ms),
       max(latest_last_ts_ms)
FROM (
    SELECT lead_id, argMax(email, version) AS latest_email, argMax(first_ts_ms, version) AS latest_first_ts_ms,
           argMax(last_ts_ms, version) AS latest_last_ts_ms
    FROM leads
    WHERE site_id = %(site_id)s AND lead_id IN (
{indent(_ACCOUNT_LEAD_IDS, ' ' * 8)}
    )
    GROUP BY lead_id
)"""

# No GROUP BY: always one row ('' and 0 for an account never added by hand).
MANUAL_ACCOUNT_SQL = """SELECT argMax(company_name, added_ms), max(added_ms)
FROM manual_accounts
WHERE site_id = %(site_id)s AND domain = %(domain)s"""

ACCOUNT_LINKS_SQL = f"""SELECT visitor_id, since_ts_ms, argMax(lead_id, version) AS owner
FROM visitor_leads
WHERE site_id = %(site_id)s
  AND visitor_id IN (SELECT visitor_id FROM visitors_by_lead WHERE site_id = %(site_id)s AND lead_id IN %(lead_ids)s)
GROUP BY visitor_id, since_ts_ms
ORDER BY visitor_id, since_ts_ms
{_SHORT_QUERY}"""

# Visitor ownership intervals as rows, for whole-site queries (the profile computes them in Python, see
# `ownership`). Pasted into lead-level queries as a subquery: ClickHouse 18.16 has no CTEs.
OWNERSHIP_SQL = """SELECT visitor_id, lead_id, since_ts_ms, until_ts_ms
FROM (
    SELECT visitor_id,
           arraySort(groupArray((since_ts_ms, lead_id))) AS links,
           arrayMap(link -> tupleElement(link, 1), links) AS starts
    FROM visitor_leads FINAL
    WHERE site_id = %(site_id)s
    GROUP BY visitor_id
)
ARRAY JOIN
    arrayMap(link -> tupleElement(link, 2), links) AS lead_id,
    arrayPushFront(arrayPopFront(starts), toUInt64(0)) AS since_ts_ms,
    arrayPushBack(arrayPopFront(starts), toUInt64(18446744073709551615)) AS until_ts_ms"""

LEADS_BY_CHANNEL_SQL = f"""SELECT channel,
       countIf(touch = 'first') AS first_touch_leads,
       countIf(touch = 'last') AS last_touch_leads
FROM (
    SELECT lead_id,
           argMin(channel, (start_ms, session_id)) AS first_channel,
           argMax(channel, (start_ms, session_id)) AS last_channel
    FROM (
        SELECT visitor_id, session_id, start_ms, channel FROM sessions FINAL
        WHERE site_id = %(site_id)s AND merged_into = '' AND is_bot = 0
    ) AS lead_sessions
    ALL INNER JOIN (
{indent(OWNERSHIP_SQL, ' ' * 8)}
    ) AS ownership USING visitor_id
    WHERE start_ms >= since_ts_ms AND start_ms < until_ts_ms AND lead_id IN (
        SELECT lead_id FROM leads FINAL
        WHERE site_id = %(site_id)s AND merged_into = '' AND (email != '' OR account_domain != '')
    )
    GROUP BY lead_id
)
ARRAY JOIN [first_channel, last_channel] AS channel, ['first', 'last'] AS touch
GROUP BY channel
ORDER BY first_touch_leads DESC, channel"""

Intervals = dict[str, list[tuple[int, int]]]


def ownership(links: Iterable[tuple[str, int, str]], lead_id: str) -> Intervals:
    """Per visitor, the [since, until) intervals in which it belongs to `lead_id`.

    `links` are (visitor_id, since_ts_ms, lead_id) sorted by visitor, then since. A visitor's first link
    starts at 0: whatever it did before it was first linked is the same person's history.
    """
    return ownership_by_lead(links, {lead_id}).get(lead_id, {})


def ownership_by_lead(links: Iterable[tuple[str, int, str]], lead_ids: Collection[str]) -> dict[str, Intervals]:
    """`ownership` for several leads at once (an account's), in one pass over the links."""
    by_visitor: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for visitor_id, since_ts_ms, owner in links:
        by_visitor[visitor_id].append((since_ts_ms, owner))
    owned: dict[str, Intervals] = defaultdict(dict)
    for visitor_id, rows in by_visitor.items():
        for i, (since, owner) in enumerate(rows):
            if owner not in lead_ids:
                continue
            start = 0 if i == 0 else since
            until = rows[i + 1][0] if i + 1 < len(rows) else FOREVER_MS
            intervals = owned[owner].setdefault(visitor_id, [])
            if intervals and intervals[-1][1] == start:  # consecutive links to the same lead
                start = intervals.pop()[0]
            intervals.append((start, until))
    return dict(owned)


def owned_table(owned_by_lead: dict[str, Intervals]) -> dict:
    """Leads' ownership intervals as the external table OWNED_TABLE, one row per (lead, visitor, interval)."""
    rows = [{"lead_id": lead_id, "visitor_id": visitor_id, "since_ts_ms": since, "until_ts_ms": until}
            for lead_id, owned in sorted(owned_by_lead.items())
            for visitor_id, intervals in sorted(owned.items()) for since, until in intervals]
    return {"name": OWNED_TABLE, "structure": OWNED_STRUCTURE, "data": rows}


def attach_events(
    page: Sequence[ProfileSession], event_rows: Iterable[Sequence], owned: Intervals
) -> tuple[ProfileSession, ...]:
    """Each session of the page with its events: same visitor, inside the session's time span and inside
    the lead's ownership (on a shared computer, part of a session may be another contact's)."""
    timelines: dict[str, list[tuple[int, ProfileEvent]]] = defaultdict(list)
    for visitor_id, ts_ms, type_, url, title, name in event_rows:  # ordered by ts_ms
        if any(since <= ts_ms < until for since, until in owned.get(visitor_id, ())):
            timelines[visitor_id].append((ts_ms, ProfileEvent(ts_ms, type_, url, title, name)))
    filled = []
    for session in page:
        timeline = timelines.get(session.visitor_id, [])
        times = [ts for ts, _ in timeline]
        first, last = bisect_left(times, session.start_ms), bisect_right(times, session.end_ms)
        filled.append(replace(session, events=tuple(event for _, event in timeline[first:last])))
    return tuple(filled)


def _touch(s: ProfileSession) -> Touch:
    return Touch(s.start_ms, s.channel, s.referrer, s.utm_source, s.utm_medium, s.utm_campaign, s.landing_url,
                 s.visitor_id, s.session_id)


@dataclass(frozen=True, slots=True)
class ClickStream:
    """One page of the sessions an ownership covers (newest first, with their events), and the count and
    first / last touch of all of them."""

    session_count: int
    first_touch: Touch | None
    last_touch: Touch | None
    sessions: tuple[ProfileSession, ...]


_NO_SESSIONS = ClickStream(0, None, None, ())


def _click_stream(client: QueryClient, site_id: str, owned_by_lead: dict[str, Intervals], page: int,
                  page_size: int) -> ClickStream:
    owned = merge_intervals(owned_by_lead)
    if not owned:
        return _NO_SESSIONS
    params = {"site_id": site_id, "offset": page * page_size, "page_size": page_size}
    count, oldest, newest, page_rows = client.execute(
        SESSIONS_PAGE_SQL, params, external_tables=[owned_table(owned_by_lead)])[0]
    if not count:
        return _NO_SESSIONS
    first_touch, last_touch = _touch(ProfileSession(*oldest)), _touch(ProfileSession(*newest))
    page_sessions = [ProfileSession(*row) for row in page_rows]
    if not page_sessions:
        return ClickStream(count, first_touch, last_touch, ())
    events = client.execute(EVENTS_SQL, {
        "site_id": site_id,
        "visitors": tuple(sorted({s.visitor_id for s in page_sessions})),
        "from_ms": min(s.start_ms for s in page_sessions),
        "to_ms": max(s.end_ms for s in page_sessions),
    })
    return ClickStream(count, first_touch, last_touch, attach_events(page_sessions, events, owned))


def _check_page(page: int, page_size: int) -> None:
    if page < 0 or page_size < 1:
        raise ValueError("page must be >= 0 and page_size >= 1")


def lead_profile(
    client: QueryClient, site_id: str, lead_id: str, page: int = 0, page_size: int = PAGE_SIZE
) -> LeadProfile | None:
    """The profile of `lead_id` (or of the lead it was merged into) with sessions page `page`, newest
    first; None if the site has no such lead."""
    _check_page(page, page_size)
    lead_rows = client.execute(LEAD_SQL, {"site_id": site_id, "lead_id": lead_id})
    if not lead_rows:
        return None
    current_id, email, domain, first_seen_ms, last_seen_ms = lead_rows[0]
    account = Account(domain, max(account_size(client, site_id, domain) - 1, 0)) if domain else None
    owned = ownership(client.execute(LEAD_LINKS_SQL, {"site_id": site_id, "lead_id": current_id}), current_id)
    stream = _click_stream(client, site_id, {current_id: owned}, page, page_size)
    return LeadProfile(
        identity=Identity(current_id, email, bool(email), tuple(sorted(owned)),
                          lead_id if lead_id != current_id else "", first_seen_ms, last_seen_ms),
        account=account,
        first_touch=stream.first_touch,
        last_touch=stream.last_touch,
        session_count=stream.session_count,
        page=page,
        page_size=page_size,
        sessions=stream.sessions,
        has_more=stream.session_count > (page + 1) * page_size,
    )


def merge_intervals(owned_by_lead: dict[str, Intervals]) -> Intervals:
    """The union of several leads' ownership (disjoint: a visitor belongs to one lead at a time)."""
    merged: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for owned in owned_by_lead.values():
        for visitor_id, intervals in owned.items():
            merged[visitor_id].extend(intervals)
    return {visitor_id: sorted(intervals) for visitor_id, intervals in merged.items()}


def session_owner(session: ProfileSession, owned_by_lead: dict[str, Intervals]) -> str:
    """The lead that owned the session's visitor when the session started; on a shared computer that
    changed hands before that, the first lead whose ownership the session overlaps."""
    candidates = [(lead_id, owned.get(session.visitor_id, ())) for lead_id, owned in sorted(owned_by_lead.items())]
    for lead_id, intervals in candidates:
        if any(since <= session.start_ms < until for since, until in intervals):
            return lead_id
    for lead_id, intervals in candidates:
        if any(since <= session.end_ms and session.start_ms < until for since, until in intervals):
            return lead_id
    return ""


def account_panel(
    client: QueryClient, site_id: str, domain: str, page: int = 0, page_size: int = PAGE_SIZE,
    max_leads: int = MAX_ACCOUNT_LEADS, company: Company | None = None,
) -> AccountPanel:
    """The account `domain`: how it was added, its company card (`company`, read from Redis by the caller),
    how many current leads it has (known contacts and anonymous employees), the `max_leads` most recently
    active of them and their click-stream merged, page `page` of 5 sessions, newest first. An account nobody
    has visited from yet (added by hand) has no leads and no sessions."""
    _check_page(page, page_size)
    company_name, added_ms = hand_added_account(client, site_id, domain)
    company_name = company_name or (company.name if company is not None else "")
    known, anonymous, first_seen_ms, last_seen_ms = client.execute(
        ACCOUNT_TOTALS_SQL, {"site_id": site_id, "domain": domain})[0]
    leads = account_leads(client, site_id, domain, max_leads) if known + anonymous else []
    lead_ids = tuple(lead.lead_id for lead in leads)
    links = client.execute(ACCOUNT_LINKS_SQL, {"site_id": site_id, "lead_ids": lead_ids}) if leads else []
    owned_by_lead = ownership_by_lead(links, set(lead_ids))
    stream = _click_stream(client, site_id, owned_by_lead, page, page_size)
    places, networks = (account_places(client, site_id, domain), account_networks(client, site_id, domain)
                        ) if leads else ((), ())
    return AccountPanel(
        account=AccountDetails(domain, company_name, added_ms, known, anonymous, first_seen_ms, last_seen_ms,
                               company, places, networks),
        leads=panel_leads(leads, lead_activity(client, site_id, owned_by_lead),
                          lead_standings(client, site_id, lead_ids)),
        session_count=stream.session_count,
        page=page,
        page_size=page_size,
        sessions=tuple(AccountSession.of(s, session_owner(s, owned_by_lead)) for s in stream.sessions),
        has_more=stream.session_count > (page + 1) * page_size,
    )


def hand_added_account(client: QueryClient, site_id: str, domain: str) -> tuple[str, int]:
    """(company name, added_ms) of an account added by hand; ('', 0) if it never was."""
    company_name, added_ms = client.execute(MANUAL_ACCOUNT_SQL, {"site_id": site_id, "domain": domain})[0]
    return company_name, added_ms


def account_places(client: QueryClient, site_id: str, domain: str) -> tuple[Place, ...]:
    """The (at most 5) places account `domain`'s people browse from, most visitors first; () when none of
    their addresses had a location. With the card's `country` this is the account's location."""
    return tuple(Place(*row) for row in client.execute(ACCOUNT_PLACES_SQL, {"site_id": site_id, "domain": domain}))


def account_networks(client: QueryClient, site_id: str, domain: str) -> tuple[Network, ...]:
    """The (at most 10) networks account `domain`'s people browse through, most visitors first."""
    return tuple(Network(*row) for row in client.execute(ACCOUNT_NETWORKS_SQL, {"site_id": site_id, "domain": domain}))


def lead_activity(client: QueryClient, site_id: str, owned_by_lead: dict[str, Intervals]) -> dict[str, Activity]:
    """Each lead's activity over its ownership; leads without a session are left out."""
    if not any(owned_by_lead.values()):
        return {}
    rows = client.execute(LEAD_ACTIVITY_SQL, {"site_id": site_id}, external_tables=[owned_table(owned_by_lead)])
    return {lead_id: (first, last, sessions, events) for lead_id, sessions, events, first, last in rows}


def lead_standings(client: QueryClient, site_id: str, lead_ids: Collection[str]) -> dict[str, Standing]:
    """(score, tags) of each of `lead_ids` that a rule has touched."""
    if not lead_ids:
        return {}
    rows = client.execute(LEAD_STANDINGS_SQL, {"site_id": site_id, "lead_ids": tuple(lead_ids)})
    return {lead_id: (int(score), tuple(tags)) for lead_id, score, tags in rows}


def panel_leads(leads: Iterable[AccountLead], activity: dict[str, Activity], standings: dict[str, Standing]
                ) -> tuple[PanelLead, ...]:
    """The listed leads, in their order, each with its activity and standing (none yet: zeros and no tags)."""
    return tuple(PanelLead(*(getattr(lead, f.name) for f in fields(lead)), *activity.get(lead.lead_id, ("", "", 0, 0)),
                           *standings.get(lead.lead_id, (0, ()))) for lead in leads)


def account_size(client: QueryClient, site_id: str, domain: str) -> int:
    """How many current leads account `domain` has."""
    return client.execute(ACCOUNT_SIZE_SQL, {"site_id": site_id, "domain": domain})[0][0]


def account_leads(client: QueryClient, site_id: str, domain: str, limit: int = MAX_ACCOUNT_LEADS) -> list[AccountLead]:
    """An account's current leads, the `limit` most recently active, most recently active first."""
    rows = client.execute(ACCOUNT_LEADS_SQL, {"site_id": site_id, "domain": domain, "limit": limit})
    return [AccountLead(lead, email, bool(email), visitors, first, last) for lead, email, visitors, first, last in rows]


def leads_by_channel(client: QueryClient, site_id: str, touch: Literal["first", "last"] = "first") -> dict[str, int]:
    """How many current leads (known, or with an account: other visitors are not leads) each channel brought,
    by the channel of their first (or latest) session, largest first."""
    if touch not in ("first", "last"):
        raise ValueError("touch must be 'first' or 'last'")
    column = 1 if touch == "first" else 2
    rows = sorted(client.execute(LEADS_BY_CHANNEL_SQL, {"site_id": site_id}), key=lambda r: (-r[column], r[0]))
    return {row[0]: row[column] for row in rows if row[column]}
