"""The benchmark's pure helpers: the rule set it applies, watermark arithmetic, SSE parsing, latency rows."""

from __future__ import annotations

import json
import math

from leadstream.bench import (
    RULES_PER_SITE,
    SseParser,
    bench_definitions,
    caught_up,
    describe_rules,
    filler_rules,
    latency_rows,
    records_applied,
    stage_watermarks,
)
from leadstream.demo import DEMO_DEFINITIONS
from schemas.definitions import load_definitions


def test_the_bench_rule_set_is_the_demo_file_plus_valid_filler_up_to_100_rules():
    definitions = bench_definitions(DEMO_DEFINITIONS.read_text())
    loaded = load_definitions(json.dumps(definitions), "bench-rules.json")  # what `rules apply` accepts
    assert len(loaded.rules) == RULES_PER_SITE
    assert [rule.id for rule in loaded.rules][:2] == ["viewed-pricing", "read-a-feature-page"]
    assert len({rule.id for rule in loaded.rules}) == RULES_PER_SITE
    assert [board.id for board in loaded.boards] == ["pipeline"]
    assert {rule.when.kind for rule in loaded.rules} == {"event", "state", "time"}


def test_filler_rules_never_move_cards_and_never_touch_the_demo_tags():
    demo_tags = {"Consideration", "Decision", "Sales Qualified", "Content download", "Webinar"}
    for rule in filler_rules(92):
        for action in rule["then"]:
            assert set(action) <= {"add_tag", "add_score", "decays_after"}
            assert action.get("add_tag") not in demo_tags


def test_describe_rules_counts_what_each_event_evaluates():
    rules = [{"when": {"event": "pageview", "url": "*/a*"}}, {"when": {"event": "any"}},
             {"when": {"score_at_least": 50}}, {"when": {"tag": "Hot"}}, {"when": {"inactive_for": "21d"}},
             {"when": {"event": "form_submit"}}]
    assert describe_rules(rules) == ("6 rules: 2 run on every pageview, 2 state triggers checked after every event,"
                                     " 1 on other event types, 1 time triggers")


def test_watermarks_ignore_stream_times_and_count_records():
    marks = stage_watermarks({b"0": b"41", b"st:0": b"1700000000000", "3": "9"})
    assert marks == {0: 41, 3: 9}
    assert records_applied(marks) == 52
    assert records_applied(marks, {0: 40}) == 12


def test_caught_up_needs_every_partition_at_its_end():
    assert caught_up({0: 9, 1: 4}, {0: 10, 1: 5})
    assert not caught_up({0: 9, 1: 3}, {0: 10, 1: 5})
    assert not caught_up({0: 9}, {0: 10, 1: 5})  # partition 1 never applied
    assert caught_up({}, {0: 0, 1: 0})  # empty partitions need nothing


def test_sse_parser_yields_an_event_per_blank_line_and_skips_comments():
    parser = SseParser()
    lines = [": ping", "", "id: 1-0", "event: stage_change", 'data: {"to_stage": "consideration"}', "",
             "event: version", "data: {", "data: }", ""]
    events = [event for event in map(parser.feed, lines) if event]
    assert events == [{"id": "1-0", "event": "stage_change", "data": '{"to_stage": "consideration"}'},
                      {"event": "version", "data": "{\n}"}]


def test_latency_rows_use_nearest_rank_percentiles_and_say_how_many():
    rows = dict(latency_rows("x", [float(v) for v in range(1, 101)]))
    assert rows["x: p50"] == "50 ms" and rows["  p95"] == "95 ms" and rows["  p99"] == "99 ms"
    assert rows["  max"] == "100 ms  (100 events)"
    assert dict(latency_rows("x", [5.0], "of 3 probes"))["  max"] == "5 ms  (1 of 3 probes)"
    empty = dict(latency_rows("x", []))
    assert empty["x: p50"] == f"{math.nan:,.0f} ms" and empty["  max"].endswith("(0 events)")
