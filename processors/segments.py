"""Segment membership: the pure core. Plain Python over explicit per-lead (and per-account) state; no I/O.

A site's segments are compiled once (`SegmentSet`). Each lead keeps a `SegmentState` inside its LeadState:
- `counters`: per event count (type + filters; counts with the same ones share a counter) the newest
  matching events as [event time, event-id digest], newest first, at most `keep` of them: one more than
  the largest value the count is compared with (a count of `gt 1` keeps 2). That is all a comparison
  needs, now and later, since events only ever leave a window: it is exact (millisecond event times, no
  buckets) and bounded (<= 101 entries per counter; a site has <= 50 counters). The digests make a
  re-delivered event count once: a copy of a kept event is recognised, and a copy of one no longer kept
  is older than every kept one, so it is not kept either. `distinct: session` counters keep sessions
  instead ([the session's newest event time, session digest]).
- `first_touch` / `last_touch`: channel and utm source/campaign of the lead's earliest event and of its
  latest event that did not come from its own site (not internal navigation); `geo`: the country of its
  latest event that had one (the lead's last seen country).
- `clock_ms`: the lead's segment clock: the newest event time of its records, or what the hourly pass
  moved it to. Every evaluation happens at the clock; changes carry that time.
- `members`: segment id -> [seq, time of its last change]; a member while seq is odd.
- `filters`: the lead filters of account segments the lead meets (its account's segments read these).

Only leads are members: a lead is known (an email) or has an account; a visitor who is neither is in no
segment, though its counters count (it may become a lead, and then its history counts).

Time: an event counts at its event time (capped at its arrival, like the processors' stream clock), and
is in a window of W while `time < event time + W`. Before an event is counted the clock moves to its time,
and every moment in between at which a count crosses its threshold (a counted event leaving the window)
is evaluated on its own, in order, with the facts from before the event: the changes are the same
whether the hourly pass or the lead's next event moves the clock past that moment. The hourly pass moves
the clock to its time minus `grace_ms` (an hour, the sessionizer's grace), so a lead's events that arrive
up to an hour behind the partition's stream clock still count at their own time; `next_due_ms` is when
the pass next has something to do. An event later than that counts from the lead's clock on (history
already emitted is never rewritten).

Every entry point takes the lead's state, returns a new `SegmentState` (never changing its input) and the
changes to emit; the same records give the same changes, byte for byte, however they were batched.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any, NamedTuple

from processors.conditions import Test, all_of, compare, exact_matcher, field_test, url_matcher
from schemas.companies import NO_COMPANIES, Company, CompanyCards
from schemas.conditions import ConditionBase
from schemas.events import EVENT_TYPES, EnrichedEvent
from schemas.records import JsonRecord, digest, event_digest
from schemas.segments import (
    FIELDS,
    PROPERTY_PREFIX,
    AccountLeadFacts,
    CountOf,
    MemberKind,
    Segment,
    SegmentBackfill,
    SegmentChange,
    SegmentCondition,
    change_id,
)

if TYPE_CHECKING:
    from processors.rules import LeadState

HOUR_MS = 3_600_000
GRACE_MS = HOUR_MS
WINDOW = "window"


# A touch: [event time, event digest, channel, utm_source, utm_campaign]; [] while there is none.
Touch = list
NO_TOUCH: Touch = []
UPDATE_IDS_KEPT = 64  # an account remembers its latest updates' ids: a re-sent one changes nothing


@dataclass(slots=True)
class SegmentState(JsonRecord):
    """A lead's segment state (see the module docstring). `version`: the site definitions version of the
    segments it was last evaluated with. `due_ms`: the next moment a count may cross its threshold (0:
    none), kept so that an event that passes no such moment costs no search."""

    version: int = 0
    clock_ms: int = 0
    due_ms: int = 0
    counters: dict[str, list[list[Any]]] = field(default_factory=dict)
    first_touch: Touch = field(default_factory=list)
    last_touch: Touch = field(default_factory=list)
    members: dict[str, list[int]] = field(default_factory=dict)
    filters: list[str] = field(default_factory=list)
    geo: list = field(default_factory=list)  # [event time, event digest, country]; [] while none had one

    def is_member(self, segment_id: str) -> bool:
        entry = self.members.get(segment_id)
        return entry is not None and entry[0] % 2 == 1

    def member_of(self) -> list[str]:
        """The segments the lead is a member of, sorted."""
        return sorted(segment for segment, (seq, _) in self.members.items() if seq % 2)

    def copy(self) -> SegmentState:
        """Independent containers; their items are replaced whole, never changed in place."""
        return SegmentState(self.version, self.clock_ms, self.due_ms, dict(self.counters), self.first_touch,
                            self.last_touch, dict(self.members), self.filters, self.geo)

    @property
    def country(self) -> str:
        return self.geo[2] if self.geo else ""

    # the touch fields as the field registry (schemas.segments.FIELDS) names them
    @property
    def first_channel(self) -> str:
        return self.first_touch[2] if self.first_touch else ""

    @property
    def last_channel(self) -> str:
        return self.last_touch[2] if self.last_touch else ""

    @property
    def first_utm_source(self) -> str:
        return self.first_touch[3] if self.first_touch else ""

    @property
    def last_utm_source(self) -> str:
        return self.last_touch[3] if self.last_touch else ""

    @property
    def first_utm_campaign(self) -> str:
        return self.first_touch[4] if self.first_touch else ""

    @property
    def last_utm_campaign(self) -> str:
        return self.last_touch[4] if self.last_touch else ""


@dataclass(slots=True)
class SegmentOutcome:
    """The lead's new segment state (None: the site has no segments), the changes to emit, and whether
    the lead filters it meets changed (its account must hear: `account_facts`)."""

    state: SegmentState | None
    changes: list[SegmentChange] = field(default_factory=list)
    filters_changed: bool = False


# ---- compiling ----

class _Facts:
    """What a lead segment's conditions read: the lead, its segment state, its account, the time of the
    evaluation and the results of the segments evaluated before (in_segment)."""

    __slots__ = ("lead", "segments", "account", "now", "results")

    def __init__(self, lead: LeadState, segments: SegmentState, now: int, companies: CompanyCards) -> None:
        self.lead = lead
        self.segments = segments
        self.account = _Account(lead.account_domain, companies)
        self.now = now
        self.results: dict[str, bool] = {}


class _Account:
    """An account as the `account.*` fields read it: its domain and its company card's fields ('' and 0
    without a card), the card looked up once, when a condition first reads it."""

    __slots__ = ("domain", "_companies", "_card")

    def __init__(self, domain: str, companies: CompanyCards) -> None:
        self.domain = domain
        self._companies = companies
        self._card: Company | None | bool = False  # False: not looked up yet

    def _company(self) -> Company | None:
        if self._card is False:
            self._card = self._companies.get(self.domain) if self.domain else None
        return self._card  # type: ignore[return-value]

    @property
    def name(self) -> str:
        card = self._company()
        return card.name if card else ""

    @property
    def industry(self) -> str:
        card = self._company()
        return card.industry if card else ""

    @property
    def employees(self) -> int | None:
        card = self._company()
        return card.employees_min or None if card else None

    @property
    def country(self) -> str:
        card = self._company()
        return card.country if card else ""


class _AccountFacts:
    """What an account segment's conditions read: the account, how many of its leads meet each lead
    filter (`counts`) and in all (`leads`), and the results of the account segments evaluated before."""

    __slots__ = ("account", "counts", "leads", "results")

    def __init__(self, state: AccountState, companies: CompanyCards) -> None:
        self.account = _Account(state.domain, companies)
        self.counts = state.counts
        self.leads = len(state.leads)
        self.results: dict[str, bool] = {}


def _reader(path: str) -> Callable[[Any], Any]:
    """A registry field (schemas.segments.FIELDS) as a function of the facts."""
    if path.startswith(PROPERTY_PREFIX):
        name = path[len(PROPERTY_PREFIX):]
        return lambda facts: facts.lead.properties.get(name)
    spec = FIELDS[path]
    read = attrgetter(spec.source)
    if spec.kind == "list":
        return lambda facts: list(read(facts))
    if spec.kind == "time":
        return lambda facts: read(facts) or None
    return read


@dataclass(frozen=True, slots=True)
class _Counter:
    key: str
    count: CountOf  # what it counts (the history query reads its filters)
    event: str  # a type, or "any"
    matches_url: Callable[[str], bool]
    matches_fields: Callable[[EnrichedEvent], bool] | None
    sessions: bool
    keep: int  # entries kept: one more than the largest value a count of it is compared with
    window_ms: int  # the longest window it is counted over


class _Critical(NamedTuple):
    """A count condition's truth can change only when its counter's entry `index` leaves `window_ms`."""

    counter: str
    window_ms: int
    index: int


def _thresholds(op: str, value: Any) -> tuple[int, ...]:
    """The entry indexes whose leaving the window flips `count op value` (count >= i+1 turns false when
    entry i leaves): gt v flips at count v+1 -> v; lt v at v -> v-1; is/is_not v at both; between [a, b] at
    b+1 -> b and a -> a-1."""
    if op == "gt":
        found = (value,)
    elif op == "lt":
        found = (value - 1,)
    elif op == "between":
        found = (value[1], value[0] - 1)
    else:
        found = (value, value - 1)
    return tuple(sorted({index for index in found if index >= 0}))


def _count_in_window(entries: list[list[Any]], since: int) -> int:
    """How many entries (newest first) are later than `since`."""
    found = 0
    for entry in entries:
        if entry[0] <= since:
            break
        found += 1
    return found


@dataclass(slots=True)
class _Reads:
    """What a lead segment's conditions read, so that an event that changed none of it skips the segment."""

    counters: set[str] = field(default_factory=set)
    segments: set[str] = field(default_factory=set)  # in_segment
    facts: bool = False  # lead and account fields
    touches: bool = False  # first/last touch fields, the last seen country
    seen: bool = False  # lead.first_seen / lead.last_seen
    company: bool = False  # the account's company card (it may be loaded or change between two records)


