"""Dead letters: why an input was refused, with its original bytes, so nothing is ever silently dropped."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import orjson
from pydantic import ValidationError

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
    """A refused message as published on events.dlq: the reason plus where and what it was."""

    reason: str
    message: str
    raw: bytes
    topic: str
    partition: int
    offset: int
    received_ms: int

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
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> DeadLetter:
        record = orjson.loads(data)
        record["raw"] = base64.b64decode(record["raw"])
        return cls(**record)
