"""The worker's batch step: events.raw messages in, enriched events / dead letters / session upserts out.

Thin adapter around the pure cores (enrich, sessionize, identity). Order of effects per batch, which
is what makes at-least-once delivery safe:
  1. skip messages at or below the partition's applied-offset watermark (already fully handled);
  2. compute everything from the stored state (pure, deterministic);
  3. produce all outputs and wait for the broker's acks;
  4. commit the new visitor states, identity-graph changes and watermark in one Redis transaction
     whose Lua step is a compare-and-set on the watermark;
  5. return, so the ingest commits the messages' Kafka offsets.
A crash before 4 replays the batch from the same state and produces the same outputs again (the
ClickHouse sink drops them by raw offset; session upserts collapse by version). A crash after 4 skips
the batch in step 1: its outputs were already acknowledged in step 3.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Iterable, Sequence

import orjson
from aiokafka import AIOKafkaProducer

from leadstream.config import Settings
from processors import identity, sessionize
from processors.accounts import AccountsContext
from processors.identity import IdentityChanges, InMemoryIdentityStore
from processors.identity_store import IdentityGraphStore, version_now
from processors.enrich import Limits, enrich_batch
from processors.state import PartitionCommit, SessionStateStore
from schemas.dead_letter import DeadLetter, Rejection
from schemas.events import EnrichedEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawMessage:
    """What the pipeline needs of a Kafka message (Faust's events are adapted to this)."""

    partition: int
    offset: int
    value: bytes | None


@dataclass
class Outputs:
    """Records to produce, per (logical topic, partition), in the order they must keep."""

    records: dict[tuple[str, int], list[tuple[bytes | None, bytes]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes) -> None:
        self.records[(topic, partition)].append((key, value))

    def count(self, topic: str) -> int:
        return sum(len(v) for (t, _), v in self.records.items() if t == topic)


def session_policy(settings: Settings) -> sessionize.SessionPolicy:
    default = sessionize.SessionConfig(
        inactivity_ms=settings.session_inactivity_min * 60_000, grace_ms=settings.session_grace_min * 60_000
    )
    return sessionize.SessionPolicy(default=default)


class BatchProducer:
    """Produces many records with aiokafka's batch API: per-message send() is the hot path's cost."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Created here, inside the running event loop, as aiokafka requires. Idempotence keeps each
        partition's records in send order even across retries: the sinks' raw-offset watermark needs it."""
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap, enable_idempotence=True, linger_ms=5,
            max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024,
        )
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    def partition_for(self, key: bytes) -> int:
        """Partition of a lead-keyed record. crc32 (C speed) rather than Kafka's murmur2, which is pure
        Python in aiokafka and cost ~15 us per record; readers only need "same key, same partition"."""
        return zlib.crc32(key) % self.settings.partitions

    async def send(self, outputs: Outputs) -> None:
        futures = []
        for (topic, partition), records in outputs.records.items():
            full_topic = self.settings.topic(topic)
            batch = self.producer.create_batch()
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    futures.append(await self.producer.send_batch(batch, full_topic, partition=partition))
                    batch = self.producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            if batch.record_count():
                futures.append(await self.producer.send_batch(batch, full_topic, partition=partition))
        if futures:
            await asyncio.gather(*futures)


class Pipeline:
    """Runs batches through enrich -> sessionize -> identity; keeps the per-partition stream clock for the timer."""

    def __init__(self, settings: Settings, store: SessionStateStore, identity_store: IdentityGraphStore,
                 producer: BatchProducer):
        self.settings = settings
        self.store = store
        self.identity = identity_store
        self.accounts = AccountsContext()
        self.producer = producer
        self.policy = session_policy(settings)
        self.limits = Limits(max_payload_bytes=settings.max_payload_bytes)
        self.lock = asyncio.Lock()  # one batch or timer tick at a time per process
        self._clock_seen: dict[int, tuple[int, int]] = {}  # partition -> (stream time, wall time it was seen)

    async def process(self, messages: Sequence[RawMessage]) -> Outputs:
        async with self.lock:
            return await self._process(messages)

    async def _process(self, messages: Sequence[RawMessage]) -> Outputs:
        received_ms = int(time.time() * 1000)
        partitions = sorted({m.partition for m in messages})
        marks = await self.store.partition_marks(partitions)
        fresh = [m for m in messages if m.offset > marks[m.partition][0]]
        if len(fresh) < len(messages):
            log.info("skipped %d messages already applied (a replay after a crash or rebalance)",
                     len(messages) - len(fresh))
        results = enrich_batch([m.value for m in fresh], received_ms, self.limits)

        outputs = Outputs()
        accepted: list[tuple[RawMessage, EnrichedEvent]] = []
        rejected: dict[int, Rejection] = {}
        for i, (message, result) in enumerate(zip(fresh, results)):
            if isinstance(result, Rejection):
                rejected[i] = result
            else:
                result.raw_partition, result.raw_offset = message.partition, message.offset
                accepted.append((message, result))

        commits = await self._sessionize(accepted, partitions, marks, fresh, outputs, rejected, received_ms)
        accepted = [(m, e) for m, e in accepted if e.raw_offset >= 0]  # duplicates went to the DLQ
        await self.identity.acquire()
        try:
            changes = await self._resolve_identity(accepted, outputs)
            self._add_events_and_dead_letters(fresh, accepted, rejected, received_ms, outputs)
            await self.producer.send(outputs)
            results_ok = await self.store.commit(commits, also=lambda pipe: self.identity.write_commands(pipe, changes))
        finally:
            await self.identity.release()
        for commit, ok in zip(commits, results_ok):
            if not ok:
                log.warning("partition %s moved on under us (rebalance?): batch state not written", commit.partition)
        return outputs

    @staticmethod
    def _mapping_since(graph, site_id: str, visitor_id: str, link) -> int | None:
        """From when a visitor's events belong to its new lead, for the `visitor_leads` row (None: no new row).

        A new visitor, or one leaving an anonymous lead, takes its whole history along (0). A visitor
        moving from one known contact to another (a shared computer) changes owner from the identify on.
        """
        previous = graph.visitors.get((site_id, visitor_id))
        if previous is None:
            return 0
        if previous.lead_id == link.lead_id:
            return None
        previous_lead = graph.leads.get((site_id, previous.lead_id))
        return link.since_ts_ms if previous_lead is not None and previous_lead.email else 0

    def _add_events_and_dead_letters(self, fresh, accepted, rejected, received_ms: int, outputs: Outputs) -> None:
        """Enriched events and dead letters keep raw-offset order per partition: the sinks rely on it."""
        raw_topic = self.settings.topic("events.raw")
        for i, message in enumerate(fresh):
            rejection = rejected.get(i)
            if rejection is not None:
                letter = DeadLetter(
                    reason=rejection.reason, message=rejection.message, raw=message.value or b"",
                    topic=raw_topic, partition=message.partition, offset=message.offset, received_ms=received_ms,
                )
                outputs.add("events.dlq", message.partition, None, letter.to_json())
        for message, event in accepted:
            value = event.to_json()
            outputs.add("events.enriched", message.partition, event.visitor_id.encode(), value)
            if event.lead_id:  # humans only: bots and datacenter traffic never reach the lead stages
                key = event.lead_id.encode()
                outputs.add("leads.activity", self.producer.partition_for(key), key, value)

    async def _resolve_identity(self, accepted, outputs: Outputs) -> IdentityChanges:
        """Stamp lead ids, emit identity events, lead upserts and visitor->lead mapping rows."""
        events = [e for _, e in accepted]
        graph = await self.identity.prefetch(events, self.accounts)
        view = InMemoryIdentityStore(graph)
        result = identity.resolve(events, view, self.accounts)
        partition_of_visitor = {}
        for (message, event), lead_id in zip(accepted, result.lead_ids):
            event.lead_id = lead_id
            partition_of_visitor[event.site_id, event.visitor_id] = message.partition
        changes = view.changes()
        version = version_now()
        for ev in result.identity_events:
            p = partition_of_visitor.get((ev.site_id, ev.visitor_id), 0)
            outputs.add("identity", p, ev.visitor_id.encode(), ev.to_json())
        for (site_id, visitor_id), link in changes.visitors.items():
            since = self._mapping_since(graph, site_id, visitor_id, link)
            if since is None:
                continue
            row = {"site_id": site_id, "visitor_id": visitor_id, "lead_id": link.lead_id, "version": version,
                   "since_ts_ms": since}
            outputs.add("identity.visitors", partition_of_visitor.get((site_id, visitor_id), 0),
                        visitor_id.encode(), orjson.dumps(row))
        for lead in changes.leads.values():
            key = lead.lead_id.encode()
            row = {f.name: getattr(lead, f.name) for f in fields(lead)} | {"version": version}
            outputs.add("identity.leads", self.producer.partition_for(key), key, orjson.dumps(row))
        return changes

    async def _sessionize(self, accepted, partitions, marks, fresh, outputs: Outputs, rejected,
                          received_ms: int) -> list[PartitionCommit]:
        by_visitor: dict[str, list[EnrichedEvent]] = defaultdict(list)
        partition_of: dict[str, int] = {}
        for message, event in accepted:
            key = self.store.visitor_key(event.site_id, event.visitor_id)
            by_visitor[key].append(event)
            partition_of[key] = message.partition
        blobs = await self.store.load(list(by_visitor))

        states: dict[int, dict[str, bytes]] = defaultdict(dict)
        deadlines: dict[int, dict[str, int | None]] = defaultdict(dict)
        duplicate_ids: set[tuple[int, int]] = set()
        for key, events in by_visitor.items():
            blob = blobs.get(key)
            result = sessionize.apply(sessionize.load_state(blob) if blob else None, events, self.policy)
            for event, session_id, late, duplicate in zip(events, result.session_ids, result.late, result.duplicate):
                event.session_id, event.is_late = session_id, late
                if duplicate:
                    duplicate_ids.add((event.raw_partition, event.raw_offset))
            p = partition_of[key]
            states[p][key] = sessionize.dump_state(result.state)
            deadlines[p][key] = sessionize.next_deadline(result.state, self.policy)
            for session in result.upserts:
                outputs.add("sessions", p, session.visitor_id.encode(), session.to_json())

        if duplicate_ids:
            index_of = {(m.partition, m.offset): i for i, m in enumerate(fresh)}
            for message, event in accepted:
                coords = (event.raw_partition, event.raw_offset)
                if coords in duplicate_ids:
                    rejected[index_of[coords]] = Rejection("duplicate_event", f"event_id {event.event_id!r} was already received")
                    event.raw_offset = -1  # not emitted as an enriched event

        commits = []
        for p in partitions:
            offsets = [m.offset for m in fresh if m.partition == p]
            if not offsets:
                continue
            # capped at arrival time: one client with a fast clock must not close a partition's sessions
            stream_time = max((min(e.ts_ms, received_ms) for m, e in accepted if m.partition == p and not e.is_late),
                              default=0)
            commits.append(PartitionCommit(p, marks[p][0], max(offsets), stream_time, states[p], deadlines[p]))
        return commits

    async def close_idle(self, partitions: Iterable[int], wall_now_ms: int | None = None) -> int:
        """Timer tick: close sessions whose deadline passed on the partition's stream clock.

        The stream clock is the partition's event-time high-water mark, advanced by wall time when no
        events arrive — so replayed history closes sessions by event time and a quiet site still closes.
        """
        wall_now_ms = int(time.time() * 1000) if wall_now_ms is None else wall_now_ms
        async with self.lock:
            partitions = sorted(partitions)
            marks = await self.store.partition_marks(partitions)
            outputs, commits = Outputs(), []
            for p in partitions:
                applied, stream_time = marks[p]
                if applied < 0:
                    continue
                clock = max(stream_time, self._idle_clock(p, stream_time, wall_now_ms))
                due = await self.store.due(p, clock)
                if not due:
                    continue
                blobs = await self.store.load(due)
                states, deadlines = {}, {}
                for key, blob in blobs.items():
                    if not blob:
                        continue
                    state, upserts = sessionize.close_idle(sessionize.load_state(blob), clock, self.policy)
                    states[key] = sessionize.dump_state(state)
                    deadlines[key] = sessionize.next_deadline(state, self.policy)
                    for session in upserts:
                        outputs.add("sessions", p, session.visitor_id.encode(), session.to_json())
                commits.append(PartitionCommit(p, applied, applied, stream_time, states, deadlines))
            await self.producer.send(outputs)
            await self.store.commit(commits)
            return outputs.count("sessions")

    def _idle_clock(self, partition: int, stream_time: int, wall_now_ms: int) -> int:
        seen = self._clock_seen.setdefault(partition, (stream_time, wall_now_ms))
        if seen[0] != stream_time:
            self._clock_seen[partition] = seen = (stream_time, wall_now_ms)
        return stream_time + (wall_now_ms - seen[1])


def adapt(events: Iterable) -> list[RawMessage]:
    """Faust events -> RawMessage (keeps Faust out of the pipeline's tests)."""
    return [RawMessage(e.message.partition, e.message.offset, e.message.value) for e in events]
