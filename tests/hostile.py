"""Hostile messages for events.raw: what a broken or malicious collector could put on the topic.

One deterministic generator serves two tests: the property test of the pure enrich core (Hypothesis drives
`hostile_messages` through `st.randoms`, so a failure shrinks to a small case) and the fault suite on the
real stack (`hostile_stream` seeds one `random.Random` per case, so 100,000 cases are reproducible one by
one without Hypothesis' per-example overhead).

Each case names its family and, where the contract fixes it, the outcome enrichment must give: `STORED` or
a dead-letter reason. `None` means either is acceptable: only "a row or a reason, never a crash" applies.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from random import Random
from typing import Any

import orjson

from schemas.events import (
    CAMPAIGN_MAX_CHARS,
    EMAIL_MAX_CHARS,
    EVENT_TYPES,
    ID_MAX_CHARS,
    IP_MAX_CHARS,
    NAME_MAX_CHARS,
    PROPERTY_KEY_MAX_CHARS,
    TITLE_MAX_CHARS,
    URL_MAX_CHARS,
    USER_AGENT_MAX_CHARS,
)

STORED = "stored"
HOUR = 3_600_000
DAY = 24 * HOUR
MAX_FUTURE_SKEW_MS = DAY  # processors.enrich.Limits: the time window the pipeline accepts
MAX_AGE_MS = 730 * DAY
TEXT_LIMITS = {
    "url": URL_MAX_CHARS, "referrer": URL_MAX_CHARS, "title": TITLE_MAX_CHARS, "ip": IP_MAX_CHARS,
    "user_agent": USER_AGENT_MAX_CHARS, "email": EMAIL_MAX_CHARS, "name": NAME_MAX_CHARS,
    "campaign": CAMPAIGN_MAX_CHARS,
}  # fmt: skip
ID_FIELDS = ("event_id", "site_id", "visitor_id")
REQUIRED = (*ID_FIELDS, "type", "ts")
BROKER_MAX_MESSAGE_BYTES = 1_000_000  # the local broker takes 1 MiB batches; keep a margin for headers

# Characters that break naive code: controls (C0, DEL, C1), bidi overrides, zero-width, BOM, replacement
# character, line/paragraph separators, a combining mark, non-BMP and multi-byte letters.
NASTY_CHARS = [chr(c) for c in range(0x00, 0x20)] + [
    "\x7f", "\x85", "\x9b", "\u200b", "\u200d", "\u202e", "\u2066", "\ufeff", "\ufffd", "\u2028", "\u2029", "\u0301",
    "😀", "𝕏", "中", "é",
]  # fmt: skip
INVALID_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
                b"\xe2\x82", b"\xf0\x9f\x98")  # fmt: skip
HOSTILE_NUMBERS = (
    b"1e308", b"-1e308", b"1.7976931348623157e308", b"1e309", b"-0", b"-0.0", b"0", b"4.9e-324", b"1e-400",
    b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808", b"-9223372036854775809",
    b"18446744073709551615", b"18446744073709551616", b"1" + b"0" * 400, b"NaN", b"Infinity", b"-Infinity",
    b"0x10", b"01", b"1.", b".5", b"+1", b"1e", b"--1",
)  # fmt: skip
NANISH_STRINGS = ("NaN", "nan", "Infinity", "-Infinity", "inf", "1e308", "null", "undefined", "", " ", "0", "-0",
                  "true", "None", "[object Object]")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Hostile:
    """One message to produce: Kafka key and value, the family that built it and the expected outcome."""

    key: bytes | None
    value: bytes | None
    family: str
    expect: str | None


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def _text(rng: Random, max_len: int = 40) -> str:
    alphabet = string.ascii_letters + string.digits + "-_."
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_len)))


def _nasty_text(rng: Random, max_len: int = 40) -> str:
    return "".join(rng.choice(NASTY_CHARS) if rng.random() < 0.4 else rng.choice(string.printable)
                   for _ in range(rng.randint(0, max_len)))


def valid_event(rng: Random, now_ms: int) -> dict[str, Any]:
    """A plausible event that must be stored: the base every mutation starts from."""
    visitor = f"v{rng.randrange(2000)}"
    event: dict[str, Any] = {
        "event_id": f"e{rng.getrandbits(64):016x}", "site_id": "hostile", "type": rng.choice(EVENT_TYPES),
        "ts": now_ms - rng.randrange(30 * DAY), "visitor_id": visitor,
        "url": f"https://acme.example.com/p/{_text(rng, 12)}?utm_source={_text(rng, 8)}",
    }  # fmt: skip
    if rng.random() < 0.3:
        event["referrer"] = rng.choice(("https://www.google.com/search?q=x", "https://t.co/abc", "android-app://x"))
    if rng.random() < 0.3:
        event["user_agent"] = rng.choice(("Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0", "curl/8.0", "Googlebot/2.1"))
    if rng.random() < 0.2:
        event["email"] = f"{_text(rng, 10)}@{rng.choice(('acme.com', 'gmail.com', 'example.com', 'x'))}"
    if rng.random() < 0.3:
        event["properties"] = {_text(rng, 10): rng.choice((_text(rng), 1, 2.5, True, None))}
    return event


def json_value(rng: Random, depth: int = 0) -> Any:
    """Arbitrary JSON (orjson-serialisable): scalars at the leaves, nested arrays and objects above."""
    roll = rng.random()
    if depth >= 4 or roll < 0.5:
        return rng.choice((None, True, False, rng.randint(-(2**63), 2**64 - 1), rng.uniform(-1e308, 1e308), -0.0,
                           _nasty_text(rng), rng.choice(NANISH_STRINGS)))
    if roll < 0.75:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_nasty_text(rng, 12): json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _replace_raw(document: bytes, field: str, raw_value: bytes) -> bytes:
    """The event with one field's JSON text replaced by bytes orjson cannot write (huge ints, NaN, ...)."""
    head = document[:-1] + (b"," if document != b"{}" else b"")
    return head + _dumps(field) + b":" + raw_value + b"}"


