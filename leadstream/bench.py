"""`leadstream bench`: what one worker process sustains on this machine, next to raw aiokafka.

Phases, all in one run on the same stack and the same data:
  1. produce K synthetic events to a fresh events.raw;
  2. baseline: a bare aiokafka consumer + orjson decode loop over those K events;
  3. pipeline: one `leadstream worker` + one `leadstream sink` from a standing start until all K are
     rows in ClickHouse (rate over the whole run and over the steady middle);
  4. latency: a paced stream (default 2,000 events/s) through the running pipeline; for each event the
     time from produce to being visible in ClickHouse (polled every 100 ms);
  5. memory and state: peak RSS of the worker, Redis bytes per visitor with state; then N (100,000)
     new visitors each with one open session, Redis bytes per open session, and the time a restarted
     worker needs to process the next event with all that state in place.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import replace

import orjson
import psutil
import redis
from aiokafka import AIOKafkaProducer, TopicPartition

from leadstream.bench_profile import percentile
from leadstream.config import Settings
from leadstream.runner import Role, count, produce, wait_for
from leadstream.topics import ensure_topics
from leadstream.traffic import TrafficGenerator
from processors.runtime.ingest import consumer as kafka_consumer
from schemas.topics import EVENTS_RAW
from sinks import clickhouse


def _percentile(values: list[float], q: float) -> float:
    return percentile(sorted(values), q) if values else float("nan")


async def _baseline(settings: Settings, expected: int) -> float:
    """Raw aiokafka consume + orjson decode of every event; returns events/s."""
    topic = settings.topic(EVENTS_RAW.name)
    consumer = kafka_consumer(settings.kafka(), group=None)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(settings.partitions)])
        await consumer.seek_to_beginning()
        seen, started = 0, time.perf_counter()
        loads = orjson.loads
        while seen < expected:
            for messages in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                for message in messages:
                    try:
                        loads(message.value)
                    except orjson.JSONDecodeError:
                        pass
                seen += len(messages)
        return seen / (time.perf_counter() - started)
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


def _latency(settings: Settings, rate: int, seconds: int) -> list[float]:
    """Paced events carrying their send time; returns produce -> visible-in-ClickHouse latencies (ms)."""
    site = f"latency-{int(time.time())}"
    total = rate * seconds
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        ch = clickhouse.connect(settings.clickhouse())
        seen: set[str] = set()
        while not done.is_set() or len(seen) < total:
            now = time.time() * 1000
            rows = ch.execute("SELECT event_id, visitParamExtractUInt(properties, 'sent_ms') FROM events"
                              " WHERE site_id = %(site)s", {"site": site})
            for event_id, sent_ms in rows:
                if event_id not in seen:
                    seen.add(event_id)
                    latencies.append(now - sent_ms)
            if done.is_set() and len(seen) >= total:
                break
            time.sleep(0.1)

    async def paced() -> None:
        """Send each event when it is due (ticks of 10 ms), letting the producer flush in between: a
        generator that sleeps synchronously would hold events in the client and measure the client."""
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=0)
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


def run_bench(settings: Settings, events: int = 200_000, latency_rate: int = 2000, latency_seconds: int = 15,
              open_sessions: int = 100_000) -> int:
    uid = int(time.time())
    s = replace(settings, topic_prefix=f"bench{uid}.", clickhouse_database=f"leadstream_bench{uid}")
    print(f"LeadStream benchmark — {events:,} events, {s.partitions} partitions, namespace {s.topic_prefix}", flush=True)
    asyncio.run(ensure_topics(s.kafka(), verbose=False))
    clickhouse.migrate(s.clickhouse(), verbose=False)
    r = redis.Redis.from_url(s.redis_url)

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

    baseline_rate = asyncio.run(_baseline(s, sent))
    print(f"  raw aiokafka consume+decode: {baseline_rate:,.0f} events/s", flush=True)

    roles = [Role(s, "bench-sink", "sink").start(), Role(s, "bench-worker", "worker", "--name", "bench-worker").start()]
    sampler = _PeakRss(roles[1].proc.pid)
    sampler.start()
    total_sql = "SELECT (SELECT count() FROM events) + (SELECT count() FROM dlq)"
    try:
        started = time.perf_counter()
        marks: list[tuple[float, int]] = []
        next_print = 0.0
        while True:
            done = count(s, total_sql)
            now = time.perf_counter() - started
            marks.append((now, done))
            if now >= next_print:
                print(f"  pipeline: {done:>9,}/{sent:,} rows in ClickHouse after {now:5.1f}s", flush=True)
                next_print = now + 5
            if done >= sent:
                break
            for role in roles:
                if not role.alive():
                    raise RuntimeError(f"{role.name} exited:\n{role.log_tail()}")
            if now > 1800:
                raise TimeoutError("pipeline did not finish within 30 minutes")
            time.sleep(0.25)
        total_s = marks[-1][0]
        first = next(t for t, n in marks if n > 0)
        lo = next(t for t, n in marks if n >= sent * 0.1)
        hi = next(t for t, n in marks if n >= sent * 0.9)
        steady_rate = (sent * 0.8) / max(hi - lo, 1e-6)
        pipeline_rate = sent / max(total_s - first, 1e-6)
        print(f"  pipeline done in {total_s:.1f}s (first rows after {first:.1f}s)", flush=True)

        print(f"  latency phase: {latency_rate:,} events/s for {latency_seconds}s ...", flush=True)
        latencies = _latency(s, latency_rate, latency_seconds)

        state_keys = list(r.scan_iter(match=f"{s.name('ls')}:v:*", count=10_000))
        state_bytes = sum(r.memory_usage(k) or 0 for k in state_keys[:20_000])
        per_visitor = state_bytes / max(min(len(state_keys), 20_000), 1)

        print(f"  open-sessions phase: {open_sessions:,} new visitors with one pageview each ...", flush=True)
        before_open = r.info("memory")["used_memory"]
        now_ms = int(time.time() * 1000)
        fresh = ((f"os{i}".encode(), orjson.dumps({"event_id": f"os{i}", "site_id": "bench", "type": "pageview",
                  "visitor_id": f"os{i}", "ts": now_ms, "url": "https://bench.example/"})) for i in range(open_sessions))
        asyncio.run(produce(s, fresh))
        wait_for(s, "SELECT count() FROM events WHERE startsWith(event_id, 'os')", open_sessions, 600, roles)
        open_now = sum(r.zcard(f"{s.name('ls')}:due:{p}") for p in range(s.partitions))
        per_open_session = (r.info("memory")["used_memory"] - before_open) / max(open_sessions, 1)

        roles[1].stop()
        restart_started = time.perf_counter()
        roles[1] = Role(s, "bench-worker", "worker", "--name", "bench-worker").start()
        probe = [(b"restart-probe", orjson.dumps({"event_id": "restart-probe", "site_id": "bench", "type": "pageview",
                                                   "visitor_id": "restart-probe", "ts": int(time.time() * 1000)}))]
        asyncio.run(produce(s, probe))
        wait_for(s, "SELECT count() FROM events WHERE event_id = 'restart-probe'", 1, 300, roles)
        restart_s = time.perf_counter() - restart_started
    finally:
        sampler.running = False
        for role in roles:
            role.stop()

    rows = [
        ("raw aiokafka consume + orjson decode", f"{baseline_rate:,.0f} events/s"),
        ("pipeline, whole run (worker+sink, into ClickHouse)", f"{pipeline_rate:,.0f} events/s"),
        ("pipeline, steady 10%..90%", f"{steady_rate:,.0f} events/s"),
        ("pipeline / raw baseline", f"{100 * steady_rate / baseline_rate:.1f} %"),
        (f"latency produce -> ClickHouse at {latency_rate:,}/s: p50", f"{_percentile(latencies, 0.5):,.0f} ms"),
        ("  p95", f"{_percentile(latencies, 0.95):,.0f} ms"),
        ("  p99", f"{_percentile(latencies, 0.99):,.0f} ms"),
        ("  max", f"{max(latencies, default=float('nan')):,.0f} ms  ({len(latencies):,} events)"),
        ("worker peak RSS", f"{sampler.peak / 2**20:,.0f} MiB"),
        ("visitors with sessionizer state in Redis", f"{len(state_keys):,}"),
        ("Redis bytes per visitor (session state key)", f"{per_visitor:,.0f} B"),
        ("Redis bytes per open session (all state: session+identity)", f"{per_open_session:,.0f} B"),
        ("open sessions in Redis at restart", f"{open_now:,}"),
        ("worker restart -> next event in ClickHouse", f"{restart_s:.1f} s  (no state restore: it is in Redis)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * (width + 24))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("=" * (width + 24))
    clickhouse.connect(s.clickhouse(), database="default").execute(f"DROP DATABASE IF EXISTS {s.clickhouse_database}")
    return 0
