"""Segment definitions: the contract's example loads; every kind of bad segment is refused whole with one
line per problem naming its entry and field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas.definitions import DefinitionsError, load_definitions
from schemas.segments import MAX_COUNTS, MAX_SEGMENT_CONDITIONS

CONTRACT_EXAMPLE = """
segments:
  - id: dutch-pricing-viewers
    name: Viewed pricing twice in 14 days
    of: lead
    if:
      - {field: lead.known, op: is, value: true}
      - {count: {event: pageview, url: "*/pricing*"}, within: 14d, op: gt, value: 1}
  - id: webinar-contacts
    name: Known contacts with score >= 40 and tag Webinar
    if:
      - {field: lead.known, op: is, value: true}
      - {field: lead.score, op: gt, value: 39}
      - {field: lead.tags, op: contains, value: Webinar}
  - id: pricing-companies
    name: Companies with 3+ leads who viewed pricing
    of: account
    if:
      - count: {leads: [{count: {event: pageview, url: "*/pricing*"}, within: 30d, op: gt, value: 0}]}
        op: gt
        value: 2
rules:
  - id: hot
    when: {event: pageview}
    if: [{in_segment: dutch-pricing-viewers}]
    then: [{add_tag: Hot}]
boards:
  - id: pipeline
    name: Pipeline
    import: {segment: dutch-pricing-viewers}
    on_leave: keep
    stages: [{id: new, name: New, entry: true}]
