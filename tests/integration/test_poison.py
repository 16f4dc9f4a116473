"""Poison never blocks, on the real stack: after each kind of poison record, the normal events behind it
all arrive in ClickHouse, and the poison is in `dlq` with its reason.

The kinds: a 900 KB event on events.raw (its dead letter used to be over the broker's record limit), an
accepted event whose enriched record is over the record limit (lowered for this worker so that an event
within the payload limit reaches it), a record of the wrong type on events.enriched (ClickHouse refuses
its row), and a record no LeadStream writer produced on leads.activity (the lead processor's input).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import replace

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from leadstream.runner import Role, count, produce, wait_drained, wait_for
from processors.runtime.ingest import Message
from schemas.dead_letter import RAW_PREFIX_BYTES
from schemas.settings import BatchConfig
from schemas.topics import EVENTS_ENRICHED, LEADS_ACTIVITY
from sinks import clickhouse
from sinks.table_sink import TABLES, TableSink
from tests.integration.test_ingest import BASE_MS, valid_events
from tests.test_lead_processor import event as enriched_event

pytestmark = pytest.mark.integration

RECORD_LIMIT = 12_000  # the worker's LEADSTREAM_MAX_RECORD_BYTES in this test


def _event(event_id: str, **fields) -> bytes:
    return orjson.dumps({"event_id": event_id, "site_id": "it", "type": "pageview", "visitor_id": "v-poison",
                         "ts": BASE_MS, **fields})


async def _produce_to(settings, topic: str, partition: int, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic(topic), value, partition=partition)
    finally:
        await producer.stop()


def test_each_kind_of_poison_is_a_dead_letter_and_the_events_behind_it_all_arrive(settings, roles):
    roles += [Role(replace(settings, max_record_bytes=RECORD_LIMIT), "worker", "worker").start(),
              Role(settings, "sink", "sink", "--tables", "events,dlq").start()]
    normal = valid_events(600)
    huge = _event("huge", properties={"blob": "x" * 900_000})
    wide = _event("wide", url="https://acme.com/" + "p" * 8000)  # valid, but its enriched record is ~16 KB
    wrong_type = orjson.loads(enriched_event(0)[0]) | {"event_id": "forged", "ts_ms": "soon", "raw_offset": 2**40}

    asyncio.run(produce(settings, normal[:200] + [(b"v-poison", huge), (b"v-poison", wide)]))
    asyncio.run(_produce_to(settings, EVENTS_ENRICHED.name, 0, orjson.dumps(wrong_type)))
    asyncio.run(_produce_to(settings, LEADS_ACTIVITY.name, 1, b"\x00 not a record"))
    asyncio.run(produce(settings, normal[200:]))

    # a sink isolates a poison batch after about 15 s of retries
    wait_for(settings, "SELECT count() FROM events", len(normal), 240, roles)
    wait_for(settings, "SELECT count() FROM dlq", 4, 120, roles)
    wait_drained(settings, 120, roles, sink_tables=("events", "dlq"))
    time.sleep(2)  # a duplicate would arrive now
    assert count(settings, "SELECT count() FROM events") == len(normal)
    assert count(settings, "SELECT uniqExact(event_id) FROM events") == len(normal)
    assert count(settings, "SELECT count() FROM events WHERE raw_topic = %(t)s", {"t": settings.topic("events.raw")}) \
        == len(normal)

    ch = clickhouse.connect(settings.clickhouse())
    letters = {(reason, topic): (message, raw, raw_size, sha, truncated, offset) for reason, topic, message, raw,
               raw_size, sha, truncated, offset in ch.execute(
                   "SELECT reason, topic, message, raw, raw_size, raw_sha256, raw_truncated, raw_offset FROM dlq")}
    raw_topic = settings.topic("events.raw")
    message, raw, raw_size, sha, truncated, _ = letters[("oversized", raw_topic)]
    assert (len(raw), raw_size, sha, truncated) == (RAW_PREFIX_BYTES, len(huge), hashlib.sha256(huge).hexdigest(), 1)
    assert raw.encode() == huge[:RAW_PREFIX_BYTES]

    message, _, raw_size, _, truncated, offset = letters[("output_too_large", settings.topic("events.enriched"))]
    assert offset == -1 and raw_size > RECORD_LIMIT and truncated and f"{RECORD_LIMIT:,}-byte" in message

    message, raw, *_ = letters[("sink_insert_error", settings.topic("events.enriched"))]
    assert orjson.loads(raw)["event_id"] == "forged" and "TypeMismatchError" in message and "Column ts_ms" in message

    message, raw, *_ = letters[("undecodable_record", settings.topic("leads.activity"))]
    assert raw == "\x00 not a record" and message.startswith("lead: undecodable record at partition 1 offset 0: ")


async def test_the_sink_inserts_the_rows_clickhouse_takes_and_stores_each_refused_one_in_dlq(settings):
    """The sink's isolation by halves on the real ClickHouse: two refused rows among ten, the rest in order."""
    sink = TableSink(TABLES["events"], settings.kafka(), settings.clickhouse(), BatchConfig())
    values = [orjson.loads(enriched_event(i)[0]) for i in range(10)]
    values[3]["is_late"] = "maybe"
    values[8]["ts_ms"] = "soon"
    batch = [Message(0, 100 + i, None, orjson.dumps(v)) for i, v in enumerate(values)]
    with pytest.raises(Exception) as failed:
        await sink.insert(batch)

    await sink.isolate(batch, failed.value)

    ch = clickhouse.connect(settings.clickhouse())
    assert ch.execute("SELECT raw_offset, raw_topic FROM events ORDER BY raw_offset") == [
        (i, settings.topic("events.raw")) for i in (0, 1, 2, 4, 5, 6, 7, 9)]
    assert ch.execute("SELECT reason, topic, raw_partition, raw_offset FROM dlq ORDER BY raw_offset") == [
        ("sink_insert_error", settings.topic("events.enriched"), 0, 103),
        ("sink_insert_error", settings.topic("events.enriched"), 0, 108)]
    assert (sink.rows_written, sink.rows_refused) == (8, 2)
    assert "Column is_late" in ch.execute("SELECT message FROM dlq WHERE raw_offset = 103")[0][0]
    await sink.insert(batch)  # a redelivery: every row is at or below the watermark now, skipped and counted
    assert count(settings, "SELECT count() FROM events") == 8 and count(settings, "SELECT count() FROM dlq") == 2
    assert sink.rows_skipped == 10
