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
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from schemas.boards import DEFINITION_ID
from schemas.conditions import (
    EVENT_FILTER_KEYS,
    MAX_FIELD_CHARS,
    MAX_GROUP_ITEMS,
    MAX_VALUE_CHARS,
    SEGMENT_ID,
    ConditionBase,
    Definition,
    EventFilters,
    FieldKind,
    check_duration,
    given,
    problem,
)
from schemas.events import EnrichedEvent
from schemas.records import JsonRecord, digest

Once = Literal["per_lead", "per_event"]
TriggerKind = Literal["event", "state", "time"]
TagTarget = Literal["lead", "account"]

TAG_PATTERN = r"^[^\x00-\x1f\x7f]{1,128}$"
PROPERTY_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
ENV_NAME = r"^[A-Z_][A-Z0-9_]{0,127}$"
HTTP_URL = r"^https?://[^\s/$.?#][^\s]*$"
PATTERN_MEANINGS = {
    DEFINITION_ID: "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
    SEGMENT_ID: "must be 1-64 lowercase letters, digits or '-'",
    TAG_PATTERN: "must be 1-128 characters, no control characters",
    PROPERTY_NAME: "must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or '_'",
    ENV_NAME: "must be an environment variable name (A-Z, 0-9, _)",
    HTTP_URL: "must be an http:// or https:// URL",
}
MAX_RULE_CONDITIONS = 200  # conditions and groups in one rule's `if`, at every depth

# The fields a rule reads: of the event (its trigger's), of the lead and of the lead's account.
_PY_KINDS: dict[str, FieldKind] = {"str": "text", "int": "number", "bool": "bool"}
EVENT_FIELDS: dict[str, FieldKind] = {
    f.name: _PY_KINDS[str(f.type)] for f in dataclasses.fields(EnrichedEvent) if f.name != "properties"
}
LEAD_FIELDS: dict[str, FieldKind] = {
    "lead_id": "text", "email": "text", "known": "bool", "score": "number", "tags": "list",
    "first_ts_ms": "number", "last_activity_ms": "number",
}
ACCOUNT_FIELDS: dict[str, FieldKind] = {
    "domain": "text",
    "name": "text",  # the company card's (schemas/companies.py); '' without a card
    "industry": "text",
    "employees": "number",  # the lower bound of the card's range: 51 for "51-200"
    "country": "text",
}
GEO_FIELDS: dict[str, FieldKind] = {  # where the event's IP is (processors/networks.py)
    "country": "text",
    "region": "text",
    "city": "text",
}
NETWORK_FIELDS: dict[str, FieldKind] = {  # the network the event's IP is in
    "asn": "number",
    "org": "text",
    "kind": "text",
}
_SCOPES = {"event": EVENT_FIELDS, "lead": LEAD_FIELDS, "account": ACCOUNT_FIELDS, "geo": GEO_FIELDS,
           "network": NETWORK_FIELDS}
EVENT_SCOPES = frozenset(("event", "geo", "network"))
"""Scopes that read the event being processed: in rules, only an event trigger has one."""


def field_kind(path: str) -> FieldKind:
    """The kind of a field path (`event.url`, `lead.properties.plan`, `account.domain`, `geo.country`, ...).
    Raises ValueError naming what is valid."""
    scope, _, rest = path.partition(".")
    if scope not in _SCOPES:
        raise ValueError(f"field {path!r} must start with {', '.join(s + '.' for s in _SCOPES)}")
    if rest.startswith("properties.") and scope in ("event", "lead") and len(rest) > len("properties."):
        return "any"
    kind = _SCOPES[scope].get(rest)
    if kind is None:
        known = ", ".join(f"{scope}.{name}" for name in _SCOPES[scope])
        extra = f", {scope}.properties.<key>" if scope in ("event", "lead") else ""
        raise ValueError(f"unknown field {path!r}; known: {known}{extra}")
    return kind


_STATE_KEYS = ("score_at_least", "tag")


