"""Sessionizer: readable examples first, then properties against a reference sessionizer.

The reference is the definition of a session: sort the accepted events by (ts, event_id) and split
where the gap exceeds the inactivity timeout. Every run is checked through the adapter's path (state
dumped and loaded between calls) and through the "final table": the latest version of each session id,
as ClickHouse's ReplacingMergeTree keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.sessionize import (
    SessionConfig,
    SessionPolicy,
    VisitorState,
    apply,
    close_idle,
    dump_state,
    load_state,
    next_deadline,
    session_id_for,
)
from schemas.session import Session

MIN = 60_000
POLICY = SessionPolicy(SessionConfig(inactivity_ms=30 * MIN, grace_ms=60 * MIN))
SITE, VISITOR = "site-1", "visitor-1"


@dataclass(slots=True)
class Ev:
    """Stands in for schemas.events.EnrichedEvent: just the fields SessionInput reads."""

    event_id: str
    ts_ms: int
    type: str = "pageview"
    url: str = ""
    site_id: str = SITE
    visitor_id: str = VISITOR
    referrer: str = ""
    channel: str = ""
    utm_source: str = ""
    utm_medium: str = ""
    utm_campaign: str = ""
    utm_term: str = ""
    utm_content: str = ""
    click_id_type: str = ""
    click_id: str = ""
    device: str = ""
    browser: str = ""
    os: str = ""
    is_bot: bool = False
    email: str = ""


def at(event_id: str, minute: float, **fields) -> Ev:
    return Ev(event_id, int(minute * MIN), url=f"/{event_id}", **fields)


def sid(event: Ev) -> str:
    return session_id_for(SITE, VISITOR, event.ts_ms, event.event_id)


def by_id(upserts: list[Session]) -> dict[str, Session]:
    return {s.session_id: s for s in upserts}


# --- examples -------------------------------------------------------------------------------------


def test_events_within_the_timeout_share_a_session_and_a_longer_gap_starts_the_next():
    a, b, c = at("a", 0, referrer="https://google.com/", channel="organic"), at("b", 29), at("c", 70)
    result = apply(None, [a, b, c], POLICY)
    first, second = by_id(result.upserts)[sid(a)], by_id(result.upserts)[sid(c)]
    assert result.session_ids == [sid(a), sid(a), sid(c)]
    assert (first.event_count, first.duration_ms, first.landing_url, first.exit_url) == (2, 29 * MIN, "/a", "/b")
    assert (first.referrer, first.channel, first.session_index, first.previous_session_id) == (
        "https://google.com/", "organic", 0, "")  # fmt: skip
    assert (second.session_index, second.previous_session_id, second.is_closed) == (1, sid(a), False)


def test_earlier_event_extends_the_session_backwards_and_tombstones_the_old_id():
    a, z = at("a", 10), at("z", 0, utm_source="news", email="ann@acme.com")
    state = apply(None, [a], POLICY).state
    result = apply(state, [z], POLICY)
    upserts = by_id(result.upserts)
    assert result.session_ids == [sid(z)]
    assert upserts[sid(a)].merged_into == sid(z) and upserts[sid(a)].version == 2
    current = upserts[sid(z)]
    assert (current.start_ms, current.landing_url, current.exit_url, current.event_count) == (0, "/z", "/a", 2)
    assert (current.utm_source, current.utm_source_last, current.email) == ("news", "news", "ann@acme.com")


def test_event_bridging_two_sessions_merges_them():
    a, b, bridge = at("a", 0), at("b", 40), at("bridge", 20)
    state = apply(None, [a, b], POLICY).state
    assert len(state.open) == 2
    result = apply(state, [bridge], POLICY)
    upserts = by_id(result.upserts)
    assert set(upserts) == {sid(a), sid(b)}
    assert upserts[sid(b)].merged_into == sid(a)
    assert (upserts[sid(a)].event_count, upserts[sid(a)].end_ms) == (3, 40 * MIN)
    assert result.session_ids == [sid(a)]


def test_tombstones_are_re_pointed_to_the_newest_id():
    a, y, x = at("a", 20), at("y", 10), at("x", 0)
    state = apply(None, [a], POLICY).state
    state = apply(state, [y], POLICY).state
    upserts = by_id(apply(state, [x], POLICY).upserts)
    assert upserts[sid(a)].merged_into == upserts[sid(y)].merged_into == sid(x)
    assert upserts[sid(a)].version == 3  # 1 created, 2 first tombstone, 3 re-pointed


def test_a_new_earlier_session_re_emits_the_later_one_with_its_new_index():
    later, earlier = at("later", 120), at("earlier", 0)
    state = apply(None, [later], POLICY).state
    upserts = by_id(apply(state, [earlier], POLICY).upserts)
    assert (upserts[sid(earlier)].session_index, upserts[sid(later)].session_index) == (0, 1)
    assert upserts[sid(later)].previous_session_id == sid(earlier)


def test_late_event_is_flagged_and_never_reopens_closed_history():
    a, b, straggler = at("a", 0), at("b", 200), at("straggler", 10)
    first = apply(None, [a, b], POLICY)
    assert by_id(first.upserts)[sid(a)].is_closed  # watermark 200 >= 0 + 30 + 60
    result = apply(first.state, [straggler], POLICY)
    assert (result.late, result.session_ids, result.upserts) == ([True], [""], [])


def test_stream_clock_closes_sessions_before_the_batch_is_placed():
    a, b = at("a", 0), at("b", 20)
    state = apply(None, [a], POLICY).state
    result = apply(state, [b], POLICY, now_ms=90 * MIN)
    assert result.late == [True]
    assert [(s.session_id, s.is_closed) for s in result.upserts] == [(sid(a), True)]


def test_event_past_its_own_deadline_that_touches_no_closed_session_is_final_at_once():
    a, b, c = at("a", 0), at("b", 200), at("c", 100)
    state = apply(None, [a, b], POLICY).state
    result = apply(state, [c], POLICY)
    upserts = by_id(result.upserts)
    assert result.late == [False]
    assert (upserts[sid(c)].session_index, upserts[sid(c)].is_closed) == (1, True)
    assert (upserts[sid(b)].session_index, upserts[sid(b)].previous_session_id) == (2, sid(c))


def test_duplicate_delivery_is_flagged_and_counted_once():
    a, b = at("a", 0), at("b", 5)
    state = apply(None, [a], POLICY).state
    result = apply(state, [b, a], POLICY)
    assert result.duplicate == [False, True]
    assert result.session_ids == [sid(a), ""]
    assert by_id(result.upserts)[sid(a)].event_count == 2


def test_a_copy_resent_after_its_session_closed_is_still_a_duplicate_within_the_window():
    policy = SessionPolicy(SessionConfig(inactivity_ms=30 * MIN, grace_ms=60 * MIN, dedup_window_ms=24 * 60 * MIN))
    a = at("a", 0)
    state = apply(None, [a, at("b", 5 * 60)], policy).state  # five hours later: a's session is closed
    assert state.closed_count == 1
    result = apply(state, [a, at("c", 5 * 60 + 1)], policy)
    assert (result.duplicate, result.late) == ([True, False], [False, False])
    state = apply(result.state, [at("d", 25 * 60)], policy).state  # a is now older than the window
    assert apply(state, [a], policy).late == [True]  # accepted again, flagged late, never a session


def test_a_visitor_remembers_only_its_newest_ids():
    policy = SessionPolicy(SessionConfig(dedup_window_ms=24 * 60 * MIN, dedup_max_ids=3))
    events = [at(f"e{i}", i) for i in range(5)]
    state = apply(None, events, policy).state
    assert state.recent.entries == [[2 * MIN, "e2"], [3 * MIN, "e3"], [4 * MIN, "e4"]]
    assert apply(state, [events[4], events[1]], policy).duplicate == [True, False]


def test_idle_session_is_closed_by_the_timer_once():
    a = at("a", 0)
    state = apply(None, [a], POLICY).state
    deadline = next_deadline(state, POLICY)
    assert deadline == 90 * MIN
    state, upserts = close_idle(state, deadline - 1, POLICY)
    assert upserts == []
    state, upserts = close_idle(state, deadline, POLICY)
    assert [(s.session_id, s.is_closed, s.version) for s in upserts] == [(sid(a), True, 2)]
    assert close_idle(state, deadline + 10 * MIN, POLICY)[1] == []
    assert next_deadline(state, POLICY) is None


def test_timeout_is_configured_per_site():
    policy = SessionPolicy(POLICY.default, {"fast": SessionConfig(inactivity_ms=5 * MIN, grace_ms=0)})
    fast = [at("a", 0, site_id="fast"), at("b", 6, site_id="fast")]
    assert len(set(apply(None, fast, policy).session_ids)) == 2
    assert len(set(apply(None, [at("a", 0), at("b", 6)], policy).session_ids)) == 1


def test_last_touch_bot_and_email_come_from_the_whole_session():
    events = [
        at("a", 0, utm_source="google", utm_medium="cpc", click_id_type="gclid", click_id="g1"),
        at("b", 1, email="old@acme.com"),
        at("c", 2, type="custom", utm_source="news", utm_campaign="may", email="new@acme.com", is_bot=True),
        at("d", 3),
    ]
    session = by_id(apply(None, events, POLICY).upserts)[sid(events[0])]
    assert (session.utm_source, session.utm_medium, session.click_id_type, session.click_id) == (
        "google", "cpc", "gclid", "g1")  # fmt: skip
    last = (session.utm_source_last, session.utm_medium_last, session.utm_campaign_last, session.click_id_last)
    assert last == ("news", "", "may", "")
    assert (session.email, session.is_bot, session.pageview_count, session.exit_url) == ("new@acme.com", True, 3, "/d")


def test_landing_url_falls_back_to_the_earliest_event_without_pageviews():
    session = apply(None, [at("click", 0, type="email_click"), at("open", 1, type="email_open")], POLICY).upserts[0]
    assert (session.landing_url, session.exit_url, session.pageview_count) == ("/click", "", 0)


def test_events_of_another_visitor_are_refused():
    with pytest.raises(ValueError, match="not from visitor"):
        apply(None, [at("a", 0), at("b", 1, visitor_id="someone-else")], POLICY)


@pytest.mark.parametrize("inactivity, grace", [(0, 0), (MIN, -1)])
def test_config_rejects_nonsense(inactivity, grace):
    with pytest.raises(ValueError):
        SessionConfig(inactivity, grace)


def test_session_json_round_trip_ignores_unknown_keys():
    session = apply(None, [at("a", 0, channel="paid")], POLICY).upserts[0]
    assert Session.from_json(session.to_json()) == session
    assert Session.from_json(session.to_json()[:-1] + b',"added_later":1}') == session


def test_state_stays_small():
    events = [at(f"{i:032x}", i, referrer="https://www.google.com/", channel="organic") for i in range(10)]
    state = apply(None, events, POLICY).state
    assert load_state(dump_state(state)) == state
    assert len(dump_state(state)) < 1200  # one open session of 10 events with uuid-sized ids


def test_a_session_that_never_idles_keeps_a_bounded_state():
    """A visitor sending an event every second for a day never closes its session; its state must not
    grow with it (it used to hold every event id of the open session)."""
    state, sizes = None, []
    for batch in range(60):
        events = [Ev(f"{i:032x}", i * 1000) for i in range(batch * 500, (batch + 1) * 500)]
        state = load_state(dump_state(apply(state, events, POLICY).state))
        sizes.append(len(dump_state(state)))
    assert len(state.open) == 1 and state.open[0].event_count == 30_000
    assert len(state.recent.entries) == POLICY.default.dedup_max_ids
    assert max(sizes) < 50_000  # 1,000 ids of 32 characters and one session (the ids alone were 1 MB)


def test_a_blob_of_the_previous_format_loads_and_keeps_catching_duplicates():
    old_session = ["sid-a", 2, 5 * MIN, ["b", "a"], 2, False, [0, "a", "/a", [""] * 12], None, None, None, None, []]
    state = load_state(orjson.dumps([1, SITE, VISITOR, 5 * MIN, 0, "", 0, [old_session]]))
    assert (state.open[0].event_count, state.recent.entries) == (2, [[5 * MIN, "a"], [5 * MIN, "b"]])
    result = apply(state, [at("a", 0), at("c", 6)], POLICY)
    assert result.duplicate == [True, False]
    assert by_id(result.upserts)["sid-a"].event_count == 3


# --- properties -----------------------------------------------------------------------------------

TYPES = ("pageview", "pageview", "custom", "email_click", "form_submit")


def make_event(i: int, ts: int, kind: str, utm: str, click: str, email: str, bot: bool) -> Ev:
    """Every first-touch value names its event, so a value taken from the wrong event shows."""
    return Ev(
        f"e{i}", ts, type=kind, url=f"/p{i}", referrer=f"r{i}", channel=f"ch{i % 3}", utm_source=utm,
        utm_medium=utm and f"m{i}", utm_campaign=utm and f"c{i}", utm_term=utm and f"t{i}",
        utm_content=utm and f"x{i}", click_id_type=click and "gclid", click_id=click and f"{click}{i}",
        device=f"d{i}", browser=f"b{i}", os=f"o{i}", is_bot=bot, email=email,
    )  # fmt: skip


event_fields = st.tuples(
    st.integers(0, 300),
    st.sampled_from(TYPES),
    st.sampled_from(["", "", "google", "news"]),
    st.sampled_from(["", "", "", "click"]),
    st.sampled_from(["", "", "ann@acme.com", "bob@acme.com"]),
    st.sampled_from([False, False, False, True]),
)
event_lists = st.lists(event_fields, min_size=1, max_size=24)
configs = st.builds(SessionConfig, inactivity_ms=st.integers(1, 20), grace_ms=st.integers(0, 40))


@st.composite
def streams(draw) -> tuple[SessionConfig, list[Ev]]:
    """Events in any arrival order, some delivered twice."""
    config = draw(configs)
    events = [make_event(i, *fields) for i, fields in enumerate(draw(event_lists))]
    redelivered = draw(st.lists(st.sampled_from(events), max_size=4))
    return config, draw(st.permutations(events + redelivered))


@st.composite
def streams_within_grace(draw) -> tuple[SessionConfig, list[Ev]]:
    """Events in an arrival order where each arrives less than `grace` behind the newest so far."""
    config = draw(configs)
    newest, events = draw(st.integers(0, 50)), []
    for i, fields in enumerate(draw(event_lists)):
        if draw(st.booleans()):
            ts = newest + draw(st.integers(0, 3 * config.inactivity_ms))
        else:
            ts = newest - draw(st.integers(0, max(config.grace_ms - 1, 0)))
        newest = max(newest, ts)
        events.append(make_event(i, ts, *fields[1:]))
    return config, events


def splits(events: list[Ev], cuts: set[int]) -> list[list[Ev]]:
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(events)), len(events)]
    return [events[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


@dataclass
class Run:
    """What the adapter would see and store after feeding batches through apply()."""

    state: VisitorState
    table: dict[str, Session]  # latest version of every session id: what ReplacingMergeTree keeps
    emitted: list[Session]
    session_ids: list[str]  # as returned, per event (superseded ids may have moved on since)
    late: list[bool]
    duplicate: list[bool]

    def current(self) -> list[Session]:
        return sorted((s for s in self.table.values() if not s.merged_into), key=lambda s: s.start_ms)


def feed(batches: list[list[Ev]], policy: SessionPolicy) -> Run:
    state, table, emitted, session_ids, late, duplicate = None, {}, [], [], [], []
    for batch in batches:
        result = apply(state, batch, policy)
        assert len({s.session_id for s in result.upserts}) == len(result.upserts), "an id twice in one call"
        for session in result.upserts:
            assert session.session_id not in table or session.version > table[session.session_id].version
            table[session.session_id] = session
        emitted += result.upserts
        session_ids += result.session_ids
        late += result.late
        duplicate += result.duplicate
        state = load_state(dump_state(result.state))  # the adapter's path: every call starts from Redis
    return Run(state, table, emitted, session_ids, late, duplicate)


def reference(events: list[Ev], inactivity_ms: int) -> list[Session]:
    """Sessions by definition: sorted events split on gaps > inactivity (version and is_closed unset)."""
    groups: list[list[Ev]] = []
    for event in sorted(events, key=lambda e: (e.ts_ms, e.event_id)):
        if groups and event.ts_ms - groups[-1][-1].ts_ms <= inactivity_ms:
            groups[-1].append(event)
        else:
            groups.append([event])
    sessions, previous_id = [], ""
    for index, group in enumerate(groups):
        first, pages = group[0], [e for e in group if e.type == "pageview"]
        touched = [e for e in group if e.utm_source or e.utm_medium or e.utm_campaign or e.click_id]
        last = touched[-1] if touched else Ev("", 0)
        emails = [e.email for e in group if e.email]
        session = Session(
            sid(first), SITE, VISITOR, index, previous_id, first.ts_ms, group[-1].ts_ms,
            group[-1].ts_ms - first.ts_ms, len(group), len(pages), (pages or group)[0].url,
            pages[-1].url if pages else "", first.referrer, first.channel, first.utm_source, first.utm_medium,
            first.utm_campaign, first.utm_term, first.utm_content, first.click_id_type, first.click_id,
            last.utm_source, last.utm_medium, last.utm_campaign, last.click_id, first.device, first.browser,
            first.os, any(e.is_bot for e in group), emails[-1] if emails else "", version=0,
        )  # fmt: skip
        sessions.append(session)
        previous_id = session.session_id
    return sessions


def comparable(sessions: list[Session]) -> list[Session]:
    return [replace(s, version=0, is_closed=False) for s in sessions]


def accepted(run: Run, arrivals: list[Ev]) -> list[Ev]:
    return [e for e, late, dup in zip(arrivals, run.late, run.duplicate) if not (late or dup)]


@settings(max_examples=150, deadline=None)
@given(streams(), st.sets(st.integers(1, 30)), st.sets(st.integers(1, 30)))
def test_batch_split_does_not_change_the_outcome(stream, cuts, other_cuts):
    config, events = stream
    policy = SessionPolicy(config)
    runs = [feed(splits(events, c), policy) for c in ({}, cuts, other_cuts, set(range(len(events))))]
    for run in runs[1:]:
        assert dump_state(run.state) == dump_state(runs[0].state)
        assert run.table == runs[0].table  # versions included: a replayed batch re-emits identical rows
        assert (run.late, run.duplicate) == (runs[0].late, runs[0].duplicate)


@settings(max_examples=150, deadline=None)
@given(streams(), st.sets(st.integers(1, 30)))
def test_sessions_are_the_reference_split_of_the_accepted_events(stream, cuts):
    config, events = stream
    run = feed(splits(events, cuts), SessionPolicy(config))
    assert comparable(run.current()) == reference(accepted(run, events), config.inactivity_ms)


@settings(max_examples=150, deadline=None)
@given(streams_within_grace())
def test_arrival_order_within_grace_does_not_change_the_sessions(stream):
    config, events = stream
    policy = SessionPolicy(config)
    run = feed([[e] for e in events], policy)
    in_order = feed([sorted(events, key=lambda e: e.ts_ms)], policy)
    assert not any(run.late)
    assert comparable(run.current()) == comparable(in_order.current()) == reference(events, config.inactivity_ms)
    assert [s.is_closed for s in run.current()] == [s.is_closed for s in in_order.current()]


@settings(max_examples=150, deadline=None)
@given(streams(), st.sets(st.integers(1, 30)))
def test_ids_resolve_in_one_hop_and_closed_sessions_never_change(stream, cuts):
    config, events = stream
    run = feed(splits(events, cuts), SessionPolicy(config))
    for session in run.table.values():
        if session.merged_into:
            assert not run.table[session.merged_into].merged_into, "tombstone chain longer than one hop"
    for event, session_id, late, duplicate in zip(events, run.session_ids, run.late, run.duplicate):
        if late or duplicate:
            assert session_id == ""
            continue
        home = run.table[session_id]
        home = run.table[home.merged_into] if home.merged_into else home
        assert home.start_ms <= event.ts_ms <= home.end_ms
    closed = [s for s in run.emitted if s.is_closed]
    assert len({s.session_id for s in closed}) == len(closed), "a closed session was emitted again"
    assert all(run.table[s.session_id] == s for s in closed)


@settings(max_examples=150, deadline=None)
@given(streams(), st.sets(st.integers(1, 30)))
def test_redelivered_events_are_flagged_and_counted_once(stream, cuts):
    """The default window (a day) and id count (1,000) cover these streams: every copy is caught, open
    session or closed, and only copies are."""
    config, events = stream
    run = feed(splits(events, cuts), SessionPolicy(config))
    counted = [e.event_id for e in accepted(run, events)]
    assert len(counted) == len(set(counted))
    assert sum(s.event_count for s in run.current()) == len(counted)
    seen: set[str] = set()
    for event, duplicate in zip(events, run.duplicate):
        assert duplicate == (event.event_id in seen)
        seen.add(event.event_id)


dedup_configs = st.builds(SessionConfig, inactivity_ms=st.integers(1, 20), grace_ms=st.integers(0, 40),
                          dedup_window_ms=st.integers(0, 150), dedup_max_ids=st.integers(1, 6))


@st.composite
def streams_with_small_dedup_bounds(draw) -> tuple[SessionConfig, list[Ev]]:
    """Long streams, many copies, and a window and id count they overflow."""
    config = draw(dedup_configs)
    events = [make_event(i, *fields) for i, fields in enumerate(draw(st.lists(event_fields, min_size=1, max_size=40)))]
    copies = draw(st.lists(st.sampled_from(events), max_size=20))
    return config, draw(st.permutations(events + copies))


@settings(max_examples=200, deadline=None)
@given(streams_with_small_dedup_bounds(), st.sets(st.integers(1, 60)))
def test_a_copy_is_caught_exactly_while_its_original_is_among_the_newest_ids_in_the_window(stream, cuts):
    """The oracle: before each event, the remembered ids are the newest `dedup_max_ids` (by ts, id) of
    the events accepted so far whose ts is within the window of the newest ts seen. Whatever the stream
    and the batch split, exactly the events whose id is among them are duplicates, and the state never
    holds more than that."""
    config, events = stream
    run = feed(splits(events, cuts), SessionPolicy(config))
    accepted_so_far: list[tuple[int, str]] = []
    newest = events[0].ts_ms
    for event, duplicate in zip(events, run.duplicate):
        in_window = sorted(pair for pair in accepted_so_far if pair[0] >= newest - config.dedup_window_ms)
        remembered = {event_id for _, event_id in in_window[-config.dedup_max_ids:]}
        assert duplicate == (event.event_id in remembered)
        if not duplicate:
            accepted_so_far.append((event.ts_ms, event.event_id))
        newest = max(newest, event.ts_ms)
    entries = run.state.recent.entries
    assert len(entries) <= config.dedup_max_ids
    assert all(ts >= run.state.watermark_ms - config.dedup_window_ms for ts, _ in entries)


@settings(max_examples=150, deadline=None)
@given(streams(), st.integers(0, 400))
def test_close_idle_closes_each_idle_session_exactly_once(stream, now):
    config, events = stream
    policy = SessionPolicy(config)
    state = feed([events], policy).state
    due = {s.session_id for s in state.open if s.end_ms + config.inactivity_ms + config.grace_ms <= now}
    state, upserts = close_idle(state, now, policy)
    assert {s.session_id for s in upserts} == due and all(s.is_closed for s in upserts)
    assert close_idle(state, now, policy)[1] == []
    deadline = next_deadline(state, policy)
    assert (deadline is None) == (not state.open) and (deadline is None or deadline > now)
    state, upserts = close_idle(state, 10**6, policy)
    assert not state.open and next_deadline(state, policy) is None


@settings(max_examples=100, deadline=None)
@given(streams(), st.sets(st.integers(1, 30)))
def test_state_round_trips_through_its_blob(stream, cuts):
    config, events = stream
    state = None
    for batch in splits(events, cuts):
        state = apply(state, batch, SessionPolicy(config)).state
        blob = dump_state(state)
        assert load_state(blob) == state and dump_state(load_state(blob)) == blob
