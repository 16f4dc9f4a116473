"""Over 100,000 hostile messages through Kafka, the raw processor and the events and dlq sinks, on the real
stack: every raw offset ends up exactly once as an event row or as a dead letter with a known reason,
the outcome the contract fixes where it fixes one, the worker survives, and ordinary events sent after the
flood still arrive."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from functools import partial

import pytest
from confluent_kafka import Producer

from leadstream.runner import Role, count, wait_for
from schemas.dead_letter import REASONS, RUNTIME_REASONS
from schemas.topics import EVENTS_RAW
from sinks.clickhouse import connect
from tests.hostile import STORED, Hostile, hostile_stream
from tests.integration.test_ingest import valid_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CASES = 100_000
AFTER_SITE = "after-hostile"
AFTER_EVENTS = 500


def produce_placed(settings, messages: list[Hostile]) -> dict[tuple[int, int], Hostile]:
    """Produce to events.raw and learn where each message landed: (partition, offset) -> message.
    Java-compatible partitioning (murmur2), as every other LeadStream producer uses."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 20, "acks": "all",
                         "message.max.bytes": 1_048_576, "partitioner": "murmur2_random",
                         "queue.buffering.max.kbytes": 512 * 1024, "enable.idempotence": True})
    placed: dict[tuple[int, int], Hostile] = {}
    errors: list[str] = []

    def delivered(message: Hostile, err, record) -> None:
        if err is not None:
            errors.append(f"{message.family}: {err}")
        else:
            placed[record.partition(), record.offset()] = message

    topic = settings.topic(EVENTS_RAW.name)
    for message in messages:
        while True:
            try:
                producer.produce(topic, value=message.value, key=message.key, on_delivery=partial(delivered, message))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(120) == 0, "messages still in flight after 120 s"
    assert not errors, errors[:10]
    return placed


def outcomes(settings) -> tuple[list[tuple[int, int]], list[tuple[int, int, str, int, str]]]:
    ch = connect(settings.clickhouse())
    stored = ch.execute("SELECT raw_partition, raw_offset FROM events")
    letters = ch.execute("SELECT raw_partition, raw_offset, reason, raw_size, raw_sha256 FROM dlq"
                         " WHERE topic = %(topic)s", {"topic": settings.topic(EVENTS_RAW.name)})
    return stored, letters


def acceptable(message: Hostile, got: str) -> bool:
    """The contract's outcome where it fixes one; a stored event may also be a duplicate of an earlier one
    (the duplicate family, or an id pushed to its length limit in several cases of one visitor)."""
    if message.expect is None:
        return True
    return got == message.expect or (message.expect == STORED and got == "duplicate_event")


def test_every_hostile_message_is_an_event_or_a_dead_letter_and_the_pipeline_keeps_going(settings, roles):
    messages = list(hostile_stream(seed=2026, cases=CASES, now_ms=int(time.time() * 1000),
                                   max_payload=settings.max_payload_bytes))
    assert len(messages) >= 100_000
    worker = Role(settings, "worker", "worker", "--processors", "raw").start()
    sink = Role(settings, "sink", "sink", "--tables", "events,dlq").start()
    roles += [worker, sink]

    started = time.monotonic()
    placed = produce_placed(settings, messages)
    after = produce_placed(settings, [Hostile(key, value, "after", STORED) for key, value in valid_events(
        AFTER_EVENTS, site=AFTER_SITE)])
    print(f"produced {len(placed):,} hostile + {len(after)} ordinary messages in {time.monotonic() - started:.0f} s")
    try:
        wait_for(settings, "SELECT (SELECT count() FROM events) + (SELECT count() FROM dlq WHERE topic = %(topic)s)",
                 len(placed) + len(after), 150, roles, {"topic": settings.topic(EVENTS_RAW.name)},
                 label="events + dead letters", progress=True)
    except TimeoutError as stalled:  # say which messages never came out, by family, before failing
        stored, letters = outcomes(settings)
        done = set(stored) | {(p, o) for p, o, *_ in letters}
        missing = Counter(m.family for coords, m in placed.items() if coords not in done)
        pytest.fail(f"{stalled}; missing by family: {dict(missing.most_common(20))}\n{worker.log_tail(30)}")
    print(f"accounted for in {time.monotonic() - started:.0f} s")
    time.sleep(2)  # anything doubled would land now

    stored, letters = outcomes(settings)
    every_offset = {**placed, **after}
    assert len(stored) == len(set(stored)), "an event row was stored twice"
    assert len(letters) == len({(p, o) for p, o, *_ in letters}), "a message was dead-lettered twice"
    got = {coords: STORED for coords in stored}
    for p, o, reason, raw_size, raw_sha256 in letters:
        assert (p, o) not in got, f"raw offset {p}:{o} is both an event and a dead letter"
        got[p, o] = reason
        original = every_offset[p, o].value or b""  # the letter identifies the bytes it refused
        assert (raw_size, raw_sha256) == (len(original), hashlib.sha256(original).hexdigest()), every_offset[p, o]
    assert got.keys() == every_offset.keys()

    assert set(got.values()) <= {STORED, *REASONS, *RUNTIME_REASONS}, Counter(got.values())
    assert "internal_error" not in got.values(), "enrichment raised on some input"
    wrong = Counter((m.family, m.expect, got[coords]) for coords, m in every_offset.items()
                    if not acceptable(m, got[coords]))
    assert not wrong, dict(wrong.most_common(20))
    assert count(settings, "SELECT count() FROM events WHERE site_id = %(site)s", {"site": AFTER_SITE}) == AFTER_EVENTS
    assert worker.alive() and sink.alive()
    print(f"outcomes: {dict(Counter(got.values()).most_common())}")