class Trigger(EventFilters):
    """Exactly one kind of trigger: an event (type + optional filters), a state (score threshold and/or
    tag present; fires when it becomes true), or a time (no activity for a period; hourly pass)."""

    score_at_least: int | None = Field(default=None, ge=0, le=100)
    tag: str | None = Field(default=None, pattern=TAG_PATTERN)
    inactive_for: str | None = None

    _duration = field_validator("inactive_for")(check_duration)

    @model_validator(mode="after")
    def _one_kind(self) -> Trigger:
        keys = given(self)
        kinds = [kind for kind, names in (("event", ("event",) + EVENT_FILTER_KEYS), ("state", _STATE_KEYS),
                                          ("time", ("inactive_for",))) if keys & set(names)]
        if not kinds:
            raise problem("empty trigger: give event: TYPE, score_at_least/tag, or inactive_for")
        if len(kinds) > 1:
            raise problem("mixes {kinds} triggers; a rule has one kind of trigger "
                          "(put further requirements under 'if')", kinds=" and ".join(kinds))
        if kinds == ["event"] and self.event is None:
            raise problem("event filters need the event type: add event: TYPE (or event: any)")
        return self

    @property
    def kind(self) -> TriggerKind:
        if self.event is not None:
            return "event"
        return "time" if self.inactive_for is not None else "state"


class Condition(ConditionBase):
    """A rule's condition: `{field, op, value}` over the event, the lead or its account; `{in_segment: id}`
    (the lead is a member of that lead segment); or a group: `{any: [...]}` (one must hold) / `{all: [...]}`
    (all must hold)."""

    any: list[Condition] | None = Field(default=None, min_length=1, max_length=MAX_GROUP_ITEMS)
    all: list[Condition] | None = Field(default=None, min_length=1, max_length=MAX_GROUP_ITEMS)

    @classmethod
    def field_kind(cls, path: str) -> FieldKind:
        return field_kind(path)


class TagAction(Definition):
    tag: str = Field(pattern=TAG_PATTERN)
    on: TagTarget = "lead"


def _tag_shorthand(value: Any) -> Any:
    """`add_tag: X` is short for `add_tag: {tag: X}`."""
    return {"tag": value} if isinstance(value, str) else value


class SetProperty(Definition):
    """A fixed `value`, or `from` a field (skipped when that field has no value)."""

    name: str = Field(pattern=PROPERTY_NAME)
    value: str | int | float | bool | None = None
    from_: str | None = Field(default=None, alias="from", max_length=MAX_FIELD_CHARS)

    @field_validator("value")
    @classmethod
    def _short_text(cls, value: str | int | float | bool | None) -> str | int | float | bool | None:
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            raise problem("a text value has at most {n} characters", n=MAX_VALUE_CHARS)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> SetProperty:
        if (self.value is None) == (self.from_ is None):
            raise problem("give exactly one of value or from")
        if self.from_ is not None:
            try:
                field_kind(self.from_)
            except ValueError as error:
                raise problem("from: {error}", error=str(error)) from None
        return self


class MoveCard(Definition):
    board: str = Field(pattern=DEFINITION_ID)
    stage: str = Field(pattern=DEFINITION_ID)


RESERVED_ENV_PREFIX = "LEADSTREAM_"
WEBHOOK_SECRET_PREFIX = "LEADSTREAM_WEBHOOK_SECRET_"
_SECRET_NAME = re.compile(r"[A-Z0-9]+(?:_[A-Z0-9]+)*")
_NOT_NAME_CHARACTERS = re.compile(r"[^A-Z0-9]+")


def site_secret_token(site_id: str) -> str:
    """The site's part of its webhook-secret variable names: the id upper-cased, every run of characters other
    than A-Z and 0-9 replaced by one '_', none at either end (`acme-eu.com` -> `ACME_EU_COM`). It never holds
    '__', which is what separates it from the secret's own name."""
    return _NOT_NAME_CHARACTERS.sub("_", site_id.upper()).strip("_")


def webhook_secret_name(site_id: str, name: str) -> str:
    """`LEADSTREAM_WEBHOOK_SECRET_<SITE>__<NAME>`: the only variables a site's webhooks may sign with. The
    double underscore keeps sites apart: `ACME__EU_CRM` (site acme) is never `ACME_EU__CRM` (site acme-eu)."""
    return f"{WEBHOOK_SECRET_PREFIX}{site_secret_token(site_id)}__{name}"


