"""Definitions files: the DESIGN example loads; every kind of bad file is refused whole, each problem
naming its entry and field."""

from __future__ import annotations

import json

import pytest

from schemas.definitions import DefinitionsError, limit_problems, load_definitions
from schemas.rules import Rule
from schemas.settings import DefinitionLimits

DESIGN_EXAMPLE = """
rules:
- id: viewed-pricing
  when: {event: pageview, url: "*/pricing*"}
  if:
  - {field: account.domain, op: exists}
  once: per_lead
  then:
  - {add_tag: Consideration}
  - {add_score: 15}
  - {set_property: {name: last_campaign, from: event.utm_campaign}}
- id: hot-lead
  when: {score_at_least: 60}
  then:
  - {add_tag: Decision}
  - {webhook: {url: "https://crm.example/hook", secret_env: CRM_WEBHOOK_SECRET}}
- id: gone-quiet
  when: {inactive_for: 14d}
  then: [{remove_tag: Consideration}]
boards:
- id: pipeline
  name: Sales pipeline
  card: account
  stages:
  - {id: new, name: New, entry: true}
  - {id: consideration, name: Consideration, when_tag: Consideration}
  - {id: decision, name: Decision, when_tag: Decision}
  - {id: customer, name: Customer}
"""


def problems(text: str, source: str = "defs.yaml") -> list[str]:
    with pytest.raises(DefinitionsError) as refused:
        load_definitions(text, source)
    return refused.value.problems


def test_design_example_loads():
    definitions = load_definitions(DESIGN_EXAMPLE, "rules.yaml")
    assert [r.id for r in definitions.rules] == ["viewed-pricing", "hot-lead", "gone-quiet"]
    assert [r.when.kind for r in definitions.rules] == ["event", "state", "time"]
    first = definitions.rules[0]
    assert first.then[0].add_tag.tag == "Consideration" and first.then[2].set_property.from_ == "event.utm_campaign"
    assert definitions.boards[0].stages[1].when_tag == "Consideration"


def test_json_and_an_exported_rule_with_version_load():
    exported = load_definitions(DESIGN_EXAMPLE, "rules.yaml").rules[1].model_dump(mode="json", by_alias=True)
    exported["version"] = 7
    definitions = load_definitions(json.dumps({"rules": [exported]}), "rules.json")
    assert definitions.rules[0].id == "hot-lead"


def test_yaml_on_and_no_stay_text():
    text = """
rules:
- id: r
  when: {event: pageview}
  if: [{field: lead.properties.answer, op: is, value: no}]
  then: [{add_tag: {tag: Target, on: account}}]
"""
    rule = load_definitions(text, "r.yaml").rules[0]
    assert rule.then[0].add_tag.on == "account" and rule.if_[0].value == "no"