@dataclass(frozen=True, slots=True)
class _Compiled:
    segment_id: str
    version: int
    of: MemberKind
    public: bool  # False: a lead filter of an account segment (its lead's account hears of it)
    test: Test
    reads: _Reads = field(default_factory=_Reads)

    def affected(self, dirty: _Dirty, changed: set[str]) -> bool:
        reads = self.reads
        return bool((dirty.facts and reads.facts) or (dirty.touches and reads.touches)
                    or (dirty.company and reads.company)
                    or (reads.counters and not reads.counters.isdisjoint(dirty.counters))
                    or (reads.segments and not reads.segments.isdisjoint(changed)))


class _Dirty(NamedTuple):
    """What a record changed: these counters, the lead's fields, its touches; `company`: the lead has an
    account whose company card conditions read (a card is not part of the lead: it may have changed)."""

    counters: set[str]
    facts: bool
    touches: bool
    company: bool = False


class _Compiler:
    """Compiles one site's segments: conditions to tests, event counts to shared counters."""

    def __init__(self) -> None:
        self.counters: dict[str, _Counter] = {}
        self.critical: set[_Critical] = set()
        self.filters: list[_Compiled] = []
        self.filters_of: dict[str, int] = {}  # account segment id -> its lead filters so far
        self.reads = _Reads()

    def lead(self, segment_id: str, version: int, public: bool, conditions: list[SegmentCondition]) -> _Compiled:
        reads = self.reads = _Reads()
        return _Compiled(segment_id, version, "lead", public, all_of(conditions, self.lead_leaf), reads)

    def lead_leaf(self, condition: ConditionBase) -> Test:
        assert isinstance(condition, SegmentCondition)
        if condition.in_segment is not None:
            segment = condition.in_segment
            self.reads.segments.add(segment)
            return lambda facts: facts.results.get(segment, False)
        if condition.count is not None:
            return self._count_test(condition.count, condition.window_ms(), condition.op or "", condition.value)
        source = FIELDS[condition.field].source if condition.field in FIELDS else "lead.properties"
        if source.startswith("segments."):
            self.reads.touches = True
        else:
            self.reads.facts = True
            self.reads.seen = self.reads.seen or source in ("lead.first_ts_ms", "lead.last_activity_ms")
            self.reads.company = self.reads.company or (source.startswith("account.") and source != "account.domain")
        return field_test(_reader(condition.field or ""), condition.op or "", condition.value)

    def _count_test(self, count: CountOf, window_ms: int, op: str, value: Any) -> Test:
        indexes = _thresholds(op, value)
        keep = max(indexes, default=0) + 1
        key = count.key()
        known = self.counters.get(key)
        self.counters[key] = _Counter(
            key, count, count.event or "any", url_matcher(count.url), exact_matcher(count), count.distinct == "session",
            max(keep, known.keep if known else 0), max(window_ms, known.window_ms if known else 0))
        self.critical.update(_Critical(key, window_ms, index) for index in indexes)
        self.reads.counters.add(key)
        holds = compare(op, value)

        def test(facts: _Facts) -> bool:
            entries = facts.segments.counters.get(key, ())
            return holds(_count_in_window(entries, facts.now - window_ms))  # type: ignore[arg-type]
        return test

    def account_leaf(self, segment: Segment) -> Callable[[ConditionBase], Test]:
        def leaf(condition: ConditionBase) -> Test:
            assert isinstance(condition, SegmentCondition)
            if condition.in_segment is not None:
                target = condition.in_segment
                return lambda facts: facts.results.get(target, False)
            if condition.any_lead is not None:
                counted = self._lead_filter(segment, condition.any_lead)
                return lambda facts: facts.counts.get(counted, 0) > 0
            if condition.every_lead is not None:
                counted = self._lead_filter(segment, condition.every_lead)
                return lambda facts: facts.leads > 0 and facts.counts.get(counted, 0) == facts.leads
            if condition.count is not None:
                counted = self._lead_filter(segment, condition.count.leads or [])
                holds = compare(condition.op or "", condition.value)
                return lambda facts: holds(facts.counts.get(counted, 0))
            return field_test(_reader(condition.field or ""), condition.op or "", condition.value)
        return leaf

    def _lead_filter(self, segment: Segment, conditions: list[SegmentCondition]) -> str:
        """A lead filter of an account segment, evaluated for each lead with the lead segments. Its id
        carries the segment's version: after an edit, accounts count the new filter from zero as their
        leads are evaluated again, never the old one under a new meaning."""
        number = self.filters_of[segment.id] = self.filters_of.get(segment.id, -1) + 1
        filter_id = f"{segment.id}@{segment.version}#{number}"
        self.filters.append(self.lead(filter_id, segment.version, False, conditions))
        return filter_id


