"""Kafka topic -> ClickHouse table, batched, at-least-once delivery made exactly-once by watermarks.

Runs on the shared ingest loop (processors/runtime/ingest.py) in `fill` mode: up to `sink_batch_size`
rows or `sink_batch_ms` per insert. A batch's Kafka offsets are committed only after the insert that
covers it succeeded; a failed insert is retried with backoff until ClickHouse takes it.

Exactly-once rows: every event/DLQ row carries the (raw_partition, raw_offset) of the events.raw message
it came from, and the worker writes the output of raw partition p to partition p of its output topics.
So one sink consumer sees raw offsets of a raw partition in increasing order, and anything at or below
the highest raw offset already in the table is a redelivery (a sink restart, or a worker replaying a
batch it had produced before a crash) and is skipped. After any failed insert the watermarks are re-read
from ClickHouse, so an insert that landed although its reply was lost is not inserted twice. Upsert
tables (sessions, identity) need no watermark: a ReplacingMergeTree collapses identical versions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import orjson

from leadstream.config import BatchConfig, ClickHouseConfig, KafkaConfig
from processors.runtime.ingest import BatchIngest, Message
from schemas.boards import StageChange
from schemas.dead_letter import DeadLetter
from schemas.events import EnrichedEvent
from schemas.identity import IdentityEvent, LeadRow, VisitorLeadRow
from schemas.rules import LeadChange, LeadSnapshot, RuleExecution
from schemas.session import Session
from schemas.topics import (BOARD_STAGE_CHANGES, EVENTS_DLQ, EVENTS_ENRICHED, EVENTS_RAW, IDENTITY, IDENTITY_LEADS,
                            IDENTITY_VISITORS, LEADS_CHANGES, LEADS_STATE, RULE_EXECUTIONS, SESSIONS, Topic)
from sinks import clickhouse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableSpec:
    """Which topic feeds which table, how a message becomes a row, and whether rows are watermarked."""

    table: str
    topic: Topic
    columns: tuple[str, ...]
    to_row: Callable[[bytes], Sequence]
    watermarked: bool


def _columns(record_type) -> tuple[str, ...]:
    """A table's columns are its record's fields, in order: the schema is the one place they are listed."""
    return tuple(f.name for f in fields(record_type))


def _record_row(columns: tuple[str, ...]) -> Callable[[bytes], Sequence]:
    def to_row(value: bytes) -> Sequence:
        record = orjson.loads(value)
        return [record[name] for name in columns]

    return to_row


def _dead_letter_row(value: bytes) -> Sequence:
    d = DeadLetter.from_json(value)
    return [d.reason, d.message, d.raw, d.topic, d.partition, d.offset, d.received_ms]


DLQ_COLUMNS = ("reason", "message", "raw", "topic", "raw_partition", "raw_offset", "received_ms")


def _spec(table: str, topic: Topic, record_type, watermarked: bool = False) -> TableSpec:
    columns = _columns(record_type)
    return TableSpec(table, topic, columns, _record_row(columns), watermarked)


TABLES = {spec.table: spec for spec in (
    _spec("events", EVENTS_ENRICHED, EnrichedEvent, watermarked=True),
    TableSpec("dlq", EVENTS_DLQ, DLQ_COLUMNS, _dead_letter_row, watermarked=True),
    _spec("sessions", SESSIONS, Session),
    _spec("identity_events", IDENTITY, IdentityEvent),
    _spec("visitor_leads", IDENTITY_VISITORS, VisitorLeadRow),
    _spec("leads", IDENTITY_LEADS, LeadRow),
    _spec("lead_changes", LEADS_CHANGES, LeadChange),
    _spec("lead_state", LEADS_STATE, LeadSnapshot),
    _spec("rule_executions", RULE_EXECUTIONS, RuleExecution),
    _spec("stage_changes", BOARD_STAGE_CHANGES, StageChange),
)}


class TableSink:
    """Consumes one topic into one table. Several processes may run it: partitions are shared out."""

    def __init__(self, spec: TableSpec, kafka: KafkaConfig, ch: ClickHouseConfig, batch: BatchConfig):
        self.spec = spec
        self.kafka = kafka
        self.client = clickhouse.connect(ch)
        self.watermarks: dict[int, int] | None = None  # None: read from ClickHouse before the next insert
        self.rows_written = 0
        self.rows_skipped = 0
        self.ingest = BatchIngest(kafka, spec.topic.name, f"leadstream-sink-{spec.table}", batch, self.insert,
                                  fill=True, on_assigned=lambda partitions: self.forget_watermarks())

    async def run(self, stop: asyncio.Event) -> None:
        await self.ingest.start()
        try:
            await self.ingest.run(stop.is_set)
        finally:
            await self.ingest.stop()
            log.info("%s: wrote %d rows, skipped %d redelivered", self.spec.table, self.rows_written, self.rows_skipped)

    async def insert(self, messages: Sequence[Message]) -> None:
        """One insert for the batch (and one into dlq for records no LeadStream writer produced)."""
        rows, poison = self._rows(messages)
        try:
            if self.watermarks is None and self.spec.watermarked:
                self.watermarks = await asyncio.to_thread(
                    clickhouse.raw_offset_watermarks, self.client, self.spec.table, self.kafka.topic(EVENTS_RAW.name))
            fresh = self._deduplicated(rows)
            await asyncio.to_thread(clickhouse.insert_columnar, self.client, self.spec.table, self.spec.columns, fresh)
            await asyncio.to_thread(clickhouse.insert_columnar, self.client, "dlq", DLQ_COLUMNS, poison)
        except Exception:  # ClickHouse down or restarting: the ingest backs off and hands the batch over again
            self.client.disconnect()
            self.forget_watermarks()
            raise
        self.rows_written += len(fresh)
        self.rows_skipped += len(rows) - len(fresh)

    def _rows(self, messages: Sequence[Message]) -> tuple[list, list]:
        to_row = self.spec.to_row
        rows, poison = [], []
        topic = self.kafka.topic(self.spec.topic.name)
        for message in messages:
            try:
                rows.append(to_row(message.value))
            except Exception as err:  # a record no LeadStream writer produced: keep it, don't crash-loop
                log.error("undecodable record in %s[%s]@%s: %s", topic, message.partition, message.offset, err)
                poison.append(["sink_decode_error", f"{self.spec.table}: {err}", message.value or b"", topic,
                               message.partition, message.offset, int(time.time() * 1000)])
        return rows, poison

    def _deduplicated(self, rows: list) -> list:
        if not self.spec.watermarked:
            return rows
        p_idx = self.spec.columns.index("raw_partition")
        o_idx = p_idx + 1
        marks = dict(self.watermarks)
        fresh = []
        for row in rows:
            partition, offset = row[p_idx], row[o_idx]
            if offset > marks.get(partition, -1):
                marks[partition] = offset
                fresh.append(row)
        self.watermarks = marks  # only once this batch's rows are chosen; a failed insert forgets them anyway
        return fresh

    def forget_watermarks(self) -> None:
        """Watermarked tables re-read theirs from ClickHouse before the next insert."""
        self.watermarks = None


async def run_sinks(kafka: KafkaConfig, ch: ClickHouseConfig, batch: BatchConfig, tables: Sequence[str],
                    stop: asyncio.Event) -> list[TableSink]:
    sinks = [TableSink(TABLES[name], kafka, ch, batch) for name in tables]
    await asyncio.gather(*(sink.run(stop) for sink in sinks))
    return sinks