@pytest.mark.parametrize("entry, expected", [
    ({"id": "r", "when": {"event": "pageviw"}, "then": [{"add_tag": "A"}]}, "rules[0] (id: r): when.event: Input should be"),
    ({"id": "r", "when": {"url": "*/x"}, "then": [{"add_tag": "A"}]}, "rules[0] (id: r): when: event filters need the event type"),
    ({"id": "r", "when": {"event": "pageview", "tag": "A"}, "then": [{"add_tag": "A"}]}, "rules[0] (id: r): when: mixes event and state"),
    ({"id": "r", "when": {}, "then": [{"add_tag": "A"}]}, "rules[0] (id: r): when: empty trigger"),
    ({"id": "r", "when": {"inactive_for": "2 weeks"}, "then": [{"add_tag": "A"}]}, "rules[0] (id: r): when.inactive_for: must be a duration"),
    ({"id": "r", "when": {"score_at_least": 101}, "then": [{"add_tag": "A"}]}, "rules[0] (id: r): when.score_at_least: Input should be less than or equal to 100"),
    ({"id": "r", "when": {"event": "pageview"}, "then": []}, "rules[0] (id: r): then: List should have at least 1 item"),
    ({"id": "r", "when": {"event": "pageview"}}, "rules[0] (id: r): then: required field missing"),
    ({"id": "r", "when": {"event": "pageview"}, "then": [{"add_tags": "A"}]}, "rules[0] (id: r): then[0].add_tags: unknown field"),
    ({"id": "r", "when": {"event": "pageview"}, "then": [{"add_tag": "A", "add_score": 1}]}, "rules[0] (id: r): then[0]: an action has exactly one of"),
    ({"id": "r", "when": {"event": "pageview"}, "then": [{"add_score": "15"}]}, "rules[0] (id: r): then[0].add_score: Input should be a valid integer"),
    ({"id": "r", "when": {"event": "pageview"}, "then": [{"add_tag": "A", "decays_after": "3d"}]}, "rules[0] (id: r): then[0]: decays_after goes only with add_score"),
    ({"id": "r", "when": {"event": "pageview"}, "then": [{"set_property": {"name": "x"}}]}, "rules[0] (id: r): then[0].set_property: give exactly one of value or from"),
    ({"id": "r", "when": {"event": "pageview"}, "then": [{"webhook": {"url": "ftp://x", "secret_env": "S"}}]}, "rules[0] (id: r): then[0].webhook.url: must be an http:// or https:// URL"),
    ({"id": "r", "when": {"event": "pageview"}, "if": [{"field": "lead.scor", "op": "gt", "value": 1}], "then": [{"add_tag": "A"}]}, "rules[0] (id: r): if[0]: unknown field 'lead.scor'"),
    ({"id": "r", "when": {"event": "pageview"}, "if": [{"field": "lead.score", "op": "contains", "value": 1}], "then": [{"add_tag": "A"}]}, "rules[0] (id: r): if[0]: op contains does not apply to lead.score"),
    ({"id": "r", "when": {"event": "pageview"}, "if": [{"field": "lead.score", "op": "between", "value": [5, 1]}], "then": [{"add_tag": "A"}]}, "rules[0] (id: r): if[0]: op between needs value"),
    ({"id": "r", "when": {"event": "pageview"}, "if": [{"any": [{"field": "lead.email", "op": "exists", "value": 1}]}], "then": [{"add_tag": "A"}]}, "rules[0] (id: r): if[0].any[0]: op exists takes no value"),
    ({"id": "r", "when": {"tag": "A"}, "if": [{"field": "event.url", "op": "exists"}], "then": [{"add_tag": "B"}]}, "rules[0] (id: r): if[0]: event.url needs an event trigger"),
    ({"id": "r", "when": {"event": "pageview"}, "once": "always", "then": [{"add_tag": "A"}]}, "rules[0] (id: r): once: Input should be 'per_lead' or 'per_event'"),
    ({"id": "bad id!", "when": {"event": "pageview"}, "then": [{"add_tag": "A"}]}, "rules[0] (id: bad id!): id: must be 1-64 letters"),
])
def test_bad_rule_is_refused_naming_entry_and_field(entry, expected):
    text = json.dumps({"rules": [entry]})
    found = problems(text, "defs.json")
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_with_its_entry():
    text = """
rules:
- id: ok
  when: {event: pageview}
  then: [{add_tag: A}]
- id: hot-lead
  when: {score_at_least: high}
  then: [{add_tag: A}]
- id: ok
  when: {event: pageview}
  then: [{move_card: {board: pipeline, stage: nowhere}}]
boards:
- {id: pipeline, name: P, stages: [{id: new, name: New}, {id: new, name: Again}]}
"""
    found = problems(text)
    assert any(p.startswith("rules[1] (id: hot-lead): when.score_at_least:") for p in found)
    assert any(p.startswith("boards[0] (id: pipeline): stages:") or p.startswith("boards[0] (id: pipeline):")
               for p in found)
    assert "rules[2] (id: ok): id: already used by rules[0]" in found


def test_move_card_must_name_a_stage_of_a_board_in_the_same_file():
    text = DESIGN_EXAMPLE.replace("- {add_tag: Decision}", "- {move_card: {board: pipeline, stage: won}}")
    assert problems(text) == ["rules[1] (id: hot-lead): then[0].move_card.stage: board 'pipeline' has no stage "
                              "'won' (stages: new, consideration, decision, customer)"]
    other_board = DESIGN_EXAMPLE.replace("- {add_tag: Decision}", "- {move_card: {board: elsewhere, stage: won}}")
    assert load_definitions(other_board, "defs.yaml").rules[1].then[0].move_card.board == "elsewhere"


@pytest.mark.parametrize("text, expected", [
    ("rules: [", "defs.yaml: line 1, column 9: expected the node content"),
    ("", "defs.yaml: empty file"),
    ("- a\n- b\n", "defs.yaml: expected a mapping"),
    ("rules: []\n", "defs.yaml: no rules, no segments, no boards and no owners"),
    ("rule: []\n", "defs.yaml: rule: unknown field"),
    ("rules:\n- id: a\n  when: {event: pageview}\n  when: {event: exit}\n  then: [{add_tag: A}]\n",
     "defs.yaml: line 4, column 3: key 'when' given twice"),
    ("rules: {id: a}\n", "defs.yaml: rules: Input should be a valid list"),
])
def test_bad_file_is_refused(text, expected):
    found = problems(text)
    assert found[0].startswith(expected), found


