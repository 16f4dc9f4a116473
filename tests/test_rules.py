"""The rule engine: examples for every trigger, op and action first, then properties of firing once.

Properties (DESIGN "Rules fire once"): the same records whatever the batch split, with the state taken
through JSON between batches; a per_lead rule never fires twice; a re-delivered event changes nothing;
a merge carries state over once; chains end; bots never fire; the hourly pass is idempotent per hour.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from processors.conditions import url_matcher
from processors.enrich import CHANNELS as ENRICH_CHANNELS
from processors.rules import (
    HOUR_MS,
    MAX_CHAIN_DEPTH,
    SEEN_EVENTS,
    URL_CACHE_SIZE,
    LeadState,
    TagSource,
    Outcome,
    RuleSet,
    apply_event,
    firing_id,
    hourly_pass,
    merge,
    next_due_ms,
    set_identity,
    tag_by_hand,
)
from schemas.companies import Company
from schemas.events import EnrichedEvent
from schemas.conditions import CHANNELS
from schemas.rules import Rule

SITE = "site-1"
DAY_MS = 24 * HOUR_MS
T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS
_EVENT_FIELDS = [f.name for f in dataclasses.fields(EnrichedEvent)]


def event(event_id: str, type: str = "pageview", ts_ms: int = T0, **fields: Any) -> EnrichedEvent:
    values: dict[str, Any] = {name: "" for name in _EVENT_FIELDS}
    values.update(event_id=event_id, site_id=SITE, type=type, ts_ms=ts_ms, received_ms=ts_ms, is_bot=False,
                  properties="{}", raw_partition=-1, raw_offset=-1, is_late=False, lead_id="lead-1", network_asn=0,
                  may_identify=True)
    if isinstance(fields.get("properties"), dict):
        fields["properties"] = orjson.dumps(fields["properties"]).decode()
    values.update(fields)
    return EnrichedEvent(**values)


def rules(*definitions: dict[str, Any]) -> RuleSet:
    return RuleSet.compile(Rule.model_validate({"version": 1, **d}) for d in definitions)


def lead(**fields: Any) -> LeadState:
    return LeadState("lead-1", SITE, **fields)


def fired(outcome: Outcome) -> list[str]:
    return [execution.rule_id for execution in outcome.executions]


def run_events(ruleset: RuleSet, state: LeadState, *events: EnrichedEvent) -> tuple[LeadState, list[Outcome]]:
    outcomes = []
    for e in events:
        outcomes.append(apply_event(ruleset, state, e))
        state = outcomes[-1].state
    return state, outcomes


def test_channels_match_enrichment():
    assert CHANNELS == ENRICH_CHANNELS


# ---- event triggers ----

@pytest.mark.parametrize("when, fields, expected", [
    ({"event": "pageview"}, {}, True),
    ({"event": "form_submit"}, {}, False),
    ({"event": "any"}, {"type": "custom"}, True),
    ({"event": "pageview", "url": "*/pricing*"}, {"url": "https://a.com/Pricing/team"}, True),
    ({"event": "pageview", "url": "*/pricing*"}, {"url": "https://a.com/blog"}, False),
    ({"event": "pageview", "channel": "email"}, {"channel": "email"}, True),
    ({"event": "pageview", "channel": "email"}, {"channel": "paid"}, False),
    ({"event": "pageview", "utm_source": "Newsletter"}, {"utm_source": "newsletter"}, True),
    ({"event": "pageview", "utm_medium": "cpc"}, {"utm_medium": "email"}, False),
    ({"event": "pageview", "utm_campaign": "spring"}, {"utm_campaign": "spring"}, True),
    ({"event": "custom", "name": "demo_booked"}, {"type": "custom", "name": "demo_booked"}, True),
    ({"event": "custom", "name": "demo_booked"}, {"type": "custom", "name": "other"}, False),
    ({"event": "email_click", "campaign": "c-42"}, {"type": "email_click", "campaign": "c-42"}, True),
])
def test_event_trigger(when, fields, expected):
    ruleset = rules({"id": "r", "when": when, "then": [{"add_tag": "T"}]})
    outcome = apply_event(ruleset, lead(), event("e1", **fields))
    assert (fired(outcome) == ["r"]) is expected
    assert ("T" in outcome.state.tags) is expected


@given(st.lists(st.sampled_from(["/pricing", "/Pricing/team", "/blog", "/docs/pricing", "/"]), max_size=40),
       st.lists(st.sampled_from(["pageview", "custom"]), min_size=1, max_size=40))
def test_url_cache_gives_what_matching_every_glob_gives(paths, types):
    """The per-(type, URL) cache of matching rules never changes which rules run, and stays bounded."""
    ruleset = rules({"id": "a", "when": {"event": "pageview", "url": "*/pricing*"}, "then": [{"add_tag": "A"}]},
                    {"id": "b", "when": {"event": "any", "url": "*blog"}, "then": [{"add_tag": "B"}]},
                    {"id": "c", "when": {"event": "pageview"}, "then": [{"add_tag": "C"}]})
    for path, type_ in zip(paths, types * len(paths)):
        e = event("e", type=type_, url="https://a.com" + path)
        expected = [rule.rule_id for rule in ruleset.by_event_type[type_] if rule.matches_url(e.url)]
        assert [rule.rule_id for rule in ruleset.event_rules(e)] == expected
        assert [rule.rule_id for rule in ruleset.event_rules(e)] == expected  # now from the cache
    assert len(ruleset.by_page) <= URL_CACHE_SIZE


# Letters whose ignore-case matching differs between `re` and lower(): the Kelvin sign, the long s, dotted
# and dotless i, sharp s; glob wildcards and a set; plain ASCII.
_URL_TEXT = st.text(alphabet="aAkKsSiI/-.?*[]!\u212a\u017f\u0130\u0131\u00dfe\u00e9", max_size=12)


@given(_URL_TEXT, _URL_TEXT)
@example("*s*", "/\u017f")  # the regex's ignore-case takes the long s for s; lower() does not
@example("*I/*", "/\u0131/")  # and the dotless i for i
def test_url_glob_prefilter_never_changes_a_match(glob, url):
    """The literal-part prefilter of a URL glob only spares the regex: a match is exactly the regex's."""
    assert url_matcher(glob)(url) == (not glob or re.compile(fnmatch.translate(glob), re.IGNORECASE).match(url)
                                      is not None)


