"""`leadstream bench`: what one worker process sustains on this machine, and at what CPU cost per event.

Phases, all in one run on the same stack and the same data:
  1. produce K synthetic events to a fresh events.raw;
  2. baseline: a bare aiokafka consumer + orjson decode loop over those K events;
  3. pipeline: the workers of a layout (`split`: one `leadstream worker --processors raw` and one with the
     lead, board and webhooks processors; `single`: one worker with every processor) + one `leadstream sink`
     from a standing start until all K are rows in ClickHouse and the lead and board processors have drained too;
  4. latency: a paced stream (default 2,000 events/s) through the running pipeline; for each event the
     time from produce to being visible in ClickHouse (polled every 100 ms);
  5. memory and state: peak RSS of the worker, Redis bytes per visitor with state; then N (100,000)
     new visitors each with one open session, Redis bytes per open session, and the time a restarted
     worker needs to process the next event with all that state in place.
Cost and scale, on the same run:
  - CPU per event (user+sys), the figure a shared, noisy machine moves least: the worker's, whole and per
    part (processors/runtime/cost.py: the worker publishes its meter to Redis), and the sink's;
  - producers: the same enriched events produced to the partitions, idempotent, acks=all, a batch at a
    time until acked, by the worker's BatchProducer (aiokafka) and by librdkafka (confluent-kafka);
  - the machine: CPU per event of every process on the box (workers, sink, Kafka, ClickHouse, Redis) during
    phase 3, and the rate the box's cores allow at that cost;
  - comparison and scale-out: phase 3 again in a fresh namespace with one single-layout worker (after a
    split run) and with `workers` single-layout workers.
  - segments: phase 3 again, twice, in fresh namespaces with the run's layout: with the bench rule set, and
    with it and 20 segments (`bench_segments`, half of them counting events in 14-day windows): rate,
    worker CPU per event and the lead processor step's CPU per event, without and with.
Workflow automation and LeadBoards, on the same run:
  - before any traffic the bench sites get the demo's rules and board plus generated filler rules, 100
    rules in all, so the lead processor evaluates a realistic rule set on every event;
  - after phase 3 the worker is given time to drain its lead and board processors too (whole-worker rate);
  - board latency: a paced stream at the latency rate in which some visitors identify with a company email
    and then view the pricing page; for each, the time from producing that pageview to the account card
    being in the Consideration column of `GET /v1/sites/{site}/boards/pipeline` (polled) and to its
    `stage_change` arriving on the board's SSE stream. The API runs as its own `leadstream api` process;
  - lead processor alone: the run's leads.activity, copied to a fresh namespace, replayed by a separate
    `leadstream worker --processors lead` with nothing else running; rate and CPU per record between its
    first and last commit; then the same with the bench's 20 segments (half with 14-day windows) added.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import httpx
import orjson
import psutil
import redis
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from confluent_kafka import Producer as ConfluentProducer
from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient

from leadstream.admin import apply_definitions_text
from leadstream.bench_profile import percentile
from leadstream.demo import allowing_the_crm_stand_in, demo_definitions
from leadstream.runner import Role, count, drop_namespace, forget_redis_keys, produce, start_workers, wait_for
from leadstream.stack import servers
from leadstream.topics import delete_topics, ensure_topics
from leadstream.traffic import TrafficGenerator
from processors.app import LAYOUTS
from processors.enrich import enrich_batch
from processors.runtime.cost import PUBLISH_EVERY_S
from processors.runtime.ingest import consumer as kafka_consumer
from processors.runtime.producer import BatchProducer, Outputs
from processors.runtime.runner import TIMERS_PART
from schemas.events import EnrichedEvent
from schemas.redis_keys import RedisKeys
from schemas.rules import LeadHandover
from schemas.settings import KafkaConfig, Settings
from schemas.topics import (BOARD_COMMANDS, BOARD_STAGE_CHANGES, CATALOG, EVENTS_DLQ, EVENTS_ENRICHED, EVENTS_RAW,
                            LEADS_ACTIVITY)
from sinks import clickhouse

RULES_PER_SITE = 100
PROCESSOR_GROUPS = ("leadstream-worker", "leadstream-lead-processor", "leadstream-account-processor",
                    "leadstream-board-processor")  # processors/app.py
PRODUCER_RECORDS = 100_000  # records each client produces in the producer comparison (fewer if the run has fewer)
BOARD = "pipeline"  # the demo's board: account cards, Consideration when the lead has that tag
PROBE_EVERY = 100  # one in this many events of the board-latency stream is a probe (20/s at 2,000/s)
BOARD_POLL_S = 0.05
BOARD_PAGE = 100  # cards of the Consideration column per poll: most recently entered first
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
# The board-latency stream's other visitors: every rule runs on their pageviews, but they never view
# pricing, so the Consideration column holds only probes and one page of it shows every new arrival.
BACKGROUND_PATHS = ("/", "/features/lead-scoring", "/blog/what-is-lead-scoring", "/docs/getting-started", "/careers",
                    "/integrations/hubspot", "/customers", "/features/leadboards")
RARELY_VISITED_PATHS = ("/careers", "/legal/privacy", "/security", "/about", "/integrations/hubspot",
                        "/integrations/salesforce", "/customers/northwind-traders", "/login")


def _percentile(values: list[float], q: float) -> float:
    return percentile(sorted(values), q) if values else float("nan")


# ------------------------------------------------------------------------------------- pure helpers


def latency_rows(label: str, latencies_ms: Sequence[float], counted: str = "events") -> list[tuple[str, str]]:
    """p50/p95/p99/max rows of one latency figure, the way the final table prints them; the max row says
    how many were measured ("1,234 events", or e.g. counted="of 280 probes")."""
    values = list(latencies_ms)
    return [
        (f"{label}: p50", f"{_percentile(values, 0.5):,.0f} ms"),
        ("  p95", f"{_percentile(values, 0.95):,.0f} ms"),
        ("  p99", f"{_percentile(values, 0.99):,.0f} ms"),
        ("  max", f"{max(values, default=float('nan')):,.0f} ms  ({len(values):,} {counted})"),
    ]


def filler_rules(count: int) -> list[dict]:
    """`count` rules that stand in for a site's long tail of automation: a few state rules that never
    become true, tag rules on pages the traffic visits now and then, and score rules on paths it never
    visits. All of them are evaluated on every event of their trigger; few of them fire."""
    rules: list[dict] = []
    for n in range(count):
        if n < 8:
            trigger = {"tag": f"Watch list {n}"} if n % 2 else {"score_at_least": 60 + n}
            rules.append({"id": f"filler-state-{n}", "when": trigger,
                          "if": [{"field": "lead.email", "op": "contains", "value": "@never.invalid"}],
                          "then": [{"add_tag": f"Filler state {n}"}]})
        elif n < 8 + len(RARELY_VISITED_PATHS):
            path = RARELY_VISITED_PATHS[n - 8]
            rules.append({"id": f"filler-interest-{n}", "when": {"event": "pageview", "url": f"*{path}*"},
                          "then": [{"add_tag": f"Interest {path}"}]})
        else:
            rule = {"id": f"filler-page-{n}", "when": {"event": "pageview", "url": f"*/kb/topic-{n}/*"},
                    "once": "per_event", "then": [{"add_score": 1 + n % 5, "decays_after": "30d"}]}
            if n % 3 == 0:
                rule["if"] = [{"field": "event.channel", "op": "is", "value": "organic"}]
            rules.append(rule)
    return rules


def bench_segments() -> list[dict]:
    """20 lead segments of the kinds sites use: half count events in 14-day windows (pages, forms, sessions),
    half read the lead's fields (known, score, tags, first channel) or another segment."""
    windowed = [{"count": {"event": "pageview", "url": f"*{path}*"}, "within": "14d", "op": "gt", "value": n}
                for path, n in (("/pricing", 0), ("/pricing", 1), ("/docs", 2), ("/blog", 0), ("/features", 1),
                                ("/about", 0))]
    windowed += [{"count": {"event": "form_submit"}, "within": "14d", "op": "gt", "value": 0},
                 {"count": {"event": "any", "distinct": "session"}, "within": "14d", "op": "gt", "value": 2},
                 {"count": {"event": "any"}, "within": "14d", "op": "between", "value": [5, 50]},
                 {"count": {"event": "pageview", "channel": "organic"}, "within": "14d", "op": "gt", "value": 3}]
    fields = [{"field": "lead.known", "op": "is", "value": True},
              {"field": "lead.score", "op": "gt", "value": 20},
              {"field": "lead.score", "op": "gt", "value": 60},
              {"field": "lead.tags", "op": "contains", "value": "Consideration"},
              {"field": "lead.tags", "op": "contains", "value": "Decision"},
              {"field": "lead.first_channel", "op": "is", "value": "organic"},
              {"field": "lead.last_channel", "op": "is", "value": "paid"},
              {"field": "lead.email_domain", "op": "contains", "value": ".com"}]
    segments = [{"id": f"bench-window-{n}", "name": f"Window {n}", "if": [condition]}
                for n, condition in enumerate(windowed)]
    segments += [{"id": f"bench-field-{n}", "name": f"Field {n}", "if": [condition]} for n, condition in enumerate(fields)]
    segments += [{"id": "bench-known-pricing", "name": "Known, pricing", "if": [{"in_segment": "bench-window-0"},
                                                                                  {"field": "lead.known", "op": "is", "value": True}]},
                 {"id": "bench-hot", "name": "Hot", "if": [{"in_segment": "bench-field-2"}, {"in_segment": "bench-window-7"}]}]
    return segments


