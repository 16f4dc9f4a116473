"""The condition language rules and segments share: `{field, op, value}` tests, `{in_segment: id}`,
`any:` / `all:` groups, durations, and the event filters of an event trigger or an event count.

Rules (schemas.rules) and segments (schemas.segments) each subclass `ConditionBase` with the fields they
may read and the further kinds of condition they allow; the shape checks, the ops each kind of field
takes and the value checks are written once, here. Models are strict: an unknown key is an error, never a
silently ignored line.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from schemas.events import EVENT_TYPES

# The channels enrichment assigns (processors.enrich.CHANNELS; a test keeps the two equal).
Channel = Literal["direct", "organic", "social", "email", "referral", "paid"]
CHANNELS: tuple[str, ...] = get_args(Channel)
EventFilter = Literal[EVENT_TYPES + ("any",)]  # an event type, or any
Op = Literal["is", "is_not", "contains", "exists", "unknown", "gt", "lt", "between"]

SEGMENT_ID = r"^[a-z0-9-]{1,64}$"
MAX_CONDITION_DEPTH = 4
MAX_GROUP_ITEMS = 50
MAX_VALUE_ITEMS = 100  # items of an `is` list
MAX_VALUE_CHARS = 1024
MAX_FIELD_CHARS = 128  # a field path

_DURATION = re.compile(r"^([1-9][0-9]{0,5})([dhm])$")
_UNIT_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000}

# Field kinds decide which ops make sense: numbers and times compare, text and lists contain, all is/exists.
FieldKind = Literal["text", "number", "time", "bool", "list", "any"]
OPS_BY_KIND: dict[str, frozenset[str]] = {
    "text": frozenset(("is", "is_not", "contains", "exists", "unknown")),
    "number": frozenset(("is", "is_not", "exists", "unknown", "gt", "lt", "between")),
    "time": frozenset(("exists", "unknown", "gt", "lt", "between")),  # epoch milliseconds
    "bool": frozenset(("is", "is_not", "exists", "unknown")),
    "list": frozenset(("is", "is_not", "contains", "exists", "unknown")),
    "any": frozenset(get_args(Op)),
}


def problem(message: str, **context: Any) -> PydanticCustomError:
    """A validation error whose text is exactly `message` (no 'Value error, ' prefix)."""
    return PydanticCustomError("definition", message, context or None)


def duration_ms(text: str) -> int:
    """'14d' / '12h' / '30m' in milliseconds (the text is validated by the models)."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def check_duration(value: str | None) -> str | None:
    if value is not None and _DURATION.fullmatch(value) is None:
        raise problem("must be a duration like 30m, 12h or 14d")
    return value


def given(model: BaseModel) -> set[str]:
    """Keys with a value: null is the same as leaving a key out, so a full export applies again."""
    return {name for name in model.model_fields_set if getattr(model, name) is not None}


class Definition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


EVENT_FILTER_KEYS = ("url", "channel", "utm_source", "utm_medium", "utm_campaign", "name", "campaign")


class EventFilters(Definition):
    """Which events: a type (or any) narrowed by a URL glob (case-insensitive) and exact, case-insensitive
    values of the event's channel, utm_* parameters, custom event name or email campaign."""

    event: EventFilter | None = None
    url: str | None = Field(default=None, min_length=1, max_length=1024)
    channel: Channel | None = None
    utm_source: str | None = Field(default=None, min_length=1, max_length=256)
    utm_medium: str | None = Field(default=None, min_length=1, max_length=256)
    utm_campaign: str | None = Field(default=None, min_length=1, max_length=256)
    name: str | None = Field(default=None, min_length=1, max_length=256)
    campaign: str | None = Field(default=None, min_length=1, max_length=256)

    def exact_filters(self) -> tuple[tuple[str, str], ...]:
        """(event field, expected value) of the exact-value filters given."""
        return tuple((key, getattr(self, key)) for key in EVENT_FILTER_KEYS[1:] if getattr(self, key) is not None)