def test_url_glob_matches_case_insensitively_around_its_literal_part():
    matches = url_matcher("*/kb/Topic-12/*")
    assert matches("https://a.com/KB/topic-12/intro?x=1")
    assert not matches("https://a.com/kb/topic-13/intro")
    assert matches("https://a.com/kb/topic-12/\u00e9t\u00e9")  # a non-ASCII URL: the regex decides


def test_url_cache_is_bounded():
    ruleset = rules({"id": "a", "when": {"event": "pageview", "url": "*/pricing*"}, "then": [{"add_tag": "A"}]})
    for i in range(URL_CACHE_SIZE + 10):
        ruleset.event_rules(event("e", url=f"https://a.com/pricing?i={i}"))
        assert len(ruleset.by_page) <= URL_CACHE_SIZE
    assert [r.rule_id for r in ruleset.event_rules(event("e", url="https://a.com/pricing?i=1"))] == ["a"]


def test_per_lead_fires_once_per_event_fires_every_event():
    ruleset = rules({"id": "once", "when": {"event": "pageview"}, "then": [{"add_score": 1}]},
                    {"id": "each", "when": {"event": "pageview"}, "once": "per_event", "then": [{"add_score": 10}]})
    state, outcomes = run_events(ruleset, lead(), event("e1"), event("e2"), event("e3"))
    assert [fired(o) for o in outcomes] == [["each", "once"], ["each"], ["each"]]
    assert state.score == 31
    assert state.fired == ["once"]


# ---- conditions ----