def webhook_secret_variable(site_id: str, secret_env: str) -> str:
    """The variable a site's webhook is signed with. A rule names its secret (`secret_env: CRM_WEBHOOK_SECRET`,
    as in the v1 contract) and the site's own variable holds it: `LEADSTREAM_WEBHOOK_SECRET_<SITE>__<NAME>`.
    A rule may also give that full name. No other variable is ever read, so one site's rule can never sign
    with another site's secret or with one of LeadStream's own settings (passwords among them)."""
    if secret_env.startswith(WEBHOOK_SECRET_PREFIX):
        return secret_env
    return webhook_secret_name(site_id, _NOT_NAME_CHARACTERS.sub("_", secret_env.upper()).strip("_") or "SECRET")


def webhook_secret_problem(site_id: str, secret_env: str) -> str | None:
    """Why a rule of `site_id` may not name `secret_env`; None when it may. Checked when a rule is stored and
    again before every delivery."""
    token = site_secret_token(site_id)
    if not token:
        return f"site {site_id!r} has no letter or digit to name its webhook secrets after"
    own = webhook_secret_name(site_id, "")
    if secret_env.startswith(own) and _SECRET_NAME.fullmatch(secret_env[len(own):]):
        return None
    if secret_env.startswith(WEBHOOK_SECRET_PREFIX):
        return f"{secret_env} is not a webhook secret of site {site_id}: its secrets are named {own}<NAME>"
    if secret_env.startswith(RESERVED_ENV_PREFIX):
        return f"{secret_env} is one of LeadStream's own settings; site {site_id}'s webhook secrets are named {own}<NAME>"
    return None


class Webhook(Definition):
    """Where to post and which variable holds the signing secret. Whether the site may use that variable and
    that address is checked when the rule is stored for a site (processors.webhooks.definition_problems)."""

    url: str = Field(pattern=HTTP_URL, max_length=2048)
    secret_env: str = Field(pattern=ENV_NAME)

    @field_validator("secret_env")
    @classmethod
    def _not_a_setting(cls, value: str) -> str:
        """A site-independent first check: of LeadStream's own variables only the webhook secrets qualify."""
        if value.startswith(RESERVED_ENV_PREFIX) and not (
                value.startswith(WEBHOOK_SECRET_PREFIX) and "__" in value[len(WEBHOOK_SECRET_PREFIX):]):
            raise ValueError(f"must not name one of LeadStream's own settings ({RESERVED_ENV_PREFIX}*); webhook "
                             f"secrets are named {WEBHOOK_SECRET_PREFIX}<SITE>__<NAME>")
        return value


ACTION_KEYS = ("add_tag", "remove_tag", "add_score", "set_property", "move_card", "webhook", "assign_owner")


class Action(Definition):
    """One key per action. `decays_after` goes beside `add_score`: those points are taken back by the
    hourly pass once the period has passed (behaviour that ages out)."""

    add_tag: TagAction | None = None
    remove_tag: TagAction | None = None
    add_score: int | None = Field(default=None, ge=-100, le=100)
    decays_after: str | None = None
    set_property: SetProperty | None = None
    move_card: MoveCard | None = None
    webhook: Webhook | None = None
    assign_owner: str | None = Field(default=None, pattern=DEFINITION_ID)  # an owner id of the site

    _tags = field_validator("add_tag", "remove_tag", mode="before")(_tag_shorthand)
    _duration = field_validator("decays_after")(check_duration)

    @model_validator(mode="after")
    def _exactly_one(self) -> Action:
        given = [key for key in ACTION_KEYS if getattr(self, key) is not None]
        if len(given) != 1:
            raise problem("an action has exactly one of: {keys}", keys=", ".join(ACTION_KEYS))
        if self.decays_after is not None and self.add_score is None:
            raise problem("decays_after goes only with add_score")
        if self.add_score == 0:
            raise problem("add_score: 0 does nothing")
        return self

    @property
    def key(self) -> str:
        return next(key for key in ACTION_KEYS if getattr(self, key) is not None)


