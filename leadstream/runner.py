"""Start roles as child processes, produce traffic, wait for ClickHouse to catch up.

Shared by the demo, the benchmark and the integration tests so that all three drive the pipeline the
way an operator would: real `leadstream worker` / `leadstream sink` processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import redis
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from leadstream.topics import delete_topics
from processors.runtime.ingest import consumer as kafka_consumer
from processors.runtime.redis_client import redis_from_url
from schemas.redis_keys import RedisKeys
from schemas.settings import Settings
from schemas.topics import BOARD_COMMANDS, EVENTS_RAW, LEADS_ACTIVITY, SEGMENTS_ACCOUNT_LEADS, sink_group
from sinks import clickhouse
from sinks.table_sink import TABLES


class Role:
    """One `leadstream <role>` child process with its log file."""

    def __init__(self, settings: Settings, name: str, *args: str, env: dict[str, str] | None = None):
        self.name = name
        self.settings = settings
        log_dir = Path(settings.stack_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{settings.name(name)}.log"
        self.args = [sys.executable, "-m", "leadstream.cli", *args]
        self.env = {**os.environ, **settings.as_env(), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Role":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        return self

    def start_detached(self) -> "Role":
        """Start a role that outlives this command (the demo's API); `leadstream stack down` stops it."""
        pid_file = detached_pid_file(self.settings, self.name)
        if pid_file.exists():
            stop_detached(pid_file)
        self.start()
        pid_file.write_text(str(self.proc.pid))
        return self

    def kill(self) -> None:
        """SIGKILL: the crash the exactly-once tests simulate."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_workers(settings: Settings, name: str, layout: str = "split", env: dict[str, str] | None = None) -> list[Role]:
    """The `leadstream worker` processes of a layout (processors.app.LAYOUTS): `name`, or `name-raw` and
    `name-automation`, each with its `--processors`."""
    from processors.app import LAYOUTS

    names = {suffix: f"{name}-{suffix}" if suffix else name for suffix in LAYOUTS[layout]}
    return [Role(settings, names[suffix], "worker", "--name", names[suffix], "--processors", ",".join(processors),
                 env=env).start()
            for suffix, processors in LAYOUTS[layout].items()]


def detached_pid_file(settings: Settings, name: str) -> Path:
    directory = Path(settings.stack_dir) / "roles"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{name}.pid"


def stop_detached(pid_file: Path) -> None:
    try:
        os.killpg(int(pid_file.read_text().strip()), signal.SIGTERM)
    except (OSError, ValueError):
        pass
    pid_file.unlink(missing_ok=True)


async def produce(settings: Settings, records: Iterable[tuple[bytes | None, bytes]], progress_every: int = 0,
                  label: str = "sent") -> int:
    """Send (key, value) records to events.raw as fast as the broker takes them; return the count.
    Idempotent: a retry after a lost acknowledgement (a broker killed mid-send) must not write a record
    twice, or the pipeline rightly sets the second copy aside as a `duplicate_event` dead letter."""
    producer = AIOKafkaProducer(**settings.kafka().client_options(), linger_ms=10, max_batch_size=512 * 1024,
                                max_request_size=4 * 1024 * 1024, acks="all", enable_idempotence=True)
    await producer.start()
    sent, started, pending = 0, time.monotonic(), []
    try:
        topic = settings.topic(EVENTS_RAW.name)
        for key, value in records:
            pending.append(await producer.send(topic, value=value, key=key))
            sent += 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
            if progress_every and sent % progress_every == 0:
                rate = sent / max(time.monotonic() - started, 1e-6)
                print(f"  {label} {sent:>9,} events  ({rate:,.0f}/s)", flush=True)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent


def count(settings: Settings, sql: str, params: dict | None = None) -> int:
    return int(clickhouse.connect(settings.clickhouse()).execute(sql, params or {})[0][0])


def wait_for(settings: Settings, sql: str, expected: int, timeout_s: float, roles: Iterable[Role] = (),
             params: dict | None = None, label: str = "rows", progress: bool = False) -> int:
    """Poll a count query until it reaches `expected`; fail fast if a role died."""
    deadline = time.monotonic() + timeout_s
    last_print = 0.0
    value = -1
    while time.monotonic() < deadline:
        value = count(settings, sql, params)
        if value >= expected:
            return value
        for role in roles:
            if not role.alive():
                raise RuntimeError(f"{role.name} exited early:\n{role.log_tail()}")
        if progress and time.monotonic() - last_print > 2:
            print(f"  waiting for ClickHouse: {value:,}/{expected:,} {label}", flush=True)
            last_print = time.monotonic()
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {expected} {label}; have {value}")


PROCESSOR_INPUTS = (("lead", LEADS_ACTIVITY), ("account", SEGMENTS_ACCOUNT_LEADS), ("board", BOARD_COMMANDS))


async def _backlog(settings: Settings, sink_tables: Sequence[str]) -> int:
    """Records the lead, account and board processors' watermarks do not yet cover, plus records of the given
    tables' topics their sinks have not yet committed."""
    kafka = settings.kafka()
    consumer = kafka_consumer(kafka, group=None)
    admin = AIOKafkaAdminClient(**kafka.client_options())
    await consumer.start()
    await admin.start()
    redis = redis_from_url(settings.redis_url)

    async def ends(topic) -> dict[TopicPartition, int]:
        return await consumer.end_offsets([TopicPartition(kafka.topic(topic.name), p) for p in range(kafka.partitions)])

    try:
        backlog = 0
        for processor, topic in PROCESSOR_INPUTS:
            marks = await redis.hgetall(RedisKeys.of(settings).watermarks(processor))
            for tp, end in (await ends(topic)).items():
                backlog += max(0, end - 1 - int(marks.get(str(tp.partition).encode(), -1)))
        for table in sink_tables:
            committed = await admin.list_consumer_group_offsets(kafka.group(sink_group(table)))
            for tp, end in (await ends(TABLES[table].topic)).items():
                backlog += max(0, end - (committed[tp].offset if tp in committed else 0))
        return backlog
    finally:
        await consumer.stop()
        await admin.close()
        await redis.aclose()


def wait_drained(settings: Settings, timeout_s: float, roles: Iterable[Role] = (), progress: bool = False,
                 sink_tables: Sequence[str] = ("lead_state", "rule_executions", "stage_changes")) -> None:
    """Wait until the lead, account and board processors have applied every record of their inputs and the
    sinks of `sink_tables` have stored theirs (the processors feed each other and themselves, so the backlog
    must stay at zero for two looks in a row)."""
    deadline = time.monotonic() + timeout_s
    quiet, last_print = 0, 0.0
    while time.monotonic() < deadline:
        for role in roles:
            if not role.alive():
                raise RuntimeError(f"{role.name} exited early:\n{role.log_tail()}")
        backlog = asyncio.run(_backlog(settings, sink_tables))
        quiet = quiet + 1 if backlog == 0 else 0
        if quiet >= 2:
            return
        if progress and backlog and time.monotonic() - last_print > 2:
            print(f"  lead, account and board processors, sinks: {backlog:,} records to go", flush=True)
            last_print = time.monotonic()
        time.sleep(0.5)
    raise TimeoutError("timed out waiting for the lead, account and board processors to catch up")


def drop_namespace(settings: Settings) -> None:
    """Remove everything a throwaway namespace (a test's, a benchmark's) created: its topics, its ClickHouse
    database and its Redis keys."""
    asyncio.run(delete_topics(settings.kafka()))
    clickhouse.drop_database(settings.clickhouse())
    forget_redis_keys(settings)


def forget_redis_keys(settings: Settings) -> None:
    """Delete a throwaway namespace's Redis keys (all under its topic prefix)."""
    if not settings.topic_prefix:
        raise ValueError("refusing to delete Redis keys without a topic prefix: they would be a real pipeline's")
    r = redis.Redis.from_url(settings.redis_url)
    keys = list(r.scan_iter(match=f"{settings.topic_prefix}*", count=10_000))
    for i in range(0, len(keys), 1000):
        r.delete(*keys[i:i + 1000])