def bench_definitions(demo_yaml: str, total_rules: int = RULES_PER_SITE, segments: bool = False) -> dict:
    """The demo's rules and board, topped up with filler rules to `total_rules`; with `segments`, the
    bench's 20 segments too."""
    definitions = yaml.safe_load(demo_yaml)
    definitions["rules"] += filler_rules(total_rules - len(definitions["rules"]))
    if segments:
        definitions["segments"] = definitions.get("segments", []) + bench_segments()
    return definitions


def describe_rules(rules: Iterable[dict]) -> str:
    """'100 rules: 86 run on every pageview, 9 state triggers, ...' for the bench's log."""
    rules = list(rules)
    on_pageview = sum(rule["when"].get("event") in ("pageview", "any") for rule in rules)
    state = sum("score_at_least" in rule["when"] or "tag" in rule["when"] for rule in rules)
    timed = sum("inactive_for" in rule["when"] for rule in rules)
    other_events = len(rules) - on_pageview - state - timed
    return (f"{len(rules)} rules: {on_pageview} run on every pageview, {state} state triggers checked after every"
            f" event, {other_events} on other event types, {timed} time triggers")


def processor_watermarks(fields: dict[bytes | str, bytes | str]) -> dict[int, int]:
    """A processor's watermarks hash (`RedisKeys.watermarks`: partition -> last applied offset, and st:P stream
    times) as partition -> last applied offset."""
    marks = {}
    for key, value in fields.items():
        key = key.decode() if isinstance(key, bytes) else key
        if key.isdigit():
            marks[int(key)] = int(value)
    return marks


def records_applied(marks: dict[int, int], start_offsets: dict[int, int] | None = None) -> int:
    """How many records the watermarks cover (offsets from `start_offsets`, else from 0)."""
    start_offsets = start_offsets or {}
    return sum(max(0, offset + 1 - start_offsets.get(partition, 0)) for partition, offset in marks.items())


def caught_up(marks: dict[int, int], end_offsets: dict[int, int]) -> bool:
    """Every record before `end_offsets` (Kafka's next offsets) is applied."""
    return all(marks.get(partition, -1) >= end - 1 for partition, end in end_offsets.items())


class SseParser:
    """Server-sent events from a stream of lines: feed each line, get an event at each blank line."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}

    def feed(self, line: str) -> dict[str, str] | None:
        if line == "":
            event, self.fields = self.fields, {}
            return event if event.get("event") or event.get("data") else None
        if not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            self.fields[name] = self.fields[name] + "\n" + value if name == "data" and name in self.fields else value
        return None


RAW_PARTS = (("enrich", "enrich (validate, parse, classify)"), ("sessionize", "sessionize (incl. state load)"),
             ("identity", "identity (incl. graph prefetch)"), ("serialize", "serialize events, dead letters, feed"))
PROCESSOR_STEPS = (("lead", "lead processor step (rules)"), ("board", "board processor step (cards)"),
                   ("account", "account processor step (account segments)"))
TIMER_LABELS = {"raw-events": "sessions closing", "lead": "hourly passes, merge holds"}
RUNTIME_PARTS = (("produce", "produce (every processor's outputs, until acked)"),
                 ("commit", "Redis commit (every processor's state, CAS)"))


def combine_costs(snapshots: Iterable[dict]) -> dict:
    """Several workers' CostMeter snapshots as one: CPU seconds and items summed per part."""
    total: dict = {"process_cpu_s": 0.0, "parts": {}}
    for snapshot in snapshots:
        total["process_cpu_s"] += snapshot["process_cpu_s"]
        for part, spent in snapshot["parts"].items():
            into = total["parts"].setdefault(part, {"cpu_s": 0.0, "items": 0})
            into["cpu_s"] += spent["cpu_s"]
            into["items"] += spent["items"]
    return total


def cost_rows(cost: dict, events: int) -> list[tuple[str, str]]:
    """Worker CPU (user+sys) in µs per event of the run, the whole process and each part of it; the parts
    add up to the total, the rest being what no part covers (fetching, client I/O tasks, webhook dispatch, the
    loop)."""
    parts = cost["parts"]

    def cpu(part: str) -> float:
        return parts.get(part, {}).get("cpu_s", 0.0)

    def per_event(seconds: float) -> str:
        return f"{1e6 * seconds / max(events, 1):,.1f} µs"

    def per_item(part: str, unit: str) -> str:
        items = parts.get(part, {}).get("items", 0)
        return f"  ({1e6 * cpu(part) / items:,.1f} µs per {unit}, {items:,} {unit}s)" if items else ""

    raw = cpu("raw-events")
    rows = [("worker CPU per event, all its processes (every processor)", per_event(cost["process_cpu_s"])),
            ("  raw processor step", per_event(raw))]
    rows += [(f"    {label}", per_event(cpu(part))) for part, label in RAW_PARTS]
    rows.append(("    rest of the raw step (batching, identity lock)", per_event(raw - sum(cpu(p) for p, _ in RAW_PARTS))))
    rows += [(f"  {label}", per_event(cpu(part)) + per_item(part, "record")) for part, label in PROCESSOR_STEPS]
    rows += [(f"  {label}", per_event(cpu(part)) + per_item(part, "record" if part == "produce" else "input"))
             for part, label in RUNTIME_PARTS]
    timer_parts = sorted(part for part in parts if part.startswith(TIMERS_PART + " "))
    timers = sum(cpu(part) for part in timer_parts)
    rows.append(("  timers, every processor's due keys", per_event(timers)))
    for part in timer_parts:
        name = part.removeprefix(TIMERS_PART + " ")
        rows.append((f"    {name} ({TIMER_LABELS.get(name, 'due keys')})", per_event(cpu(part))))
    measured = raw + timers + sum(cpu(p) for p, _ in PROCESSOR_STEPS + RUNTIME_PARTS)
    rows.append(("  other: Kafka fetch, client I/O, webhook dispatch, event loop",
                 per_event(cost["process_cpu_s"] - measured)))
    return rows


async def _baseline(settings: Settings, expected: int) -> tuple[float, float]:
    """Raw aiokafka consume + orjson decode of every event: (events/s, CPU seconds of this process)."""
    topic = settings.topic(EVENTS_RAW.name)
    consumer = kafka_consumer(settings.kafka(), group=None)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(settings.partitions)])
        await consumer.seek_to_beginning()
        seen, started, cpu_started = 0, time.perf_counter(), time.process_time()
        loads = orjson.loads
        while seen < expected:
            for messages in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                for message in messages:
                    try:
                        loads(message.value)
                    except orjson.JSONDecodeError:
                        pass
                seen += len(messages)
        return seen / (time.perf_counter() - started), time.process_time() - cpu_started
    finally:
        await consumer.stop()