@pytest.mark.parametrize("condition, state_fields, event_fields, expected", [
    ({"field": "event.url", "op": "contains", "value": "PRICING"}, {}, {"url": "https://a.com/pricing"}, True),
    ({"field": "event.channel", "op": "is", "value": "email"}, {}, {"channel": "email"}, True),
    ({"field": "event.channel", "op": "is", "value": ["paid", "social"]}, {}, {"channel": "email"}, False),
    ({"field": "event.channel", "op": "is_not", "value": "email"}, {}, {"channel": "direct"}, True),
    ({"field": "event.utm_campaign", "op": "unknown"}, {}, {}, True),
    ({"field": "event.utm_campaign", "op": "exists"}, {}, {}, False),
    ({"field": "event.properties.employees", "op": "gt", "value": 100}, {}, {"properties": {"employees": "250"}}, True),
    ({"field": "event.properties.employees", "op": "lt", "value": 100}, {}, {"properties": {"employees": 250}}, False),
    ({"field": "event.properties.employees", "op": "between", "value": [100, 250]}, {},
     {"properties": {"employees": 250}}, True),
    ({"field": "event.properties.employees", "op": "gt", "value": 1}, {}, {"properties": {"employees": "many"}},
     False),
    ({"field": "event.properties.plan", "op": "is", "value": "pro"}, {}, {"properties": {"plan": "Pro"}}, True),
    ({"field": "event.properties.trial", "op": "is", "value": True}, {}, {"properties": {"trial": "true"}}, True),
    ({"field": "event.is_bot", "op": "is", "value": False}, {}, {}, True),
    ({"field": "lead.known", "op": "is", "value": True}, {"email": "a@acme.com"}, {}, True),
    ({"field": "lead.known", "op": "is", "value": True}, {}, {}, False),
    ({"field": "lead.email", "op": "contains", "value": "@acme.com"}, {"email": "a@acme.com"}, {}, True),
    ({"field": "lead.score", "op": "between", "value": [10, 20]}, {"score": 15}, {}, True),
    ({"field": "lead.score", "op": "is", "value": 15}, {"score": 15}, {}, True),
    ({"field": "lead.tags", "op": "contains", "value": "vip"}, {"tags_": ["VIP"]}, {}, True),
    ({"field": "lead.tags", "op": "is_not", "value": "vip"}, {"tags_": ["other"]}, {}, True),
    ({"field": "lead.tags", "op": "unknown"}, {}, {}, True),
    ({"field": "lead.properties.plan", "op": "exists"}, {"properties": {"plan": "pro"}}, {}, True),
    ({"field": "lead.first_ts_ms", "op": "unknown"}, {}, {}, False),  # the event itself sets it
    ({"field": "account.domain", "op": "is", "value": "ACME.com"}, {"account_domain": "acme.com"}, {}, True),
    ({"field": "account.domain", "op": "is_not", "value": "acme.com"}, {}, {}, True),
    ({"any": [{"field": "event.channel", "op": "is", "value": "paid"},
              {"all": [{"field": "lead.score", "op": "gt", "value": 5}, {"field": "account.domain", "op": "exists"}]}]},
     {"score": 6, "account_domain": "acme.com"}, {}, True),
    ({"any": [{"field": "event.channel", "op": "is", "value": "paid"}, {"field": "lead.score", "op": "gt", "value": 5}]},
     {"score": 5}, {}, False),
])
def test_condition(condition, state_fields, event_fields, expected):
    ruleset = rules({"id": "r", "when": {"event": "any"}, "if": [condition], "then": [{"add_score": 1}]})
    tags = {tag: TagSource("user") for tag in state_fields.pop("tags_", [])}
    outcome = apply_event(ruleset, lead(tags=tags, **state_fields), event("e1", **event_fields))
    assert (fired(outcome) == ["r"]) is expected


CARDS = {"acme.com": Company("acme.com", "Acme", "Software", "51-200", 51, "NL"),
         "tiny.io": Company("tiny.io", "Tiny")}


@pytest.mark.parametrize(("condition", "account", "event_fields", "expected"), [
    ({"field": "geo.country", "op": "is", "value": "nl"}, "", {"geo_country": "NL"}, True),
    ({"field": "geo.country", "op": "is", "value": ["DE", "BE"]}, "", {"geo_country": "NL"}, False),
    ({"field": "geo.city", "op": "unknown"}, "", {"geo_country": "NL"}, True),
    ({"field": "network.kind", "op": "is_not", "value": "isp"}, "", {"network_kind": "business"}, True),
    ({"field": "network.org", "op": "contains", "value": "telekom"}, "", {"network_org": "Deutsche Telekom AG"}, True),
    ({"field": "network.asn", "op": "is", "value": 3320}, "", {"network_asn": 3320}, True),
    ({"field": "network.asn", "op": "exists"}, "", {"network_asn": 0}, False),  # 0: unknown
    ({"field": "account.industry", "op": "is", "value": "software"}, "acme.com", {}, True),
    ({"field": "account.employees", "op": "gt", "value": 50}, "acme.com", {}, True),
    ({"field": "account.employees", "op": "between", "value": [100, 500]}, "acme.com", {}, False),
    ({"field": "account.employees", "op": "unknown"}, "tiny.io", {}, True),  # a card without a size
    ({"field": "account.name", "op": "is", "value": "Acme"}, "acme.com", {}, True),
    ({"field": "account.country", "op": "is", "value": "NL"}, "acme.com", {}, True),
    ({"field": "account.name", "op": "exists"}, "unknown.example", {}, False),  # an account without a card
    ({"field": "account.industry", "op": "is_not", "value": "Software"}, "", {}, True),  # no account at all
])
def test_geo_network_and_company_conditions(condition, account, event_fields, expected):
    ruleset = rules({"id": "r", "when": {"event": "any"}, "if": [condition], "then": [{"add_score": 1}]})
    outcome = apply_event(ruleset, lead(account_domain=account), event("e1", **event_fields), CARDS)
    assert (fired(outcome) == ["r"]) is expected


