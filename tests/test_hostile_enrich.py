"""The enrich core against the hostile generator the fault suite sends through Kafka: every message is an
enriched event or a dead letter with a known reason, never an exception, and where the contract fixes the
outcome (a limit, an encoding, a time window) it is that outcome. Hypothesis drives the generator's random
choices, so a failure shrinks to a small case."""

from __future__ import annotations

import hashlib
from collections import Counter
from random import Random

from hypothesis import given, settings
from hypothesis import strategies as st

from processors.enrich import DEFAULT_LIMITS, enrich_batch, validate_and_enrich
from schemas.dead_letter import RAW_PREFIX_BYTES, REASONS, DeadLetter, Rejection
from schemas.events import TEXT_CONTROLS, EnrichedEvent
from schemas.privacy import minimise_payload
from tests.hostile import FAMILIES, STORED, hostile_messages, hostile_stream

NOW = 1_795_000_000_000  # 2026-11-18
MAX_PAYLOAD = DEFAULT_LIMITS.max_payload_bytes
TEXT_COLUMNS = ("url", "referrer", "title", "ip", "user_agent", "email", "name", "campaign", "properties")


def outcome(result: EnrichedEvent | Rejection) -> str:
    return STORED if isinstance(result, EnrichedEvent) else result.reason


@settings(max_examples=1500)
@given(st.randoms(use_true_random=False))
def test_a_hostile_message_is_an_event_or_a_dead_letter_with_its_reason(rng: Random) -> None:
    for message in hostile_messages(rng, NOW, MAX_PAYLOAD):
        result = validate_and_enrich(message.value, NOW)
        assert outcome(result) in (STORED, *REASONS)
        assert outcome(result) != "internal_error", (message.family, result)
        if message.expect is not None:
            assert outcome(result) == message.expect, (message.family, message.value[:300] if message.value else None)
        if isinstance(result, EnrichedEvent):  # what the raw processor publishes must serialise and read back
            assert EnrichedEvent.from_json(result.to_json()) == result
            assert not any(TEXT_CONTROLS.search(getattr(result, column)) for column in TEXT_COLUMNS)
        else:  # the dead letter identifies the original bytes however large: a prefix, the size, the hash
            original = message.value or b""
            letter = DeadLetter.from_json(
                DeadLetter(result.reason, result.message, original, "events.raw", 0, 0, NOW).to_json())
            assert letter.raw == minimise_payload(original[:RAW_PREFIX_BYTES])
            assert letter.raw_truncated == (len(original) > RAW_PREFIX_BYTES)
            assert (letter.raw_size, letter.raw_sha256) == (len(original), hashlib.sha256(original).hexdigest())


def test_the_stream_is_reproducible_case_by_case_and_covers_every_family_and_limit() -> None:
    first = list(hostile_stream(seed=11, cases=3000, now_ms=NOW, max_payload=MAX_PAYLOAD))
    assert first == list(hostile_stream(seed=11, cases=3000, now_ms=NOW, max_payload=MAX_PAYLOAD))
    families = Counter(message.family.split(":")[0] for message in first)
    assert {family.__name__.strip("_") for family, _ in FAMILIES} >= set(families)
    assert len(families) == len(FAMILIES)
    sizes = {len(m.value) - MAX_PAYLOAD for m in first if m.family.startswith("payload_size") and m.value}
    assert {-1, 0, 1} <= sizes  # one under, at and one over the payload limit, to the byte


def test_batched_enrichment_of_the_stream_equals_one_by_one() -> None:
    messages = list(hostile_stream(seed=12, cases=2000, now_ms=NOW, max_payload=MAX_PAYLOAD))
    batched = enrich_batch([m.value for m in messages], NOW)
    assert [outcome(r) for r in batched] == [outcome(validate_and_enrich(m.value, NOW)) for m in messages]
    assert all(outcome(r) == m.expect for r, m in zip(batched, messages) if m.expect is not None)
