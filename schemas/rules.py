"""Workflow-automation rules (contract v1): the rule definitions users write, and the records the rule
engine emits (tag/score/property changes, rule executions, webhook and card-move requests).

A rule is `when` (one trigger) + `if` (conditions, all must hold) + `then` (actions) + `once`. Models are
strict (unknown keys are refused) so a typo in a file is an error, never a silently ignored line. The
engine (processors.rules) compiles validated rules once; nothing here runs per event.

`version` is assigned by the definitions store (the site's definitions version at which the rule last
changed). A `version` in a file is accepted, so an exported rule can be applied again, and ignored.
See docs/rules.md for the user-facing description.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from schemas.boards import DEFINITION_ID
from schemas.events import EVENT_TYPES, EnrichedEvent
from schemas.records import JsonRecord

# The channels enrichment assigns (processors.enrich.CHANNELS; a test keeps the two equal).
Channel = Literal["direct", "organic", "social", "email", "referral", "paid"]
CHANNELS: tuple[str, ...] = get_args(Channel)

EventFilter = Literal[EVENT_TYPES + ("any",)]  # an event type, or any
Op = Literal["is", "is_not", "contains", "exists", "unknown", "gt", "lt", "between"]
Once = Literal["per_lead", "per_event"]
TriggerKind = Literal["event", "state", "time"]
TagTarget = Literal["lead", "account"]

TAG_PATTERN = r"^[^\x00-\x1f\x7f]{1,128}$"
PROPERTY_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
ENV_NAME = r"^[A-Z_][A-Z0-9_]{0,127}$"
HTTP_URL = r"^https?://[^\s/$.?#][^\s]*$"
PATTERN_MEANINGS = {
    DEFINITION_ID: "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
    TAG_PATTERN: "must be 1-128 characters, no control characters",
    PROPERTY_NAME: "must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or '_'",
    ENV_NAME: "must be an environment variable name (A-Z, 0-9, _)",
    HTTP_URL: "must be an http:// or https:// URL",
}
_DURATION = re.compile(r"^([1-9][0-9]{0,5})([dhm])$")
_UNIT_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000}
MAX_CONDITION_DEPTH = 4

# Field kinds decide which ops make sense: numbers compare, text and lists contain, everything is/exists.
FieldKind = Literal["text", "number", "bool", "list", "any"]
_PY_KINDS: dict[str, FieldKind] = {"str": "text", "int": "number", "bool": "bool"}
EVENT_FIELDS: dict[str, FieldKind] = {
    f.name: _PY_KINDS[str(f.type)] for f in dataclasses.fields(EnrichedEvent) if f.name != "properties"
}
LEAD_FIELDS: dict[str, FieldKind] = {
    "lead_id": "text", "email": "text", "known": "bool", "score": "number", "tags": "list",
    "first_ts_ms": "number", "last_activity_ms": "number",
}
ACCOUNT_FIELDS: dict[str, FieldKind] = {"domain": "text"}
_SCOPES = {"event": EVENT_FIELDS, "lead": LEAD_FIELDS, "account": ACCOUNT_FIELDS}
_OPS_BY_KIND: dict[str, frozenset[str]] = {
    "text": frozenset(("is", "is_not", "contains", "exists", "unknown")),
    "number": frozenset(("is", "is_not", "exists", "unknown", "gt", "lt", "between")),
    "bool": frozenset(("is", "is_not", "exists", "unknown")),
    "list": frozenset(("is", "is_not", "contains", "exists", "unknown")),
    "any": frozenset(get_args(Op)),
}


def _problem(message: str, **context: Any) -> PydanticCustomError:
    """A validation error whose text is exactly `message` (no 'Value error, ' prefix)."""
    return PydanticCustomError("definition", message, context or None)


def duration_ms(text: str) -> int:
    """'14d' / '12h' / '30m' in milliseconds (the text is validated by the models)."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def field_kind(path: str) -> FieldKind:
    """The kind of a field path (`event.url`, `lead.properties.plan`, `account.domain`, ...).
    Raises ValueError naming what is valid."""
    scope, _, rest = path.partition(".")
    if scope not in _SCOPES:
        raise ValueError(f"field {path!r} must start with event., lead. or account.")
    if rest.startswith("properties.") and scope in ("event", "lead") and len(rest) > len("properties."):
        return "any"
    kind = _SCOPES[scope].get(rest)
    if kind is None:
        known = ", ".join(f"{scope}.{name}" for name in _SCOPES[scope])
        extra = f", {scope}.properties.<key>" if scope != "account" else ""
        raise ValueError(f"unknown field {path!r}; known: {known}{extra}")
    return kind