def test_a_card_loaded_later_is_read_by_the_next_evaluation():
    ruleset = rules({"id": "big", "when": {"score_at_least": 0}, "if": [
        {"field": "account.employees", "op": "gt", "value": 1000}], "then": [{"add_tag": "Enterprise"}]})
    cards: dict[str, Company] = {}
    before = set_identity(ruleset, lead(), T0, account_domain="globex.io", companies=cards)
    assert fired(before) == []
    cards["globex.io"] = Company("globex.io", "Globex", employees="1001-5000", employees_min=1001)
    assert fired(hourly_pass(ruleset, before.state, T0 + HOUR_MS, cards)) == ["big"]


@pytest.mark.parametrize(("rule", "problem"), [
    ({"when": {"tag": "A"}, "if": [{"field": "geo.country", "op": "exists"}]}, "geo.country needs an event trigger"),
    ({"when": {"inactive_for": "1d"}, "if": [{"field": "network.kind", "op": "is", "value": "isp"}]},
     "network.kind needs an event trigger"),
    ({"when": {"tag": "A"}, "then": [{"set_property": {"name": "country", "from": "geo.country"}}]},
     "needs an event trigger"),
    ({"when": {"event": "any"}, "if": [{"field": "account.revenue", "op": "exists"}]}, "unknown field 'account.revenue'"),
    ({"when": {"event": "any"}, "if": [{"field": "geo.country", "op": "gt", "value": 1}]}, "does not apply"),
    ({"when": {"event": "any"}, "if": [{"field": "place.country", "op": "exists"}]}, "must start with event."),
])
def test_geo_and_network_fields_belong_to_event_rules(rule, problem):
    with pytest.raises(ValueError, match=problem):
        Rule.model_validate({"id": "r", "then": [{"add_score": 1}]} | rule)


def test_set_property_copies_the_events_country():
    ruleset = rules({"id": "r", "when": {"event": "pageview"},
                     "then": [{"set_property": {"name": "country", "from": "geo.country"}}]})
    assert apply_event(ruleset, lead(), event("e1", geo_country="BE")).state.properties == {"country": "BE"}


# ---- actions ----

def test_add_and_remove_tag_with_provenance():
    ruleset = rules({"id": "add", "when": {"event": "pageview"}, "then": [{"add_tag": "A"}]},
                    {"id": "rm", "when": {"event": "form_submit"}, "then": [{"remove_tag": "A"}, {"remove_tag": "B"}]})
    state, (first, second) = run_events(ruleset, lead(), event("e1"), event("e2", "form_submit", T0 + 1))
    tag = first.state.tags["A"]
    assert (tag.source, tag.rule_id, tag.rule_version, tag.event_id, tag.ts_ms) == ("rule", "add", 1, "e1", T0)
    assert [(c.kind, c.name, c.rule_id, c.event_id) for c in first.changes] == [("tag_added", "A", "add", "e1")]
    assert [(c.kind, c.name) for c in second.changes] == [("tag_removed", "A")]
    assert second.executions[0].actions == ["remove_tag A", "remove_tag B (already absent)"]
    assert state.tags == {}


def test_add_tag_on_account_needs_an_account():
    ruleset = rules({"id": "r", "when": {"event": "pageview"}, "once": "per_event",
                     "then": [{"add_tag": {"tag": "Target", "on": "account"}}]})
    without = apply_event(ruleset, lead(), event("e1"))
    assert without.changes == [] and without.executions[0].outcome == "no_change"
    with_account = apply_event(ruleset, lead(account_domain="acme.com"), event("e1"))
    (change,) = with_account.changes
    assert (change.on, change.name, change.account_domain) == ("account", "Target", "acme.com")
    assert with_account.state.tags == {}


def test_add_score_clamps_and_can_be_negative():
    ruleset = rules({"id": "up", "when": {"event": "pageview"}, "once": "per_event", "then": [{"add_score": 40}]},
                    {"id": "down", "when": {"event": "exit"}, "once": "per_event", "then": [{"add_score": -70}]})
    state, outcomes = run_events(ruleset, lead(), *(event(f"e{i}", ts_ms=T0 + i) for i in range(3)),
                                 event("x1", "exit"), event("x2", "exit"))
    assert [o.state.score for o in outcomes] == [40, 80, 100, 30, 0]
    assert [c.value for o in outcomes for c in o.changes] == ["+40", "+40", "+20", "-70", "-30"]
    assert outcomes[-1].changes[0].score == 0