def _dependency_order(segments: list[Segment]) -> list[Segment]:
    """Segments after the segments they name in in_segment (validated acyclic), ties by id."""
    by_id = {segment.id: segment for segment in segments}
    ordered: list[Segment] = []
    placed: set[str] = set()

    def place(segment: Segment) -> None:
        if segment.id in placed:
            return
        placed.add(segment.id)
        for _, target, _ in sorted(segment.references()):
            if target in by_id:
                place(by_id[target])
        ordered.append(segment)

    for segment in sorted(segments, key=attrgetter("id")):
        place(segment)
    return ordered


@dataclass(frozen=True, slots=True)
class _ReadIndex:
    """Which lead segments (positions in `SegmentSet.lead`, dependencies first) read what, built once per
    definitions version, so that a record that changed one counter evaluates only the segments reading it
    (and those naming a segment that flipped) without visiting the others."""

    position: dict[str, int]  # segment id -> its position
    by_counter: dict[str, tuple[int, ...]]
    facts: tuple[int, ...]
    touches: tuple[int, ...]
    company: tuple[int, ...]
    dependents: dict[str, tuple[int, ...]]  # segment id -> the segments whose in_segment names it
    named: tuple[str, ...]  # the segments some in_segment names
    filters: tuple[str, ...]  # the lead filters of account segments, in order

    @classmethod
    def of(cls, compiled: list[_Compiled]) -> _ReadIndex:
        by_counter: dict[str, list[int]] = {}
        dependents: dict[str, list[int]] = {}
        for i, c in enumerate(compiled):
            for key in c.reads.counters:
                by_counter.setdefault(key, []).append(i)
            for target in c.reads.segments:
                dependents.setdefault(target, []).append(i)
        return cls({c.segment_id: i for i, c in enumerate(compiled)},
                   {key: tuple(found) for key, found in by_counter.items()},
                   tuple(i for i, c in enumerate(compiled) if c.reads.facts),
                   tuple(i for i, c in enumerate(compiled) if c.reads.touches),
                   tuple(i for i, c in enumerate(compiled) if c.reads.company),
                   {target: tuple(found) for target, found in dependents.items()},
                   tuple(sorted(dependents)), tuple(c.segment_id for c in compiled if not c.public))

    def reading(self, dirty: _Dirty) -> list[int]:
        """The segments that read what `dirty` names (not yet those naming a segment that flips)."""
        found: set[int] = set()
        for key in dirty.counters:
            found.update(self.by_counter.get(key, ()))
        if dirty.facts:
            found.update(self.facts)
        if dirty.touches:
            found.update(self.touches)
        if dirty.company:
            found.update(self.company)
        return list(found)