def _check_duration(value: str | None) -> str | None:
    if value is not None and _DURATION.fullmatch(value) is None:
        raise _problem("must be a duration like 30m, 12h or 14d")
    return value


def _given(model: BaseModel) -> set[str]:
    """Keys with a value: null is the same as leaving a key out, so a full export applies again."""
    return {name for name in model.model_fields_set if getattr(model, name) is not None}


class _Definition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


_EVENT_FILTERS = ("url", "channel", "utm_source", "utm_medium", "utm_campaign", "name", "campaign")
_STATE_KEYS = ("score_at_least", "tag")


class Trigger(_Definition):
    """Exactly one kind of trigger: an event (type + optional filters), a state (score threshold and/or
    tag present; fires when it becomes true), or a time (no activity for a period; hourly pass)."""

    event: EventFilter | None = None
    url: str | None = Field(default=None, min_length=1, max_length=1024)
    channel: Channel | None = None
    utm_source: str | None = Field(default=None, min_length=1, max_length=256)
    utm_medium: str | None = Field(default=None, min_length=1, max_length=256)
    utm_campaign: str | None = Field(default=None, min_length=1, max_length=256)
    name: str | None = Field(default=None, min_length=1, max_length=256)
    campaign: str | None = Field(default=None, min_length=1, max_length=256)
    score_at_least: int | None = Field(default=None, ge=0, le=100)
    tag: str | None = Field(default=None, pattern=TAG_PATTERN)
    inactive_for: str | None = None

    _duration = field_validator("inactive_for")(_check_duration)

    @model_validator(mode="after")
    def _one_kind(self) -> Trigger:
        given = _given(self)
        kinds = [kind for kind, keys in (("event", ("event",) + _EVENT_FILTERS), ("state", _STATE_KEYS),
                                         ("time", ("inactive_for",))) if given & set(keys)]
        if not kinds:
            raise _problem("empty trigger: give event: TYPE, score_at_least/tag, or inactive_for")
        if len(kinds) > 1:
            raise _problem("mixes {kinds} triggers; a rule has one kind of trigger "
                           "(put further requirements under 'if')", kinds=" and ".join(kinds))
        if kinds == ["event"] and self.event is None:
            raise _problem("event filters need the event type: add event: TYPE (or event: any)")
        return self

    @property
    def kind(self) -> TriggerKind:
        if self.event is not None:
            return "event"
        return "time" if self.inactive_for is not None else "state"


