"""Kafka topic -> ClickHouse table, batched, at-least-once delivery made exactly-once by watermarks.

Runs on the shared ingest loop (processors/runtime/ingest.py) in `fill` mode: up to `sink_batch_size`
rows or `sink_batch_ms` per insert. A batch's Kafka offsets are committed only after the insert that
covers it succeeded; an insert that fails because ClickHouse is unreachable is retried with backoff until
ClickHouse takes it.

Exactly-once rows: every event/DLQ row carries the (raw_partition, raw_offset) of the message it came
from — for events, of events.raw, whose full name the sink stores beside it (`raw_topic`); for dead
letters, of the topic the letter names — and the worker writes the output of raw partition p to partition
p of its output topics. So one sink consumer sees the offsets of a source (topic, partition) in increasing
order, and anything at or below the highest offset already in the table for that source is a redelivery
(a sink restart, or a worker replaying a batch it had produced before a crash) and is skipped, counted in
`rows_skipped` and logged as it happens. After any failed insert the watermarks are re-read from
ClickHouse, so an insert that landed although its reply was lost is not inserted twice. Upsert tables
(sessions, identity) need no watermark: a ReplacingMergeTree collapses identical versions.

Poison: a record that cannot become a row goes to `dlq` (sink_decode_error) with the batch. An insert
that keeps failing for a reason other than an outage (a value ClickHouse cannot take) is isolated by
halves: the rows ClickHouse takes are inserted in order, each refused one goes to `dlq` (sink_insert_error)
with the error, and the partition moves on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import orjson

from processors.runtime.backoff import describe, is_transient
from processors.runtime.ingest import BatchIngest, Message
from schemas.boards import StageChange
from schemas.companies import Company
from schemas.dead_letter import DeadLetter
from schemas.events import EnrichedEvent
from schemas.identity import IdentityEvent, LeadRow, VisitorLeadRow
from schemas.privacy import RetentionPolicy
from schemas.records import picker
from schemas.rules import LeadChange, LeadSnapshot, RuleExecution, WebhookDelivery
from schemas.segments import SegmentChange
from schemas.session import Session
from schemas.settings import BatchConfig, ClickHouseConfig, KafkaConfig
from schemas.topics import (BOARD_STAGE_CHANGES, COMPANIES, EVENTS_DLQ, EVENTS_ENRICHED, EVENTS_RAW, IDENTITY,
                            IDENTITY_LEADS, IDENTITY_VISITORS, LEADS_CHANGES, LEADS_STATE, RULE_EXECUTIONS,
                            SEGMENTS_CHANGES, SESSIONS, WEBHOOK_DELIVERIES, Topic, sink_group)
from sinks import clickhouse
from sinks.retention import RetentionJob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableSpec:
    """Which topic feeds which table, how a message becomes a row, and how its rows are watermarked:
    `watermark` names the (source topic, partition, offset) columns, None for upsert tables.
    `stamps_raw_topic`: the sink adds a `raw_topic` column, the full name of events.raw."""

    table: str
    topic: Topic
    columns: tuple[str, ...]
    to_row: Callable[[bytes], Sequence]
    watermark: tuple[str, str, str] | None = None
    stamps_raw_topic: bool = False


def _columns(record_type) -> tuple[str, ...]:
    """A table's columns are its record's fields, in order: the schema is the one place they are listed."""
    return tuple(f.name for f in fields(record_type))


def _record_row(columns: tuple[str, ...]) -> Callable[[bytes], Sequence]:
    pick = picker(columns)
    return lambda value: pick(orjson.loads(value))


DLQ_COLUMNS = ("reason", "message", "raw", "raw_size", "raw_sha256", "raw_truncated", "topic", "raw_partition",
               "raw_offset", "received_ms")


def _letter_row(d: DeadLetter) -> list:
    return [d.reason, d.message, d.raw, d.raw_size, d.raw_sha256, int(d.raw_truncated), d.topic, d.partition,
            d.offset, d.received_ms]


def _dead_letter_row(value: bytes) -> Sequence:
    return _letter_row(DeadLetter.from_json(value))


def _spec(table: str, topic: Topic, record_type, **watermarking) -> TableSpec:
    columns = _columns(record_type)
    return TableSpec(table, topic, columns, _record_row(columns), **watermarking)


TABLES = {spec.table: spec for spec in (
    _spec("events", EVENTS_ENRICHED, EnrichedEvent, watermark=("raw_topic", "raw_partition", "raw_offset"),
          stamps_raw_topic=True),
    TableSpec("dlq", EVENTS_DLQ, DLQ_COLUMNS, _dead_letter_row, watermark=("topic", "raw_partition", "raw_offset")),
    _spec("sessions", SESSIONS, Session),
    _spec("identity_events", IDENTITY, IdentityEvent),
    _spec("visitor_leads", IDENTITY_VISITORS, VisitorLeadRow),
    _spec("leads", IDENTITY_LEADS, LeadRow),
    _spec("lead_changes", LEADS_CHANGES, LeadChange),
    _spec("lead_state", LEADS_STATE, LeadSnapshot),
    _spec("rule_executions", RULE_EXECUTIONS, RuleExecution),
    _spec("stage_changes", BOARD_STAGE_CHANGES, StageChange),
    _spec("companies", COMPANIES, Company),
    _spec("webhook_deliveries", WEBHOOK_DELIVERIES, WebhookDelivery),
    _spec("segment_membership", SEGMENTS_CHANGES, SegmentChange),
)}

Row = tuple[Message, Sequence]  # a row with the message it came from (named by its dead letter if refused)


class TableSink:
    """Consumes one topic into one table. Several processes may run it: partitions are shared out."""

    def __init__(self, spec: TableSpec, kafka: KafkaConfig, ch: ClickHouseConfig, batch: BatchConfig):
        self.spec = spec
        self.kafka = kafka
        self.source_topic = kafka.topic(spec.topic.name)
        self.raw_topic = kafka.topic(EVENTS_RAW.name)
        self.columns = spec.columns + (("raw_topic",) if spec.stamps_raw_topic else ())
        self.client = clickhouse.connect(ch)
        self.watermarks: dict[tuple[str, int], int] | None = None  # None: read from ClickHouse before the next insert
        self.rows_written = 0
        self.rows_skipped = 0  # at or below their source's watermark: logged as they are skipped
        self.rows_refused = 0  # refused by ClickHouse (or undecodable): stored in dlq instead
        self.ingest = BatchIngest(kafka, spec.topic.name, sink_group(spec.table), batch, self.insert,
                                  fill=True, on_assigned=lambda partitions: self.forget_watermarks(),
                                  isolate=self.isolate)

    async def run(self, stop: asyncio.Event) -> None:
        await self.ingest.start()
        try:
            await self.ingest.run(stop.is_set)
        finally:
            await self.ingest.stop()
            log.info("%s: wrote %d rows, skipped %d at or below their watermark, sent %d to dlq", self.spec.table,
                     self.rows_written, self.rows_skipped, self.rows_refused)

    async def insert(self, messages: Sequence[Message]) -> None:
        """One insert for the batch (and one into dlq for records no LeadStream writer produced)."""
        rows, letters = self._rows(messages)
        await self._write(rows)
        await self._write_letters(letters)

    async def isolate(self, messages: Sequence[Message], error: BaseException) -> None:
        """The ingest's way through a batch whose insert failed the same way again and again: find by
        halves the rows ClickHouse refuses, insert the others in order, store the refused ones in dlq."""
        rows, letters = self._rows(messages)
        refused: list[DeadLetter] = []
        await self._bisect(rows, error, refused)
        await self._write_letters(letters + refused)

    async def _bisect(self, rows: list[Row], error: BaseException, refused: list[DeadLetter]) -> None:
        if len(rows) == 1:
            message = rows[0][0]
            refused.append(self._letter("sink_insert_error", message, error))
            log.error("%s: ClickHouse refused the row of %s[%d]@%d; stored in dlq: %s", self.spec.table,
                      self.source_topic, message.partition, message.offset, describe(error))
            return
        middle = len(rows) // 2
        for half in (rows[:middle], rows[middle:]):
            if not half:
                continue
            try:
                await self._write(half)
            except Exception as err:  # noqa: BLE001 - an outage stops the isolation; the ingest retries
                if is_transient(err):
                    raise
                await self._bisect(half, err, refused)

    async def _write(self, rows: list[Row]) -> None:
        """Insert the rows the table does not hold yet; after any failure, reconnect and re-read the
        watermarks (the insert may have landed although its reply was lost)."""
        try:
            if self.watermarks is None and self.spec.watermark:
                self.watermarks = await asyncio.to_thread(
                    clickhouse.raw_offset_watermarks, self.client, self.spec.table, self.spec.watermark[0])
            fresh, skipped = self._deduplicated(rows)
            await asyncio.to_thread(clickhouse.insert_columnar, self.client, self.spec.table, self.columns,
                                    [values for _, values in fresh])
        except Exception:
            self.client.disconnect()
            self.forget_watermarks()
            raise
        self.rows_written += len(fresh)
        for (topic, partition), (first, last, count, stored) in skipped.items():
            self.rows_skipped += count
            log.warning("%s: skipped %d rows of %s[%d], offsets %d..%d: at or below offset %d, already stored. "
                        "A redelivery after a restart or replay; if %s was recreated (offsets restarted), "
                        "these rows are not stored: see README, Sinks", self.spec.table, count, topic,
                        partition, first, last, stored, topic)

    async def _write_letters(self, letters: list[DeadLetter]) -> None:
        try:
            await asyncio.to_thread(clickhouse.insert_columnar, self.client, "dlq", DLQ_COLUMNS,
                                    [_letter_row(letter) for letter in letters])
        except Exception:
            self.client.disconnect()
            raise
        self.rows_refused += len(letters)

    def _rows(self, messages: Sequence[Message]) -> tuple[list[Row], list[DeadLetter]]:
        to_row = self.spec.to_row
        rows, letters = [], []
        for message in messages:
            try:
                values = to_row(message.value)
            except Exception as err:  # noqa: BLE001 - a record no LeadStream writer produced: keep it, don't crash-loop
                log.error("undecodable record in %s[%s]@%s: %s", self.source_topic, message.partition,
                          message.offset, describe(err))
                letters.append(self._letter("sink_decode_error", message, err))
                continue
            if self.spec.stamps_raw_topic:
                values = (*values, self.raw_topic)
            rows.append((message, values))
        return rows, letters

    def _letter(self, reason: str, message: Message, error: BaseException) -> DeadLetter:
        return DeadLetter(reason=reason, message=f"{self.spec.table}: {describe(error)}", raw=message.value or b"",
                          topic=self.source_topic, partition=message.partition, offset=message.offset,
                          received_ms=int(time.time() * 1000))

    def _deduplicated(self, rows: list[Row]) -> tuple[list[Row], dict[tuple[str, int], tuple[int, int, int, int]]]:
        """The rows above their source's watermark, and per source the skipped ones: (first offset, last
        offset, count, the watermark they were at or below)."""
        if not self.spec.watermark:
            return rows, {}
        t_idx, p_idx, o_idx = (self.columns.index(name) for name in self.spec.watermark)
        marks = dict(self.watermarks)
        fresh, skipped = [], {}
        for message, values in rows:
            source, offset = (values[t_idx], values[p_idx]), values[o_idx]
            stored = marks.get(source, -1)
            if offset < 0 or offset > stored:  # -1: never written (output_too_large), nothing to compare with
                marks[source] = max(stored, offset)
                fresh.append((message, values))
            else:
                first, _, count, _ = skipped.get(source, (offset, offset, 0, stored))
                skipped[source] = (first, offset, count + 1, stored)
        self.watermarks = marks  # only once this batch's rows are chosen; a failed insert forgets them anyway
        return fresh, skipped

    def forget_watermarks(self) -> None:
        """Watermarked tables re-read theirs from ClickHouse before the next insert."""
        self.watermarks = None


async def run_sinks(kafka: KafkaConfig, ch: ClickHouseConfig, batch: BatchConfig, tables: Sequence[str],
                    stop: asyncio.Event, retention: RetentionPolicy | None = None) -> list[TableSink]:
    """Run the sinks of `tables` until `stop`; with a retention policy, also the daily retention run
    (sinks/retention.py: on a server without table TTL, the sinks are what deletes old rows)."""
    sinks = [TableSink(TABLES[name], kafka, ch, batch) for name in tables]
    jobs = [RetentionJob(ch, retention).run(stop)] if retention is not None else []
    await asyncio.gather(*(sink.run(stop) for sink in sinks), *jobs)
    return sinks
