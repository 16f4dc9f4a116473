"""Poison never blocks, without servers: dead letters are bounded, an output over the record limit becomes a
dead letter, the retry loop tells an outage from poison, and the processor runner sets poison aside by halves
while everything around it goes through in order, exactly once. The sinks' side runs on the real
ClickHouse in tests/integration/test_poison.py."""

from __future__ import annotations

import hashlib
import logging
import socket

import orjson
import pytest
import redis.exceptions
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, RequestTimedOutError
from clickhouse_driver.errors import NetworkError, ServerException
from hypothesis import given
from hypothesis import strategies as st

from processors.runtime.backoff import POISON_AFTER, describe, is_transient, retry_until_done
from processors.runtime.ingest import Message
from processors.runtime.producer import Outputs
from processors.runtime.runner import ProcessorRunner, StaleBatch
from schemas.dead_letter import MESSAGE_CHARS, RAW_PREFIX_BYTES, DeadLetter
from schemas.privacy import minimise_payload
from schemas.topics import EVENTS_DLQ, EVENTS_ENRICHED, IDENTITY_LEADS, LEADS_ACTIVITY, SESSIONS
from tests.test_lead_processor import event as lead_event
from tests.test_lead_processor import processor_runner as lead_processor_runner
from tests.test_raw_processor import event, messages, runner
from tests.twins import applied, sent, values

# ------------------------------------------------------------------------------------ bounded dead letters


