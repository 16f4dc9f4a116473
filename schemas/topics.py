"""The topic catalog: every Kafka topic LeadStream uses, declared once — name, record, key, partitioner.

Nothing else spells a topic name: producers, sinks, admin and tests take a `Topic` from here.

Partitioners:
- `input`: a record goes to the same partition number as the events.raw message it came from. The
  ClickHouse sinks deduplicate by (raw partition, raw offset), which needs each raw partition's records
  in one output partition, in order.
- `key`: `partition_for_key` (crc32 of the key bytes). Every producer of lead-keyed or card-keyed records
  uses it, so one lead's (or card's) records are in one partition, in order. crc32 rather than Kafka's
  murmur2: aiokafka's murmur2 is pure Python (~15 us a record); readers only need "same key, same
  partition", which any producer can reproduce with `zlib.crc32(key) % partitions`.
- `client`: chosen by the sending site's producer (events.raw is keyed by visitor_id; Kafka's default
  partitioner is fine).
All topics have the same partition count (the `input` partitioner needs it).

Shared topics (`leads.activity`, `board.commands`) carry records of several types: each record says which
in its `record-type` header (`Topic.types`), so a reader dispatches on the header, never on the JSON.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Literal

from schemas.boards import BoardCommand, CardUpdate, StageChange
from schemas.companies import Company
from schemas.dead_letter import DeadLetter
from schemas.events import EnrichedEvent, ForwardedEvent
from schemas.identity import IdentityEvent, LeadRow, VisitorLeadRow
from schemas.rules import (LeadChange, LeadHandover, LeadSnapshot, MergeNotice, RuleExecution, TagByHand,
                           WebhookDelivery)
from schemas.segments import AccountLeadFacts, DefinitionsMark, SegmentBackfill, SegmentChange
from schemas.session import Session

Partitioner = Literal["input", "key", "client"]


RECORD_TYPE_HEADER = "record-type"

Headers = list[tuple[str, bytes]]
NO_HEADERS: Headers = []
"""Shared by every record without headers, as the headers of each record type are shared by its records:
producing allocates nothing per record for them. Never change one in place."""


@dataclass(frozen=True)
class Topic:
    """`record`: the record class, or on a shared topic the classes it carries, each named by the value of
    its `record-type` header in `types` (same order)."""

    name: str
    record: type | tuple[type, ...]
    key: str
    partitioner: Partitioner
    types: tuple[str, ...] = ()
    _headers: dict[type, Headers] = field(init=False, repr=False, compare=False)
    _classes: dict[bytes, type] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        records = self.record if isinstance(self.record, tuple) else (self.record,)
        if self.types and len(self.types) != len(records):
            raise ValueError(f"{self.name}: one record-type name per record class")
        object.__setattr__(self, "_headers", {cls: [(RECORD_TYPE_HEADER, name.encode())]
                                              for cls, name in zip(records, self.types)})
        object.__setattr__(self, "_classes", {name.encode(): cls for cls, name in zip(records, self.types)})

    def headers(self, record_type: type | None) -> Headers:
        """The headers of a record of `record_type` on this topic: its record type on a shared topic, none
        on any other."""
        if not self.types:
            return NO_HEADERS
        try:
            return self._headers[record_type]
        except KeyError:
            raise ValueError(f"{self.name} carries {', '.join(self.types)} records, not {record_type}") from None

    def decode(self, value: bytes | None, headers: Headers = NO_HEADERS):
        """A record of this topic: on a shared topic, of the type its `record-type` header names."""
        if not self.types:
            return self.record.from_json(value)  # type: ignore[union-attr]
        for name, type_name in headers:
            if name == RECORD_TYPE_HEADER:
                cls = self._classes.get(type_name)
                if cls is None:
                    raise ValueError(f"{self.name}: unknown record type {type_name!r}")
                return cls.from_json(value)
        return _decode_untyped(self, value)


def sink_group(table: str) -> str:
    """The consumer group of a ClickHouse table's sink (sinks/table_sink.py): its committed offsets say how
    much of the table's topic the table holds."""
    return f"leadstream-sink-{table}"


def partition_for_key(key: bytes, partitions: int) -> int:
    """The one partitioner for lead- and card-keyed topics (see module docstring)."""
    return zlib.crc32(key) % partitions


EVENTS_RAW = Topic("events.raw", bytes, "visitor_id", "client")  # v1 JSON contract, validated by enrichment
EVENTS_DLQ = Topic("events.dlq", DeadLetter, "none", "input")
EVENTS_ENRICHED = Topic("events.enriched", EnrichedEvent, "visitor_id", "input")
SESSIONS = Topic("sessions", Session, "visitor_id", "input")
IDENTITY = Topic("identity", IdentityEvent, "visitor_id", "key")
IDENTITY_LEADS = Topic("identity.leads", LeadRow, "lead_id", "key")
IDENTITY_VISITORS = Topic("identity.visitors", VisitorLeadRow, "visitor_id", "key")
LEADS_ACTIVITY = Topic("leads.activity", (EnrichedEvent, IdentityEvent, LeadHandover, SegmentBackfill, DefinitionsMark,
                                          TagByHand, MergeNotice, ForwardedEvent),
                       "lead_id", "key", types=("event", "identity", "handover", "backfill", "definitions", "tag",
                                                "merge-notice", "forwarded-event"))
LEADS_CHANGES = Topic("leads.changes", LeadChange, "lead_id", "key")
LEADS_STATE = Topic("leads.state", LeadSnapshot, "lead_id", "key")
RULE_EXECUTIONS = Topic("rules.executions", RuleExecution, "lead_id", "key")
BOARD_COMMANDS = Topic("board.commands", (BoardCommand, CardUpdate), "card_id", "key",
                       types=("command", "card-update"))
BOARD_STAGE_CHANGES = Topic("board.stage-changes", StageChange, "card_id", "key")
COMPANIES = Topic("companies", Company, "domain", "key")  # company cards, for ClickHouse (Redis has the live copy)
WEBHOOK_DELIVERIES = Topic("webhooks.deliveries", WebhookDelivery, "webhook_id", "key")
SEGMENTS_CHANGES = Topic("segments.changes", SegmentChange, "member_id", "key")  # a lead id or an account domain
SEGMENTS_ACCOUNT_LEADS = Topic("segments.account-leads", AccountLeadFacts, "account_domain", "key")

CATALOG: tuple[Topic, ...] = (
    EVENTS_RAW, EVENTS_DLQ, EVENTS_ENRICHED, SESSIONS, IDENTITY, IDENTITY_LEADS, IDENTITY_VISITORS,
    LEADS_ACTIVITY, LEADS_CHANGES, LEADS_STATE, RULE_EXECUTIONS, BOARD_COMMANDS, BOARD_STAGE_CHANGES, COMPANIES,
    WEBHOOK_DELIVERIES, SEGMENTS_CHANGES, SEGMENTS_ACCOUNT_LEADS,
)


def _decode_untyped(topic: Topic, value: bytes):
    """Upgrade path: a record written before records carried their `record-type` header (a topic replayed
    from before that release) is told apart by the field its writer put first, as readers did then."""
    if topic is LEADS_ACTIVITY:
        if value.startswith(b'{"identity_event_id"'):
            return IdentityEvent.from_json(value)
        if value.startswith(b'{"handover_id"'):
            return LeadHandover.from_json(value)
        return EnrichedEvent.from_json(value)
    if topic is BOARD_COMMANDS:
        if value.startswith(b'{"update_id"'):
            return CardUpdate.from_json(value)
        return BoardCommand.from_json(value)
    raise ValueError(f"{topic.name}: a record without a record-type header")
