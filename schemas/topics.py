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
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

from schemas.boards import BoardCommand, CardUpdate, StageChange
from schemas.companies import Company
from schemas.dead_letter import DeadLetter
from schemas.events import EnrichedEvent
from schemas.identity import IdentityEvent, LeadRow, VisitorLeadRow
from schemas.rules import LeadChange, LeadHandover, LeadSnapshot, RuleExecution, WebhookDelivery
from schemas.session import Session

Partitioner = Literal["input", "key", "client"]


@dataclass(frozen=True)
class Topic:
    name: str
    record: type | tuple[type, ...]
    key: str
    partitioner: Partitioner


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
LEADS_ACTIVITY = Topic("leads.activity", (EnrichedEvent, IdentityEvent, LeadHandover), "lead_id", "key")
LEADS_CHANGES = Topic("leads.changes", LeadChange, "lead_id", "key")
LEADS_STATE = Topic("leads.state", LeadSnapshot, "lead_id", "key")
RULE_EXECUTIONS = Topic("rules.executions", RuleExecution, "lead_id", "key")
BOARD_COMMANDS = Topic("board.commands", (BoardCommand, CardUpdate), "card_id", "key")
BOARD_STAGE_CHANGES = Topic("board.stage-changes", StageChange, "card_id", "key")
COMPANIES = Topic("companies", Company, "domain", "key")  # company cards, for ClickHouse (Redis has the live copy)
WEBHOOK_DELIVERIES = Topic("webhooks.deliveries", WebhookDelivery, "webhook_id", "key")

CATALOG: tuple[Topic, ...] = (
    EVENTS_RAW, EVENTS_DLQ, EVENTS_ENRICHED, SESSIONS, IDENTITY, IDENTITY_LEADS, IDENTITY_VISITORS,
    LEADS_ACTIVITY, LEADS_CHANGES, LEADS_STATE, RULE_EXECUTIONS, BOARD_COMMANDS, BOARD_STAGE_CHANGES, COMPANIES,
    WEBHOOK_DELIVERIES,
)


def decode_lead_activity(value: bytes) -> EnrichedEvent | IdentityEvent | LeadHandover:
    """A leads.activity record is a lead's event, one of its identity changes (a merge, a visitor
    re-pointed, an account linked) or a merged lead's handover. Each record's JSON starts with its first
    field, which tells them apart without a second parse."""
    if value.startswith(b'{"identity_event_id"'):
        return IdentityEvent.from_json(value)
    if value.startswith(b'{"handover_id"'):
        return LeadHandover.from_json(value)
    return EnrichedEvent.from_json(value)


def decode_board_input(value: bytes) -> BoardCommand | CardUpdate:
    """A board.commands record is a person's command (from the API) or the lead processor's card update."""
    if value.startswith(b'{"update_id"'):
        return CardUpdate.from_json(value)
    return BoardCommand.from_json(value)