def test_a_webhook_may_not_sign_with_one_of_leadstreams_own_settings():
    text = """
rules:
- id: leak
  when: {event: pageview}
  then: [{webhook: {url: "https://example.com/hook", secret_env: LEADSTREAM_CLICKHOUSE_PASSWORD}}]
"""
    with pytest.raises(DefinitionsError) as refused:
        load_definitions(text, "rules.yaml")
    assert "rules[0] (id: leak)" in str(refused.value) and "secret_env" in str(refused.value)


def _rule_if(*conditions: dict) -> dict:
    return {"id": "r", "when": {"event": "pageview"}, "if": list(conditions), "then": [{"add_tag": "A"}]}


def _nested(depth: int, width: int) -> dict:
    """`width` conditions in a group, `depth` groups deep."""
    leaf = {"field": "lead.email", "op": "exists"}
    return leaf if depth == 0 else {"any": [_nested(depth - 1, width) for _ in range(width)]}


@pytest.mark.parametrize("entry, expected", [
    (_rule_if({"field": "lead.email", "op": "is", "value": [f"a{i}@x.com" for i in range(101)]}),
     "rules[0] (id: r): if[0]: a value list has at most 100 items"),
    (_rule_if({"field": "event.url", "op": "contains", "value": "x" * 1025}),
     "rules[0] (id: r): if[0]: a text value has at most 1024 characters"),
    (_rule_if({"field": "lead.properties." + "p" * 200, "op": "exists"}),
     "rules[0] (id: r): if[0].field: String should have at most 128 characters"),
    (_rule_if(*[_nested(2, 5)] * 10), "rules[0] (id: r): if: at most 200 conditions in all"),  # 10 x 31
    ({"id": "r", "when": {"event": "pageview"}, "then": [{"set_property": {"name": "p", "value": "x" * 1025}}]},
     "rules[0] (id: r): then[0].set_property.value: a text value has at most 1024 characters"),
    ({"id": "r", "when": {"event": "pageview"},
      "then": [{"set_property": {"name": "p", "from": "event." + "u" * 200}}]},
     "rules[0] (id: r): then[0].set_property.from: String should have at most 128 characters"),
])
def test_a_rule_is_bounded_in_every_list_and_text(entry, expected):
    found = problems(json.dumps({"rules": [entry]}), "defs.json")
    assert any(p.startswith(expected) for p in found), found


def test_a_rule_at_its_bounds_loads():
    entry = _rule_if({"field": "lead.email", "op": "is", "value": ["x" * 1024] * 100}, *[_nested(2, 5)] * 6)
    assert load_definitions(json.dumps({"rules": [entry]}), "defs.json").rules[0].if_[0].value[0] == "x" * 1024


def test_site_limits_refuse_growth_past_them_only():
    def rule(i: int, webhook: bool = False) -> Rule:
        action = {"webhook": {"url": "https://crm.example/h", "secret_env": "S"}} if webhook else {"add_score": 1}
        return Rule.model_validate({"id": f"r{i}", "when": {"event": "pageview"}, "then": [action]})

    limits = DefinitionLimits(rules=3, boards=1, webhook_actions=1)
    three = [rule(0), rule(1), rule(2, webhook=True)]
    assert limit_problems(three, 1, three[:2], 1, limits) == []
    assert limit_problems([*three, rule(3)], 2, three, 1, limits) == [
        "a site has at most 3 rules (LEADSTREAM_MAX_RULES_PER_SITE); this would make 4",
        "a site has at most 1 boards (LEADSTREAM_MAX_BOARDS_PER_SITE); this would make 2"]
    assert limit_problems([*three[:2], rule(2, True), rule(3, True)][1:], 1, three, 1, limits) == [
        "a site has at most 1 webhook actions (LEADSTREAM_MAX_WEBHOOK_ACTIONS_PER_SITE); this would make 2"]
    lowered = DefinitionLimits(rules=1, boards=0, webhook_actions=0)
    assert limit_problems(three, 1, three, 1, lowered) == []  # already over a lowered limit: editing stays possible