"""


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(DefinitionsError) as refused:
        load_definitions(json.dumps(data), "defs.json")
    return refused.value.problems


def segment(id: str = "s", **fields: Any) -> dict[str, Any]:
    return {"id": id, "name": id, **fields}


def test_contract_example_loads():
    definitions = load_definitions(CONTRACT_EXAMPLE, "defs.yaml")
    first, _, companies = definitions.segments
    assert first.if_[1].count.url == "*/pricing*" and first.if_[1].window_ms() == 14 * 86_400_000
    assert companies.of == "account" and companies.if_[0].count.leads[0].count.event == "pageview"
    assert definitions.boards[0].import_.segment == "dutch-pricing-viewers"
    assert definitions.boards[0].content()["import"] == {"segment": "dutch-pricing-viewers"}
    assert definitions.rules[0].if_[0].in_segment == "dutch-pricing-viewers"


PRICING = {"count": {"event": "pageview", "url": "*/pricing*"}, "within": "14d", "op": "gt", "value": 1}


@pytest.mark.parametrize("entry, expected", [
    (segment(**{"if": [{"field": "lead.scor", "op": "gt", "value": 1}]}),
     "segments[0] (id: s): if[0]: unknown field 'lead.scor'; known: lead.lead_id"),
    (segment(**{"if": [{**PRICING, "within": "367d"}]}), "segments[0] (id: s): if[0]: within: at most 366d"),
    (segment(**{"if": [{**PRICING, "within": "2 weeks"}]}), "segments[0] (id: s): if[0]: must be a duration"),
    (segment(**{"if": [{**PRICING, "within": None}]}), "segments[0] (id: s): if[0]: a count of events needs within"),
    (segment(**{"if": [{**PRICING, "value": 101}]}), "segments[0] (id: s): if[0]: a count compares with whole numbers 0..100"),
    (segment(**{"if": [{**PRICING, "op": "contains"}]}), "segments[0] (id: s): if[0]: a count needs op: one of gt, lt"),
    (segment(**{"if": [{"count": {"url": "*/x"}, "within": "1d", "op": "gt", "value": 0}]}),
     "segments[0] (id: s): if[0].count: give event: TYPE"),
    (segment(**{"if": [{"count": {"event": "pageview", "urls": "x"}, "within": "1d", "op": "gt", "value": 0}]}),
     "segments[0] (id: s): if[0].count.urls: unknown field"),
    (segment(**{"if": [{"in_segment": "s", "op": "is"}]}), "segments[0] (id: s): if[0]: a condition is exactly one of"),
    (segment(**{"if": [{"field": "lead.tags", "op": "is", "value": ["x"] * 101}]}),
     "segments[0] (id: s): if[0]: a value list has at most 100 items"),
    (segment(**{"if": [{"any": [{"field": "lead.known", "op": "exists"}] * 50}, {"all": [{"field": "lead.known", "op": "exists"}] * 50}]}),
     f"segments[0] (id: s): 102 conditions; a segment has at most {MAX_SEGMENT_CONDITIONS}"),
    (segment("Bad_Id"), "segments[0] (id: Bad_Id): id: must be 1-64 lowercase letters, digits or '-'"),
    (segment(of="company"), "segments[0] (id: s): of: Input should be 'lead' or 'account'"),
    (segment(iff=[]), "segments[0] (id: s): iff: unknown field"),
    (segment(of="account", **{"if": [{"field": "lead.score", "op": "gt", "value": 1}]}),
     "segments[0] (id: s): if[0]: lead.score is a lead field; an account segment reads account.* fields"),
    (segment(**{"if": [{"any_lead": [{"field": "lead.known", "op": "exists"}]}]}),
     "segments[0] (id: s): if[0]: any_lead belongs to account segments"),
    (segment(of="account", **{"if": [PRICING]}), "segments[0] (id: s): if[0]: an account segment counts its leads"),
    (segment(of="account", **{"if": [{"count": {"leads": []}, "within": "1d", "op": "gt", "value": 1}]}),
     "segments[0] (id: s): if[0]: a count of leads takes no within"),
])
def test_bad_segment_is_refused_naming_entry_and_field(entry, expected):
    found = problems({"segments": [entry]})
    assert any(p.startswith(expected) for p in found), found


def test_references_to_unknown_or_wrong_segments_and_cycles():
    found = problems({
        "segments": [
            segment("a", **{"if": [{"in_segment": "b"}]}),
            segment("b", **{"if": [{"any": [{"in_segment": "c"}]}]}),
            segment("c", **{"if": [{"in_segment": "a"}]}),
            segment("d", **{"if": [{"in_segment": "d"}]}),
            segment("acct", of="account", **{"if": [{"in_segment": "a"}, {"any_lead": [{"in_segment": "acct"}]}]}),
        ],
        "rules": [{"id": "r", "when": {"event": "pageview"}, "if": [{"in_segment": "acct"}], "then": [{"add_tag": "X"}]}],
        "boards": [{"id": "b", "name": "B", "card": "lead", "import": {"segment": "acct"},
                    "stages": [{"id": "n", "name": "N"}]}],
    })
    assert found == [
        "rules[0] (id: r): if[0].in_segment: 'acct' is an account segment; a rule names lead segments",
        "segments[4] (id: acct): if[0].in_segment: 'a' is a lead segment; an account segment names account segments",
        "segments[4] (id: acct): if[1].any_lead[0].in_segment: 'acct' is an account segment; a lead filter names lead "
        "segments",
        "boards[0] (id: b): import.segment: 'acct' is an account segment; a board with lead cards imports a lead "
        "segment (or use card: account)",
        "segments[0] (id: a): in_segment: cycle a -> b -> c -> a",
        "segments[3] (id: d): in_segment: cycle d -> d",
    ]


def test_a_file_with_several_problems_lists_them_all():
    found = problems({
        "segments": [segment("x", **{"if": [{**PRICING, "within": "400d"}]}), segment("x"),
                     segment("y", **{"if": [{"field": "lead.nope", "op": "exists"}]})],
        "boards": [{"id": "b", "name": "B", "on_leave": "archive", "stages": [{"id": "n", "name": "N"}]}],
    })
    assert [p.split(":")[0] for p in found] == [
        "segments[0] (id", "segments[2] (id", "boards[0] (id", "segments[1] (id"]
    assert found[2].startswith("boards[0] (id: b): Value error, on_leave goes with import") or \
        found[2].startswith("boards[0] (id: b): on_leave goes with import")
    assert found[3] == "segments[1] (id: x): id: already used by segments[0]"


def test_too_many_counts_on_a_site():
    many = [segment(f"s{i}", **{"if": [{**PRICING, "count": {"event": "pageview", "url": f"*/p{i}*"}}]})
            for i in range(MAX_COUNTS + 1)]
    assert problems({"segments": many}) == [
        f"segments: {MAX_COUNTS + 1} different event counts; a site has at most {MAX_COUNTS} (counts with the "
        "same event and filters share one)"]


def test_references_to_segments_stored_elsewhere_are_left_to_the_store():
    definitions = load_definitions(json.dumps({"boards": [
        {"id": "b", "name": "B", "import": {"segment": "stored"}, "stages": [{"id": "n", "name": "N"}]}]}), "b.json")
    assert definitions.boards[0].on_leave is None
