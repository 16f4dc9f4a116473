"""Kafka topic -> ClickHouse table, batched, at-least-once delivery made exactly-once by watermarks.

Why a plain aiokafka consumer and not a Faust agent: the sink must commit a Kafka offset only after
the ClickHouse insert that covers it succeeded, flush before a partition is revoked and reload its
watermark when one is assigned. aiokafka's manual commits and rebalance listener say that directly.

Exactly-once rows: every event/DLQ row carries the (raw_partition, raw_offset) of the events.raw message
it came from, and the worker writes the output of raw partition p to partition p of its output topics.
So one sink consumer sees raw offsets of a raw partition in increasing order, and anything at or below
the highest raw offset already in the table is a redelivery (a sink restart, or a worker replaying a
batch it had produced before a crash) and is skipped. Upsert tables (sessions, identity) need no watermark: a
ReplacingMergeTree collapses identical versions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from leadstream.config import Settings
from schemas.dead_letter import DeadLetter
from schemas.events import EnrichedEvent
from schemas.identity import IdentityEvent, LeadRecord
from schemas.session import Session
from sinks import clickhouse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableSpec:
    """Which topic feeds which table, how a message becomes a row, and whether rows are watermarked."""

    table: str
    topic: str
    columns: tuple[str, ...]
    to_row: Callable[[bytes], Sequence]
    watermarked: bool


def _dict_row(columns: tuple[str, ...]) -> Callable[[bytes], Sequence]:
    def to_row(value: bytes) -> Sequence:
        record = orjson.loads(value)
        return [record[name] for name in columns]

    return to_row


def _dead_letter_row(value: bytes) -> Sequence:
    d = DeadLetter.from_json(value)
    return [d.reason, d.message, d.raw, d.topic, d.partition, d.offset, d.received_ms]


def _columns(record_type) -> tuple[str, ...]:
    """A table's columns are its record's fields, in order: the schema is the one place they are listed."""
    return tuple(f.name for f in fields(record_type))


EVENT_COLUMNS = _columns(EnrichedEvent)
DLQ_COLUMNS = ("reason", "message", "raw", "topic", "raw_partition", "raw_offset", "received_ms")
SESSION_COLUMNS = _columns(Session)
IDENTITY_EVENT_COLUMNS = _columns(IdentityEvent)
VISITOR_LEAD_COLUMNS = ("site_id", "visitor_id", "since_ts_ms", "lead_id", "version")
LEAD_COLUMNS = _columns(LeadRecord) + ("version",)  # lead upserts carry the version they were written at

TABLES = {
    "events": TableSpec("events", "events.enriched", EVENT_COLUMNS, _dict_row(EVENT_COLUMNS), watermarked=True),
    "dlq": TableSpec("dlq", "events.dlq", DLQ_COLUMNS, _dead_letter_row, watermarked=True),
    "sessions": TableSpec("sessions", "sessions", SESSION_COLUMNS, _dict_row(SESSION_COLUMNS), watermarked=False),
    "identity_events": TableSpec("identity_events", "identity", IDENTITY_EVENT_COLUMNS,
                                 _dict_row(IDENTITY_EVENT_COLUMNS), watermarked=False),
    "visitor_leads": TableSpec("visitor_leads", "identity.visitors", VISITOR_LEAD_COLUMNS,
                               _dict_row(VISITOR_LEAD_COLUMNS), watermarked=False),
    "leads": TableSpec("leads", "identity.leads", LEAD_COLUMNS, _dict_row(LEAD_COLUMNS), watermarked=False),
}


@dataclass
class _Pending:
    rows: list = field(default_factory=list)
    poison: list = field(default_factory=list)  # undecodable records, stored in the dlq table
    offsets: dict[TopicPartition, int] = field(default_factory=dict)


class TableSink:
    """Consumes one topic into one table. Several processes may run it: partitions are shared out."""

    def __init__(self, spec: TableSpec, settings: Settings):
        self.spec = spec
        self.settings = settings
        self.client = clickhouse.connect(settings)
        self.watermarks: dict[int, int] | None = None  # None: read from ClickHouse before the next insert
        self.pending = _Pending()
        self.lock = asyncio.Lock()
        self.rows_written = 0
        self.rows_skipped = 0
        self.consumer: AIOKafkaConsumer | None = None

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=s.name(f"leadstream-sink-{self.spec.table}"),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
        )
        self.consumer.subscribe([s.topic(self.spec.topic)], listener=_Rebalance(self))
        await self.consumer.start()
        try:
            while not stop.is_set():
                await self._collect(stop)
                async with self.lock:
                    await self._flush()
        finally:
            async with self.lock:
                await self._flush()
            await self.consumer.stop()
            log.info("%s: wrote %d rows, skipped %d redelivered", self.spec.table, self.rows_written, self.rows_skipped)

    async def _collect(self, stop: asyncio.Event) -> None:
        deadline = time.monotonic() + self.settings.sink_batch_ms / 1000
        while len(self.pending.rows) < self.settings.sink_batch_size and not stop.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            batches = await self.consumer.getmany(timeout_ms=left_ms, max_records=self.settings.sink_batch_size)
            for tp, messages in batches.items():
                self._add(tp, messages)

    def _add(self, tp: TopicPartition, messages) -> None:
        to_row = self.spec.to_row
        rows = self.pending.rows
        for message in messages:
            try:
                rows.append(to_row(message.value))
            except Exception as err:  # a record no LeadStream writer produced: keep it, don't crash-loop
                log.error("undecodable record in %s[%s]@%s: %s", tp.topic, tp.partition, message.offset, err)
                self.pending.poison.append([
                    "sink_decode_error", f"{self.spec.table}: {err}", message.value or b"", tp.topic,
                    tp.partition, message.offset, int(time.time() * 1000),
                ])
        self.pending.offsets[tp] = messages[-1].offset + 1

    def _deduplicated(self, rows: list) -> list:
        if not self.spec.watermarked:
            return rows
        p_idx = self.spec.columns.index("raw_partition")
        o_idx = p_idx + 1
        marks = self.watermarks
        fresh = []
        for row in rows:
            partition, offset = row[p_idx], row[o_idx]
            if offset > marks.get(partition, -1):
                marks[partition] = offset
                fresh.append(row)
        self.rows_skipped += len(rows) - len(fresh)
        return fresh

    async def _flush(self) -> None:
        """Insert the pending rows, retrying with backoff until ClickHouse takes them, then commit offsets.

        After any failure the watermarks are re-read from ClickHouse before retrying, so an insert that
        landed although its reply was lost is not inserted twice.
        """
        if not self.pending.offsets:
            return
        batch, self.pending = self.pending, _Pending()
        delay = 0.5
        while True:
            try:
                if self.watermarks is None:
                    self.watermarks = await asyncio.to_thread(
                        clickhouse.raw_offset_watermarks, self.client, self.spec.table, self.settings.topic("events.raw"))
                rows = self._deduplicated(batch.rows)
                await asyncio.to_thread(clickhouse.insert_columnar, self.client, self.spec.table, self.spec.columns, rows)
                await asyncio.to_thread(clickhouse.insert_columnar, self.client, "dlq", DLQ_COLUMNS, batch.poison)
                break
            except Exception as err:  # ClickHouse down or restarting: keep the batch, back off, retry.
                log.warning("insert into %s failed (%s); retrying in %.1fs", self.spec.table, err, delay)
                self.client.disconnect()
                self.forget_watermarks()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.rows_written += len(rows)
        await self.consumer.commit(batch.offsets)

    def forget_watermarks(self) -> None:
        """Watermarked tables re-read theirs from ClickHouse before the next insert."""
        self.watermarks = None if self.spec.watermarked else {}


class _Rebalance(ConsumerRebalanceListener):
    """Flush before giving partitions away; re-read watermarks when getting new ones."""

    def __init__(self, sink: TableSink):
        self.sink = sink

    async def on_partitions_revoked(self, revoked) -> None:
        async with self.sink.lock:
            await self.sink._flush()

    async def on_partitions_assigned(self, assigned) -> None:
        self.sink.forget_watermarks()


async def run_sinks(settings: Settings, tables: Sequence[str], stop: asyncio.Event) -> list[TableSink]:
    sinks = [TableSink(TABLES[name], settings) for name in tables]
    await asyncio.gather(*(sink.run(stop) for sink in sinks))
    return sinks