_SCALARS = (str, int, float, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Condition(_Definition):
    """`{field, op, value}`, or a group: `{any: [...]}` (one must hold) / `{all: [...]}` (all must hold)."""

    field: str | None = None
    op: Op | None = None
    value: Any = None
    any: list[Condition] | None = Field(default=None, min_length=1, max_length=50)
    all: list[Condition] | None = Field(default=None, min_length=1, max_length=50)

    @model_validator(mode="after")
    def _well_formed(self) -> Condition:
        groups = [name for name in ("any", "all") if getattr(self, name) is not None]
        if groups:
            if len(groups) > 1 or _given(self) & {"field", "op", "value"}:
                raise _problem("a group has exactly one key: any or all")
            if self.depth() > MAX_CONDITION_DEPTH:
                raise _problem("groups nest at most {n} deep", n=MAX_CONDITION_DEPTH)
            return self
        if self.field is None or self.op is None:
            raise _problem("a condition needs field and op (or is a group: any / all)")
        try:
            kind = field_kind(self.field)
        except ValueError as error:
            raise _problem("{error}", error=str(error)) from None
        if self.op not in _OPS_BY_KIND[kind]:
            raise _problem("op {op} does not apply to {field} ({kind}); use one of: {ops}", op=self.op,
                           field=self.field, kind=kind, ops=", ".join(sorted(_OPS_BY_KIND[kind])))
        self._check_value()
        return self

    def _check_value(self) -> None:
        op, value, given = self.op, self.value, self.value is not None
        if op in ("exists", "unknown"):
            if given:
                raise _problem("op {op} takes no value", op=op)
        elif op in ("gt", "lt"):
            if not _is_number(value):
                raise _problem("op {op} needs a number value", op=op)
        elif op == "between":
            if not (isinstance(value, list) and len(value) == 2 and all(map(_is_number, value))
                    and value[0] <= value[1]):
                raise _problem("op between needs value: [low, high] (numbers, low <= high)")
        elif op == "contains":
            if not isinstance(value, _SCALARS) or value == "":
                raise _problem("op contains needs a non-empty text or number value")
        elif not (isinstance(value, _SCALARS) or (
                isinstance(value, list) and value and all(isinstance(v, _SCALARS) for v in value))):
            raise _problem("op {op} needs a value: text, number, true/false, or a list of them (any of)", op=op)

    def depth(self) -> int:
        children = self.any or self.all or []
        return 1 + max((child.depth() for child in children), default=0)

    def fields(self) -> list[str]:
        """Every field path this condition reads."""
        if self.field is not None:
            return [self.field]
        return [path for child in (self.any or self.all or []) for path in child.fields()]


class TagAction(_Definition):
    tag: str = Field(pattern=TAG_PATTERN)
    on: TagTarget = "lead"


def _tag_shorthand(value: Any) -> Any:
    """`add_tag: X` is short for `add_tag: {tag: X}`."""
    return {"tag": value} if isinstance(value, str) else value


class SetProperty(_Definition):
    """A fixed `value`, or `from` a field (skipped when that field has no value)."""

    name: str = Field(pattern=PROPERTY_NAME)
    value: str | int | float | bool | None = None
    from_: str | None = Field(default=None, alias="from")

    @model_validator(mode="after")
    def _one_source(self) -> SetProperty:
        if (self.value is None) == (self.from_ is None):
            raise _problem("give exactly one of value or from")
        if self.from_ is not None:
            try:
                field_kind(self.from_)
            except ValueError as error:
                raise _problem("from: {error}", error=str(error)) from None
        return self


class MoveCard(_Definition):
    board: str = Field(pattern=DEFINITION_ID)
    stage: str = Field(pattern=DEFINITION_ID)


RESERVED_ENV_PREFIX = "LEADSTREAM_"


def signing_secret_allowed(env_name: str) -> bool:
    """A rule names the variable holding its endpoint's secret; LeadStream's own settings (passwords among
    them) are never signing secrets, or anyone who may write rules could have them used as one."""
    return not env_name.upper().startswith(RESERVED_ENV_PREFIX)


class Webhook(_Definition):
    url: str = Field(pattern=HTTP_URL, max_length=2048)
    secret_env: str = Field(pattern=ENV_NAME)

    @field_validator("secret_env")
    @classmethod
    def _not_a_setting(cls, value: str) -> str:
        if not signing_secret_allowed(value):
            raise ValueError(f"must not name one of LeadStream's own settings ({RESERVED_ENV_PREFIX}*)")
        return value


ACTION_KEYS = ("add_tag", "remove_tag", "add_score", "set_property", "move_card", "webhook")


class Action(_Definition):
    """One key per action. `decays_after` goes beside `add_score`: those points are taken back by the
    hourly pass once the period has passed (behaviour that ages out)."""

    add_tag: TagAction | None = None
    remove_tag: TagAction | None = None
    add_score: int | None = Field(default=None, ge=-100, le=100)
    decays_after: str | None = None
    set_property: SetProperty | None = None
    move_card: MoveCard | None = None
    webhook: Webhook | None = None

    _tags = field_validator("add_tag", "remove_tag", mode="before")(_tag_shorthand)
    _duration = field_validator("decays_after")(_check_duration)

    @model_validator(mode="after")
    def _exactly_one(self) -> Action:
        given = [key for key in ACTION_KEYS if getattr(self, key) is not None]
        if len(given) != 1:
            raise _problem("an action has exactly one of: {keys}", keys=", ".join(ACTION_KEYS))
        if self.decays_after is not None and self.add_score is None:
            raise _problem("decays_after goes only with add_score")
        if self.add_score == 0:
            raise _problem("add_score: 0 does nothing")
        return self

    @property
    def key(self) -> str:
        return next(key for key in ACTION_KEYS if getattr(self, key) is not None)


class Rule(_Definition):
    id: str = Field(pattern=DEFINITION_ID)
    description: str | None = Field(default=None, max_length=1000)
    when: Trigger
    if_: list[Condition] = Field(default_factory=list, alias="if", max_length=50)
    once: Once = "per_lead"
    then: list[Action] = Field(min_length=1, max_length=20)
    version: int = Field(default=0, ge=0)  # assigned by the store; a value in a file is ignored

    @model_validator(mode="after")
    def _event_fields_need_event(self) -> Rule:
        """Only an event trigger has an event to read; state and time triggers also fire in the hourly
        pass and on merges, where there is none."""
        if self.when.kind == "event":
            return self
        for i, condition in enumerate(self.if_):
            for path in condition.fields():
                if path.startswith("event."):
                    raise _problem("if[{i}]: {path} needs an event trigger (this rule has a {kind} trigger)",
                                   i=i, path=path, kind=self.when.kind)
        for i, action in enumerate(self.then):
            source = action.set_property.from_ if action.set_property else None
            if source and source.startswith("event."):
                raise _problem("then[{i}].set_property.from: {path} needs an event trigger", i=i, path=source)
        return self

    def content(self) -> dict[str, Any]:
        """The rule as written (aliases, no defaults, no version): what 'changed' is compared on."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"version"})


# ---- records the engine emits (Kafka topics, ClickHouse tables) ----

ChangeKind = Literal["tag_added", "tag_removed", "score_changed", "property_set"]


@dataclass(slots=True, frozen=True)
class LeadChange(JsonRecord):
    """One change to a lead (or, with on='account', to its account's tags) on `leads.changes`.

    name: the tag, the property name, or 'score'. value: the property value as text, the signed score
    delta ('+15'), '' for tags. score: the lead's score after the change (every record carries it, so a
    board can show it without a lookup). change_id is deterministic: replays re-derive it (sinks dedup).
    """

    change_id: str
    site_id: str
    lead_id: str
    kind: ChangeKind
    name: str
    value: str = ""
    score: int = 0
    rule_id: str = ""
    rule_version: int = 0
    event_id: str = ""
    ts_ms: int = 0
    account_domain: str = ""
    on: TagTarget = "lead"


@dataclass(slots=True, frozen=True)
class RuleExecution(JsonRecord):
    """One firing of one rule for one lead (ClickHouse `rule_executions`). execution_id is the firing id.

    trigger: what fired it. depth: 0 when the trigger fired it directly, n when the n-th link of a chain
    (another rule's action made its state trigger true). actions: one line per action, e.g.
    'add_tag Decision', 'add_score +15 -> 40', 'webhook wh_...'. outcome: 'changed' when an action changed
    the lead or requested something, 'no_change' when every action was already in effect."""

    execution_id: str
    site_id: str
    rule_id: str
    rule_version: int
    lead_id: str
    trigger: TriggerKind
    event_id: str = ""
    actions: list[str] = field(default_factory=list)
    outcome: str = "changed"
    ts_ms: int = 0
    depth: int = 0


@dataclass(slots=True, frozen=True)
class WebhookRequest(JsonRecord):
    """A webhook to deliver (Standard Webhooks). webhook_id is stable across retries and replays: the
    `webhook-id` header. The sender reads the signing secret from the environment variable secret_env."""

    webhook_id: str
    site_id: str
    url: str
    secret_env: str
    payload: dict[str, Any]
    rule_id: str = ""
    rule_version: int = 0
    lead_id: str = ""
    ts_ms: int = 0


@dataclass(slots=True, frozen=True)
class CardMoveRequest(JsonRecord):
    """A rule asks the board processor to move the lead's card (account card when the board has account
    cards and the lead has an account). The stage machine decides: automation never moves a card back."""

    request_id: str
    site_id: str
    lead_id: str
    board: str
    stage: str
    rule_id: str
    rule_version: int
    event_id: str = ""
    account_domain: str = ""
    ts_ms: int = 0


@dataclass(slots=True, frozen=True)
class LeadSnapshot(JsonRecord):
    """A lead's current tags, score and properties on `leads.state`, written by the lead processor whenever
    they change (ClickHouse `lead_state`, rows collapsed by version). tags: sorted tag names;
    tag_sources: tag -> provenance JSON; properties: JSON object text."""

    site_id: str
    lead_id: str
    email: str
    account_domain: str
    tags: list[str]
    tag_sources: str
    score: int
    properties: str
    first_ts_ms: int
    last_activity_ms: int
    merged_into: str
    version: int


@dataclass(slots=True, frozen=True)
class LeadHandover(JsonRecord):
    """An anonymous lead's rule state on its way to the known lead it merged into (on `leads.activity`,
    keyed by the survivor): sent once the absorbed lead's own feed is done, so nothing of it is missed."""

    handover_id: str
    site_id: str
    from_lead_id: str
    to_lead_id: str
    state: str  # the absorbed lead's LeadState JSON
    event_id: str
    ts_ms: int