class Rule(Definition):
    id: str = Field(pattern=DEFINITION_ID)
    description: str | None = Field(default=None, max_length=1000)
    when: Trigger
    if_: list[Condition] = Field(default_factory=list, alias="if", max_length=MAX_GROUP_ITEMS)
    once: Once = "per_lead"
    then: list[Action] = Field(min_length=1, max_length=20)
    version: int = Field(default=0, ge=0)  # assigned by the store; a value in a file is ignored

    @model_validator(mode="after")
    def _bounded(self) -> Rule:
        if sum(condition.size() for condition in self.if_) > MAX_RULE_CONDITIONS:
            raise problem("if: at most {n} conditions in all, groups and nested ones included",
                          n=MAX_RULE_CONDITIONS)
        return self

    @model_validator(mode="after")
    def _event_fields_need_event(self) -> Rule:
        """Only an event trigger has an event to read; state and time triggers also fire in the hourly
        pass and on merges, where there is none."""
        if self.when.kind == "event":
            return self
        for i, condition in enumerate(self.if_):
            for path in condition.fields():
                if path.partition(".")[0] in EVENT_SCOPES:
                    raise problem("if[{i}]: {path} needs an event trigger (this rule has a {kind} trigger)",
                                  i=i, path=path, kind=self.when.kind)
        for i, action in enumerate(self.then):
            source = action.set_property.from_ if action.set_property else None
            if source and source.partition(".")[0] in EVENT_SCOPES:
                raise problem("then[{i}].set_property.from: {path} needs an event trigger", i=i, path=source)
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
    actor: str = ""  # who made a change by hand ("user:<key id>"); '' for rules and the system


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
    event_type: str = "rule.fired"  # or "stage.changed" (a board's on_stage_change)
    board_id: str = ""  # the board of a stage.changed webhook


WebhookOutcome = Literal["delivered", "retrying", "failed", "circuit_open"]


@dataclass(slots=True, frozen=True)
class WebhookDelivery(JsonRecord):
    """One row of the delivery log (topic `webhooks.deliveries` -> ClickHouse `webhook_deliveries`): an
    attempt, or a deferral while the endpoint's circuit breaker was open (outcome circuit_open, no request
    sent, attempt = the one deferred). (site_id, webhook_id, attempt, ts_ms) identifies it: a row sent twice
    is the same row, and the table collapses the two."""

    webhook_id: str
    site_id: str
    rule_id: str
    url: str
    attempt: int
    status_code: int  # 0: no HTTP response
    outcome: WebhookOutcome
    error: str
    duration_ms: int
    ts_ms: int  # when the attempt started
    next_attempt_ms: int = 0  # with retrying / circuit_open: when it will be tried again
    board_id: str = ""  # a board's stage.changed webhook ('' for a rule's)


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
class CardOwnerRequest(JsonRecord):
    """A rule's assign_owner: the lead's cards (its lead card and, with an account, its account card) get
    `owner` on every board they are on."""

    request_id: str
    site_id: str
    lead_id: str
    owner: str
    rule_id: str
    rule_version: int
    event_id: str = ""
    account_domain: str = ""
    ts_ms: int = 0


@dataclass(slots=True, frozen=True)
class TagByHand(JsonRecord):
    """A person added (present) or removed a tag of a lead through the API, on `leads.activity` keyed by the
    lead: the lead processor applies it like any change (rules, score, segments and boards react).
    `command_id` derives from the request's Idempotency-Key, so a retried request acts once; `actor` is
    "user:<key id>"."""

    command_id: str
    site_id: str
    lead_id: str
    tag: str
    present: bool
    actor: str
    ts_ms: int = 0


@dataclass(slots=True, frozen=True)
class LeadSnapshot(JsonRecord):
    """A lead's current tags, score and properties on `leads.state`, written by the lead processor whenever
    they change (ClickHouse `lead_state`, rows collapsed by version). tags: sorted tag names;
    tag_sources: tag -> provenance JSON; properties: JSON object text; segments: the lead segments it is a
    member of now, sorted (a segment's members by score or last seen are one read of `lead_state`)."""

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
    segments: list[str] = field(default_factory=list)


def handover_id(identity_event_id: str) -> str:
    """The id of the hand-over a merge (its `lead_merged` identity event) causes."""
    return "ho_" + digest(identity_event_id)


@dataclass(slots=True, frozen=True)
class MergeNotice(JsonRecord):
    """On the survivor's feed (`leads.activity`, keyed by the survivor), written by the raw processor with the
    merge and ahead of every record of the survivor that follows it: the absorbed lead's hand-over
    (`handover_id`) is on its way, one hop behind. The survivor holds its records until it arrives, so that
    what follows a merge always sees the absorbed lead's firings, however the partitions interleave.
    `received_ms`: when the raw processor received the merging event, where the hold's time starts (0 in
    notices written before it was recorded: the event's own time then)."""

    notice_id: str
    site_id: str
    lead_id: str  # the survivor
    from_lead_id: str
    handover_id: str
    ts_ms: int
    received_ms: int = 0


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