def test_set_property_value_and_from():
    ruleset = rules({"id": "r", "when": {"event": "pageview"}, "once": "per_event", "then": [
        {"set_property": {"name": "last_campaign", "from": "event.utm_campaign"}},
        {"set_property": {"name": "seats", "from": "event.properties.seats"}},
        {"set_property": {"name": "interested", "value": True}}]})
    first = apply_event(ruleset, lead(), event("e1", utm_campaign="spring", properties={"seats": 12}))
    assert first.state.properties == {"last_campaign": "spring", "seats": 12, "interested": True}
    assert [(c.name, c.value) for c in first.changes] == [("last_campaign", "spring"), ("seats", "12"),
                                                         ("interested", "true")]
    second = apply_event(ruleset, first.state, event("e2"))  # no utm: skipped; same value: unchanged
    assert second.changes == [] and second.state.properties == first.state.properties
    assert second.executions[0].actions[0] == "set_property last_campaign (no value in event.utm_campaign)"


def test_move_card_and_webhook_requests_have_stable_ids():
    ruleset = rules({"id": "r", "when": {"event": "form_submit"}, "then": [
        {"move_card": {"board": "pipeline", "stage": "decision"}},
        {"webhook": {"url": "https://crm.example/hook", "secret_env": "CRM_SECRET"}}]})
    state = lead(email="a@acme.com", account_domain="acme.com")
    first, again = (apply_event(ruleset, state, event("e1", "form_submit")) for _ in range(2))
    assert first == again
    (move,) = first.card_moves
    assert (move.board, move.stage, move.rule_id, move.rule_version, move.event_id, move.account_domain) == (
        "pipeline", "decision", "r", 1, "e1", "acme.com")
    (hook,) = first.webhooks
    assert hook.webhook_id.startswith("wh_") and hook.secret_env == "CRM_SECRET"
    assert hook.payload["data"]["lead"]["email"] == "a@acme.com"
    assert hook.payload["data"]["execution_id"] == first.executions[0].execution_id
    assert hook.payload["timestamp"].endswith("Z")
    assert first.executions[0].execution_id == firing_id(SITE, "r", "lead-1", ("lead",))


# ---- state triggers and chains ----

def test_state_trigger_fires_on_becoming_true_only():
    ruleset = rules({"id": "score", "when": {"event": "pageview"}, "once": "per_event", "then": [{"add_score": 30}]},
                    {"id": "hot", "when": {"score_at_least": 60}, "once": "per_event", "then": [{"add_tag": "Hot"}]},
                    {"id": "cool", "when": {"event": "exit"}, "once": "per_event", "then": [{"add_score": -50}]})
    _, outcomes = run_events(ruleset, lead(), event("e1"), event("e2"), event("e3"), event("x", "exit"),
                             event("e4"), event("e5"))
    assert ["hot" in fired(o) for o in outcomes] == [False, True, False, False, True, False]  # 30 60 90 40 70 100
    state_firing = outcomes[1].executions[1]
    assert (state_firing.trigger, state_firing.depth, state_firing.event_id) == ("state", 1, "e2")


def test_tag_trigger_and_chain_in_one_pass():
    ruleset = rules({"id": "a", "when": {"event": "form_submit"}, "then": [{"add_tag": "Lead"}]},
                    {"id": "b", "when": {"tag": "Lead"}, "then": [{"add_score": 60}]},
                    {"id": "c", "when": {"score_at_least": 60, "tag": "Lead"}, "then": [{"add_tag": "Decision"}]})
    outcome = apply_event(ruleset, lead(), event("e1", "form_submit"))
    assert [(x.rule_id, x.trigger, x.depth) for x in outcome.executions] == [
        ("a", "event", 0), ("b", "state", 1), ("c", "state", 2)]
    assert set(outcome.state.tags) == {"Lead", "Decision"} and outcome.state.score == 60


def test_chain_depth_cap_defers_the_rest_to_the_next_pass():
    links = MAX_CHAIN_DEPTH + 2
    chain = [{"id": f"r{i:02d}", "when": {"tag": f"t{i}"}, "then": [{"add_tag": f"t{i + 1}"}]} for i in range(links)]
    ruleset = rules({"id": "start", "when": {"event": "pageview"}, "then": [{"add_tag": "t0"}]}, *chain)
    first = apply_event(ruleset, lead(), event("e1"))
    assert max(x.depth for x in first.executions) == MAX_CHAIN_DEPTH
    assert len(first.executions) == 1 + MAX_CHAIN_DEPTH
    second = apply_event(ruleset, first.state, event("e2", ts_ms=T0 + 1))
    assert len(first.executions) + len(second.executions) == 1 + links
    assert f"t{links}" in second.state.tags


