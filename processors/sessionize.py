"""Sessionizer core: one visitor's events -> session upserts, with Kafka Streams / Flink session-window rules.

Pure and deterministic: no I/O and no clock; the adapter passes the time in and stores the state.
All times are event time in epoch milliseconds.

- Two events share a session when the gap between them is at most the site's `inactivity_ms`, whatever
  order they arrive in: an event inside or near an open session joins it (possibly extending it
  backwards) and an event that bridges two open sessions merges them.
- A session is closed (final) once the horizon - the visitor's watermark (max ts seen) or the caller's
  `now_ms` - reaches `end + inactivity + grace`. Closed history never changes: an event at or before
  `end + inactivity` of the last closed session would touch it, so it is LATE (in no session, id "").
- An event whose event_id the visitor already had is a DUPLICATE: flagged, counted once, whether its
  session is open or closed. The state remembers the ids of the visitor's last `dedup_max_ids` accepted
  events (by event time) within `dedup_window_ms` of its newest one, and no others, so a visitor's state
  stays bounded however many events it sends. A copy of an event it no longer remembers is taken as a
  new event (late, if its session has closed).
- A session's id hashes (site, visitor, earliest (ts, event_id)), so it does not depend on arrival
  order. When it changes, the old id is emitted once more as a tombstone (`merged_into` = new id); the
  state keeps each open session's former ids so every tombstone always points at a current id.
- `version` counts changes, not emissions: +1 per event step that changes a session (new data, new
  index or previous id) and +1 on close. So the same events give the same (id, version, row) whatever
  the batch split, and a replayed batch re-emits identical rows that collapse downstream.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, insort
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Mapping, Protocol, Sequence

import orjson

from schemas.session import Session

MINUTE_MS = 60_000
PAGEVIEW = "pageview"
_STATE_FORMAT = 2  # 1: each open session kept all its event ids (read, and converted, by load_state)

# Copied from the earliest event onto the session, in this order (unpacked in `_Run._record`).
_FIRST_TOUCH = (
    "referrer", "channel", "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content",
    "click_id_type", "click_id", "device", "browser", "os",
)  # fmt: skip
_first_touch = attrgetter(*_FIRST_TOUCH)
# Copied from the latest event carrying any of them, onto the Session's `<name>_last` fields.
_last_touch = attrgetter("utm_source", "utm_medium", "utm_campaign", "click_id")
_NO_LAST_TOUCH = ("", "", "", "")


class SessionInput(Protocol):
    """What the sessionizer reads of an enriched event (missing optional values are "")."""

    event_id: str
    site_id: str
    visitor_id: str
    type: str
    ts_ms: int
    url: str
    referrer: str
    channel: str
    utm_source: str
    utm_medium: str
    utm_campaign: str
    utm_term: str
    utm_content: str
    click_id_type: str
    click_id: str
    device: str
    browser: str
    os: str
    is_bot: bool
    email: str


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """`grace_ms`: how long after a session's inactivity timeout it still accepts out-of-order events.
    `dedup_window_ms` and `dedup_max_ids`: which of a visitor's event ids are remembered to catch a re-sent
    copy (at most that many, none older than the window before the visitor's newest event)."""

    inactivity_ms: int = 30 * MINUTE_MS
    grace_ms: int = 60 * MINUTE_MS
    dedup_window_ms: int = 24 * 60 * MINUTE_MS
    dedup_max_ids: int = 1000

    def __post_init__(self) -> None:
        if self.inactivity_ms <= 0 or self.grace_ms < 0 or self.dedup_window_ms < 0 or self.dedup_max_ids < 1:
            raise ValueError(f"need inactivity_ms > 0, grace_ms >= 0, dedup_window_ms >= 0 and dedup_max_ids >= 1,"
                             f" got {self}")

    @property
    def state_lifetime_ms(self) -> int:
        """How long after a visitor's newest event its state still matters for more than numbering: its
        last session may still take events, its ids still catch copies. A time to live on idle visitor
        state must not be shorter."""
        return self.inactivity_ms + self.grace_ms + self.dedup_window_ms


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """Per-site session settings, with a default for sites that have none."""

    default: SessionConfig = SessionConfig()
    sites: Mapping[str, SessionConfig] = field(default_factory=dict)

    def for_site(self, site_id: str) -> SessionConfig:
        return self.sites.get(site_id, self.default)


def _earliest(a: list | None, b: list | None) -> list | None:
    return a if b is None or (a is not None and a <= b) else b


def _latest(a: list | None, b: list | None) -> list | None:
    return a if b is None or (a is not None and a >= b) else b


@dataclass(slots=True)
class OpenSession:
    """Mergeable summary of an open session.

    Every slot is a list that starts with (ts, event_id), so "earliest" and "latest" are plain list
    comparisons and the summary is the same whatever order its events arrived or merged in.
    """

    session_id: str
    version: int
    end_ms: int
    event_count: int
    pageview_count: int
    is_bot: bool
    first: list  # [ts, event_id, url, [first-touch values]] of the earliest event; first[0] is the start
    landing: list | None  # [ts, event_id, url] of the earliest pageview
    exit: list | None  # [ts, event_id, url] of the latest pageview
    last_touch: list | None  # [ts, event_id, [last-touch values]] of the latest event carrying any
    email: list | None  # [ts, event_id, email] of the latest event with an email
    formers: list[list]  # [former id, its start_ms, its version]: ids superseded by this one

    @classmethod
    def from_event(cls, event: SessionInput, session_id: str) -> OpenSession:
        first = [event.ts_ms, event.event_id, event.url, list(_first_touch(event))]
        session = cls(session_id, 0, event.ts_ms, 0, 0, False, first, None, None, None, None, [])
        session.add(event)
        return session

    def add(self, event: SessionInput) -> None:
        ts, event_id = event.ts_ms, event.event_id
        self.event_count += 1
        if ts > self.end_ms:
            self.end_ms = ts
        first = self.first
        if ts < first[0] or (ts == first[0] and event_id < first[1]):
            self.first = [ts, event_id, event.url, list(_first_touch(event))]
        if event.type == PAGEVIEW:
            self.pageview_count += 1
            page = [ts, event_id, event.url]
            self.landing = _earliest(self.landing, page)
            self.exit = _latest(self.exit, page)
        touch = _last_touch(event)
        if any(touch):
            self.last_touch = _latest(self.last_touch, [ts, event_id, list(touch)])
        if event.email:
            self.email = _latest(self.email, [ts, event_id, event.email])
        if event.is_bot:
            self.is_bot = True

    def absorb(self, other: OpenSession) -> None:
        """Takes in the events of a session that starts later (its ids are the caller's business)."""
        self.event_count += other.event_count
        self.end_ms = max(self.end_ms, other.end_ms)
        self.pageview_count += other.pageview_count
        self.is_bot = self.is_bot or other.is_bot
        self.landing = _earliest(self.landing, other.landing)
        self.exit = _latest(self.exit, other.exit)
        self.last_touch = _latest(self.last_touch, other.last_touch)
        self.email = _latest(self.email, other.email)


@dataclass(slots=True)
class RecentIds:
    """The ids of a visitor's newest accepted events, [ts, event_id] ascending (so equal histories give
    equal bytes), with a set beside it for lookups. `forget` keeps it bounded both ways; applied after
    every event, it keeps exactly the newest `max_ids` of all ids ever added that are inside the window,
    whatever the batch split."""

    entries: list[list] = field(default_factory=list)
    ids: set[str] = field(default_factory=set, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.ids.update(event_id for _, event_id in self.entries)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self.ids

    def add(self, ts_ms: int, event_id: str) -> None:
        insort(self.entries, [ts_ms, event_id])
        self.ids.add(event_id)

    def forget(self, oldest_ms: int, max_ids: int) -> None:
        """Drop ids older than `oldest_ms`, then the oldest beyond `max_ids`."""
        entries = self.entries
        cut = max(bisect_left(entries, [oldest_ms]), len(entries) - max_ids)
        if cut > 0:
            self.ids.difference_update(event_id for _, event_id in entries[:cut])
            del entries[:cut]


@dataclass(slots=True)
class VisitorState:
    """All a visitor's sessionizer needs: its open sessions, a three-field summary of closed history and
    the ids of its recent events."""

    site_id: str
    visitor_id: str
    watermark_ms: int
    closed_count: int = 0
    last_closed_id: str = ""
    last_closed_end_ms: int = 0
    open: list[OpenSession] = field(default_factory=list)  # by start; gaps between them > inactivity
    recent: RecentIds = field(default_factory=RecentIds)


@dataclass(slots=True)
class SessionizeResult:
    """`session_ids`, `late` and `duplicate` are aligned with the events passed in."""

    state: VisitorState
    upserts: list[Session]
    session_ids: list[str]
    late: list[bool]
    duplicate: list[bool]


def session_id_for(site_id: str, visitor_id: str, ts_ms: int, event_id: str) -> str:
    """Deterministic id of the session whose earliest event is (ts_ms, event_id)."""
    key = f"{site_id}\x1f{visitor_id}\x1f{ts_ms}\x1f{event_id}".encode()
    return hashlib.blake2b(key, digest_size=8).hexdigest()


class _Run:
    """One call's work on a state: applies steps in place and remembers which ids changed."""

    __slots__ = ("state", "gap", "close_after", "dedup_window", "dedup_max_ids", "changed", "closed")

    def __init__(self, state: VisitorState, config: SessionConfig):
        self.state = state
        self.gap = config.inactivity_ms
        self.close_after = config.inactivity_ms + config.grace_ms
        self.dedup_window, self.dedup_max_ids = config.dedup_window_ms, config.dedup_max_ids
        self.changed: set[str] = set()
        self.closed: list[tuple[OpenSession, Session]] = []  # closed in this call, with their final record

    def close_expired(self, horizon: int) -> None:
        state = self.state
        while state.open and state.open[0].end_ms + self.close_after <= horizon:
            session = state.open.pop(0)
            session.version += 1
            self.changed.add(session.session_id)
            record = self._record(session, state.closed_count, state.last_closed_id, closed=True)
            self.closed.append((session, record))
            state.closed_count += 1
            state.last_closed_id = session.session_id
            state.last_closed_end_ms = session.end_ms

    def add(self, event: SessionInput) -> None:
        """Places an event that is neither late nor a duplicate."""
        sessions = self.state.open
        ts, gap = event.ts_ms, self.gap
        hits = [i for i, s in enumerate(sessions) if s.first[0] - gap <= ts <= s.end_ms + gap]
        if len(hits) == 1:  # the common case: joins one session and does not change its id
            session = sessions[hits[0]]
            first = session.first
            if ts > first[0] or (ts == first[0] and event.event_id > first[1]):
                session.add(event)
                self._bump(session)
                return
        links_before = {id(s): link for s, link in zip(sessions, self._links())}
        if hits:
            target = self._combine(sessions[hits[0] : hits[-1] + 1], event)
            sessions[hits[0] : hits[-1] + 1] = [target]
        else:
            target = self._combine([], event)
            sessions.insert(sum(1 for s in sessions if s.first[0] < ts), target)
        self._bump(target)
        for session, link in zip(sessions, self._links()):
            if session is not target and links_before[id(session)] != link:
                self._bump(session)

    def _combine(self, group: list[OpenSession], event: SessionInput) -> OpenSession:
        """Folds adjacent sessions and an event into one, under the id of the earliest event.

        Every id that stops being current becomes a former id of the result, and former ids that pointed
        at it are re-pointed, so tombstone chains stay one hop long.
        """
        survivor = min(group, key=attrgetter("first"), default=None)
        # strictly earlier only: a copy of the first event that is no longer remembered (see RecentIds) has
        # the same (ts, id) and would otherwise found a session under the survivor's own id
        if survivor is None or [event.ts_ms, event.event_id] < survivor.first[:2]:
            survivor = None
            new_id = session_id_for(self.state.site_id, self.state.visitor_id, event.ts_ms, event.event_id)
            target = OpenSession.from_event(event, new_id)
        else:
            target = survivor
            target.add(event)
        for session in group:
            if session is survivor:
                continue
            for former in session.formers:
                former[2] += 1
            session.formers.append([session.session_id, session.first[0], session.version + 1])
            self.changed.update(former[0] for former in session.formers)
            target.formers.extend(session.formers)
            target.absorb(session)
        return target

    def _bump(self, session: OpenSession) -> None:
        session.version += 1
        self.changed.add(session.session_id)

    def _links(self) -> list[tuple[int, str]]:
        """(session_index, previous_session_id) of each open session."""
        state = self.state
        links, previous = [], state.last_closed_id
        for index, session in enumerate(state.open, start=state.closed_count):
            links.append((index, previous))
            previous = session.session_id
        return links

    def _record(self, session: OpenSession, index: int, previous_id: str, closed: bool) -> Session:
        state = self.state
        start_ms, _, url, first_touch = session.first
        (referrer, channel, utm_source, utm_medium, utm_campaign, utm_term, utm_content,
         click_id_type, click_id, device, browser, os) = first_touch  # fmt: skip
        source_last, medium_last, campaign_last, click_id_last = (
            session.last_touch[2] if session.last_touch else _NO_LAST_TOUCH
        )
        return Session(
            session_id=session.session_id,
            site_id=state.site_id,
            visitor_id=state.visitor_id,
            session_index=index,
            previous_session_id=previous_id,
            start_ms=start_ms,
            end_ms=session.end_ms,
            duration_ms=session.end_ms - start_ms,
            event_count=session.event_count,
            pageview_count=session.pageview_count,
            landing_url=session.landing[2] if session.landing else url,
            exit_url=session.exit[2] if session.exit else "",
            referrer=referrer,
            channel=channel,
            utm_source=utm_source,
            utm_medium=utm_medium,
            utm_campaign=utm_campaign,
            utm_term=utm_term,
            utm_content=utm_content,
            click_id_type=click_id_type,
            click_id=click_id,
            utm_source_last=source_last,
            utm_medium_last=medium_last,
            utm_campaign_last=campaign_last,
            click_id_last=click_id_last,
            device=device,
            browser=browser,
            os=os,
            is_bot=session.is_bot,
            email=session.email[2] if session.email else "",
            is_closed=closed,
            version=session.version,
        )

    def upserts(self) -> list[Session]:
        """The last version of every id changed in this call: sessions and tombstones."""
        state, changed = self.state, self.changed
        records = self.closed + [
            (session, self._record(session, index, previous_id, closed=False))
            for session, (index, previous_id) in zip(state.open, self._links())
            if session.session_id in changed
        ]
        upserts = []
        for session, record in records:
            upserts.extend(
                Session(former_id, state.site_id, state.visitor_id, start_ms=start_ms, end_ms=start_ms,
                        merged_into=session.session_id, version=version)
                for former_id, start_ms, version in session.formers
                if former_id in changed
            )  # fmt: skip
            upserts.append(record)
        return upserts

    def session_ids(self, events: Sequence[SessionInput], placed: list[bool]) -> list[str]:
        """The session each placed event is in now: the one whose time span covers it (sessions are
        disjoint in time, and a placed event is inside its own). '' for late events and duplicates."""
        homes = [session for session, _ in self.closed] + self.state.open
        return [
            next(s.session_id for s in homes if s.first[0] <= event.ts_ms <= s.end_ms) if was_placed else ""
            for event, was_placed in zip(events, placed)
        ]


def apply(
    state: VisitorState | None, events: Sequence[SessionInput], policy: SessionPolicy, now_ms: int | None = None
) -> SessionizeResult:
    """Adds one visitor's events (in arrival order) to its state, which is updated in place and returned.

    `now_ms` (the stream clock, if the caller has one) closes sessions like the watermark does.
    """
    if state is None:
        if not events:
            raise ValueError("a visitor's first call needs events")
        state = VisitorState(events[0].site_id, events[0].visitor_id, events[0].ts_ms)
    run = _Run(state, policy.for_site(state.site_id))
    floor = state.watermark_ms if now_ms is None else now_ms
    sessions, gap, close_after = state.open, run.gap, run.close_after  # `sessions` is only mutated in place
    recent, dedup_window, dedup_max_ids = state.recent, run.dedup_window, run.dedup_max_ids
    late, duplicate = [False] * len(events), [False] * len(events)
    for i, event in enumerate(events):
        if event.visitor_id != state.visitor_id or event.site_id != state.site_id:
            raise ValueError(f"event {event.event_id!r} is not from visitor {state.visitor_id!r}")
        horizon = max(state.watermark_ms, floor)
        if sessions and sessions[0].end_ms + close_after <= horizon:
            run.close_expired(horizon)
        ts, event_id = event.ts_ms, event.event_id
        if event_id in recent:
            duplicate[i] = True
        else:
            if state.closed_count and ts <= state.last_closed_end_ms + gap:
                late[i] = True
            else:
                run.add(event)
            recent.add(ts, event_id)
        if ts > state.watermark_ms:
            state.watermark_ms = ts
        recent.forget(state.watermark_ms - dedup_window, dedup_max_ids)
    run.close_expired(max(state.watermark_ms, floor))
    placed = [not (is_late or is_duplicate) for is_late, is_duplicate in zip(late, duplicate)]
    return SessionizeResult(state, run.upserts(), run.session_ids(events, placed), late, duplicate)


def close_idle(state: VisitorState, now_ms: int, policy: SessionPolicy) -> tuple[VisitorState, list[Session]]:
    """Timer path: closes the sessions whose deadline `now_ms` has reached, though no event arrived."""
    result = apply(state, (), policy, now_ms)
    return result.state, result.upserts


def next_deadline(state: VisitorState, policy: SessionPolicy) -> int | None:
    """When the earliest open session closes if nothing arrives (None: nothing open)."""
    if not state.open:
        return None
    config = policy.for_site(state.site_id)
    return state.open[0].end_ms + config.inactivity_ms + config.grace_ms


_SESSION_COLUMNS = tuple(f.name for f in fields(OpenSession))
_EVENT_COUNT_COLUMN = _SESSION_COLUMNS.index("event_count")
_END_COLUMN = _SESSION_COLUMNS.index("end_ms")


def dump_state(state: VisitorState) -> bytes:
    """Compact positional JSON (no keys): one blob per visitor lives in Redis."""
    return orjson.dumps(
        [
            _STATE_FORMAT, state.site_id, state.visitor_id, state.watermark_ms, state.closed_count,
            state.last_closed_id, state.last_closed_end_ms,
            [[getattr(s, name) for name in _SESSION_COLUMNS] for s in state.open], state.recent.entries,
        ]
    )  # fmt: skip


def load_state(blob: bytes) -> VisitorState:
    state_format, *values = orjson.loads(blob)
    if state_format == 1:
        return _load_format_1(values)
    if state_format != _STATE_FORMAT:
        raise ValueError(f"unknown sessionizer state format {state_format!r}")
    *summary, rows, recent = values
    return VisitorState(*summary, open=[OpenSession(*row) for row in rows], recent=RecentIds(recent))


def _load_format_1(values: list) -> VisitorState:
    """A blob written before ids were kept per visitor: each open session's ids become recent ids (at the
    session's end time; `apply` trims them to the current bounds) and its id count its event count."""
    *summary, rows = values
    recent = RecentIds()
    for row in rows:
        for event_id in row[_EVENT_COUNT_COLUMN]:
            recent.add(row[_END_COLUMN], event_id)
        row[_EVENT_COUNT_COLUMN] = len(row[_EVENT_COUNT_COLUMN])
    return VisitorState(*summary, open=[OpenSession(*row) for row in rows], recent=recent)