@given(size=st.integers(0, 3 * RAW_PREFIX_BYTES), fill=st.binary(min_size=1, max_size=64))
def test_a_dead_letter_keeps_a_capped_prefix_with_the_size_and_hash_of_the_whole(size, fill):
    raw = (fill * (size // len(fill) + 1))[:size]
    letter = DeadLetter("oversized", "too big", raw, "events.raw", 3, 17, 1)
    assert letter.raw == minimise_payload(raw[:RAW_PREFIX_BYTES])
    assert letter.raw_size == size and letter.raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert letter.raw_truncated == (size > RAW_PREFIX_BYTES)
    encoded = letter.to_json()
    assert len(encoded) < 100_000  # base64 of the prefix plus a few fields: far below any record limit
    assert orjson.loads(encoded)["raw_truncated"] == letter.raw_truncated
    assert DeadLetter.from_json(encoded) == letter


def test_a_dead_letters_message_is_capped_too():
    letter = DeadLetter("stage_error", "x" * 100_000, b"", "t", 0, 0, 1)
    assert len(letter.message) == MESSAGE_CHARS


def test_a_letter_written_before_sizes_were_recorded_still_decodes():
    old = orjson.dumps({"reason": "bad_json", "message": "m", "raw": "e25vdA==", "topic": "events.raw",
                        "partition": 1, "offset": 2, "received_ms": 3})
    letter = DeadLetter.from_json(old)
    assert letter.raw == b"{not" and letter.raw_size == 4 and not letter.raw_truncated
    assert letter.raw_sha256 == hashlib.sha256(b"{not").hexdigest()


# ---------------------------------------------------------------------------------------- record limit


@given(st.lists(st.tuples(st.sampled_from([EVENTS_ENRICHED, SESSIONS, IDENTITY_LEADS]), st.integers(0, 3),
                          st.integers(0, 3000)), max_size=30))
def test_every_output_over_the_limit_becomes_a_dead_letter_on_its_partition(records):
    limit = 1000
    outputs = Outputs(4)
    for i, (topic, partition, size) in enumerate(records):
        outputs.add(topic, f"k{i}".encode(), f"{i:08d}".encode().ljust(size, b"."), partition)
    before = {key: list(kept) for key, kept in outputs.records.items()}

    letters = outputs.set_aside_oversized(limit, EVENTS_DLQ, lambda name: f"pre.{name}")

    for (topic, partition), kept in before.items():
        small = [(k, v, h) for k, v, h in kept if len(k) + len(v) <= limit]
        assert outputs.records[(topic, partition)] == small  # order kept
        big = [(k, v) for k, v, _ in kept if len(k) + len(v) > limit]
        dlq = [DeadLetter.from_json(v) for _, v, _ in outputs.records.get((EVENTS_DLQ.name, partition), [])]
        mine = [d for d in dlq if d.topic == f"pre.{topic}"]
        assert [d.raw_size for d in mine] == [len(v) for _, v in big]
        assert all(d.reason == "output_too_large" and d.offset == -1 and d.partition == partition for d in mine)
    assert len(letters) == sum(len(k) + len(v) > limit for kept in before.values() for k, v, _ in kept)
    assert all(len(v) <= 100_000 for (name, _), kept in outputs.records.items() if name == EVENTS_DLQ.name
               for _, v, _ in kept)


def test_an_oversized_lead_row_names_its_topic_and_key():
    outputs = Outputs(4)
    outputs.add(IDENTITY_LEADS, b"lead_forged", orjson.dumps({"visitors": [f"v{i:0>130}" for i in range(8000)]}))
    [letter] = outputs.set_aside_oversized(1_000_000, EVENTS_DLQ, lambda name: f"pre.{name}")
    assert "pre.identity.leads" in letter.message and "lead_forged" in letter.message
    assert letter.raw_size > 1_000_000 and len(letter.raw) == RAW_PREFIX_BYTES and values(outputs, IDENTITY_LEADS) == []


# ------------------------------------------------------------------------------- outage versus poison


@pytest.mark.parametrize("error", [ConnectionRefusedError(111, "refused"), socket.timeout("timed out"),
                                   TimeoutError(), KafkaConnectionError("down"), RequestTimedOutError(),
                                   redis.exceptions.ConnectionError("down"), NetworkError("down"),
                                   ServerException("Table default.x doesn't exist", 60), StaleBatch("moved")])
def test_outages_and_lost_races_are_transient(error):
    assert is_transient(error)


@pytest.mark.parametrize("error", [ValueError("bad"), KeyError("site_id"), TypeError("not an int"),
                                   MessageSizeTooLargeError()])
def test_anything_else_is_taken_for_poison_when_it_repeats(error):
    assert not is_transient(error)


def test_a_failure_is_described_with_its_text():
    assert describe(KeyError("site_id")) == "KeyError: 'site_id'"
    assert describe(MessageSizeTooLargeError()).startswith("aiokafka.errors.MessageSizeTooLargeError: [Error 10]")
    assert "no message" in describe(ValueError())


class _Script:
    """An attempt that raises the given errors in turn, then succeeds."""

    def __init__(self, errors):
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


async def test_poison_is_isolated_after_repeated_failures_in_a_row():
    attempt, isolated = _Script([ValueError("bad")] * 50), []

    async def isolate(err):
        isolated.append(err)

    assert await retry_until_done(attempt, "batch", logging.getLogger("t"), first_delay_s=0, isolate=isolate)
    assert attempt.calls == POISON_AFTER and isolated and str(isolated[0]) == "bad"


async def test_an_outage_is_retried_until_it_passes_and_never_isolated():
    almost_poison = [ValueError("bad")] * (POISON_AFTER - 1)
    errors = almost_poison + [ConnectionError("down")] + almost_poison
    attempt = _Script(errors + [ConnectionError("down")] * 20)

    async def isolate(err):
        raise AssertionError("an outage must not make a batch poison")

    assert await retry_until_done(attempt, "batch", logging.getLogger("t"), first_delay_s=0, isolate=isolate)
    assert attempt.calls == len(errors) + 21


# --------------------------------------------------------------------------- the processor runner's isolation


class _ChokesOn:
    """A processor that fails, every time, on any batch holding one of the `poison` values."""

    def __init__(self, processor, poison: set[bytes]):
        self.processor, self.poison, self.name, self.timers = processor, poison, processor.name, None

    async def step(self, batch, messages):
        for m in messages:
            if m.value in self.poison:
                raise ValueError(f"cannot handle offset {m.offset}")
        await self.processor.step(batch, messages)


async def test_the_runner_parks_each_poison_message_and_the_rest_goes_through_in_order():
    plain, store, producer = runner()
    poison = {b"POISON-A", b"POISON-B"}
    run = ProcessorRunner(_ChokesOn(plain.processor, poison), store, producer, 4, EVENTS_DLQ, "pre.events.raw")
    batch = messages([event(0), event(1), b"POISON-A", event(3), event(4), event(5), b"POISON-B", event(7)])
    with pytest.raises(ValueError) as failed:
        await run.process(batch)

    await run.isolate(batch, failed.value)

    events = [orjson.loads(v) for v in sent(producer, EVENTS_ENRICHED)]
    assert [e["raw_offset"] for e in events] == [0, 1, 3, 4, 5, 7]
    assert [e["event_id"] for e in events] == ["e0", "e1", "e3", "e4", "e5", "e7"]
    letters = [DeadLetter.from_json(v) for v in sent(producer, EVENTS_DLQ)]
    assert [(d.reason, d.offset, d.raw, d.topic) for d in letters] == [
        ("stage_error", 2, b"POISON-A", "pre.events.raw"), ("stage_error", 6, b"POISON-B", "pre.events.raw")]
    assert letters[0].message == "raw-events: ValueError: cannot handle offset 2"
    assert await applied(store, 0) == 7
    sent_before = len(producer.sent)
    await run.isolate(batch, failed.value)  # a replay of the whole batch: everything is applied already
    assert await run.process(batch) is None and len(producer.sent) == sent_before


async def test_an_outage_during_isolation_stops_it_and_a_retry_goes_on_from_there():
    plain, store, producer = runner()
    run = ProcessorRunner(_ChokesOn(plain.processor, {b"POISON"}), store, producer, 4, EVENTS_DLQ, "events.raw")
    batch = messages([event(0), event(1), b"POISON", event(3)])
    producer.fail_next = 1  # the broker is down when the first half is sent
    with pytest.raises(ConnectionError):
        await run.isolate(batch, ValueError("cannot handle"))
    assert await applied(store, 0) == -1
    await run.isolate(batch, ValueError("cannot handle"))
    assert [orjson.loads(v)["raw_offset"] for v in sent(producer, EVENTS_ENRICHED)] == [0, 1, 3]
    assert [DeadLetter.from_json(v).offset for v in sent(producer, EVENTS_DLQ)] == [2]


async def test_an_undecodable_record_on_an_internal_topic_is_a_dead_letter_at_once():
    run, store, producer = lead_processor_runner()
    run.input_topic = "pre.leads.activity"
    batch = [Message(1, 0, b"lead_a", *lead_event(0)), Message(1, 1, b"lead_a", b"\x00garbage"),
             Message(1, 2, b"lead_a", *lead_event(2))]

    assert await run.process(batch) is None  # went through in parts

    [letter] = [DeadLetter.from_json(v) for v in sent(producer, EVENTS_DLQ)]
    assert (letter.reason, letter.topic, letter.partition, letter.offset, letter.raw) == (
        "undecodable_record", "pre.leads.activity", 1, 1, b"\x00garbage")
    assert "offset 1" in letter.message and "JSONDecodeError" in letter.message
    assert await applied(store, 1) == 2
    assert len(sent(producer, LEADS_ACTIVITY)) == 0  # the lead processor reads leads.activity, never writes it


async def test_an_oversized_output_of_a_processor_is_a_dead_letter_and_its_batch_commits():
    run, store, producer = runner()
    producer.max_record_bytes = 5000
    batch = messages([event(0), event(1, url="https://acme.com/" + "p" * 6000), event(2)])
    outputs = await run.process(batch)
    assert [orjson.loads(v)["event_id"] for v in values(outputs, EVENTS_ENRICHED)] == ["e0", "e2"]
    letters = [DeadLetter.from_json(v) for v in values(outputs, EVENTS_DLQ)]
    assert {d.topic for d in letters} >= {"events.enriched"} and {d.reason for d in letters} == {"output_too_large"}
    assert await applied(store, 0) == 2