URL_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class SegmentSet:
    """A site's segments compiled once. `lead` holds the lead segments (dependencies first) and then the
    lead filters of account segments; `account` the account segments (dependencies first)."""

    version: int
    lead: tuple[_Compiled, ...]
    account: tuple[_Compiled, ...]
    counters: dict[str, _Counter]
    by_event_type: dict[str, tuple[_Counter, ...]]
    critical: tuple[_Critical, ...]
    grace_ms: int
    reads_touches: bool  # some condition reads a first/last touch or the last seen country
    reads_seen: bool  # some condition reads lead.first_seen / lead.last_seen
    reads_company: bool  # some lead segment reads the account's company card
    by_page: dict[tuple[str, str], tuple[_Counter, ...]] = field(default_factory=dict, compare=False, repr=False)
    index: _ReadIndex = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    @classmethod
    def compile(cls, segments: Iterable[Segment], version: int = 0, grace_ms: int = GRACE_MS) -> SegmentSet:
        compiler = _Compiler()
        ordered = _dependency_order(list(segments))
        lead = [compiler.lead(s.id, s.version, True, s.if_) for s in ordered if s.of == "lead"]
        account = [_Compiled(s.id, s.version, "account", True, all_of(s.if_, compiler.account_leaf(s)))
                   for s in ordered if s.of == "account"]
        counters = compiler.counters
        by_type = {t: tuple(c for c in counters.values() if c.event in (t, "any")) for t in EVENT_TYPES}
        compiled = lead + compiler.filters
        return cls(version, tuple(compiled), tuple(account), counters, by_type, tuple(sorted(compiler.critical)),
                   grace_ms, any(c.reads.touches for c in compiled), any(c.reads.seen for c in compiled),
                   any(c.reads.company for c in compiled), index=_ReadIndex.of(compiled))

    @property
    def empty(self) -> bool:
        return not self.lead and not self.account

    def counters_needing_history(self, before: SegmentSet) -> list[_Counter]:
        """The counters this set has that `before` did not keep enough of (new, or kept for a shorter
        window or fewer events): a lead's state cannot know events it was not counting."""
        return [counter for key, counter in sorted(self.counters.items())
                if key not in before.counters or before.counters[key].keep < counter.keep
                or before.counters[key].window_ms < counter.window_ms]

    def event_counters(self, event: EnrichedEvent) -> tuple[_Counter, ...]:
        """The counters an event counts in (type, URL glob, exact filters)."""
        page = (event.type, event.url)
        found = self.by_page.get(page)
        if found is None:
            if len(self.by_page) >= URL_CACHE_SIZE:  # bounded: unique URLs (query strings) must not grow it
                self.by_page.clear()
            found = self.by_page[page] = tuple(c for c in self.by_event_type.get(event.type, ())
                                               if c.matches_url(event.url))
        return tuple(c for c in found if c.matches_fields is None or c.matches_fields(event))


EMPTY = SegmentSet.compile([])


# ---- one lead ----

def event_time(event: EnrichedEvent) -> int:
    """Event time, capped at its arrival: a client clock set in the future must not hold a lead in a
    window (the stream clocks cap it the same way)."""
    return min(event.ts_ms, event.received_ms) if event.received_ms > 0 else event.ts_ms


def session_digest(session_id: str) -> str:
    """What a `distinct: session` counter keeps of a session id."""
    return event_digest(session_id)


def _insert(entries: list[list[Any]], entry: list[Any], keep: int, sessions: bool) -> list[list[Any]] | None:
    """entries with `entry` counted (newest first, at most `keep`), or None when nothing changes: the
    same event again, an event older than the `keep` newest, or (sessions) a session already kept with a
    newer event."""
    ts, ident = entry
    kept = entries
    for index, (found_ts, found_ident) in enumerate(entries):
        if found_ident == ident:
            if not sessions or found_ts >= ts:
                return None
            kept = entries[:index] + entries[index + 1:]
            break
    position = next((i for i, (t, d) in enumerate(kept) if (t, d) < (ts, ident)), len(kept))
    if position >= keep:
        return None
    return (kept[:position] + [[ts, ident]] + kept[position:])[:keep]