def test_a_loop_of_per_event_rules_ends():
    ruleset = rules({"id": "on", "when": {"tag": "A"}, "once": "per_event", "then": [{"remove_tag": "A"}, {"add_tag": "B"}]},
                    {"id": "off", "when": {"tag": "B"}, "once": "per_event", "then": [{"remove_tag": "B"}, {"add_tag": "A"}]},
                    {"id": "go", "when": {"event": "pageview"}, "once": "per_event", "then": [{"add_tag": "A"}]})
    outcome = apply_event(ruleset, lead(), event("e1"))
    assert sorted(fired(outcome)) == ["go", "off", "on"]


def test_set_identity_and_tag_by_hand_run_state_rules():
    ruleset = rules({"id": "known", "when": {"tag": "Lead"}, "if": [{"field": "lead.known", "op": "is", "value": True}],
                     "then": [{"add_score": 20}]},
                    {"id": "acct", "when": {"score_at_least": 0}, "if": [{"field": "account.domain", "op": "exists"}],
                     "then": [{"add_tag": "HasAccount"}]})
    tagged = tag_by_hand(ruleset, lead(), "Lead", True, T0, "cmd-1")
    assert tagged.state.tags["Lead"].source == "user" and fired(tagged) == []
    identified = set_identity(ruleset, tagged.state, T0, email="a@acme.com", account_domain="acme.com", event_id="e9")
    assert sorted(fired(identified)) == ["acct", "known"] and identified.state.score == 20
    assert set_identity(ruleset, identified.state, T0, email="a@acme.com").executions == []


# ---- time triggers and decay ----

def test_inactive_for_fires_once_per_quiet_spell_with_per_event():
    ruleset = rules({"id": "quiet", "when": {"inactive_for": "14d"}, "once": "per_event", "then": [{"remove_tag": "Hot"}]},
                    {"id": "quiet-once", "when": {"inactive_for": "1d"}, "then": [{"add_tag": "WasQuiet"}]})
    state, _ = run_events(ruleset, lead(), event("e1"))
    assert next_due_ms(ruleset, state) == T0 + DAY_MS
    assert hourly_pass(ruleset, state, T0 + 13 * DAY_MS).executions[0].rule_id == "quiet-once"
    early = hourly_pass(ruleset, state, T0 + 13 * DAY_MS).state
    assert next_due_ms(ruleset, early) == T0 + 14 * DAY_MS
    due = hourly_pass(ruleset, early, T0 + 14 * DAY_MS + 5)
    assert fired(due) == ["quiet"] and due.executions[0].trigger == "time"
    assert next_due_ms(ruleset, due.state) is None
    assert fired(hourly_pass(ruleset, due.state, T0 + 40 * DAY_MS)) == []
    state, _ = run_events(ruleset, due.state, event("e2", ts_ms=T0 + 41 * DAY_MS))
    again = hourly_pass(ruleset, state, T0 + 56 * DAY_MS)
    assert fired(again) == ["quiet"] and again.executions[0].execution_id != due.executions[0].execution_id


def test_decaying_points_are_taken_back_by_the_hourly_pass():
    ruleset = rules({"id": "r", "when": {"event": "pageview"}, "once": "per_event",
                     "then": [{"add_score": 15, "decays_after": "30d"}]},
                    {"id": "base", "when": {"event": "form_submit"}, "then": [{"add_score": 5}]})
    state, _ = run_events(ruleset, lead(), event("e1"), event("f", "form_submit"), event("e2", ts_ms=T0 + 2 * DAY_MS))
    assert state.score == 35 and next_due_ms(ruleset, state) == T0 + 30 * DAY_MS
    first = hourly_pass(ruleset, state, T0 + 30 * DAY_MS)
    assert first.state.score == 20 and [(c.kind, c.value, c.score) for c in first.changes] == [
        ("score_changed", "-15", 20)]
    second = hourly_pass(ruleset, first.state, T0 + 32 * DAY_MS)
    assert second.state.score == 5 and next_due_ms(ruleset, second.state) is None


def test_decay_takes_back_only_what_was_added():
    ruleset = rules({"id": "r", "when": {"event": "pageview"}, "once": "per_event",
                     "then": [{"add_score": 30, "decays_after": "1d"}]})
    state, _ = run_events(ruleset, lead(score=90), event("e1"))
    assert state.score == 100
    assert hourly_pass(ruleset, state, T0 + DAY_MS).state.score == 90


# ---- merges ----

