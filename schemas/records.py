"""The JSON round trip shared by every record that travels on a topic or lives in Redis.

Slots dataclasses serialised with orjson: cheap to encode on the hot path. `from_json` ignores unknown
keys so that older readers keep working when a newer writer extends a record (contracts change only by
extension).
"""

from __future__ import annotations

import hashlib
from dataclasses import fields
from functools import cache
from typing import Any, Self

import orjson


def digest(*parts: str) -> str:
    """The hash every deterministic id is made of (leads, identity events, firings, stage changes, ...):
    length-prefixed, so that no two different part lists hash the same text. A replay re-derives it."""
    text = "".join(f"{len(part)}:{part}" for part in parts)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def event_digest(event_id: str) -> str:
    """The short digest of an event id a lead's state keeps to recognise the event when it comes again
    (12 hex digits: a lead's few hundred remembered events never collide in practice)."""
    return hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()


class JsonRecord:
    __slots__ = ()

    def to_json(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        try:
            return cls(**raw)
        except TypeError:  # keys of a newer writer: keep the ones this reader knows
            return cls(**{name: raw[name] for name in _field_names(cls) if name in raw})  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        return cls.from_dict(orjson.loads(data))


@cache
def _field_names(record_type: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(record_type))