def _count(state: SegmentState, counters: Iterable[_Counter], entry_of: Callable[[_Counter], list]) -> set[str]:
    """Counts one event (or backfilled entry) in `counters`; returns the keys of those that changed. An
    entry already out of every window the counter is used with cannot count any more."""
    changed = set()
    for counter in counters:
        entry = entry_of(counter)
        if not entry[1] or entry[0] + counter.window_ms <= state.clock_ms:
            continue
        kept = _insert(state.counters.get(counter.key, []), entry, counter.keep, counter.sessions)
        if kept is not None:
            state.counters[counter.key] = kept
            changed.add(counter.key)
    return changed


def _touch(state: SegmentState, first: Touch, last: Touch) -> bool:
    """Keeps the earlier first touch and the later last touch (by time, then digest); True if either changed."""
    changed = False
    if first and (not state.first_touch or first[:2] < state.first_touch[:2]):
        state.first_touch, changed = first, True
    if last and (not state.last_touch or last[:2] > state.last_touch[:2]):
        state.last_touch, changed = last, True
    return changed


def _locate(state: SegmentState, seen: list) -> bool:
    """Keeps the latest [time, digest, country] (by time, then digest); True if it changed."""
    if seen and (not state.geo or seen[:2] > state.geo[:2]):
        state.geo = seen
        return True
    return False


def _event_touches(event: EnrichedEvent, ts: int, ident: str) -> tuple[Touch, Touch]:
    """(first, last) touch candidates of an event: internal navigation is no last touch."""
    touch = [ts, ident, event.channel, event.utm_source, event.utm_campaign]
    internal = bool(event.referrer_domain) and event.referrer_domain == event.url_domain
    return touch, NO_TOUCH if internal else touch


def _due_points(segset: SegmentSet, state: SegmentState, after: int, until: int | None) -> list[int]:
    """The moments in (after, until] at which a count may cross its threshold, in order."""
    points = set()
    for critical in segset.critical:
        entries = state.counters.get(critical.counter)
        if entries is not None and len(entries) > critical.index:
            point = entries[critical.index][0] + critical.window_ms
            if point > after and (until is None or point <= until):
                points.add(point)
    return sorted(points)


def _refresh_due(segset: SegmentSet, state: SegmentState) -> None:
    """The next moment after the clock at which a count may cross its threshold (0: none)."""
    after = state.clock_ms
    counters = state.counters
    due = 0
    for critical in segset.critical:
        entries = counters.get(critical.counter)
        if entries is not None and len(entries) > critical.index:
            point = entries[critical.index][0] + critical.window_ms
            if point > after and (not due or point < due):
                due = point
    state.due_ms = due


def _advance(segset: SegmentSet, lead: LeadState, state: SegmentState, until: int, companies: CompanyCards
             ) -> list[SegmentChange]:
    """Moves the clock to `until`, evaluating each moment a count crosses its threshold on the way."""
    if until <= state.clock_ms:
        return []
    if not state.due_ms or until < state.due_ms:
        state.clock_ms = until
        return []
    changes: list[SegmentChange] = []
    for point in _due_points(segset, state, state.clock_ms, until):
        state.clock_ms = point
        changes += _evaluate(segset, lead, state, WINDOW, companies)[0]
    state.clock_ms = until
    _refresh_due(segset, state)
    return changes


def _prune(segset: SegmentSet, state: SegmentState) -> None:
    """Drops the entries out of every window (they can never count again) and the counters no segment
    uses any more. Only for tidiness: a counter never holds more than `keep` entries anyway."""
    until = state.clock_ms
    for key, entries in list(state.counters.items()):
        counter = segset.counters.get(key)
        kept = [] if counter is None else [e for e in entries if e[0] + counter.window_ms > until]
        if not kept:
            del state.counters[key]
        elif len(kept) != len(entries):
            state.counters[key] = kept


def is_lead(lead: LeadState) -> bool:
    """A lead by the product's definition: a known contact (an email) or an anonymous employee of a
    company (an account). A visitor who is neither is in no segment and on no board."""
    return bool(lead.email or lead.account_domain)


def _evaluate(segset: SegmentSet, lead: LeadState, state: SegmentState, cause: str, companies: CompanyCards,
              dirty: _Dirty | None = None) -> tuple[list[SegmentChange], bool]:
    """Evaluates the lead segments at the clock (with `dirty`, only those reading what changed and those
    naming a segment that flipped: the others keep their last result) and records the entries and exits
    (and the deletion of segments the lead was a member of). Returns the changes and whether the lead
    filters changed."""
    if not is_lead(lead):
        flipped = _leave_all(segset, state)
    elif dirty is None:
        flipped = _evaluate_all(segset, lead, state, companies)
    else:
        flipped = _evaluate_dirty(segset, lead, state, companies, dirty)
    changes = []
    if flipped:
        position = segset.index.position
        for i in sorted(position[segment_id] for segment_id in flipped):
            compiled = segset.lead[i]
            if compiled.public:
                changes.append(_change(state, lead, compiled.segment_id, compiled.version, cause))
    if state.version != segset.version:
        position = segset.index.position
        for segment_id in [s for s in state.members if s not in position]:  # deleted segments
            if state.is_member(segment_id):
                changes.append(_change(state, lead, segment_id, segset.version, f"definitions:{segset.version}"))
            del state.members[segment_id]
    filters_changed = False
    if any(segment_id in flipped for segment_id in state.filters) or \
            any(segment_id in flipped for segment_id in segset.index.filters) or state.version != segset.version:
        was = set(state.filters)
        filters = [f for f in segset.index.filters if (f in flipped) != (f in was)]
        filters_changed = filters != state.filters
        state.filters = filters
    state.version = segset.version
    return changes, filters_changed