def test_merge_carries_tags_score_properties_and_firings_once():
    ruleset = rules({"id": "pricing", "when": {"event": "pageview"}, "then": [{"add_score": 15}, {"add_tag": "Consideration"}]},
                    {"id": "form", "when": {"event": "form_submit"}, "then": [{"add_score": 10}]},
                    {"id": "hot", "when": {"score_at_least": 30}, "then": [{"add_tag": "Hot"}]})
    anonymous, _ = run_events(ruleset, LeadState("anon", SITE), event("a1"), event("a2", "form_submit"))
    anonymous.properties["plan"] = "pro"
    known, _ = run_events(ruleset, lead(email="a@acme.com"), event("k1"))
    outcome = merge(ruleset, known, anonymous, T0 + 5, "identify-1")
    merged = outcome.state
    assert merged.score == 25  # 15 (pricing, once) + 10 (form)
    assert merged.tags["Consideration"].source == "rule"  # the survivor's own tag wins
    assert merged.properties == {"plan": "pro"} and merged.fired == ["form", "pricing"]
    assert merged.merged_from == ["anon"] and outcome.retired.merged_into == "lead-1"
    assert {(c.kind, c.name) for c in outcome.changes} == {("score_changed", "score"), ("property_set", "plan")}
    for absorbed in (anonymous, outcome.retired):
        again = merge(ruleset, merged, absorbed, T0 + 6, "identify-1")
        assert again.state == merged and again.changes == [] and again.executions == []
    assert apply_event(ruleset, merged, event("k2", "form_submit")).executions == []


# ---- properties ----

PROPERTY_RULES = rules(
    {"id": "pricing", "when": {"event": "pageview", "url": "*/pricing*"}, "then": [{"add_score": 20}, {"add_tag": "Consideration"}]},
    {"id": "visit", "when": {"event": "pageview"}, "once": "per_event", "then": [{"add_score": 5, "decays_after": "2d"}]},
    {"id": "email", "when": {"event": "email_click", "channel": "email"}, "once": "per_event",
     "then": [{"add_score": 10}, {"set_property": {"name": "campaign", "from": "event.campaign"}}]},
    {"id": "exit", "when": {"event": "exit"}, "once": "per_event", "then": [{"add_score": -15}]},
    {"id": "hot", "when": {"score_at_least": 50}, "then": [{"add_tag": "Decision"}, {"webhook": {"url": "https://x.example/h", "secret_env": "S"}}]},
    {"id": "warm", "when": {"score_at_least": 30}, "once": "per_event", "then": [{"add_tag": "Warm"}, {"move_card": {"board": "b", "stage": "warm"}}]},
    {"id": "warm-off", "when": {"tag": "Warm"}, "if": [{"field": "lead.score", "op": "lt", "value": 30}], "once": "per_event",
     "then": [{"remove_tag": "Warm"}]},
    {"id": "quiet", "when": {"inactive_for": "1d"}, "once": "per_event", "then": [{"remove_tag": "Consideration"}, {"add_score": -10}]},
    {"id": "long-quiet", "when": {"inactive_for": "3d"}, "then": [{"add_tag": "Dormant"}]},
)

event_strategy = st.builds(
    lambda type_, url, channel, bot, dt: (type_, url, channel, bot, dt),
    st.sampled_from(["pageview", "pageview", "email_click", "exit", "form_submit"]),
    st.sampled_from(["https://a.com/", "https://a.com/pricing", "https://a.com/blog"]),
    st.sampled_from(["direct", "email"]),
    st.sampled_from([False, False, False, True]),  # mostly people, some bots
    st.integers(0, 30 * HOUR_MS),
)
# An operation: an event (as above) or an hourly pass (None).
operations = st.lists(st.one_of(event_strategy, event_strategy, st.none()), max_size=40)


def materialise(ops: list) -> list[tuple[str, Any]]:
    """Events get ids and increasing times; hourly passes run at the current time."""
    now, out = T0, []
    for i, op in enumerate(ops):
        if op is None:
            out.append(("hour", now))
            continue
        type_, url, channel, bot, dt = op
        now += dt
        out.append(("event", event(f"e{i}", type_, now, url=url, channel=channel, is_bot=bot, campaign="c1")))
    return out


def apply_op(state: LeadState, op: tuple[str, Any]) -> Outcome:
    kind, value = op
    return apply_event(PROPERTY_RULES, state, value) if kind == "event" else hourly_pass(PROPERTY_RULES, state, value)


def records(outcome: Outcome) -> list[bytes]:
    return [r.to_json() for r in (*outcome.changes, *outcome.executions, *outcome.webhooks, *outcome.card_moves)]


def run_all(ops: list[tuple[str, Any]], state: LeadState, cuts: set[int] = frozenset()) -> tuple[LeadState, list[bytes]]:
    emitted = []
    for i, op in enumerate(ops):
        if i in cuts:
            state = LeadState.from_json(state.to_json())
        outcome = apply_op(state, op)
        emitted.extend(records(outcome))
        state = outcome.state
    return state, emitted