def _pad_to(event: dict[str, Any], size: int) -> bytes:
    """The event serialised to exactly `size` bytes, padded through an unknown field (kept in `extra`)."""
    event = {**event, "pad": ""}
    empty = len(_dumps(event))
    event["pad"] = "x" * max(0, size - empty)
    return _dumps(event)


# --- families: each returns the messages of one case --------------------------------------------------------


def _valid(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    event = valid_event(rng, now_ms)
    return [Hostile(event["visitor_id"].encode(), _dumps(event), "valid", STORED)]


def _mutated_field(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """A valid event with one field (known or required) replaced by arbitrary JSON or removed."""
    event = valid_event(rng, now_ms)
    field = rng.choice((*REQUIRED, *TEXT_LIMITS, "properties"))
    if rng.random() < 0.15:
        event.pop(field, None)
        expect = "missing_field" if field in REQUIRED else STORED
    else:
        event[field] = json_value(rng)
        expect = None
    return [Hostile(b"mutated", _dumps(event), "mutated_field", expect)]


def _raw_number(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """Numbers at and past every float/int limit, and JSON's non-numbers, in `ts` or another field."""
    document = _dumps(valid_event(rng, now_ms))
    field = rng.choice(("ts", "ts", "event_id", "title", "properties", "huge"))
    return [Hostile(None, _replace_raw(document, field, rng.choice(HOSTILE_NUMBERS)), "raw_number", None)]


def _text_at_limit(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """A text field of exactly its limit (stored) or one past it (refused); multi-byte characters count
    once each, as the contract measures characters, not bytes."""
    event = valid_event(rng, now_ms)
    field, limit = rng.choice(list(TEXT_LIMITS.items()) + [(f, ID_MAX_CHARS) for f in ID_FIELDS])
    over = rng.random() < 0.5
    char = rng.choice(("a", "é", "中", "😀"))
    event[field] = char * (limit + over)
    return [Hostile(b"limit", _dumps(event), f"text_at_limit:{field}", "invalid_value" if over else STORED)]


def _property_limits(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """Property keys at/over their limit, nested values, non-object properties."""
    event = valid_event(rng, now_ms)
    shape = rng.randrange(4)
    if shape == 0:
        over = rng.random() < 0.5
        event["properties"] = {"k" * (PROPERTY_KEY_MAX_CHARS + over): "v"}
        expect = "invalid_value" if over else STORED
    elif shape == 1:
        event["properties"] = {"form": {"nested": [1, 2]}}
        expect = "wrong_type"
    elif shape == 2:
        event["properties"] = rng.choice(([1, 2], "text", 5, True))
        expect = "wrong_type"
    else:
        event["properties"] = {_nasty_text(rng, 20) or "k": _nasty_text(rng, 200) for _ in range(rng.randint(1, 50))}
        expect = STORED
    return [Hostile(b"props", _dumps(event), "property_limits", expect)]


def _payload_size(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """Exactly at, one under and one over the payload limit; now and then far over (up to the broker's own
    limit), where a dead letter carrying the original bytes is itself larger than the input."""
    event = valid_event(rng, now_ms)
    if rng.random() < 0.04:
        size = rng.choice((900_000, BROKER_MAX_MESSAGE_BYTES, rng.randint(max_payload * 2, BROKER_MAX_MESSAGE_BYTES)))
    else:
        size = max_payload + rng.choice((-1, 0, 0, 1, 1, 2))
    return [Hostile(b"size", _pad_to(event, size), f"payload_size:{size - max_payload:+d}",
                    "oversized" if size > max_payload else STORED)]


def _bad_encoding(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """Invalid UTF-8 (stray continuation bytes, overlongs, encoded surrogates, truncated sequences) inside
    an otherwise valid event's string."""
    document = _dumps({**valid_event(rng, now_ms), "title": "@@"})
    bad = document.replace(b"@@", rng.choice(INVALID_UTF8), 1)
    return [Hostile(b"enc", bad, "bad_encoding", "bad_encoding")]


def _escaped_surrogate(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    r"""Lone surrogates written as JSON escapes: valid UTF-8 bytes, not a valid string (\ud800 alone)."""
    document = _dumps({**valid_event(rng, now_ms), rng.choice(("title", "event_id", "x")): "@@"})
    escape = rng.choice((b"\\ud800", b"\\udfff", b"\\ud83d", b"\\ud83dx", b"\\udc00\\ud800"))
    return [Hostile(b"sur", document.replace(b"@@", escape, 1), "escaped_surrogate", "bad_json")]


def _control_characters(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """Control and other nasty characters in free text (stripped, stored) or in ids (refused, unless the
    character is whitespace the id's trimming removes)."""
    event = valid_event(rng, now_ms)
    field = rng.choice((*TEXT_LIMITS, "event_id", "visitor_id"))
    event[field] = _nasty_text(rng, 60) + "x"
    if field in ID_FIELDS:
        return [Hostile(b"ctl", _dumps(event), "control_characters:id", None)]
    return [Hostile(b"ctl", _dumps(event), "control_characters:text", STORED)]


def _timestamps(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """Far future, far past, just inside the window, and RFC 3339 strings that are almost right."""
    event = valid_event(rng, now_ms)
    margin = 10 * 60_000  # the pipeline's receive clock runs later than `now_ms`: keep off the exact edge
    choices: list[tuple[Any, str | None]] = [
        (now_ms + MAX_FUTURE_SKEW_MS + HOUR, "ts_in_future"), (now_ms + 100 * 365 * DAY, "ts_in_future"),
        (now_ms - MAX_AGE_MS - DAY, "ts_too_old"), (0, "ts_too_old"), (-1, "ts_too_old"),
        (-(2**63), "ts_too_old"), (now_ms - MAX_AGE_MS + DAY, STORED), (now_ms + MAX_FUTURE_SKEW_MS - HOUR, STORED),
        (now_ms - margin, STORED), (float(now_ms) + 0.999, STORED),
        ("2026-02-30T00:00:00Z", "invalid_value"), ("2026-01-01T23:59:60Z", "invalid_value"),
        ("2026-01-01T00:00:00+24:00", "invalid_value"), ("0000-01-01T00:00:00Z", "invalid_value"),
        ("9999-12-31T23:59:59.999999999Z", "ts_in_future"), ("1970-01-01T00:00:00Z", "ts_too_old"),
        ("2026-01-01", "invalid_value"), ("yesterday", "invalid_value"), (str(now_ms), "invalid_value"),
        ("", "invalid_value"), ("２０２６-01-01T00:00:00Z", "invalid_value"),
    ]  # fmt: skip
    event["ts"], expect = rng.choice(choices)
    return [Hostile(b"ts", _dumps(event), "timestamps", expect)]


def _deep_nesting(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """1,000-level arrays and objects, as the whole message or inside an unknown field."""
    depth = rng.choice((1000, 1000, 254, 255, 256, 1023, 1024, 1025, 5000))
    nested = (b"[" * depth + b"]" * depth) if rng.random() < 0.5 else (b'{"a":' * depth + b"1" + b"}" * depth)
    if rng.random() < 0.3:
        return [Hostile(None, nested, f"deep_nesting:top:{depth}", None)]
    return [Hostile(b"deep", _replace_raw(_dumps(valid_event(rng, now_ms)), "x", nested), f"deep_nesting:{depth}",
                    None)]


def _not_an_object(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    value, expect = rng.choice((
        (b"", "bad_json"), (b"null", "not_an_object"), (b"[]", "not_an_object"), (b'"event"', "not_an_object"),
        (b"42", "not_an_object"), (b"true", "not_an_object"), (b" \n\t ", "bad_json"), (b"{", "bad_json"),
        (b"\xef\xbb\xbf{}", None), (b"{}", "missing_field"), (b"{}{}", "bad_json"), (b"\x00", "bad_json"),
        (_dumps([valid_event(rng, now_ms)]), "not_an_object"), (None, "not_an_object"),
    ))  # fmt: skip
    return [Hostile(rng.choice((None, b"", b"v")), value, "not_an_object", expect)]


def _binary_garbage(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    size = rng.choice((1, 2, 16, 256, 4096, rng.randint(0, 20_000)))
    key = rng.randbytes(rng.randint(0, 64)) if rng.random() < 0.5 else None
    return [Hostile(key, rng.randbytes(size), "binary_garbage", None)]


def _recursive_json(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """An arbitrary JSON document, sometimes an object holding the required fields among junk."""
    document = json_value(rng)
    if rng.random() < 0.5:
        document = {**valid_event(rng, now_ms), **{_nasty_text(rng, 10): json_value(rng) for _ in range(3)}}
    return [Hostile(None, _dumps(document), "recursive_json", None)]


def _duplicate_json_keys(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """The same key twice (the last one wins in orjson): a conflicting `type`, `ts` or id."""
    event = valid_event(rng, now_ms)
    field = rng.choice(REQUIRED)
    raw_value = rng.choice((_dumps(json_value(rng)), _dumps(event[field])))
    return [Hostile(event["visitor_id"].encode(), _replace_raw(_dumps(event), field, raw_value), "duplicate_json_keys",
                    None)]


def _duplicate_event(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """The same event twice, byte for byte or re-serialised with another field: the second is a duplicate
    for the sessionizer; enrichment alone stores both."""
    event = valid_event(rng, now_ms)
    again = _dumps(event) if rng.random() < 0.5 else _dumps({**event, "title": "resent"})
    key = event["visitor_id"].encode()
    return [Hostile(key, _dumps(event), "duplicate_event", STORED), Hostile(key, again, "duplicate_event", STORED)]


def _hostile_kafka_key(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """A valid event whose Kafka key is not its visitor id: none, empty, binary, huge."""
    key = rng.choice((None, b"", rng.randbytes(16), b"\xff" * 4, b"k" * 10_000, "😀".encode()))
    return [Hostile(key, _dumps(valid_event(rng, now_ms)), "hostile_kafka_key", STORED)]


def _event_type(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    event = valid_event(rng, now_ms)
    event["type"], expect = rng.choice((
        ("PAGEVIEW", "unknown_event_type"), ("pageview\u0000", "unknown_event_type"),
        (" pageview", "unknown_event_type"),
        ("", "unknown_event_type"), ("x" * 10_000, "unknown_event_type"), (1, "wrong_type"), (None, "wrong_type"),
        (["pageview"], "wrong_type"),
    ))  # fmt: skip
    return [Hostile(b"type", _dumps(event), "event_type", expect)]


Family = Callable[[Random, int, int], list[Hostile]]
FAMILIES: tuple[tuple[Family, float], ...] = (
    (_valid, 10), (_mutated_field, 14), (_raw_number, 8), (_text_at_limit, 8), (_property_limits, 6),
    (_payload_size, 0.5), (_bad_encoding, 5), (_escaped_surrogate, 4), (_control_characters, 8), (_timestamps, 8),
    (_deep_nesting, 2), (_not_an_object, 4), (_binary_garbage, 4), (_recursive_json, 6), (_duplicate_json_keys, 4),
    (_duplicate_event, 4), (_hostile_kafka_key, 3), (_event_type, 4),
)  # fmt: skip
_FAMILY_FUNCTIONS = [family for family, _ in FAMILIES]
_FAMILY_WEIGHTS = [weight for _, weight in FAMILIES]


def hostile_messages(rng: Random, now_ms: int, max_payload: int) -> list[Hostile]:
    """One case: a family picked by weight, then its messages (usually one, two for a duplicate)."""
    family = rng.choices(_FAMILY_FUNCTIONS, weights=_FAMILY_WEIGHTS)[0]
    return family(rng, now_ms, max_payload)


def hostile_stream(seed: int, cases: int, now_ms: int, max_payload: int) -> Iterator[Hostile]:
    """`cases` cases, each from its own `Random(seed, case)`: any one can be regenerated alone."""
    for case in range(cases):
        yield from hostile_messages(Random(seed * 1_000_003 + case), now_ms, max_payload)