def _leave_all(segset: SegmentSet, state: SegmentState) -> set[str]:
    """Not a lead (any more): it is in no segment and meets no lead filter."""
    position = segset.index.position
    flipped = {segment_id for segment_id, (seq, _) in state.members.items() if seq % 2 and segment_id in position}
    flipped.update(f for f in state.filters if f in position)
    return flipped


def _evaluate_all(segset: SegmentSet, lead: LeadState, state: SegmentState, companies: CompanyCards) -> set[str]:
    """Every lead segment, in dependency order; returns those whose result flipped."""
    facts = _Facts(lead, state, state.clock_ms, companies)
    results = facts.results
    flipped: set[str] = set()
    filters = set(state.filters)
    for compiled in segset.lead:
        segment_id = compiled.segment_id
        was = state.is_member(segment_id) if compiled.public else segment_id in filters
        now = results[segment_id] = compiled.test(facts)
        if now != was:
            flipped.add(segment_id)
    return flipped


def _evaluate_dirty(segset: SegmentSet, lead: LeadState, state: SegmentState, companies: CompanyCards,
                    dirty: _Dirty) -> set[str]:
    """The segments reading what `dirty` names, then those naming one that flipped, in dependency order;
    the others keep their last result (in_segment reads it). Returns those whose result flipped."""
    index = segset.index
    pending = index.reading(dirty)
    flipped: set[str] = set()
    if not pending:
        return flipped
    facts = _Facts(lead, state, state.clock_ms, companies)
    results = facts.results
    filters = set(state.filters)
    for named in index.named:  # what an unevaluated segment's in_segment reads: its last result
        results[named] = state.is_member(named)
    heapq.heapify(pending)
    done: set[int] = set()
    while pending:
        i = heapq.heappop(pending)
        if i in done:
            continue
        done.add(i)
        compiled = segset.lead[i]
        segment_id = compiled.segment_id
        was = state.is_member(segment_id) if compiled.public else segment_id in filters
        now = results[segment_id] = compiled.test(facts)
        if now != was:
            flipped.add(segment_id)
            for dependent in index.dependents.get(segment_id, ()):
                heapq.heappush(pending, dependent)
    return flipped


def _change(state: SegmentState, lead: LeadState, segment_id: str, version: int, cause: str) -> SegmentChange:
    seq = state.members.get(segment_id, [0])[0] + 1
    state.members[segment_id] = [seq, state.clock_ms]
    return SegmentChange(lead.site_id, segment_id, lead.lead_id, seq % 2 == 1, state.clock_ms, cause, version,
                         "lead", seq, change_id(lead.site_id, segment_id, lead.lead_id, seq, state.clock_ms),
                         lead.account_domain)


def _facts_key(segset: SegmentSet, lead: LeadState) -> tuple[Any, ...]:
    """What of a lead, besides its segment state, its segments may read (the times only if they do: they
    move with every event)."""
    seen = (lead.first_ts_ms, lead.last_activity_ms) if segset.reads_seen else ()
    return (lead.email, lead.account_domain, lead.score, tuple(lead.tags), lead.properties, *seen)


def _outcome(segset: SegmentSet, lead: LeadState, state: SegmentState, changes: list[SegmentChange],
             cause: str, dirty: _Dirty | None, companies: CompanyCards) -> SegmentOutcome:
    """Evaluates what `dirty` names (everything: None), or everything when the segments changed since."""
    filters_changed = False
    current = state.version == segset.version
    if not current or dirty is None or dirty.counters or dirty.facts or dirty.touches or dirty.company:
        more, filters_changed = _evaluate(segset, lead, state, cause, companies, dirty if current else None)
        changes += more
    return SegmentOutcome(state, changes, filters_changed)


NOTHING = _Dirty(set(), False, False)


def _start(segset: SegmentSet, lead: LeadState) -> SegmentState | None:
    """A copy of the lead's segment state to work on; a new one (never evaluated) on its first record;
    None for a merged-away lead and, on a site without segments, a lead that was never in one."""
    if lead.merged_into or (segset.empty and lead.segments is None):
        return None
    if lead.segments is None:
        return SegmentState(version=-1)
    state = lead.segments.copy()
    if state.version != segset.version:  # other counts now: other moments are due
        _refresh_due(segset, state)
    return state


def on_event(segset: SegmentSet, before: LeadState, after: LeadState, event: EnrichedEvent,
             companies: CompanyCards = NO_COMPANIES) -> SegmentOutcome:
    """One (non-bot) event of the lead. `before` / `after`: the lead around the rule engine's apply_event
    (the moments before the event are evaluated with the facts from before it). `companies`: the company
    cards `account.*` fields read (here and in every entry point below)."""
    state = _start(segset, before)
    if state is None:
        return SegmentOutcome(None)
    ts, ident = event_time(event), event_digest(event.event_id)
    changes = _advance(segset, before, state, ts, companies)
    session = event.session_id and session_digest(event.session_id)
    counted = _count(state, segset.event_counters(event),
                     lambda counter: [ts, session if counter.sessions else ident])
    if counted:
        _refresh_due(segset, state)
    touched = _touch(state, *_event_touches(event, ts, ident))
    located = _locate(state, [ts, ident, event.geo_country] if event.geo_country else NO_TOUCH)
    moved = _facts_key(segset, before) != _facts_key(segset, after)
    dirty = _Dirty(counted, moved, (touched or located) and segset.reads_touches,
                   segset.reads_company and bool(after.account_domain))
    return _outcome(segset, after, state, changes, f"event:{event.event_id}", dirty, companies)


