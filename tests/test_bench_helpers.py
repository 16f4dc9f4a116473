"""The benchmark's pure helpers: the rule set it applies, watermark arithmetic, SSE parsing, latency rows."""

from __future__ import annotations

import json
import math

from leadstream.bench import (
    RULES_PER_SITE,
    PipelineRun,
    ProducerFigures,
    SseParser,
    bench_definitions,
    caught_up,
    combine_costs,
    cost_rows,
    describe_layout,
    describe_rules,
    event_id_of,
    first_seen,
    clickhouse_hops,
    hop_latencies,
    hop_rows,
    records_per_event_rows,
    records_per_topic,
    filler_rules,
    format_table,
    latency_rows,
    layout_rows,
    machine_rows,
    output_batches,
    producer_rows,
    records_applied,
    processor_watermarks,
)
from processors.enrich import enrich_batch
from schemas.dead_letter import Rejection
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
    marks = processor_watermarks({b"0": b"41", b"st:0": b"1700000000000", "3": "9"})
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


def _snapshot(process_cpu_s: float, **parts: tuple[float, int]) -> dict:
    return {"process_cpu_s": process_cpu_s,
            "parts": {name: {"cpu_s": cpu, "items": items} for name, (cpu, items) in parts.items()}}


def test_workers_costs_add_up_part_by_part():
    one = _snapshot(2.0, enrich=(0.5, 1000), produce=(0.25, 3000))
    two = _snapshot(3.0, enrich=(1.0, 2000), lead=(0.5, 900))
    assert combine_costs([one, two]) == _snapshot(5.0, enrich=(1.5, 3000), produce=(0.25, 3000), lead=(0.5, 900))
    assert combine_costs([]) == _snapshot(0.0)


def test_cost_rows_give_µs_per_event_for_every_part_and_the_unmeasured_rest():
    cost = _snapshot(10.0, **{"raw-events": (4.0, 1000), "enrich": (1.5, 1000), "sessionize": (1.0, 990),
                              "identity": (0.5, 990), "serialize": (0.25, 1000), "lead": (2.0, 1100),
                              "board": (1.0, 500), "account": (0.25, 40), "timers lead": (0.25, 0),
                              "produce": (1.0, 4000), "commit": (0.5, 2600)})
    rows = dict(cost_rows(cost, events=1000))
    assert rows["worker CPU per event, all its processes (every processor)"] == "10,000.0 µs"
    assert rows["  raw processor step"] == "4,000.0 µs"
    assert rows["    enrich (validate, parse, classify)"] == "1,500.0 µs"
    assert rows["    rest of the raw step (batching, identity lock)"] == "750.0 µs"
    assert rows["  lead processor step (rules)"] == "2,000.0 µs  (1,818.2 µs per record, 1,100 records)"
    assert rows["  produce (every processor's outputs, until acked)"] == ("1,000.0 µs  (250.0 µs per record,"
                                                                           " 4,000 records)")
    assert rows["  account processor step (account segments)"] == "250.0 µs  (6,250.0 µs per record, 40 records)"
    assert rows["  timers, every processor's due keys"] == "250.0 µs"
    assert rows["    lead (hourly passes, merge holds)"] == "250.0 µs"
    assert rows["  other: Kafka fetch, client I/O, webhook dispatch, event loop"] == "1,000.0 µs"


def test_cost_rows_of_a_worker_without_some_processors_show_zero_for_them():
    rows = dict(cost_rows(_snapshot(1.0, lead=(0.5, 100)), events=100))
    assert rows["  raw processor step"] == "0.0 µs"
    assert rows["  board processor step (cards)"] == "0.0 µs"
    assert rows["  other: Kafka fetch, client I/O, webhook dispatch, event loop"] == "5,000.0 µs"


def test_output_batches_are_the_enriched_events_keyed_by_visitor_spread_over_partitions():
    raw = [json.dumps({"event_id": f"e{i}", "site_id": "s", "type": "pageview", "visitor_id": f"v{i % 3}",
                       "ts": 1_700_000_000_000, "url": "https://example.com/pricing"}).encode() for i in range(5)]
    results = enrich_batch([*raw[:2], b"not json", *raw[2:]], 1_700_000_000_000)
    assert isinstance(results[2], Rejection)
    batches = output_batches(results, partitions=4, batch_size=2)
    assert [len(batch) for batch in batches] == [2, 2, 1]
    records = [record for batch in batches for record in batch]
    assert [(partition, key) for partition, key, _ in records] == [(0, b"v0"), (1, b"v1"), (2, b"v2"), (3, b"v0"),
                                                                    (0, b"v1")]
    assert json.loads(records[4][2])["event_id"] == "e4"


def test_producer_rows_compare_librdkafka_with_aiokafka():
    rows = producer_rows({"aiokafka": ProducerFigures(100_000, 20.0), "librdkafka": ProducerFigures(250_000, 5.0)}, 4)
    assert rows == [
        ("producer aiokafka: idempotent, acks=all, 4 partitions", "100,000 records/s  (20.0 µs CPU per record)"),
        ("producer librdkafka: idempotent, acks=all, 4 partitions", "250,000 records/s  (5.0 µs CPU per record)"),
        ("  librdkafka / aiokafka", "2.50x records/s, 0.25x CPU"),
    ]


def _run(steady: float, drained: float, process_cpu_s: float, **machine: float) -> PipelineRun:
    return PipelineRun(whole_rate=steady * 0.9, steady_rate=steady, drained_rate=drained, first_s=3.0, total_s=60.0,
                       drained_s=70.0, activity_ends={}, worker_cost=_snapshot(process_cpu_s),
                       machine_cpu_s={"workers": process_cpu_s, "sink": 5.0, **machine})


