"""Dead letters: why a record was refused, with the start of its original bytes, so nothing is ever silently
dropped and every refusal can be diagnosed.

A dead letter keeps what diagnosis needs and no more (it is personal data too): the reason and message,
where the record was (topic, partition, offset), the first RAW_PREFIX_BYTES of the original bytes with
emails masked and any `"ip"` value blanked (schemas.privacy.minimise_payload), and the full size and
SHA-256 of the whole original, so duplicates and a copy kept elsewhere (the Kafka topic, within its own
retention) can be recognised. The rest of the original is dropped.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import orjson
from pydantic import ValidationError

from schemas.privacy import minimise_message, minimise_payload

REASONS: tuple[str, ...] = (
    "bad_json",
    "bad_encoding",
    "not_an_object",
    "oversized",
    "missing_field",
    "wrong_type",
    "invalid_value",
    "unknown_event_type",
    "ts_in_future",
    "ts_too_old",
    "duplicate_event",  # set by the pipeline when the sessionizer has already seen the event_id
    "internal_error",  # a bug in enrichment: the message is parked for replay instead of crash-looping
)

RUNTIME_REASONS: tuple[str, ...] = (
    "undecodable_record",  # a record on an internal topic that no LeadStream writer produced
    "stage_error",  # a processor failed on this record the same way every time: parked so the partition moves on
    "output_too_large",  # a record a processor produced is over the broker's record limit (offset -1: never written)
    "sink_decode_error",  # a sink could not turn the record into a row
    "sink_insert_error",  # ClickHouse refused the record's row
)
"""Reasons the runtime and the sinks give, besides the input validation REASONS above."""

RAW_PREFIX_BYTES = 2048
"""At most this much of the original bytes is kept in a dead letter: a whole typical event (a few hundred
bytes), and enough of a larger one to see what it was and where it went wrong (the reason and message name
the field). A letter stays far below any broker's record limit."""

MESSAGE_CHARS = 4096
"""A dead letter's message is cut to this many characters (an exception text can quote a whole record)."""

_REASON_CODES = frozenset(REASONS)
# pydantic's own wording for these quotes the id pattern, control characters included.
_FRIENDLIER_MESSAGES = {
    "string_too_short": "must not be empty",
    "string_pattern_mismatch": "must not contain control characters",
}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one input was refused: `reason` is for machines (one of REASONS), `message` for people."""

    reason: str
    message: str

    @classmethod
    def from_validation_error(cls, error: ValidationError) -> Rejection:
        """Maps the first pydantic error to a reason; the message names the offending field."""
        first = error.errors(include_url=False)[0]
        kind = first["type"]
        field = ".".join(str(part) for part in first["loc"]) or "event"
        if kind == "missing":
            return cls("missing_field", f"missing required field '{field}'")
        if kind == "literal_error" and field == "type" and type(first["input"]) is str:
            unknown = first["input"][:64]
            return cls("unknown_event_type", f"field 'type': unknown event type {unknown!r}; {first['msg']}")
        if kind in _REASON_CODES:
            reason = kind
        elif kind.endswith("_type") or kind == "literal_error":
            reason = "wrong_type"
        else:
            reason = "invalid_value"
        return cls(reason, f"field '{field}': {_FRIENDLIER_MESSAGES.get(kind, first['msg'])}")


@dataclass(slots=True)
class DeadLetter:
    """A refused record as published on events.dlq: the reason plus where and what it was.

    Built from the whole original bytes (`raw_size` left None), it measures and hashes them, then keeps
    only their first RAW_PREFIX_BYTES, minimised. `offset` -1: the record never had an offset (an output
    that was too large to be written)."""

    reason: str
    message: str
    raw: bytes
    topic: str
    partition: int
    offset: int
    received_ms: int
    raw_size: int | None = None  # size of the original bytes; None: `raw` is the whole of them
    raw_sha256: str = ""
    raw_truncated: bool = False  # `raw` is only the first RAW_PREFIX_BYTES of the original

    def __post_init__(self) -> None:
        if self.raw_size is None:
            self.raw_size = len(self.raw)
            self.raw_sha256 = hashlib.sha256(self.raw).hexdigest()
            self.raw_truncated = self.raw_size > RAW_PREFIX_BYTES
            self.raw = minimise_payload(self.raw[:RAW_PREFIX_BYTES])
        self.message = minimise_message(self.message[:MESSAGE_CHARS])

    def to_json(self) -> bytes:
        """JSON has no bytes type: `raw` travels as base64 so even invalid UTF-8 survives unchanged."""
        return orjson.dumps(
            {
                "reason": self.reason,
                "message": self.message,
                "raw": base64.b64encode(self.raw).decode("ascii"),
                "topic": self.topic,
                "partition": self.partition,
                "offset": self.offset,
                "received_ms": self.received_ms,
                "raw_size": self.raw_size,
                "raw_sha256": self.raw_sha256,
                "raw_truncated": self.raw_truncated,
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> DeadLetter:
        """A letter as it was written. One written before the size and hash were recorded has its whole
        original in `raw`: it is measured, cut and minimised now."""
        record = orjson.loads(data)
        record["raw"] = base64.b64decode(record["raw"])
        return cls(**record)