def on_change(segset: SegmentSet, lead: LeadState, cause: str, companies: CompanyCards = NO_COMPANIES
              ) -> SegmentOutcome:
    """The lead's facts changed without an event of its own (its identity, a tag by hand, the rules'
    hourly pass) or the segments did: evaluate at the lead's clock."""
    state = _start(segset, lead)
    if state is None:
        return SegmentOutcome(None)
    return _outcome(segset, lead, state, [], cause, None, companies)


def on_identity(segset: SegmentSet, before: LeadState, after: LeadState, ts_ms: int, cause: str,
                companies: CompanyCards = NO_COMPANIES) -> SegmentOutcome:
    """The lead became known or joined an account at `ts_ms` (the identifying event's time): the clock moves
    there first, as for an event (the moments before it are evaluated with the facts from before it, so a
    window that ran out earlier leaves with the lead as it was then, whoever gets there first), then the lead
    is evaluated in full."""
    state = _start(segset, before)
    if state is None:
        return SegmentOutcome(None)
    changes = _advance(segset, before, state, ts_ms, companies)
    return _outcome(segset, after, state, changes, cause, None, companies)


def on_hour(segset: SegmentSet, lead: LeadState, now_ms: int, companies: CompanyCards = NO_COMPANIES
            ) -> SegmentOutcome:
    """The hourly pass: counts whose windows ran out by `now_ms - grace` are evaluated at the moment they
    ran out, though no new event came."""
    state = _start(segset, lead)
    if state is None:
        return SegmentOutcome(None)
    changes = _advance(segset, lead, state, now_ms - segset.grace_ms, companies)
    _prune(segset, state)
    return _outcome(segset, lead, state, changes, f"hour:{now_ms}", NOTHING, companies)