def test_layout_rows_give_the_drained_rate_first_and_each_rate_as_a_factor_over_one_worker():
    rows = layout_rows(_run(4_500, 4_000, 80.0), "2 workers", 200_000, _run(3_000, 2_500, 60.0), "1 worker")
    assert rows == [
        ("2 workers: every processor drained (rules and cards too)", "4,000 events/s  (1.60x 1 worker)"),
        ("  events into ClickHouse (raw processor + sink): whole run / steady 10%..90%",
         "4,050 / 4,500 events/s  (1.50x 1 worker)"),
        ("  the workers' CPU per event, together", "400.0 µs"),
    ]
    alone = dict(layout_rows(_run(3_000, 2_500, 60.0), "1 worker", 200_000))
    assert alone["1 worker: every processor drained (rules and cards too)"] == "2,500 events/s"


def test_layouts_are_described_by_their_processes():
    assert describe_layout("single") == "1 worker, every processor in it"
    assert describe_layout("single", 2) == "2 workers, every processor in each"
    assert describe_layout("split") == "raw + automation workers"
    assert describe_layout("split", 2) == "2 x (raw + automation) workers"


def test_machine_rows_add_every_process_up_and_give_the_rate_the_cores_allow(monkeypatch):
    monkeypatch.setattr("psutil.cpu_count", lambda: 2)
    rows = machine_rows(_run(3_000, 2_500, 60.0, Kafka=10.0, ClickHouse=15.0, Redis=10.0), 200_000)
    assert rows == [
        ("machine CPU per event, pipeline phase (first row until drained)",
         "500 µs: workers 300, sink 25, Kafka 50, ClickHouse 75, Redis 50"),
        ("  events/s this machine's 2 cores allow at that cost", "4,000"),
    ]


def test_format_table_pads_labels_to_one_column_between_rules():
    table = format_table([("short", "1"), ("a longer label", "2 µs")]).splitlines()
    assert table[0] == table[-1] == "=" * (len("a longer label") + 24)
    assert table[1:3] == ["short           1", "a longer label  2 µs"]


def test_records_per_topic_counts_what_each_topic_gained_on_every_partition():
    before = {"events.raw": {0: 10, 1: 5}, "sessions": {0: 3, 1: 0}}
    after = {"events.raw": {0: 10, 1: 5}, "sessions": {0: 7, 1: 2}, "leads.activity": {0: 4, 1: 4}}
    assert records_per_topic(before, after) == {"events.raw": 0, "sessions": 6, "leads.activity": 8}


def test_records_per_event_leaves_the_raw_topic_out_and_ranks_the_topics():
    written = {"events.raw": 1000, "events.enriched": 100, "sessions": 40, "leads.activity": 110, "companies": 0}
    (total_label, total), (_, parts) = records_per_event_rows(written, 100)
    assert total.startswith("2.50  (250 records for 100 events)")
    assert parts == "leads.activity 1.10, events.enriched 1.00, sessions 0.40"
    assert records_per_event_rows({}, 0)[1][1] == "none"


def test_event_id_of_reads_the_field_or_nothing():
    assert event_id_of(b'{"event_id": "e1", "site_id": "s"}') == "e1"
    assert event_id_of(b'{"update_id": "u"}') == ""
    assert event_id_of(b'{"event_id": 7}') == ""
    assert event_id_of(b"[1, 2]") == "" and event_id_of(b"not json") == "" and event_id_of(None) == ""


def test_first_seen_keeps_each_events_earliest_timestamp():
    assert first_seen([("a", 50), ("b", 20), ("a", 30), ("", 1), ("a", 40)]) == {"a": 30, "b": 20}


def test_hop_latencies_pair_consecutive_topics_on_the_events_both_saw():
    raw = {"a": 100, "b": 200, "c": 300}
    activity = {"a": 130, "b": 260}  # c was rejected: it never reached the lead processor
    commands = {"b": 300, "z": 999}  # only b moved a card; z came from before the window
    stages = {"b": 340}
    hops = hop_latencies([("raw", raw), ("activity", activity), ("commands", commands), ("stages", stages)])
    assert [label for label, _ in hops] == ["raw -> activity", "activity -> commands", "commands -> stages"]
    assert sorted(hops[0][1]) == [30.0, 60.0]
    assert hops[1][1] == [40.0] and hops[2][1] == [40.0]


def test_hop_rows_give_percentiles_or_say_no_event_made_the_hop():
    delays = [float(ms) for ms in range(100, 0, -1)]  # as hop_latencies gives them: in no order
    rows = hop_rows([("raw -> activity", delays), ("activity -> commands", [])])
    assert rows[0] == ("  hop raw -> activity", "p50 50 / p95 95 / p99 99 ms  (100 events)")
    assert rows[1] == ("  hop activity -> commands", "no event made this hop")


def test_clickhouse_hops_split_each_latency_at_the_events_enriched_record():
    latencies = {"a": (1_000, 1_450.0), "b": (1_010, 1_900.0), "late": (1_020, 2_000.0)}
    enriched_at = {"a": 1_050, "b": 1_400, "other": 5}  # no record read for "late"; "other" is no latency event
    hops = clickhouse_hops(latencies, enriched_at)
    assert [label for label, _ in hops] == ["produce -> events.enriched", "events.enriched -> row in ClickHouse"]
    assert sorted(hops[0][1]) == [50.0, 390.0]
    assert sorted(hops[1][1]) == [400.0, 500.0]