@given(operations, st.sets(st.integers(0, 40)))
def test_same_records_whatever_the_batch_split_and_json_round_trips(ops, cuts):
    ops = materialise(ops)
    whole_state, whole = run_all(ops, lead())
    split_state, split = run_all(ops, lead(), cuts)
    assert split == whole
    assert split_state.to_json() == whole_state.to_json()
    assert LeadState.from_json(whole_state.to_json()) == whole_state


@given(operations)
def test_per_lead_rules_never_fire_twice(ops):
    _, emitted = run_all(materialise(ops), lead())
    executions = [record for record in map(orjson.loads, emitted) if "trigger" in record]
    for rule_id in ("pricing", "hot", "long-quiet"):
        assert sum(1 for x in executions if x["rule_id"] == rule_id) <= 1
    ids = [x["execution_id"] for x in executions]
    assert len(ids) == len(set(ids))


@given(operations, st.data())
def test_replaying_an_event_changes_nothing(ops, data):
    ops = materialise(ops)
    events = [value for kind, value in ops if kind == "event"]
    state, _ = run_all(ops, lead())
    recent = events[-SEEN_EVENTS:]
    if recent:
        replayed = apply_event(PROPERTY_RULES, state, data.draw(st.sampled_from(recent)))
        assert replayed.state == state and records(replayed) == []


@given(operations)
def test_bots_never_fire(ops):
    ops = materialise(ops)
    state, _ = run_all(ops, lead())
    for kind, value in ops:
        if kind == "event":
            bot = dataclasses.replace(value, is_bot=True, event_id="bot-" + value.event_id)
            outcome = apply_event(PROPERTY_RULES, state, bot)
            assert outcome.state == state and records(outcome) == []


@given(operations, st.integers(0, 10 * DAY_MS), st.integers(0, HOUR_MS - 1))
def test_hourly_pass_is_idempotent_per_hour(ops, later, within):
    state, _ = run_all(materialise(ops), lead())
    now = T0 + later
    first = hourly_pass(PROPERTY_RULES, state, now)
    again = hourly_pass(PROPERTY_RULES, first.state, now - now % HOUR_MS + within)
    assert again.state == first.state and records(again) == []
    due = next_due_ms(PROPERTY_RULES, first.state)
    assert due is None or (due % HOUR_MS == 0 and due > first.state.checked_ms)
    if due is None:
        assert not [x for x in hourly_pass(PROPERTY_RULES, first.state, now + 30 * DAY_MS).executions
                    if x.trigger == "time"]


@given(operations, operations)
def test_merge_applies_once(anonymous_ops, known_ops):
    anonymous, _ = run_all(materialise(anonymous_ops), LeadState("anon", SITE))
    known, _ = run_all([(k, dataclasses.replace(v, event_id="k" + v.event_id) if k == "event" else v)
                        for k, v in materialise(known_ops)], lead(email="a@acme.com"))
    outcome = merge(PROPERTY_RULES, known, anonymous, T0, "merge-event")
    merged = outcome.state
    carried = {c.name for c in outcome.changes if c.kind == "tag_added" and not c.rule_id}
    assert carried == set(anonymous.tags) - set(known.tags)  # (a chained rule may then remove one)
    assert set(merged.fired) >= set(anonymous.fired) | set(known.fired)  # the merged score may fire more
    assert 0 <= merged.score <= 100
    for absorbed in (anonymous, outcome.retired):
        again = merge(PROPERTY_RULES, LeadState.from_json(merged.to_json()), absorbed, T0 + 1, "merge-event")
        assert again.state == merged and records(again) == []


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.booleans(), st.sampled_from(["per_lead", "per_event"])),
                max_size=12))
def test_chains_terminate(edges):
    """Any graph of tag rules (tag i present -> add or remove tag j), cycles included."""
    definitions = [{"id": f"r{n}", "when": {"tag": f"t{src}"}, "once": once,
                    "then": [{"add_tag" if add else "remove_tag": f"t{dst}"}]}
                   for n, (src, dst, add, once) in enumerate(edges)]
    ruleset = rules({"id": "start", "when": {"event": "pageview"}, "once": "per_event", "then": [{"add_tag": "t0"}]},
                    *definitions)
    state = lead()
    for i in range(3):
        outcome = apply_event(ruleset, state, event(f"e{i}", ts_ms=T0 + i))
        ids = [x.rule_id for x in outcome.executions]
        assert len(ids) == len(set(ids)) and all(x.depth <= MAX_CHAIN_DEPTH for x in outcome.executions)
        state = outcome.state