_SCALARS = (str, int, float, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_op_value(op: str, value: Any) -> None:
    """The value an op needs (numbers for gt/lt/between, none for exists/unknown, ...), within the caps."""
    present = value is not None
    if op in ("exists", "unknown"):
        if present:
            raise problem("op {op} takes no value", op=op)
    elif op in ("gt", "lt"):
        if not is_number(value):
            raise problem("op {op} needs a number value", op=op)
    elif op == "between":
        if not (isinstance(value, list) and len(value) == 2 and all(map(is_number, value))
                and value[0] <= value[1]):
            raise problem("op between needs value: [low, high] (numbers, low <= high)")
    elif op == "contains":
        if not isinstance(value, _SCALARS) or value == "":
            raise problem("op contains needs a non-empty text or number value")
    elif not (isinstance(value, _SCALARS) or (
            isinstance(value, list) and value and all(isinstance(v, _SCALARS) for v in value))):
        raise problem("op {op} needs a value: text, number, true/false, or a list of them (any of)", op=op)
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_VALUE_ITEMS:
        raise problem("a value list has at most {n} items", n=MAX_VALUE_ITEMS)
    if any(isinstance(item, str) and len(item) > MAX_VALUE_CHARS for item in items):
        raise problem("a text value has at most {n} characters", n=MAX_VALUE_CHARS)


class ConditionBase(Definition):
    """One condition: exactly one of its SHAPES. Every subclass declares `any` and `all` as lists of
    itself (a group holds conditions of its own language) and `field_kind`, the fields it may read."""

    # shape -> the keys that belong to it (the first key names the shape)
    SHAPES: ClassVar[dict[str, frozenset[str]]] = {
        "field": frozenset(("field", "op", "value")),
        "in_segment": frozenset(("in_segment",)),
        "any": frozenset(("any",)),
        "all": frozenset(("all",)),
    }
    NESTED: ClassVar[tuple[str, ...]] = ("any", "all")  # the keys that hold conditions

    field: str | None = Field(default=None, max_length=MAX_FIELD_CHARS)
    op: Op | None = None
    value: Any = None
    in_segment: str | None = Field(default=None, pattern=SEGMENT_ID)

    @classmethod
    def field_kind(cls, path: str) -> FieldKind:
        """The kind of a field path; raises ValueError naming what is valid."""
        raise NotImplementedError

    @property
    def shape(self) -> str:
        keys = given(self)
        return next((shape for shape in self.SHAPES if shape in keys), "field")

    @model_validator(mode="after")
    def _well_formed(self) -> ConditionBase:
        keys = given(self)
        shapes = [shape for shape in self.SHAPES if shape in keys]
        if len(shapes) > 1 or (shapes and keys - self.SHAPES[shapes[0]]):
            if keys & {"any", "all"}:
                raise problem("a group has exactly one key: any or all")
            raise problem("a condition is exactly one of: {shapes}", shapes=", ".join(self._shape_names()))
        if not shapes:
            raise problem("a condition needs field and op (or is one of: {shapes})",
                          shapes=", ".join(self._shape_names()[1:]))
        if self.depth() > MAX_CONDITION_DEPTH:
            raise problem("groups nest at most {n} deep", n=MAX_CONDITION_DEPTH)
        self.check_shape(shapes[0])
        return self

    @classmethod
    def _shape_names(cls) -> list[str]:
        return ["field/op/value" if shape == "field" else shape for shape in cls.SHAPES]

    def check_shape(self, shape: str) -> None:
        """Checks the keys of the condition's shape; subclasses add their own shapes."""
        if shape != "field":
            return
        if self.op is None:
            raise problem("a condition needs field and op (or is one of: {shapes})",
                          shapes=", ".join(self._shape_names()[1:]))
        try:
            kind = self.field_kind(self.field or "")
        except ValueError as error:
            raise problem("{error}", error=str(error)) from None
        if self.op not in OPS_BY_KIND[kind]:
            raise problem("op {op} does not apply to {field} ({kind}); use one of: {ops}", op=self.op,
                          field=self.field, kind=kind, ops=", ".join(sorted(OPS_BY_KIND[kind])))
        check_op_value(self.op, self.value)

    def children(self) -> list[ConditionBase]:
        return [child for key in self.NESTED for child in (getattr(self, key) or [])]

    def depth(self) -> int:
        return 1 + max((child.depth() for child in self.children()), default=0)

    def size(self) -> int:
        """How many conditions this one is, counting every nested one."""
        return 1 + sum(child.size() for child in self.children())

    def fields(self) -> list[str]:
        """Every field path this condition reads."""
        own = [self.field] if self.field is not None else []
        return own + [path for child in self.children() for path in child.fields()]

    def segments(self) -> list[str]:
        """Every segment this condition names with in_segment."""
        own = [self.in_segment] if self.in_segment is not None else []
        return own + [segment for child in self.children() for segment in child.segments()]