def next_due_ms(segset: SegmentSet, lead: LeadState) -> int | None:
    """When the hourly pass next has something to do for this lead (an hour boundary), or None."""
    state = lead.segments
    if state is None or lead.merged_into or not state.due_ms:
        return None
    return -(-(state.due_ms + segset.grace_ms) // HOUR_MS) * HOUR_MS


def on_backfill(segset: SegmentSet, lead: LeadState, backfill: SegmentBackfill,
                companies: CompanyCards = NO_COMPANIES) -> SegmentOutcome:
    """History for counts a segment edit added (read from ClickHouse), then a re-evaluation."""
    state = _start(segset, lead)
    if state is None:
        return SegmentOutcome(None)
    _count_entries(segset, state, backfill.counters)
    _refresh_due(segset, state)
    return _outcome(segset, lead, state, [], f"definitions:{backfill.version}", None, companies)


def on_merge(segset: SegmentSet, before: LeadState, after: LeadState, absorbed: LeadState, cause: str,
             ts_ms: int = 0, companies: CompanyCards = NO_COMPANIES) -> SegmentOutcome:
    """An anonymous lead merged into this one at `ts_ms` (`before` / `after`: the survivor around the rule
    engine's merge). Its counted events and touches come over once (an event both counted counts once), the
    clock moves to the latest of the two clocks and the merge, and the survivor is evaluated: it enters what
    it now qualifies for, when the absorbed lead leaves (`on_retire`). Applying the same merge again changes
    nothing."""
    if absorbed.lead_id in before.merged_from or absorbed.lead_id == before.lead_id:
        return SegmentOutcome(before.segments)
    state = _start(segset, before)
    if state is None:
        return SegmentOutcome(None)
    theirs = absorbed.segments or SegmentState()
    changes = _advance(segset, before, state, max(theirs.clock_ms, ts_ms), companies)
    _count_entries(segset, state, theirs.counters)
    _refresh_due(segset, state)
    _touch(state, theirs.first_touch, theirs.last_touch)
    _locate(state, theirs.geo)
    return _outcome(segset, after, state, changes, cause, None, companies)


def _count_entries(segset: SegmentSet, state: SegmentState, counters: dict[str, list[list[Any]]]) -> None:
    """Counts another state's (or a backfill's) entries in the lead's counters of the same keys."""
    for key, entries in counters.items():
        counter = segset.counters.get(key)
        if counter is not None:
            for entry in entries:
                _count(state, (counter,), lambda _: list(entry))


def on_retire(segset: SegmentSet, absorbed: LeadState, survivor_id: str, ts_ms: int) -> list[SegmentChange]:
    """The lead merged away into `survivor_id`: it leaves every segment it was in (at the lead's clock;
    the survivor enters with `on_merge`)."""
    state = absorbed.segments.copy() if absorbed.segments is not None else None
    if state is None:
        return []
    state.clock_ms = max(state.clock_ms, ts_ms)
    return [_change(state, absorbed, segment_id, segset.version, f"merged:{survivor_id}")
            for segment_id in sorted(state.members) if state.is_member(segment_id)]


def account_facts(before: LeadState, after: LeadState, outcome: SegmentOutcome, cause: str, ts_ms: int,
                  version: int = 0, refresh: bool = False, absorbed: LeadState | None = None
                  ) -> list[AccountLeadFacts]:
    """What the lead's accounts must hear after a record: its lead filters, when they changed or it joined
    an account (or, `refresh`, always), and `left` for an account it no longer belongs to. `version`: the
    definitions version the filters were evaluated with. On a merge (`absorbed`: the lead it took over,
    which told its account nothing when it retired) the survivor's update replaces the absorbed lead in
    one step, so an account both belong to never leaves and enters again in between; an account only the
    absorbed lead belonged to hears that it left."""
    filters = outcome.state.filters if outcome.state is not None else []
    updates = []
    old, new = before.account_domain, "" if after.merged_into else after.account_domain
    gone = absorbed.account_domain if absorbed is not None else ""
    if old and old != new:
        updates.append(_account_update(after, old, [], True, cause, ts_ms, version, refresh))
    if gone and gone != new:
        updates.append(_account_update(absorbed, gone, [], True, cause, ts_ms, version, refresh))
    if new and (old != new or outcome.filters_changed or refresh or gone == new):
        replaces = absorbed.lead_id if gone == new else ""
        updates.append(_account_update(after, new, filters, False, cause, ts_ms, version, refresh, replaces))
    return updates


def _account_update(lead: LeadState, domain: str, filters: list[str], left: bool, cause: str, ts_ms: int,
                    version: int, refresh: bool, replaces: str = "") -> AccountLeadFacts:
    """Its id names what it says, so a re-sent update (a replayed batch) is the same one, while two updates
    of one record (a rule chain re-evaluating the lead) are two."""
    update_id = "alf_" + digest(lead.site_id, domain, lead.lead_id, cause, ",".join(filters), str(left), replaces)
    return AccountLeadFacts(update_id, lead.site_id, domain, lead.lead_id, list(filters), left, ts_ms, cause,
                            version, refresh, replaces)


# ---- one account ----

@dataclass(slots=True)
class AccountState(JsonRecord):
    """What an account's segments need, kept by the account processor: per lead of the account the lead
    filters it meets (so a repeated or reordered update of one lead is absolute, not a delta) and the
    definitions version they were evaluated with (`reported`), per filter how many leads meet it, the
    account's memberships ([seq, time], member while odd), the ids of its latest updates (a re-sent update
    changes nothing) and the definitions version its cards last heard its memberships at (`told_version`:
    the import step tells them once per version, not once per lead)."""

    site_id: str
    domain: str
    leads: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    members: dict[str, list[int]] = field(default_factory=dict)
    update_ids: list[str] = field(default_factory=list)
    told_version: int = 0
    reported: dict[str, int] = field(default_factory=dict)

    def is_member(self, segment_id: str) -> bool:
        entry = self.members.get(segment_id)
        return entry is not None and entry[0] % 2 == 1

    def member_of(self) -> list[str]:
        """The segments the account is a member of, sorted."""
        return sorted(segment for segment, (seq, _) in self.members.items() if seq % 2)


def on_lead_facts(segset: SegmentSet, account: AccountState, update: AccountLeadFacts,
                  companies: CompanyCards = NO_COMPANIES) -> tuple[AccountState, list[SegmentChange]]:
    """One lead's filters (or its leaving) applied to its account, then the account's segments evaluated.
    An update the account has had already (a replay upstream sent it again) changes nothing. A segment
    edited after some lead of the account last reported keeps its membership until every lead has reported
    with its new lead filters (the backfill that follows the edit asks each): an edit never makes an account
    leave and enter again while its leads are counted anew."""
    if update.update_id in account.update_ids:
        return account, []
    new = AccountState(account.site_id, account.domain, dict(account.leads), dict(account.counts),
                       dict(account.members), [*account.update_ids, update.update_id][-UPDATE_IDS_KEPT:],
                       account.told_version, dict(account.reported))
    for lead_id in {update.lead_id, update.replaces} - {""}:
        for filter_id in new.leads.pop(lead_id, []):
            new.counts[filter_id] -= 1
            if not new.counts[filter_id]:
                del new.counts[filter_id]
        new.reported.pop(lead_id, None)
    if not update.left:
        new.leads[update.lead_id] = sorted(update.filters)
        new.reported[update.lead_id] = update.version
        for filter_id in update.filters:
            new.counts[filter_id] = new.counts.get(filter_id, 0) + 1
    facts = _AccountFacts(new, companies)
    oldest = min(new.reported.values(), default=segset.version)
    changes = []
    for compiled in segset.account:
        if compiled.version > oldest:  # some lead has not reported with this segment's filters yet
            facts.results[compiled.segment_id] = new.is_member(compiled.segment_id)
            continue
        holds = facts.results[compiled.segment_id] = compiled.test(facts)
        if holds != new.is_member(compiled.segment_id):
            seq = new.members.get(compiled.segment_id, [0])[0] + 1
            new.members[compiled.segment_id] = [seq, update.ts_ms]
            changes.append(SegmentChange(
                new.site_id, compiled.segment_id, new.domain, holds, update.ts_ms, f"lead:{update.lead_id}",
                compiled.version, "account", seq,
                change_id(new.site_id, compiled.segment_id, new.domain, seq, update.ts_ms), new.domain))
    for segment_id in [s for s in new.members if s not in facts.results]:  # deleted segments
        if new.is_member(segment_id):
            seq = new.members[segment_id][0] + 1
            changes.append(SegmentChange(
                new.site_id, segment_id, new.domain, False, update.ts_ms, f"definitions:{segset.version}",
                segset.version, "account", seq, change_id(new.site_id, segment_id, new.domain, seq, update.ts_ms),
                new.domain))
        del new.members[segment_id]
    return new, changes