class _PeakRss(threading.Thread):
    """Samples a process tree's resident memory every 200 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                rss = sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.2)


def _latency(settings: Settings, rate: int, seconds: int) -> dict[str, tuple[int, float]]:
    """Paced events carrying their send time; returns event_id -> (sent, seen in ClickHouse), ms."""
    site = f"latency-{int(time.time())}"
    total = rate * seconds
    latencies: dict[str, tuple[int, float]] = {}
    done = threading.Event()

    def poll() -> None:
        """Every 25 ms, the rows that arrived since the last poll. Only those: the sink inserts a raw
        partition's rows in offset order, so a new row is above the highest offset seen of its partition.
        (This read every row of the run every 100 ms before: a growing load on ClickHouse, and up to
        100 ms of each figure was the poll's.)"""
        ch = clickhouse.connect(settings.clickhouse())
        highest: dict[int, int] = {}
        while not done.is_set() or len(latencies) < total:
            now = time.time() * 1000
            above = "".join(f"raw_partition = {p}, {o}, " for p, o in sorted(highest.items()))
            rows = ch.execute("SELECT event_id, raw_partition, raw_offset, visitParamExtractUInt(properties, 'sent_ms')"
                              " FROM events WHERE site_id = %(site)s AND raw_offset > "
                              + (f"multiIf({above}-1)" if highest else "-1"), {"site": site})
            for event_id, partition, offset, sent_ms in rows:
                highest[partition] = max(highest.get(partition, -1), offset)
                if event_id not in latencies:
                    latencies[event_id] = (sent_ms, now)
            if done.is_set() and len(latencies) >= total:
                break
            time.sleep(0.025)

    async def paced() -> None:
        """Send each event when it is due (ticks of 10 ms), letting the producer flush in between: a
        generator that sleeps synchronously would hold events in the client and measure the client."""
        producer = AIOKafkaProducer(**settings.kafka().client_options(), linger_ms=0)
        await producer.start()
        try:
            started, sent_count = time.time(), 0
            while sent_count < total:
                due = min(total, int((time.time() - started) * rate) + 1)
                for i in range(sent_count, due):
                    sent = int(time.time() * 1000)
                    event = {"event_id": f"lat{i}", "site_id": site, "type": "pageview", "visitor_id": f"lv{i % 500}",
                             "ts": sent, "url": "https://bench.example/pricing", "properties": {"sent_ms": sent}}
                    await producer.send(settings.topic(EVENTS_RAW.name), orjson.dumps(event), key=f"lv{i % 500}".encode())
                sent_count = due
                await asyncio.sleep(0.01)
            await producer.flush()
        finally:
            await producer.stop()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    asyncio.run(paced())
    done.set()
    poller.join(timeout=120)
    return latencies


# ------------------------------------------------------------------------------------- automation phases


def _apply_bench_rules(settings: Settings, site_id: str, segments: bool = False) -> list[dict]:
    """Store the bench rule set (with `segments`, and the bench's segments) for a site the way an operator
    would (`leadstream rules apply FILE`); returns the rules. The command's per-rule listing is left out of
    the bench's output."""
    definitions = bench_definitions(demo_definitions(site_id), segments=segments)
    with contextlib.redirect_stdout(io.StringIO()):
        refused = apply_definitions_text(settings, json.dumps(definitions), "bench-rules.json", site_id, "rules")
    if refused:
        raise RuntimeError(f"the bench rule set was refused for site {site_id} (see above)")
    return definitions["rules"]


async def _end_offsets(consumer: AIOKafkaConsumer, topic: str, partitions: int) -> dict[int, int]:
    """partition -> the offset the next record will get."""
    ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    return {tp.partition: offset for tp, offset in ends.items()}


def _watermarks(r: redis.Redis, settings: Settings, processor: str) -> dict[int, int]:
    return processor_watermarks(r.hgetall(RedisKeys.of(settings).watermarks(processor)))


def _drain_automation(settings: Settings, r: redis.Redis, roles: list[Role], timeout_s: float = 600
                      ) -> dict[int, int]:
    """Wait until the lead and board processors have applied everything on their input topics (twice in a
    row, since each processor also writes to them); returns leads.activity's end offsets at that point."""
    async def drain() -> dict[int, int]:
        consumer = kafka_consumer(settings.kafka(), group=None)
        await consumer.start()
        try:
            deadline, settled_once = time.monotonic() + timeout_s, False
            while time.monotonic() < deadline:
                activity = await _end_offsets(consumer, settings.topic(LEADS_ACTIVITY.name), settings.partitions)
                commands = await _end_offsets(consumer, settings.topic(BOARD_COMMANDS.name), settings.partitions)
                if caught_up(_watermarks(r, settings, "lead"), activity) and \
                        caught_up(_watermarks(r, settings, "board"), commands):
                    if settled_once:
                        return activity
                    settled_once = True
                else:
                    settled_once = False
                for role in roles:
                    if not role.alive():
                        raise RuntimeError(f"{role.name} exited:\n{role.log_tail()}")
                await asyncio.sleep(0.25)
            raise TimeoutError(f"the lead and board processors did not catch up within {timeout_s:.0f}s")
        finally:
            await consumer.stop()

    return asyncio.run(drain())


async def _copy_lead_activity(source: Settings, target: Settings, until: dict[int, int]) -> dict[int, int]:
    """Copy leads.activity up to `until` into the target namespace, partition for partition, leaving out
    merge handovers (the lead processor writes those itself, so a replay re-creates them); returns the
    target's end offsets."""
    topic = source.topic(LEADS_ACTIVITY.name)
    consumer = kafka_consumer(source.kafka(), group=None)
    producer = AIOKafkaProducer(**target.kafka().client_options(), linger_ms=10, max_batch_size=512 * 1024,
                                acks="all")
    await consumer.start()
    await producer.start()
    try:
        wanted = [TopicPartition(topic, p) for p, end in until.items() if end > 0]
        consumer.assign(wanted)
        await consumer.seek_to_beginning(*wanted)
        remaining, pending = {tp.partition for tp in wanted}, []
        while remaining:
            for tp, messages in (await consumer.getmany(timeout_ms=500, max_records=10_000)).items():
                for message in messages:
                    handover = list(message.headers) == LEADS_ACTIVITY.headers(LeadHandover)
                    if message.offset < until[tp.partition] and not handover:
                        pending.append(await producer.send(target.topic(LEADS_ACTIVITY.name), message.value,
                                                           key=message.key, partition=tp.partition,
                                                           headers=list(message.headers)))
                if messages and messages[-1].offset >= until[tp.partition] - 1:
                    remaining.discard(tp.partition)
            await asyncio.gather(*pending)
            pending.clear()
        return await _end_offsets(consumer, target.topic(LEADS_ACTIVITY.name), target.partitions)
    finally:
        await producer.stop()
        await consumer.stop()


def _lead_processor_alone(settings: Settings, r: redis.Redis, activity_ends: dict[int, int], uid: int,
                          segments: bool = False) -> tuple[int, float, float]:
    """(records, records/s, CPU seconds) of a lone `leadstream worker --processors lead` over a copy of the
    run's leads.activity in a fresh namespace with the same rules (with `segments`, and the bench's 20
    segments): from its first committed batch to its last, so neither process start-up nor the
    consumer-group join is counted."""
    lone = replace(settings, topic_prefix=f"bench{uid}lead{'seg' if segments else ''}.")
    asyncio.run(ensure_topics(lone.kafka(), verbose=False))
    _apply_bench_rules(lone, "bench", segments)
    ends = asyncio.run(_copy_lead_activity(settings, lone, activity_ends))
    total = sum(ends.values())
    print(f"  lead processor alone{' with 20 segments' if segments else ''}: copied {total:,} leads.activity"
          " records; starting `worker --processors lead` ...", flush=True)
    worker = Role(lone, "bench-lead-processor", "worker", "--name", "bench-lead-processor", "--processors",
                  "lead").start()
    try:
        first: tuple[float, int] | None = None
        deadline = time.monotonic() + 900
        while True:
            marks, now = _watermarks(r, lone, "lead"), time.perf_counter()
            if first is None and marks:
                first = (now, records_applied(marks), _cpu_s(worker.proc.pid))
            if caught_up(marks, ends):
                cpu_s = _cpu_s(worker.proc.pid) - first[2]
                break
            if not worker.alive():
                raise RuntimeError(f"{worker.name} exited:\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError("the lone lead processor did not finish within 15 minutes")
            time.sleep(0.05)
    finally:
        worker.stop()
        asyncio.run(delete_topics(lone.kafka()))
        forget_redis_keys(lone)
    started, applied_at_start, _ = first
    return total, (total - applied_at_start) / max(now - started, 1e-6), cpu_s / max(total - applied_at_start, 1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class BoardLatency:
    """Produce time of each probe's second pricing pageview, and when its card was seen in Consideration."""

    sent_ms: dict[str, float] = field(default_factory=dict)  # card id -> produce time
    on_board_ms: dict[str, float] = field(default_factory=dict)  # first board API poll showing it
    on_stream_ms: dict[str, float] = field(default_factory=dict)  # arrival of its stage_change on the stream

    def latencies(self, seen: dict[str, float]) -> list[float]:
        return [at - self.sent_ms[card] for card, at in seen.items() if card in self.sent_ms]


def _raise_if_failed(tasks: Iterable[asyncio.Task]) -> None:
    """A watcher that stopped early stops the phase with its own error."""
    for task in tasks:
        if task.done():
            task.result()


def _start_api(settings: Settings, site_id: str) -> tuple[Role, str, str]:
    """A `leadstream api` process of its own on a free port, with a key for the site: (role, url, key)."""
    key = secrets.token_urlsafe(24)
    api = replace(settings, api_port=_free_port(), api_keys=f"{site_id}:{key}", server_secret=secrets.token_hex(32))
    role = Role(api, "bench-api", "api").start()
    base = f"http://127.0.0.1:{api.api_port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return role, base, key
        except httpx.TransportError:
            pass
        if not role.alive() or time.monotonic() > deadline:
            role.stop()
            raise RuntimeError(f"the API did not start:\n{role.log_tail()}")
        time.sleep(0.2)


def _board_latency(settings: Settings, rate: int, seconds: int, uid: int) -> BoardLatency:
    """Paced traffic on a site of its own with the bench rule set; one event in PROBE_EVERY is a probe: a
    new visitor identifies with the email of a company of its own, then views the pricing page twice (about
    1 and 1.5 seconds later). The first view tags the lead Consideration; the second makes it a member of the
    `evaluating` segment (pricing twice in 14 days), which the demo board imports, so the account's card
    appears, in Consideration: the latency runs from the second view, through segments, to the card."""
    site = f"boards-{uid}"
    _apply_bench_rules(settings, site)
    api, base, key = _start_api(settings, site)
    board_url = f"/v1/sites/{site}/boards/{BOARD}"
    total = rate * seconds
    # slots distinct modulo PROBE_EVERY (identifies at 0, first pricing views at 1/2, second at 1/4), so
    # a probe's events never share an index with another probe's
    whole = rate // PROBE_EVERY * PROBE_EVERY
    first_view_lag = whole + PROBE_EVERY // 2
    second_view_lag = first_view_lag + max(PROBE_EVERY, whole // 2 // PROBE_EVERY * PROBE_EVERY) - PROBE_EVERY // 4
    result = BoardLatency()
    time.sleep(1.5)  # the worker loads a site's definitions on its first event; the API on the first request

    def event(i: int) -> tuple[bytes, dict]:
        now = int(time.time() * 1000)
        common = {"event_id": f"bl{i}", "site_id": site, "ts": now, "ip": f"192.0.2.{i % 250 + 1}",
                  "user_agent": CHROME}
        if i % PROBE_EVERY == 0:
            probe = i // PROBE_EVERY
            return f"bp{probe}".encode(), common | {
                "type": "identify", "visitor_id": f"bp{probe}", "url": "https://bench.example/demo",
                "email": f"buyer@bench-account-{probe}.com"}
        for lag in (first_view_lag, second_view_lag):
            if i >= lag and (i - lag) % PROBE_EVERY == 0:
                probe = (i - lag) // PROBE_EVERY
                if lag == second_view_lag:
                    result.sent_ms[f"account:bench-account-{probe}.com"] = time.time() * 1000
                return f"bp{probe}".encode(), common | {
                    "type": "pageview", "visitor_id": f"bp{probe}", "url": "https://bench.example/pricing"}
        visitor = f"bg{i % 1000}"  # each of them on the next page of BACKGROUND_PATHS at each visit
        path = BACKGROUND_PATHS[(i + i // 1000) % len(BACKGROUND_PATHS)]
        return visitor.encode(), common | {"type": "pageview", "visitor_id": visitor,
                                           "url": f"https://bench.example{path}"}

    def all_seen() -> bool:
        return all(card in result.on_board_ms and card in result.on_stream_ms for card in result.sent_ms)

    async def paced(producer: AIOKafkaProducer) -> None:
        started, sent_count = time.time(), 0
        while sent_count < total:
            due = min(total, int((time.time() - started) * rate) + 1)
            for i in range(sent_count, due):
                key_bytes, value = event(i)
                await producer.send(settings.topic(EVENTS_RAW.name), orjson.dumps(value), key=key_bytes)
            sent_count = due
            await asyncio.sleep(0.01)
        await producer.flush()

    async def poll_board(http: httpx.AsyncClient) -> None:
        while True:
            page = await http.get(board_url, params={"stage": "consideration", "limit": BOARD_PAGE})
            now = time.time() * 1000
            for column in page.raise_for_status().json()["stages"]:
                for card in column["cards"]:
                    result.on_board_ms.setdefault(card["card_id"], now)
            await asyncio.sleep(BOARD_POLL_S)

    async def read_stream(http: httpx.AsyncClient, connected: asyncio.Event) -> None:
        token = (await http.get(f"{board_url}/stream-token")).raise_for_status().json()["token"]
        snapshot = (await http.get(board_url, params={"limit": 1})).raise_for_status().json()["feed_id"]
        parser = SseParser()
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10, read=None)) as keyless:
            async with keyless.stream("GET", f"{board_url}/stream",
                                      params={"token": token, "last_event_id": snapshot}) as stream:
                stream.raise_for_status()
                connected.set()
                async for line in stream.aiter_lines():
                    sse = parser.feed(line)
                    if sse and sse.get("event") == "stage_change":
                        change = orjson.loads(sse["data"])
                        if change["to_stage"] == "consideration":
                            result.on_stream_ms.setdefault(change["card_id"], time.time() * 1000)

    async def run() -> None:
        producer = AIOKafkaProducer(**settings.kafka().client_options(), linger_ms=0)
        await producer.start()
        async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=10) as http:
            connected = asyncio.Event()
            watchers = [asyncio.create_task(read_stream(http, connected)), asyncio.create_task(poll_board(http))]
            try:
                deadline = time.monotonic() + 30
                while not connected.is_set():
                    _raise_if_failed(watchers)
                    if time.monotonic() > deadline:
                        raise TimeoutError("the board stream did not open within 30 s")
                    await asyncio.sleep(0.05)
                await paced(producer)
                deadline = time.monotonic() + 30  # then report whatever was seen
                while not all_seen() and time.monotonic() < deadline:
                    _raise_if_failed(watchers)
                    await asyncio.sleep(0.1)
            finally:
                for watcher in watchers:
                    watcher.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)
                await producer.stop()

    try:
        asyncio.run(run())
    finally:
        api.stop()
    return result


# ------------------------------------------------------------------------------- records and hops per event

HOPS = (EVENTS_RAW, LEADS_ACTIVITY, BOARD_COMMANDS, BOARD_STAGE_CHANGES)
"""The path of an event that moves a card, topic by topic; each record on it names the event (`event_id`)."""


def records_per_topic(before: dict[str, dict[int, int]], after: dict[str, dict[int, int]]) -> dict[str, int]:
    """Records written to each topic between two snapshots of end offsets (topic -> partition -> offset)."""
    return {topic: sum(ends.values()) - sum(before.get(topic, {}).values()) for topic, ends in after.items()}


def records_per_event_rows(written: dict[str, int], raw_events: int, raw_topic: str = EVENTS_RAW.name,
                           top: int = 20) -> list[tuple[str, str]]:
    """Kafka records the pipeline produced per raw event (every topic but the raw one), with the topics that
    take most of them."""
    produced = {topic: n for topic, n in written.items() if topic != raw_topic and n > 0}
    total = sum(produced.values())
    events = max(raw_events, 1)
    ranked = sorted(produced.items(), key=lambda item: (-item[1], item[0]))
    return [("Kafka records produced per raw event (all the pipeline's topics)", f"{total / events:.2f}"
             f"  ({total:,} records for {raw_events:,} events)"),
            ("  of which", ", ".join(f"{topic} {n / events:.2f}" for topic, n in ranked[:top]) or "none")]


def event_id_of(value: bytes | None) -> str:
    """The `event_id` a record names ('' when none: not JSON, not an object, or no such field)."""
    if not value:
        return ""
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError:
        return ""
    event_id = decoded.get("event_id") if isinstance(decoded, dict) else None
    return event_id if isinstance(event_id, str) else ""


def first_seen(records: Iterable[tuple[str, int]]) -> dict[str, int]:
    """event_id -> the earliest record timestamp (ms) naming it; records naming none are left out."""
    seen: dict[str, int] = {}
    for event_id, ts_ms in records:
        if event_id and (event_id not in seen or ts_ms < seen[event_id]):
            seen[event_id] = ts_ms
    return seen


def hop_latencies(chain: Sequence[tuple[str, dict[str, int]]]) -> list[tuple[str, list[float]]]:
    """For each consecutive pair of topics on the chain (name, event_id -> first timestamp): the delays (ms)
    between an event's first record on one and its first on the next, for the events on both."""
    hops = []
    for (upstream, ups), (downstream, downs) in zip(chain, chain[1:]):
        hops.append((f"{upstream} -> {downstream}",
                     [float(downs[e] - ups[e]) for e in downs.keys() & ups.keys()]))
    return hops


def hop_rows(hops: Sequence[tuple[str, list[float]]]) -> list[tuple[str, str]]:
    """p50/p95/p99 per hop, or that no event made the hop."""
    rows = []
    for label, unsorted in hops:
        delays = sorted(unsorted)
        if not delays:
            rows.append((f"  hop {label}", "no event made this hop"))
            continue
        rows.append((f"  hop {label}", f"p50 {percentile(delays, 0.50):,.0f} / p95 {percentile(delays, 0.95):,.0f} / "
                                       f"p99 {percentile(delays, 0.99):,.0f} ms  ({len(delays):,} events)"))
    return rows


def clickhouse_hops(latencies: dict[str, tuple[int, float]], enriched_at: dict[str, int]
                    ) -> list[tuple[str, list[float]]]:
    """The ClickHouse latency in two: from producing an event to its record on events.enriched (the raw
    processor), and from there to its row being visible (the sink's window and insert)."""
    both = [(sent, enriched_at[event_id], seen) for event_id, (sent, seen) in latencies.items()
            if event_id in enriched_at]
    return [("produce -> events.enriched", [float(enriched - sent) for sent, enriched, _ in both]),
            ("events.enriched -> row in ClickHouse", [seen - enriched for _, enriched, seen in both])]


async def _all_end_offsets(settings: Settings) -> dict[str, dict[int, int]]:
    """Every catalog topic's end offsets (topic -> partition -> offset)."""
    kafka = settings.kafka()
    consumer = kafka_consumer(kafka, group=None)
    await consumer.start()
    try:
        return {topic.name: await _end_offsets(consumer, kafka.topic(topic.name), settings.partitions)
                for topic in CATALOG}
    finally:
        await consumer.stop()


def all_end_offsets(settings: Settings) -> dict[str, dict[int, int]]:
    return asyncio.run(_all_end_offsets(settings))


async def _first_seen_between(settings: Settings, topic: str, start: dict[int, int], end: dict[int, int]
                              ) -> dict[str, int]:
    """event_id -> first record timestamp among a topic's records from `start` up to `end` offsets."""
    kafka = settings.kafka()
    wanted = {TopicPartition(kafka.topic(topic), p): (start.get(p, 0), stop) for p, stop in end.items()
              if stop > start.get(p, 0)}
    if not wanted:  # (a consumer stopped before any assignment fails its stop)
        return {}
    consumer = kafka_consumer(kafka, group=None)
    await consumer.start()
    try:
        consumer.assign(list(wanted))
        for tp, (first, _) in wanted.items():
            consumer.seek(tp, first)
        seen: list[tuple[str, int]] = []
        open_parts = set(wanted)
        while open_parts:
            batches = await consumer.getmany(*open_parts, timeout_ms=1000, max_records=10_000)
            if not batches:
                break  # nothing more within a second: what is left was compacted or deleted
            for tp, messages in batches.items():
                stop = wanted[tp][1]
                seen.extend((event_id_of(m.value), m.timestamp) for m in messages if m.offset < stop)
                if messages and messages[-1].offset >= stop - 1:
                    open_parts.discard(tp)
        return first_seen(seen)
    finally:
        await consumer.stop()


def measure_hops(settings: Settings, before: dict[str, dict[int, int]], after: dict[str, dict[int, int]]
                 ) -> list[tuple[str, list[float]]]:
    """The hop latencies of the events produced between two snapshots of end offsets, from record timestamps."""
    chain = [(topic.name, asyncio.run(_first_seen_between(settings, topic.name, before.get(topic.name, {}),
                                                          after.get(topic.name, {})))) for topic in HOPS]
    return hop_latencies(chain)


# ------------------------------------------------------------------------------------- throughput phases


@dataclass
class PipelineRun:
    """One pipeline phase: rates of rows into ClickHouse, and what the processes spent on them."""

    whole_rate: float  # events/s from the first row to the last
    steady_rate: float  # events/s between 10 % and 90 % of the rows
    drained_rate: float  # events/s until the lead and board processors had applied everything too
    first_s: float
    total_s: float
    drained_s: float
    activity_ends: dict[int, int]  # leads.activity's end offsets once drained
    worker_cost: dict  # the workers' CostMeter snapshots, combined
    machine_cpu_s: dict[str, float]  # CPU of each kind of process on the box, from the first row until drained

    @property
    def sink_cpu_s(self) -> float:
        return self.machine_cpu_s["sink"]


def _start_pipeline(settings: Settings, layout: str, copies: int = 1) -> list[Role]:
    """A sink, then `copies` sets of the layout's worker processes (processors.app.LAYOUTS)."""
    names = ["bench-worker", *(f"bench-worker-{n}" for n in range(2, copies + 1))]
    return [Role(settings, "bench-sink", "sink").start(), *(w for name in names for w in start_workers(settings, name, layout))]


SERVER_LABELS = {"kafka": "Kafka", "clickhouse": "ClickHouse", "redis": "Redis"}


def _machine_processes(settings: Settings, roles: list[Role]) -> dict[str, list[int]]:
    """The processes whose CPU the pipeline costs, by kind: roles[0] is the sink, the rest are workers; the
    local stack's servers when they run here (not when LeadStream points at servers elsewhere)."""
    kinds = {"workers": [role.proc.pid for role in roles[1:]], "sink": [roles[0].proc.pid]}
    for server in servers(settings):
        pid = server.pid()
        if pid is not None:
            kinds[SERVER_LABELS.get(server.name, server.name)] = [pid]
    return kinds


def _machine_cpu_s(processes: dict[str, list[int]]) -> dict[str, float]:
    return {kind: sum(_cpu_s(pid) for pid in pids) for kind, pids in processes.items()}


def _cpu_s(pid: int) -> float:
    """User+sys CPU seconds of a process and its children (0 once it is gone)."""
    try:
        process = psutil.Process(pid)
        return sum(p.cpu_times().user + p.cpu_times().system for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0.0


def _worker_costs(settings: Settings, r: redis.Redis, workers: Iterable[Role]) -> dict:
    """The workers' published CPU cost (after one more publishing tick, so that it covers all done so far)."""
    time.sleep(2 * PUBLISH_EVERY_S)
    blobs = [r.get(RedisKeys.of(settings).cost(worker.name)) for worker in workers]
    return combine_costs(orjson.loads(blob) for blob in blobs if blob)


def _run_pipeline(settings: Settings, r: redis.Redis, roles: list[Role], sent: int, label: str) -> PipelineRun:
    """From a standing start until all `sent` events are rows in ClickHouse (events or dead letters), then
    until the lead and board processors have caught up; roles[0] is the sink, the rest are workers."""
    total_sql = "SELECT (SELECT count() FROM events) + (SELECT count() FROM dlq)"
    started = time.perf_counter()
    marks: list[tuple[float, int]] = []
    next_print, cpu_at_first = 0.0, None
    processes = _machine_processes(settings, roles)
    while True:
        done = count(settings, total_sql)
        now = time.perf_counter() - started
        marks.append((now, done))
        if done and cpu_at_first is None:  # the processes' start-up is behind them: count their work from here
            cpu_at_first = _machine_cpu_s(processes)
        if now >= next_print:
            print(f"  {label}: {done:>9,}/{sent:,} rows in ClickHouse after {now:5.1f}s", flush=True)
            next_print = now + 5
        if done >= sent:
            break
        for role in roles:
            if not role.alive():
                raise RuntimeError(f"{role.name} exited:\n{role.log_tail()}")
        if now > 1800:
            raise TimeoutError(f"{label} did not finish within 30 minutes")
        time.sleep(0.25)
    total_s = marks[-1][0]
    first = next(t for t, n in marks if n > 0)
    lo = next(t for t, n in marks if n >= sent * 0.1)
    hi = next(t for t, n in marks if n >= sent * 0.9)
    print(f"  {label} done in {total_s:.1f}s (first rows after {first:.1f}s)", flush=True)
    activity_ends = _drain_automation(settings, r, roles)
    drained_s = time.perf_counter() - started
    cpu_at_drained = _machine_cpu_s(processes)
    machine_cpu_s = {kind: cpu_at_drained[kind] - (cpu_at_first or {}).get(kind, 0.0) for kind in processes}
    print(f"  {label}: lead and board processors caught up after {drained_s:.1f}s", flush=True)
    return PipelineRun(
        whole_rate=sent / max(total_s - first, 1e-6), steady_rate=(sent * 0.8) / max(hi - lo, 1e-6),
        drained_rate=sent / max(drained_s - first, 1e-6), first_s=first, total_s=total_s, drained_s=drained_s,
        activity_ends=activity_ends, worker_cost=_worker_costs(settings, r, roles[1:]), machine_cpu_s=machine_cpu_s)


def _prepare_namespace(settings: Settings, site_id: str = "bench", segments: bool = False) -> list[dict]:
    """Topics, tables and the bench rule set (with `segments`, and the bench's segments) of a fresh
    namespace; returns the rules."""
    asyncio.run(ensure_topics(settings.kafka(), verbose=False))
    clickhouse.migrate(settings.clickhouse(), verbose=False)
    return _apply_bench_rules(settings, site_id, segments)


def _wait_until_joined(settings: Settings, workers: int, roles: list[Role], timeout_s: float = 180) -> None:
    """Until every processor's consumer group is stable with one member per copy of the layout: workers that
    start together still join one after the other, and each join stops the group for a rebalance."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, **settings.kafka().security.librdkafka_options(), "log_level": 4})  # no notices on exit
    groups = [settings.kafka().group(group) for group in PROCESSOR_GROUPS]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        described = [future.result() for future in admin.describe_consumer_groups(groups).values()]
        if all(group.state == ConsumerGroupState.STABLE and len(group.members) == workers for group in described):
            return
        for role in roles:
            if not role.alive():
                raise RuntimeError(f"{role.name} exited:\n{role.log_tail()}")
        time.sleep(0.5)
    raise TimeoutError(f"{workers} workers did not all join their processors' consumer groups within {timeout_s:.0f}s")


def segment_rows(plain: PipelineRun, segmented: PipelineRun, events: int) -> list[tuple[str, str]]:
    """The pipeline without and with the bench's 20 segments: rate, worker CPU and the lead step's CPU."""
    def lead_cpu(run: PipelineRun) -> float:
        return run.worker_cost["parts"].get("lead", {}).get("cpu_s", 0.0)

    return [
        ("pipeline drained, without / with 20 segments", f"{plain.drained_rate:,.0f} / {segmented.drained_rate:,.0f}"
                                                         f" events/s ({100 * segmented.drained_rate / plain.drained_rate:.1f} %)"),
        ("  worker CPU per event, without / with", f"{1e6 * plain.worker_cost['process_cpu_s'] / events:,.1f} / "
                                                   f"{1e6 * segmented.worker_cost['process_cpu_s'] / events:,.1f} µs"),
        ("  lead processor step per event, without / with", f"{1e6 * lead_cpu(plain) / events:,.1f} / "
                                                            f"{1e6 * lead_cpu(segmented) / events:,.1f} µs"),
    ]


def _rerun(settings: Settings, r: redis.Redis, records: list[tuple[bytes, bytes]], layout: str, copies: int,
           uid: int, segments: bool = False) -> PipelineRun:
    """The pipeline phase again with `copies` sets of the layout's worker processes (with `segments`, the
    bench's 20 segments applied too), on the same events in a fresh namespace; the events are produced once
    every worker has joined, so that the rates leave the joins' rebalances out."""
    name = f"{uid}{layout}{copies}{'seg' if segments else ''}"
    scaled = replace(settings, topic_prefix=f"bench{name}.", clickhouse_database=f"leadstream_bench{name}")
    _prepare_namespace(scaled, segments=segments)
    try:
        roles = _start_pipeline(scaled, layout, copies)
        try:
            _wait_until_joined(scaled, copies, roles)
            producing = threading.Thread(target=lambda: asyncio.run(produce(scaled, records)), daemon=True)
            producing.start()  # the clock runs from the first record on, as in the main phase
            run = _run_pipeline(scaled, r, roles, len(records), describe_layout(layout, copies))
            producing.join()
            return run
        finally:
            for role in roles:
                role.stop()
    finally:
        drop_namespace(scaled)


@dataclass
class ProducerFigures:
    records_per_s: float
    cpu_us_per_record: float


def output_batches(results: Iterable[object], partitions: int, batch_size: int) -> list[list[tuple[int, bytes, bytes]]]:
    """Enriched events as the raw processor would produce them: (partition, key, value) in batches of
    `batch_size`, spread over the partitions the way raw offsets are; rejections are left out."""
    records = [(i % partitions, event.visitor_id.encode(), event.to_json())
               for i, event in enumerate(result for result in results if isinstance(result, EnrichedEvent))]
    return [records[i:i + batch_size] for i in range(0, len(records), batch_size)]


async def _produce_with_aiokafka(kafka: KafkaConfig, batches: list[list[tuple[int, bytes, bytes]]]
                                 ) -> tuple[float, float]:
    """The worker's own BatchProducer, a batch at a time until acked: (wall s, CPU s)."""
    producer = BatchProducer(kafka, EVENTS_DLQ)
    await producer.start()
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        for batch in batches:
            outputs = Outputs(kafka.partitions)
            for partition, key, value in batch:
                outputs.add(EVENTS_ENRICHED, key, value, partition)
            await producer.send(outputs)
        return time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        await producer.stop()


def _produce_with_librdkafka(kafka: KafkaConfig, batches: list[list[tuple[int, bytes, bytes]]]
                             ) -> tuple[float, float]:
    """confluent-kafka (librdkafka), configured like BatchProducer (idempotent, acks=all, linger 5 ms), a
    batch at a time until every record is acked: (wall s, CPU s of this process, librdkafka's threads in)."""
    producer = ConfluentProducer({
        "bootstrap.servers": kafka.bootstrap, **kafka.security.librdkafka_options(), "enable.idempotence": True, "acks": "all", "linger.ms": 5,
        "batch.size": 1024 * 1024, "message.max.bytes": 8 * 1024 * 1024})
    topic, failures = kafka.topic(EVENTS_ENRICHED.name), []
    producer.list_topics(topic, timeout=30)  # connected before the clock starts, as aiokafka's start() is

    def delivered(error, _message) -> None:
        if error is not None:
            failures.append(error)

    started, cpu_started = time.perf_counter(), time.process_time()
    for batch in batches:
        for partition, key, value in batch:
            producer.produce(topic, value, key, partition=partition, on_delivery=delivered)
        if producer.flush(60):
            raise TimeoutError("librdkafka did not get every ack within 60 s")
    if failures:
        raise RuntimeError(f"librdkafka: {len(failures)} records not delivered, first: {failures[0]}")
    return time.perf_counter() - started, time.process_time() - cpu_started


def _compare_producers(settings: Settings, records: list[tuple[bytes, bytes]], uid: int, rounds: int = 2
                       ) -> dict[str, ProducerFigures]:
    """The hot path's producer against librdkafka on the same enriched events, alternating, `rounds` times
    each; per client the round with the least CPU (the figure the machine's other load moves least)."""
    target = replace(settings, topic_prefix=f"bench{uid}prod.")
    asyncio.run(ensure_topics(target.kafka(), verbose=False))
    kafka = target.kafka()
    batches = output_batches(enrich_batch([value for _, value in records[:PRODUCER_RECORDS]], int(time.time() * 1000)),
                             kafka.partitions, settings.worker_batch_size)
    total = sum(map(len, batches))
    best: dict[str, tuple[float, float]] = {}
    try:
        for _ in range(rounds):
            for name, run in (("aiokafka", lambda: asyncio.run(_produce_with_aiokafka(kafka, batches))),
                              ("librdkafka", lambda: _produce_with_librdkafka(kafka, batches))):
                wall, cpu = run()
                if name not in best or cpu < best[name][1]:
                    best[name] = (wall, cpu)
    finally:
        asyncio.run(delete_topics(kafka))
    return {name: ProducerFigures(total / wall, 1e6 * cpu / total) for name, (wall, cpu) in best.items()}


def producer_rows(producers: dict[str, ProducerFigures], partitions: int) -> list[tuple[str, str]]:
    """The producer comparison: each client's rate and CPU per record, then librdkafka relative to aiokafka."""
    rows = [(f"producer {name}: idempotent, acks=all, {partitions} partitions",
             f"{figures.records_per_s:,.0f} records/s  ({figures.cpu_us_per_record:,.1f} µs CPU per record)")
            for name, figures in producers.items()]
    aiokafka, librdkafka = producers["aiokafka"], producers["librdkafka"]
    rows.append(("  librdkafka / aiokafka", f"{librdkafka.records_per_s / aiokafka.records_per_s:.2f}x records/s,"
                                            f" {librdkafka.cpu_us_per_record / aiokafka.cpu_us_per_record:.2f}x CPU"))
    return rows


def describe_layout(layout: str, copies: int = 1) -> str:
    """E.g. "2 workers, every processor in each" or "raw + automation workers"."""
    if layout == "single":
        return "1 worker, every processor in it" if copies == 1 else f"{copies} workers, every processor in each"
    sets = " + ".join(f"{suffix or 'all'}" for suffix in LAYOUTS[layout])
    return f"{sets} workers" if copies == 1 else f"{copies} x ({sets}) workers"


def layout_rows(run: PipelineRun, label: str, events: int, against: PipelineRun | None = None,
                against_label: str = "") -> list[tuple[str, str]]:
    """A pipeline phase's rates: events into ClickHouse (raw processor and sink), then every processor drained
    (the rules and the cards too: the figure that counts), and the workers' CPU per event; `against`: as a
    factor."""
    def factor(rate: str) -> str:
        return "" if against is None else f"  ({getattr(run, rate) / getattr(against, rate):.2f}x {against_label})"

    return [
        (f"{label}: every processor drained (rules and cards too)",
         f"{run.drained_rate:,.0f} events/s" + factor("drained_rate")),
        ("  events into ClickHouse (raw processor + sink): whole run / steady 10%..90%",
         f"{run.whole_rate:,.0f} / {run.steady_rate:,.0f} events/s" + factor("steady_rate")),
        ("  the workers' CPU per event, together", f"{1e6 * run.worker_cost['process_cpu_s'] / events:,.1f} µs"),
    ]


def machine_rows(run: PipelineRun, events: int) -> list[tuple[str, str]]:
    """Where the box's CPU went per event in a pipeline phase, by kind of process, and the rate that total
    allows on this machine's cores: the ceiling no worker change can lift alone."""
    total = sum(run.machine_cpu_s.values())
    cores = psutil.cpu_count() or 1
    per_event = {kind: 1e6 * seconds / max(events, 1) for kind, seconds in run.machine_cpu_s.items()}
    return [
        ("machine CPU per event, pipeline phase (first row until drained)",
         f"{1e6 * total / max(events, 1):,.0f} µs: " + ", ".join(f"{kind} {us:,.0f}" for kind, us in per_event.items())),
        (f"  events/s this machine's {cores} cores allow at that cost", f"{cores * events / max(total, 1e-9):,.0f}"),
    ]


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    """The final table: labels padded to one column, between rules."""
    width = max(len(label) for label, _ in rows)
    rule = "=" * (width + 24)
    return "\n".join([rule, *(f"{label:<{width}}  {value}" for label, value in rows), rule])


def run_bench(settings: Settings, events: int = 200_000, latency_rate: int = 2000, latency_seconds: int = 15,
              open_sessions: int = 100_000, board_latency_seconds: int = 15, workers: int = 2,
              layout: str = "split") -> int:
    uid = int(time.time())
    s = replace(allowing_the_crm_stand_in(settings), topic_prefix=f"bench{uid}.",
                clickhouse_database=f"leadstream_bench{uid}")
    print(f"LeadStream benchmark — {events:,} events, {s.partitions} partitions, namespace {s.topic_prefix}", flush=True)
    r = redis.Redis.from_url(s.redis_url)
    rules = _prepare_namespace(s)
    print(f"  rule set for the bench sites: {describe_rules(rules)}", flush=True)

    records: list[tuple[bytes, bytes]] = []
    seed = 11
    while len(records) < events:  # ~9 events per visitor; top up with more seeds until K
        now_ms = int(time.time() * 1000)
        traffic = TrafficGenerator(visitors=max(events // 8, 100), seed=seed, site_ids=("bench",), malformed_ratio=0.001,
                                   start_ms=now_ms - 14 * 86_400_000, now_ms=now_ms)
        records.extend(itertools.islice(traffic.events(), events - len(records)))
        seed += 1
    started = time.perf_counter()
    sent = asyncio.run(produce(s, records, progress_every=100_000, label="produced"))
    produce_rate = sent / (time.perf_counter() - started)
    print(f"  produced {sent:,} events at {produce_rate:,.0f}/s", flush=True)

    baseline_rate, baseline_cpu_s = asyncio.run(_baseline(s, sent))
    print(f"  raw aiokafka consume+decode: {baseline_rate:,.0f} events/s", flush=True)

    print(f"  producer comparison: {min(sent, PRODUCER_RECORDS):,} enriched events to {s.partitions} partitions,"
          " idempotent, acks=all, aiokafka (the worker's BatchProducer) vs librdkafka ...", flush=True)
    producers = _compare_producers(s, records, uid)

    print(f"  pipeline phase: {describe_layout(layout)} ({layout} layout) and a sink", flush=True)
    offsets_at_start = all_end_offsets(s)
    roles = _start_pipeline(s, layout)
    samplers = [_PeakRss(role.proc.pid) for role in roles[1:]]
    for sampler in samplers:
        sampler.start()
    try:
        run = _run_pipeline(s, r, roles, sent, "pipeline")
        written = records_per_topic(offsets_at_start, all_end_offsets(s))

        print(f"  latency phase: {latency_rate:,} events/s for {latency_seconds}s ...", flush=True)
        enriched_before = all_end_offsets(s)[EVENTS_ENRICHED.name]
        latencies = _latency(s, latency_rate, latency_seconds)
        enriched_at = asyncio.run(_first_seen_between(s, EVENTS_ENRICHED.name, enriched_before,
                                                      all_end_offsets(s)[EVENTS_ENRICHED.name]))

        _drain_automation(s, r, roles)
        print(f"  board latency phase: {latency_rate:,} events/s for {board_latency_seconds}s, one in {PROBE_EVERY}"
              " a probe (identify, then pricing twice) ...", flush=True)
        offsets_before_board = all_end_offsets(s)
        board = _board_latency(s, latency_rate, board_latency_seconds, uid)
        _drain_automation(s, r, roles)
        hops = measure_hops(s, offsets_before_board, all_end_offsets(s))
        board_latencies, stream_latencies = board.latencies(board.on_board_ms), board.latencies(board.on_stream_ms)

        state_keys = list(r.scan_iter(match=RedisKeys.of(s).visitor_states_pattern(), count=10_000))
        state_bytes = sum(r.memory_usage(k) or 0 for k in state_keys[:20_000])
        per_visitor = state_bytes / max(min(len(state_keys), 20_000), 1)

        print(f"  open-sessions phase: {open_sessions:,} new visitors with one pageview each ...", flush=True)
        before_open = r.info("memory")["used_memory"]
        now_ms = int(time.time() * 1000)
        fresh = ((f"os{i}".encode(), orjson.dumps({"event_id": f"os{i}", "site_id": "bench", "type": "pageview",
                  "visitor_id": f"os{i}", "ts": now_ms, "url": "https://bench.example/"})) for i in range(open_sessions))
        asyncio.run(produce(s, fresh))
        wait_for(s, "SELECT count() FROM events WHERE startsWith(event_id, 'os')", open_sessions, 600, roles)
        open_now = sum(r.zcard(RedisKeys.of(s).due("raw", p)) for p in range(s.partitions))
        per_open_session = (r.info("memory")["used_memory"] - before_open) / max(open_sessions, 1)

        roles[1].stop()  # the worker with the raw processor
        restart_started = time.perf_counter()
        roles[1].start()
        probe = [(b"restart-probe", orjson.dumps({"event_id": "restart-probe", "site_id": "bench", "type": "pageview",
                                                   "visitor_id": "restart-probe", "ts": int(time.time() * 1000)}))]
        asyncio.run(produce(s, probe))
        wait_for(s, "SELECT count() FROM events WHERE event_id = 'restart-probe'", 1, 300, roles)
        restart_s = time.perf_counter() - restart_started
    finally:
        for sampler in samplers:
            sampler.running = False
        for role in roles:
            role.stop()

    lead_records, lead_alone_rate, lead_cpu_s = _lead_processor_alone(s, r, run.activity_ends, uid)
    _, segments_rate, segments_cpu_s = _lead_processor_alone(s, r, run.activity_ends, uid, segments=True)
    comparisons = [("single", 1)] if layout != "single" else []  # the per-process figure
    if workers > 1:
        comparisons.append(("single", workers))
    reruns: list[tuple[str, PipelineRun]] = []
    for other, copies in comparisons:
        label = describe_layout(other, copies)
        print(f"  comparison phase: the same {sent:,} events, {label}, {s.partitions} partitions ...", flush=True)
        reruns.append((label, _rerun(s, r, records, other, copies, uid)))
    print(f"  segments phase: the same {sent:,} events, {describe_layout(layout)}, without and with 20 segments ...",
          flush=True)
    plain, segmented = (_rerun(s, r, records, layout, 1, uid, segments) for segments in (False, True))
    one_worker = run if layout == "single" else (reruns[0][1] if reruns else None)
    load = ", ".join(f"{value:.2f}" for value in psutil.getloadavg())

    rows = [
        ("raw aiokafka consume + orjson decode", f"{baseline_rate:,.0f} events/s"
                                                 f"  ({1e6 * baseline_cpu_s / sent:,.1f} µs CPU per event)"),
        ("rules on each bench site (demo's 8 + generated filler)", describe_rules(rules)),
        *layout_rows(run, f"pipeline, {describe_layout(layout)}", sent,
                     one_worker if one_worker is not run else None, "1 worker"),
        ("  pipeline (every processor drained) / raw baseline", f"{100 * run.drained_rate / baseline_rate:.1f} %"),
        *machine_rows(run, sent),
        *records_per_event_rows(written, sent),
        *cost_rows(run.worker_cost, sent),
        ("sink CPU per event (all its tables, first row until drained)", f"{1e6 * run.sink_cpu_s / sent:,.1f} µs"),
        *producer_rows(producers, s.partitions),
        *(row for label, rerun in reruns
          for row in layout_rows(rerun, label, sent, one_worker if rerun is not one_worker else None, "1 worker")),
        ("lead processor alone: own `worker --processors lead` replaying", f"{lead_alone_rate:,.0f} records/s"),
        ("  the run's leads.activity, first to last commit", f"({lead_records:,} records, nothing else running)"),
        ("lead processor alone / raw baseline", f"{100 * lead_alone_rate / baseline_rate:.1f} %"),
        ("  its CPU per record", f"{1e6 * lead_cpu_s:,.1f} µs"),
        *segment_rows(plain, segmented, sent),
        ("lead processor alone with 20 segments (10 with 14-day windows)", f"{segments_rate:,.0f} records/s"
                                                                             f"  ({1e6 * segments_cpu_s:,.1f} µs CPU"
                                                                             " per record)"),
        ("  rate with segments / without", f"{100 * segments_rate / lead_alone_rate:.1f} %"),
        *latency_rows(f"latency produce -> ClickHouse at {latency_rate:,}/s",
                      [seen - sent for sent, seen in latencies.values()]),
        ("  split at each event's events.enriched record (its Kafka timestamp)", ""),
        *hop_rows(clickhouse_hops(latencies, enriched_at)),
        *latency_rows(f"latency produce -> card in Consideration, board API polled every"
                      f" {BOARD_POLL_S * 1000:.0f} ms, at {latency_rate:,}/s", board_latencies,
                      f"of {len(board.sent_ms):,} probes"),
        *latency_rows(f"latency produce -> stage_change on the board's SSE stream at {latency_rate:,}/s",
                      stream_latencies, f"of {len(board.sent_ms):,} probes"),
        ("hops of the board latency phase's events, from Kafka record timestamps", "(first record per event)"),
        *hop_rows(hops),
        ("worker peak RSS", ", ".join(f"{role.name.removeprefix('bench-')} {sampler.peak / 2**20:,.0f} MiB"
                                      for role, sampler in zip(roles[1:], samplers))),
        ("visitors with sessionizer state in Redis", f"{len(state_keys):,}"),
        ("Redis bytes per visitor (session state key)", f"{per_visitor:,.0f} B"),
        ("Redis bytes per open session (all state: session+identity)", f"{per_open_session:,.0f} B"),
        ("open sessions in Redis at restart", f"{open_now:,}"),
        ("worker restart -> next event in ClickHouse", f"{restart_s:.1f} s  (no state restore: it is in Redis)"),
        ("load average (1, 5, 15 min) at the end", load),
    ]
    print("\n" + format_table(rows))
    drop_namespace(s)
    return 0
