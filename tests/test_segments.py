"""Segment membership, the pure core: examples for each kind of condition first, then properties.

Properties: (a) the membership history is the same for any split of a lead's records into batches, with
the hourly pass run at every batch boundary, and with events re-delivered anywhere; (b) a member of a
window segment leaves at exactly the moment its window runs out, through the hourly pass the lead's due
time asks for, with no new event; (c) a merge counts every event once.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from processors.rules import LeadState, RuleSet, apply_event, hourly_pass, merge, next_due_ms as rules_due
from processors.segments import (
    GRACE_MS,
    AccountState,
    SegmentOutcome,
    SegmentSet,
    SegmentState,
    account_facts,
    event_time,
    next_due_ms,
    on_backfill,
    on_change,
    on_event,
    on_hour,
    on_identity,
    on_lead_facts,
    on_merge,
    on_retire,
)
from schemas.companies import Company
from schemas.records import event_digest
from schemas.rules import Rule
from schemas.segments import AccountLeadFacts, Segment, SegmentBackfill, SegmentChange
from tests.test_rules import DAY_MS, HOUR_MS, SITE, T0, event

PRICING = {"count": {"event": "pageview", "url": "*/pricing*"}, "within": "14d", "op": "gt", "value": 1}


def segments(*definitions: dict[str, Any], version: int = 1) -> SegmentSet:
    return SegmentSet.compile([Segment.model_validate({"name": d["id"], "version": version, **d})
                               for d in definitions], version)


class Lead:
    """A lead as the lead processor drives it: the rules, then the segments, after every record. An
    anonymous employee of acme.com unless `fields` say otherwise (only leads are members of segments)."""

    def __init__(self, segset: SegmentSet, ruleset: RuleSet | None = None, lead_id: str = "lead-1", **fields: Any):
        self.segset, self.rules = segset, ruleset or RuleSet.compile([])
        self.state = LeadState(lead_id, SITE, **({"account_domain": "acme.com"} | fields))
        self.changes: list[SegmentChange] = []

    def _take(self, outcome: SegmentOutcome) -> list[SegmentChange]:
        self.state.segments = outcome.state
        self.changes += outcome.changes
        return outcome.changes

    def see(self, *events: Any) -> list[SegmentChange]:
        changes = []
        for e in events:
            before = self.state
            after = apply_event(self.rules, before, e).state
            self.state = after
            changes += self._take(on_event(self.segset, before, after, e))
        return changes

    def hour(self, now_ms: int) -> list[SegmentChange]:
        self.state = hourly_pass(self.rules, self.state, now_ms).state
        return self._take(on_hour(self.segset, self.state, now_ms))

    def due(self) -> int | None:
        found = [due for due in (rules_due(self.rules, self.state), next_due_ms(self.segset, self.state)) if due]
        return min(found, default=None)

    def members(self) -> list[str]:
        state = self.state.segments
        return sorted(s for s in state.members if state.is_member(s)) if state else []


def pricing(event_id: str, ts_ms: int, **fields: Any):
    return event(event_id, ts_ms=ts_ms, url="https://acme.com/pricing", **fields)


def moves(changes: list[SegmentChange]) -> list[tuple[str, bool, int, str]]:
    return [(c.segment_id, c.entered, c.ts_ms - T0, c.cause) for c in changes]


# ---- examples ----

def test_the_contract_example_enters_on_the_second_pricing_view_and_leaves_when_14_days_run_out():
    lead = Lead(segments({"id": "pricing-twice", "if": [PRICING]}))
    assert lead.see(pricing("e1", T0), event("e2", ts_ms=T0 + HOUR_MS, url="https://acme.com/")) == []
    assert moves(lead.see(pricing("e3", T0 + DAY_MS))) == [("pricing-twice", True, DAY_MS, "event:e3")]
    assert lead.due() == T0 + 14 * DAY_MS + GRACE_MS  # e1 leaves the window at T0 + 14d; the pass an hour on
    assert lead.hour(T0 + 14 * DAY_MS) == []  # within the grace: not yet
    left = lead.hour(lead.due())
    assert moves(left) == [("pricing-twice", False, 14 * DAY_MS, "window")]
    assert left[0].seq == 2 and left[0].version == 1 and left[0].of == "lead" and lead.due() is None


def test_known_contacts_with_score_and_tag():
    ruleset = RuleSet.compile([Rule.model_validate(
        {"id": "webinar", "when": {"event": "form_submit", "name": "webinar"},
         "then": [{"add_tag": "Webinar"}, {"add_score": 45}]})])
    lead = Lead(segments({"id": "webinar-known", "if": [
        {"field": "lead.known", "op": "is", "value": True}, {"field": "lead.score", "op": "gt", "value": 39},
        {"field": "lead.tags", "op": "contains", "value": "webinar"}]}), ruleset)
    assert lead.see(event("e1", "form_submit", name="webinar")) == []  # anonymous: not yet
    lead.state.email = "ann@acme.com"
    assert moves(lead._take(on_change(lead.segset, lead.state, "identity:i1"))) == [
        ("webinar-known", True, 0, "identity:i1")]


def test_fields_of_the_registry():
    segset = segments(
        {"id": "paid-first", "if": [{"field": "lead.first_channel", "op": "is", "value": "paid"}]},
        {"id": "email-last", "if": [{"field": "lead.last_channel", "op": "is", "value": "email"},
                                    {"field": "lead.last_utm_campaign", "op": "is", "value": "spring"}]},
        {"id": "acme", "if": [{"field": "lead.email_domain", "op": "is", "value": "acme.com"},
                              {"field": "account.domain", "op": "exists"}]},
        {"id": "plan", "if": [{"field": "lead.properties.plan", "op": "is", "value": "pro"}]},
        {"id": "old", "if": [{"field": "lead.first_seen", "op": "lt", "value": T0 + 1}]},
    )
    lead = Lead(segset, email="bo@acme.com", account_domain="acme.com", properties={"plan": "Pro"})
    lead.see(event("e1", channel="paid"))
    assert lead.members() == ["acme", "old", "paid-first", "plan"]
    internal = event("e2", ts_ms=T0 + 1, channel="direct", referrer_domain="acme.com", url_domain="acme.com")
    assert lead.see(internal) == []  # internal navigation is no touch
    lead.see(event("e3", "email_click", ts_ms=T0 + 2, channel="email", utm_campaign="spring"))
    assert lead.members() == ["acme", "email-last", "old", "paid-first", "plan"]


def test_the_last_seen_country_and_the_company_cards_fields():
    cards = {"acme.com": Company("acme.com", "Acme", industry="Software", employees="51-200", employees_min=51,
                                 country="NL")}
    segset = segments(
        {"id": "dutch-now", "if": [{"field": "geo.country", "op": "is", "value": "nl"}]},
        {"id": "dutch-software", "if": [{"field": "account.industry", "op": "is", "value": "software"},
                                        {"field": "account.country", "op": "is", "value": "NL"},
                                        {"field": "account.employees", "op": "gt", "value": 50},
                                        {"field": "account.name", "op": "contains", "value": "acm"}]},
        {"id": "companies-nl", "of": "account", "if": [{"field": "account.country", "op": "is", "value": "NL"}]})
    lead = Lead(segset)
    lead.state.segments = on_event(segset, lead.state, lead.state, event("e1", geo_country="NL"), cards).state
    assert lead.members() == ["dutch-now", "dutch-software"]
    later, earlier = event("e2", ts_ms=T0 + 2, geo_country="DE"), event("e3", ts_ms=T0 + 1, geo_country="NL")
    for e in (later, earlier, event("e4", ts_ms=T0 + 3)):  # the latest event with a country wins; none: no change
        lead.state.segments = on_event(segset, lead.state, lead.state, e, cards).state
    assert lead.members() == ["dutch-software"] and lead.state.segments.country == "DE"
    cards.clear()  # the card is gone: the next record reads that
    lead.state.segments = on_event(segset, lead.state, lead.state, event("e5", ts_ms=T0 + 4), cards).state
    assert lead.members() == []
    account, changes = on_lead_facts(segset, AccountState(SITE, "acme.com"), lead_facts("lead-1", [], left=False),
                                     {"acme.com": Company("acme.com", "Acme", country="NL")})
    assert [(c.segment_id, c.member_id, c.entered) for c in changes] == [("companies-nl", "acme.com", True)]


def test_a_visitor_who_is_neither_known_nor_of_an_account_is_in_no_segment():
    segset = segments({"id": "pricing-twice", "if": [PRICING]})
    visitor = Lead(segset, account_domain="")
    assert visitor.see(pricing("e1", T0), pricing("e2", T0 + HOUR_MS)) == []  # counted, but not a lead
    joined = LeadState(visitor.state.lead_id, SITE, account_domain="acme.com", segments=visitor.state.segments)
    outcome = on_identity(segset, visitor.state, joined, T0 + 2 * HOUR_MS, "identity:i1")
    assert moves(outcome.changes) == [("pricing-twice", True, 2 * HOUR_MS, "identity:i1")]


def test_a_window_that_ran_out_before_an_identity_change_is_evaluated_with_the_lead_as_it_was():
    """The hourly pass or the identity change: whoever gets past the moment first, the same change."""
    segset = segments({"id": "pricing-twice", "if": [PRICING]})
    lead = Lead(segset)
    lead.see(pricing("e1", T0), pricing("e2", T0 + HOUR_MS))
    moved = LeadState(lead.state.lead_id, SITE, account_domain="beta.com", segments=lead.state.segments)
    by_identity = on_identity(segset, lead.state, moved, T0 + 20 * DAY_MS, "identity:i1").changes
    by_the_pass = on_hour(segset, lead.state, T0 + 20 * DAY_MS).changes
    assert by_identity == by_the_pass and [c.account_domain for c in by_identity] == ["acme.com"]
    assert moves(by_identity) == [("pricing-twice", False, 14 * DAY_MS, "window")]


def test_in_segment_is_evaluated_after_its_dependency_in_the_same_pass():
    lead = Lead(segments(
        {"id": "a-hot", "if": [{"in_segment": "z-pricing"}, {"field": "lead.known", "op": "is", "value": True}]},
        {"id": "z-pricing", "if": [{**PRICING, "value": 0}]}), email="c@d.com")
    assert moves(lead.see(pricing("e1", T0))) == [("z-pricing", True, 0, "event:e1"), ("a-hot", True, 0, "event:e1")]


def test_a_rule_reads_in_segment():
    ruleset = RuleSet.compile([Rule.model_validate(
        {"id": "tag-hot", "when": {"event": "pageview"}, "if": [{"in_segment": "viewers"}], "then": [{"add_tag": "Hot"}]})])
    lead = Lead(segments({"id": "viewers", "if": [{**PRICING, "value": 0}]}), ruleset)
    lead.see(pricing("e1", T0))
    assert "Hot" not in lead.state.tags  # the rule read the membership from before this event
    lead.see(event("e2", ts_ms=T0 + 1))
    assert "Hot" in lead.state.tags


def test_distinct_sessions_and_count_ops():
    lead = Lead(segments(
        {"id": "three-sessions", "if": [{"count": {"event": "any", "distinct": "session"}, "within": "7d",
                                         "op": "between", "value": [3, 4]}]},
        {"id": "few-forms", "if": [{"count": {"event": "form_submit"}, "within": "30d", "op": "lt", "value": 2}]},
        {"id": "one-click", "if": [{"count": {"event": "email_click", "campaign": "C1"}, "within": "2h", "op": "is",
                                    "value": 1}]}))
    lead.see(*(event(f"s{i}-{j}", ts_ms=T0 + i * HOUR_MS + j, session_id=f"s{i}") for i in range(3) for j in range(2)))
    assert lead.members() == ["few-forms", "three-sessions"]
    lead.see(event("f1", "form_submit", ts_ms=T0 + 3 * HOUR_MS), event("f2", "form_submit", ts_ms=T0 + 3 * HOUR_MS + 1))
    assert lead.members() == ["three-sessions"]
    lead.see(event("c1", "email_click", ts_ms=T0 + 4 * HOUR_MS, campaign="c1"))
    assert lead.members() == ["one-click", "three-sessions"]
    lead.see(*(event(f"t{i}", ts_ms=T0 + 5 * HOUR_MS + i, session_id=f"t{i}") for i in range(2)))
    assert lead.members() == ["one-click"]  # five sessions: more than 4
    assert lead.hour(T0 + 7 * HOUR_MS - 1) == [] and lead.members() == ["one-click"]
    assert moves(lead.hour(T0 + 7 * HOUR_MS)) == [("one-click", False, 6 * HOUR_MS, "window")]


def test_an_event_from_the_future_counts_from_its_arrival():
    lead = Lead(segments({"id": "viewers", "if": [{**PRICING, "value": 0}]}))
    future = pricing("e1", T0 + 30 * DAY_MS, received_ms=T0)
    assert event_time(future) == T0
    lead.see(future)
    assert next_due_ms(lead.segset, lead.state) == T0 + 14 * DAY_MS + GRACE_MS


def test_a_deleted_segment_is_left_and_an_edit_re_evaluates():
    lead = Lead(segments({"id": "viewers", "if": [{**PRICING, "value": 0}]}, {"id": "all", "if": []}))
    lead.see(pricing("e1", T0))
    assert lead.members() == ["all", "viewers"]
    edited = segments({"id": "viewers", "if": [PRICING]}, version=2)
    changes = lead._take(on_change(edited, lead.state, "definitions:2"))
    assert [(c.segment_id, c.entered, c.cause, c.version) for c in changes] == [
        ("viewers", False, "definitions:2", 2), ("all", False, "definitions:2", 2)]
    assert lead.state.segments.members == {"viewers": [2, T0]}
    gone = lead._take(on_change(SegmentSet.compile([], 3), lead.state, "definitions:3"))
    assert gone == [] and lead.state.segments.members == {}


def test_a_backfill_brings_history_a_new_count_needs():
    lead = Lead(segments({"id": "all", "if": []}))
    lead.see(event("e1", ts_ms=T0 + DAY_MS))
    edited = segments({"id": "all", "if": []}, {"id": "pricing-twice", "if": [PRICING]}, version=2)
    key = next(iter(edited.counters))
    history = {key: [[T0 + HOUR_MS, event_digest("old2")], [T0, event_digest("old1")]]}
    backfill = SegmentBackfill("bf1", SITE, "lead-1", 2, history, T0 + DAY_MS)
    assert moves(lead._take(on_backfill(edited, lead.state, backfill))) == [
        ("pricing-twice", True, DAY_MS, "definitions:2")]
    assert lead._take(on_backfill(edited, lead.state, backfill)) == []  # the same history again: no change
    lead.segset = edited
    assert lead.see(pricing("old1", T0)) == []  # the event itself, late: counted once


def test_merge_and_retire_move_membership_once():
    segset = segments({"id": "pricing-twice", "if": [PRICING]})
    anonymous, known = Lead(segset, lead_id="anon"), Lead(segset, lead_id="known", email="k@acme.com")
    anonymous.see(pricing("e1", T0), pricing("e2", T0 + HOUR_MS))
    known.see(pricing("e2", T0 + HOUR_MS))  # the same event, seen by both
    assert anonymous.members() == ["pricing-twice"] and known.members() == []
    left = on_retire(segset, anonymous.state, "known", T0 + 2 * HOUR_MS)
    assert moves(left) == [("pricing-twice", False, 2 * HOUR_MS, "merged:known")]
    before = known.state
    after = merge(known.rules, before, anonymous.state, T0 + 2 * HOUR_MS).state
    outcome = on_merge(segset, before, after, anonymous.state, "merge:anon")
    assert moves(outcome.changes) == [("pricing-twice", True, HOUR_MS, "merge:anon")]
    after.segments = outcome.state
    assert on_merge(segset, after, after, anonymous.state, "merge:anon").changes == []  # again: nothing


def test_account_segments_aggregate_their_leads():
    segset = segments(
        {"id": "viewers", "if": [{**PRICING, "value": 0}]},
        {"id": "busy-companies", "of": "account", "if": [
            {"count": {"leads": [{"in_segment": "viewers"}]}, "op": "gt", "value": 2}]},
        {"id": "all-known", "of": "account", "if": [{"every_lead": [{"field": "lead.known", "op": "is", "value": True}]},
                                                    {"field": "account.domain", "op": "contains", "value": "acme"}]},
        {"id": "followers", "of": "account", "if": [{"in_segment": "busy-companies"},
                                                   {"any_lead": [{"field": "lead.score", "op": "gt", "value": 10}]}]})
    account = AccountState(SITE, "acme.com")
    changes: list[SegmentChange] = []
    for i in range(3):
        lead = Lead(segset, lead_id=f"lead-{i}", email=f"p{i}@acme.com", account_domain="acme.com", score=6 * i)
        lead.see(pricing(f"e{i}", T0 + i))
        joined = account_facts(LeadState(f"lead-{i}", SITE), lead.state, SegmentOutcome(lead.state.segments), f"e{i}", 0,
                               version=1)
        assert [(u.account_domain, u.left) for u in joined] == [("acme.com", False)]
        account, more = on_lead_facts(segset, account, joined[0])
        changes += more
    assert [(c.segment_id, c.entered, c.member_id, c.cause) for c in changes] == [
        ("all-known", True, "acme.com", "lead:lead-0"), ("busy-companies", True, "acme.com", "lead:lead-2"),
        ("followers", True, "acme.com", "lead:lead-2")]
    account, more = on_lead_facts(segset, account, lead_facts("lead-9", [], left=False))
    assert [(c.segment_id, c.entered) for c in more] == [("all-known", False)]  # an anonymous lead joined
    account, more = on_lead_facts(segset, account, lead_facts("lead-2", [], left=True))
    assert [(c.segment_id, c.entered) for c in more] == [("busy-companies", False), ("followers", False)]
    assert sorted(account.leads) == ["lead-0", "lead-1", "lead-9"]
    again, more = on_lead_facts(segset, account, lead_facts("lead-2", [], left=True))
    assert again == account and more == []
    moved = LeadState("lead-0", SITE, account_domain="other.com")
    assert [(u.account_domain, u.left) for u in account_facts(lead.state, moved, SegmentOutcome(None), "i", 0)] == [
        ("acme.com", True), ("other.com", False)]


def test_an_account_segment_waits_for_every_lead_to_report_with_its_new_filters():
    """An edit renames a lead filter (its id carries the segment's version): until every lead of the account
    has reported with the new one, the account keeps its membership instead of leaving and entering again."""
    def of(version: int) -> SegmentSet:
        return segments({"id": "two-viewers", "of": "account", "if": [
            {"count": {"leads": [{**PRICING, "value": 0}]}, "op": "gt", "value": 1}]}, version=version)

    first, edited = of(1), of(2)
    old_filter, new_filter = first.lead[0].segment_id, edited.lead[0].segment_id
    assert old_filter != new_filter
    account = AccountState(SITE, "acme.com")
    for lead_id in ("a", "b"):
        account, _ = on_lead_facts(first, account, lead_facts(lead_id, [old_filter], left=False))
    assert account.member_of() == ["two-viewers"]
    account, changes = on_lead_facts(edited, account, lead_facts("a", [new_filter], left=False, version=2))
    assert changes == [] and account.member_of() == ["two-viewers"]  # b still counts the old filter
    account, changes = on_lead_facts(edited, account, lead_facts("b", [new_filter], left=False, version=2))
    assert changes == [] and account.member_of() == ["two-viewers"]
    account, changes = on_lead_facts(edited, account, lead_facts("b", [], left=False, version=2, update="b2"))
    assert [(c.entered, c.cause, c.version) for c in changes] == [(False, "lead:b", 2)]


def test_a_deleted_account_segment_is_left():
    segset = segments({"id": "any-lead", "of": "account", "if": [{"count": {"leads": []}, "op": "gt", "value": 0}]})
    every_lead = segset.lead[0].segment_id  # the lead filter of `leads: []`: every lead meets it
    account, changes = on_lead_facts(segset, AccountState(SITE, "acme.com"), lead_facts("a", [every_lead], left=False))
    assert account.member_of() == ["any-lead"]
    account, changes = on_lead_facts(SegmentSet.compile([], 2), account, lead_facts("a", [], left=True))
    assert [(c.segment_id, c.entered, c.cause) for c in changes] == [("any-lead", False, "definitions:2")]
    assert account.members == {}


def lead_facts(lead_id: str, filters: list[str], left: bool, version: int = 1, update: str = "") -> AccountLeadFacts:
    return AccountLeadFacts(update or f"u-{lead_id}-{left}-{version}", SITE, "acme.com", lead_id, filters, left,
                            T0 + DAY_MS, f"lead:{lead_id}", version=version)


def test_state_round_trips_through_json():
    lead = Lead(segments({"id": "paid", "if": [PRICING, {"field": "lead.first_channel", "op": "is", "value": "paid"}]}))
    lead.see(pricing("e1", T0, channel="paid"), pricing("e2", T0 + 1))
    again = LeadState.from_json(lead.state.to_json())
    assert again == lead.state and isinstance(again.segments, SegmentState)


# ---- properties ----

URLS = ("https://acme.com/pricing", "https://acme.com/pricing?plan=pro", "https://acme.com/blog", "https://acme.com/")
PROPERTY_SEGMENTS = segments(
    {"id": "pricing-twice", "if": [PRICING]},
    {"id": "quiet-pricing", "if": [{"count": {"event": "pageview", "url": "*/pricing*"}, "within": "2d", "op": "lt",
                                    "value": 2}, {"field": "lead.tags", "op": "contains", "value": "x"}]},
    {"id": "three-in-a-day", "if": [{"count": {"event": "any"}, "within": "1d", "op": "between", "value": [3, 5]}]},
    {"id": "sessions", "if": [{"count": {"event": "any", "distinct": "session"}, "within": "3d", "op": "gt",
                               "value": 1}]},
    {"id": "twice-and-sessions", "if": [{"in_segment": "pricing-twice"}, {"in_segment": "sessions"}]},
    {"id": "came-by-email", "if": [{"field": "lead.last_channel", "op": "is", "value": "email"},
                                   {"any": [{"in_segment": "sessions"}, {"field": "lead.first_channel", "op": "is",
                                                                         "value": "paid"}]}]},
)
TAGGER = RuleSet.compile([Rule.model_validate({"id": "x", "when": {"event": "pageview", "url": "*/blog*"},
                                               "then": [{"add_tag": "x"}]})])


@st.composite
def feeds(draw: Any) -> tuple[list[Any], list[int], list[int]]:
    """A lead's records as a partition delivers them: the partition's stream clock only moves forward,
    and each event is at most the grace behind it (or a re-delivery of an earlier one, at any lag).
    Returns the records, the clock after each record, and where batches end."""
    records, clocks, clock = [], [], T0
    for i in range(draw(st.integers(1, 40))):
        clock += draw(st.sampled_from((0, 60_000, 20 * 60_000, 3 * HOUR_MS, DAY_MS, 5 * DAY_MS)))
        if records and draw(st.integers(0, 5)) == 0:
            records.append(draw(st.sampled_from(records)))  # re-delivered
        else:
            lag = draw(st.integers(0, GRACE_MS))
            records.append(event(f"e{i}", ts_ms=clock - lag, url=draw(st.sampled_from(URLS)),
                                 session_id=f"s{(clock - lag) // (6 * HOUR_MS)}", url_domain="acme.com",
                                 channel=draw(st.sampled_from(("direct", "paid", "email"))),
                                 referrer_domain=draw(st.sampled_from(("", "acme.com", "news.com")))))
        clocks.append(clock)
    cuts = sorted(set(draw(st.lists(st.integers(1, len(records)), max_size=10))))
    return records, clocks, cuts


def run(records: list[Any], clocks: list[int], cuts: list[int]) -> Lead:
    """Records in batches; after each batch, the hourly pass at the partition's clock (whether the lead is
    due or not: another reason may have made it due), then one far in the future."""
    lead = Lead(PROPERTY_SEGMENTS, TAGGER)
    start = 0
    for end in [*cuts, len(records)]:
        lead.see(*records[start:end])
        if end:
            lead.hour(clocks[end - 1])
        start = end
    lead.hour(T0 + 400 * DAY_MS)
    return lead


@given(feeds())
def test_evaluating_only_what_a_record_changed_is_exact(feed):
    """After every record, evaluating every segment in full finds nothing to change."""
    records, _, _ = feed
    lead = Lead(PROPERTY_SEGMENTS, TAGGER)
    for record in records:
        lead.see(record)
        assert on_change(lead.segset, lead.state, "check").changes == []


@given(feeds())
def test_membership_is_the_same_whatever_the_batches_and_replays(feed):
    records, clocks, cuts = feed
    whole = run(records, clocks, [])
    batched = run(records, clocks, cuts)
    assert [c.to_json() for c in batched.changes] == [c.to_json() for c in whole.changes]
    replayed = run(records + records[: len(records) // 2], clocks + clocks[-1:] * (len(records) // 2), cuts)
    assert replayed.changes == whole.changes


@given(st.lists(st.integers(0, 20 * DAY_MS), min_size=2, max_size=12),
       st.integers(0, 2), st.sampled_from(("14d", "36h", "90m")))
def test_a_window_member_leaves_when_its_window_runs_out_with_no_new_event(offsets, value, within):
    window = {"14d": 14 * DAY_MS, "36h": 36 * HOUR_MS, "90m": 90 * 60_000}[within]
    lead = Lead(segments({"id": "viewers", "if": [{**PRICING, "within": within, "value": value}]}))
    times = sorted(T0 + offset for offset in offsets)
    lead.see(*(pricing(f"e{i}", ts) for i, ts in enumerate(times)))
    last = times[-1]
    in_window = [ts for ts in times if ts + window > last]
    if len(in_window) <= value:
        assert lead.members() == []
        return
    leaves_at = sorted(in_window, reverse=True)[value] + window  # the (value+1)-th newest leaves the window
    assert lead.members() == ["viewers"]
    due = lead.due()
    assert due == -(-(leaves_at + GRACE_MS) // HOUR_MS) * HOUR_MS
    assert lead.hour(leaves_at + GRACE_MS - 1) == [] and lead.members() == ["viewers"]  # a pass before: nothing
    left = lead.hour(due)
    assert [(c.segment_id, c.entered, c.ts_ms, c.cause) for c in left] == [("viewers", False, leaves_at, "window")]
    assert lead.due() is None


@given(st.lists(st.tuples(st.integers(0, 30), st.sampled_from("abc")), max_size=30),
       st.lists(st.integers(0, 10 * DAY_MS), min_size=31, max_size=31), st.integers(0, 3))
def test_a_merge_counts_every_event_once(events, offsets, value):
    """Two leads that saw overlapping events merge: every count is what one lead seeing each distinct event
    once would have."""
    segset = segments({"id": "viewers", "if": [{**PRICING, "value": value}]},
                      {"id": "busy", "if": [{"count": {"event": "any"}, "within": "3d", "op": "gt", "value": value}]})
    survivor, absorbed, reference = Lead(segset, lead_id="known"), Lead(segset, lead_id="anon"), Lead(segset, lead_id="ref")
    if not events:
        return
    made = {}
    for number, where in events:
        offset = offsets[number]
        made[number] = e = pricing(f"e{number}", T0 + offset) if number % 2 else event(f"e{number}", ts_ms=T0 + offset)
        for lead, side in ((survivor, "ab"), (absorbed, "bc")):
            if where in side:
                lead.see(e)
    reference.see(*sorted(made.values(), key=lambda e: e.ts_ms))
    before = survivor.state
    after = merge(survivor.rules, before, absorbed.state, T0).state
    merged = on_merge(segset, before, after, absorbed.state, "merge:anon").state
    reference.hour(merged.clock_ms + segset.grace_ms)
    final = reference.state.segments
    assert final.clock_ms == merged.clock_ms
    for key, counter in segset.counters.items():
        window = counter.window_ms
        counted = [e for e in merged.counters.get(key, []) if e[0] > merged.clock_ms - window]
        expected = [e for e in final.counters.get(key, []) if e[0] > final.clock_ms - window]
        assert counted == expected
        assert len({ident for _, ident in counted}) == len(counted)
    assert {s for s in merged.members if merged.is_member(s)} == {s for s in final.members if final.is_member(s)}


FILTERED_SEGMENTS = segments(
    {"id": "pricing-twice", "if": [PRICING]},
    {"id": "three-in-a-day", "if": [{"count": {"event": "any"}, "within": "1d", "op": "between", "value": [3, 5]}]},
    {"id": "tagged-and-busy", "if": [{"in_segment": "three-in-a-day"}, {"field": "lead.tags", "op": "contains",
                                                                         "value": "x"}]},
    {"id": "pricing-accounts", "of": "account",
     "if": [{"any_lead": [{"count": {"event": "pageview", "url": "*/pricing*"}, "within": "2d", "op": "gt",
                           "value": 0}]},
            {"count": {"leads": [{"in_segment": "three-in-a-day"}]}, "op": "gt", "value": 0}]},
)


@given(feeds(), st.lists(st.booleans(), min_size=40, max_size=40))
def test_the_read_index_evaluates_lead_filters_and_non_leads_as_a_full_pass_would(feed, employed):
    """The lead drifts in and out of being a lead (its account comes and goes) between records; after
    every record, a full evaluation finds no membership change and no lead filter change."""
    records, _, _ = feed
    lead = Lead(FILTERED_SEGMENTS, TAGGER)
    for record, works_there in zip(records, employed):
        if bool(lead.state.account_domain) != works_there:
            before = lead.state
            lead.state = before.copy()
            lead.state.account_domain = "acme.com" if works_there else ""
            lead._take(on_identity(lead.segset, before, lead.state, record.ts_ms, "identity"))
        lead.see(record)
        check = on_change(lead.segset, lead.state, "check")
        assert check.changes == [] and not check.filters_changed
        if not works_there:
            assert lead.members() == [] and lead.state.segments.filters == []
