"""Segments (contract v1): saved filters over leads or accounts, and the records their membership emits.

A segment is `id` + `name` + `of: lead | account` + `if:` (conditions, all must hold). Its conditions are
the rules' condition language (schemas.conditions) with what segments need besides:
- lead and account fields from one registry, FIELDS (adding a field is one line there);
- `{count: {event: pageview, url: "*/pricing*"}, within: 14d, op: gt, value: 1}`: how many of the lead's
  events (`distinct: session`: sessions) matched in the last 14 days, on event time;
- `{in_segment: id}`: membership of another segment of the same kind (no cycles);
- for account segments, aggregates over the account's leads: `{any_lead: [...]}` (some lead meets all the
  conditions), `{every_lead: [...]}` (every lead does, and there is one), and
  `{count: {leads: [...]}, op: gt, value: 2}` (how many do; `leads: []` counts every lead).
Models are strict, and a segment is capped in size (conditions, list lengths, texts, windows, counts)
so that the per-lead state membership keeps (processors.segments) stays small and bounded.
See docs/segments.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

from pydantic import Field, model_validator

from schemas.conditions import (
    EVENT_FILTER_KEYS,
    SEGMENT_ID,
    ConditionBase,
    Definition,
    EventFilters,
    FieldKind,
    check_duration,
    duration_ms,
    given,
    is_number,
    problem,
)
from schemas.records import JsonRecord, digest

MemberKind = Literal["lead", "account"]
DAY_MS = 86_400_000
MAX_WITHIN_DAYS = 366
MAX_COUNT_VALUE = 100  # a count compares with at most this: a lead keeps at most value+1 events per count
MAX_SEGMENT_CONDITIONS = 100  # in one segment, nested ones included
MAX_SEGMENTS = 100  # per site
MAX_COUNTS = 50  # distinct event counts (type + filters) per site: each costs every lead a little state
COUNT_OPS = ("gt", "lt", "between", "is", "is_not")


class FieldSpec(NamedTuple):
    """kind: which ops apply. source: the attribute path the value is read from: `lead.<attr>` of the
    lead's state (processors.rules.LeadState), `segments.<attr>` of its segment state
    (processors.segments.SegmentState), `account.<attr>` of the account. Fields read from the account are
    readable by account segments too; the others only by lead segments (and the lead filters of account
    segments)."""

    kind: FieldKind
    source: str


# The fields segments read, one line each.
FIELDS: dict[str, FieldSpec] = {
    "lead.lead_id": FieldSpec("text", "lead.lead_id"),
    "lead.email": FieldSpec("text", "lead.email"),
    "lead.known": FieldSpec("bool", "lead.known"),
    "lead.email_domain": FieldSpec("text", "lead.email_domain"),
    "lead.score": FieldSpec("number", "lead.score"),
    "lead.tags": FieldSpec("list", "lead.tags"),
    "lead.first_seen": FieldSpec("time", "lead.first_ts_ms"),
    "lead.last_seen": FieldSpec("time", "lead.last_activity_ms"),
    "lead.first_channel": FieldSpec("text", "segments.first_channel"),
    "lead.last_channel": FieldSpec("text", "segments.last_channel"),
    "lead.first_utm_source": FieldSpec("text", "segments.first_utm_source"),
    "lead.last_utm_source": FieldSpec("text", "segments.last_utm_source"),
    "lead.first_utm_campaign": FieldSpec("text", "segments.first_utm_campaign"),
    "lead.last_utm_campaign": FieldSpec("text", "segments.last_utm_campaign"),
    "geo.country": FieldSpec("text", "segments.country"),  # of the lead's latest event that had one
    "account.domain": FieldSpec("text", "account.domain"),
    "account.name": FieldSpec("text", "account.name"),  # the account's company card ('' without one)
    "account.industry": FieldSpec("text", "account.industry"),
    "account.employees": FieldSpec("number", "account.employees"),  # the card's lower bound: 51 for 51-200
    "account.country": FieldSpec("text", "account.country"),
}
PROPERTY_PREFIX = "lead.properties."


def readable_by(path: str) -> tuple[MemberKind, ...]:
    spec = FIELDS.get(path)
    return ("lead", "account") if spec is not None and spec.source.startswith("account.") else ("lead",)


def segment_field_kind(path: str) -> FieldKind:
    if path.startswith(PROPERTY_PREFIX) and len(path) > len(PROPERTY_PREFIX):
        return "any"
    spec = FIELDS.get(path)
    if spec is None:
        raise ValueError(f"unknown field {path!r}; known: {', '.join(FIELDS)}, {PROPERTY_PREFIX}<key>")
    return spec.kind


class CountOf(EventFilters):
    """What a count counts: events (`event:` + the rules' event filters; `distinct: session` counts the
    sessions those events were in), or, in an account segment, `leads:` meeting all the given conditions."""

    distinct: Literal["session"] | None = None
    leads: list[SegmentCondition] | None = Field(default=None, max_length=50)

    @model_validator(mode="after")
    def _events_or_leads(self) -> CountOf:
        keys = given(self)
        if self.leads is not None:
            if keys - {"leads"}:
                raise problem("count leads takes only leads: [conditions]")
        elif self.event is None:
            raise problem("give event: TYPE (or event: any) to count events, or leads: [...] to count leads")
        return self

    def key(self) -> str:
        """The counter's identity: counts with the same events share one per lead (window and threshold
        are the condition's, not the counter's)."""
        text = json.dumps(self.model_dump(mode="json", include={"event", "distinct", *EVENT_FILTER_KEYS},
                                          exclude_none=True), sort_keys=True)
        return "n" + digest(text)[:12]


class SegmentCondition(ConditionBase):
    """A segment's condition: a field test, in_segment, an any/all group, a count, or (account segments)
    an aggregate over the account's leads."""

    SHAPES: ClassVar[dict[str, frozenset[str]]] = {
        **ConditionBase.SHAPES,
        "count": frozenset(("count", "within", "op", "value")),
        "any_lead": frozenset(("any_lead",)),
        "every_lead": frozenset(("every_lead",)),
    }
    NESTED: ClassVar[tuple[str, ...]] = ("any", "all", "any_lead", "every_lead")

    any: list[SegmentCondition] | None = Field(default=None, min_length=1, max_length=50)
    all: list[SegmentCondition] | None = Field(default=None, min_length=1, max_length=50)
    count: CountOf | None = None
    within: str | None = None
    any_lead: list[SegmentCondition] | None = Field(default=None, min_length=1, max_length=50)
    every_lead: list[SegmentCondition] | None = Field(default=None, min_length=1, max_length=50)

    @classmethod
    def field_kind(cls, path: str) -> FieldKind:
        return segment_field_kind(path)

    def children(self) -> list[ConditionBase]:
        counted = self.count.leads if self.count is not None and self.count.leads else []
        return super().children() + list(counted)

    def check_shape(self, shape: str) -> None:
        super().check_shape(shape)
        if shape != "count":
            return
        assert self.count is not None
        check_duration(self.within)
        if self.count.leads is None:
            if self.within is None:
                raise problem("a count of events needs within: a window like 14d (at most {n}d)", n=MAX_WITHIN_DAYS)
            if duration_ms(self.within) > MAX_WITHIN_DAYS * DAY_MS:
                raise problem("within: at most {n}d", n=MAX_WITHIN_DAYS)
        elif self.within is not None:
            raise problem("a count of leads takes no within (it counts the account's leads now)")
        if self.op not in COUNT_OPS:
            raise problem("a count needs op: one of {ops}", ops=", ".join(COUNT_OPS))
        values = self.value if self.op == "between" and isinstance(self.value, list) else [self.value]
        if not (all(isinstance(v, int) and is_number(v) and 0 <= v <= MAX_COUNT_VALUE for v in values)
                and (self.op != "between" or (len(values) == 2 and values[0] <= values[1]))):
            raise problem("a count compares with whole numbers 0..{n}{pair}", n=MAX_COUNT_VALUE,
                          pair=" (between: [low, high])" if self.op == "between" else "")

    def window_ms(self) -> int:
        return duration_ms(self.within) if self.within else 0


CountOf.model_rebuild()


def _walk(conditions: list[SegmentCondition], where: str, context: MemberKind
          ) -> list[tuple[str, SegmentCondition, MemberKind]]:
    """(location, condition, what it reads: a lead or an account) for every condition, nested ones too."""
    found = []
    for index, condition in enumerate(conditions):
        here = f"{where}[{index}]"
        found.append((here, condition, context))
        for key in ("any", "all"):
            found += _walk(getattr(condition, key) or [], f"{here}.{key}", context)
        for key in ("any_lead", "every_lead"):
            found += _walk(getattr(condition, key) or [], f"{here}.{key}", "lead")
        if condition.count is not None and condition.count.leads:
            found += _walk(condition.count.leads, f"{here}.count.leads", "lead")
    return found


class Segment(Definition):
    id: str = Field(pattern=SEGMENT_ID)
    name: str = Field(min_length=1, max_length=128)
    description: str | None = Field(default=None, max_length=1000)
    of: MemberKind = "lead"
    if_: list[SegmentCondition] = Field(default_factory=list, alias="if", max_length=50)
    version: int = Field(default=0, ge=0)  # assigned by the store; a value in a file is ignored

    @model_validator(mode="after")
    def _bounded(self) -> Segment:
        size = len(self.conditions())
        if size > MAX_SEGMENT_CONDITIONS:
            raise problem("{size} conditions; a segment has at most {n}", size=size, n=MAX_SEGMENT_CONDITIONS)
        return self

    def problems(self) -> list[str]:
        """What each condition reads must exist for what it tests: lead fields and event counts on a lead,
        account fields and lead aggregates on an account. One line per misplaced condition."""
        problems = []
        for where, condition, context in self.conditions():
            shape = condition.shape
            if shape == "field" and context not in readable_by(condition.field or ""):
                problems.append(f"{where}: {condition.field} is a lead field; an account segment reads account.* "
                                "fields, and its leads through any_lead, every_lead or count: {leads: [...]}")
            elif shape in ("any_lead", "every_lead") and context == "lead":
                problems.append(f"{where}: {shape} belongs to account segments (of: account)")
            elif shape == "count" and context == "lead" and condition.count.leads is not None:
                problems.append(f"{where}: count leads belongs to account segments (of: account)")
            elif shape == "count" and context == "account" and condition.count.leads is None:
                problems.append(f"{where}: an account segment counts its leads (count: {{leads: [...]}}); "
                                "count events inside a lead filter: any_lead: [{count: ...}]")
        return problems

    def conditions(self) -> list[tuple[str, SegmentCondition, MemberKind]]:
        return _walk(self.if_, "if", self.of)

    def references(self) -> list[tuple[str, str, MemberKind]]:
        """(location, segment id, the kind that segment must be) for every in_segment."""
        return [(where, condition.in_segment, context) for where, condition, context in self.conditions()
                if condition.in_segment is not None]

    def counts(self) -> list[CountOf]:
        """Its event counts (each needs a counter per lead)."""
        return [c.count for _, c, _ in self.conditions() if c.count is not None and c.count.leads is None]

    def content(self) -> dict[str, Any]:
        """The segment as written (aliases, no defaults, no version): what 'changed' is compared on."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"version"})


# ---- records ----

@dataclass(slots=True, frozen=True)
class SegmentChange(JsonRecord):
    """A member entered (`entered`) or left a segment: on `segments.changes` keyed by member, a row of
    ClickHouse `segment_membership`. member_id: the lead id (`of` lead) or the account domain (`of`
    account); account_domain: a lead member's account ('' without one), so boards with account cards know
    the card. cause: `event:<event id>`, `window` (a count's window ran out), `merge:<absorbed lead>`,
    `merged:<surviving lead>`, `identity:<identity event id>`, `hour:<ms>`, `definitions:<version>` or
    `lead:<lead id>` (an account's lead changed). version: the segment's definition version. seq: the
    member's change number in this segment (odd: entered). change_id is deterministic: a replay
    re-derives it."""

    site_id: str
    segment_id: str
    member_id: str
    entered: bool
    ts_ms: int
    cause: str
    version: int
    of: MemberKind
    seq: int
    change_id: str
    account_domain: str = ""


def change_id(site_id: str, segment_id: str, member_id: str, seq: int, ts_ms: int) -> str:
    return "seg_" + digest(site_id, segment_id, member_id, str(seq), str(ts_ms))


@dataclass(slots=True, frozen=True)
class AccountLeadFacts(JsonRecord):
    """What an account's segments need of one of its leads: the lead filters of account segments it meets
    now (`filters`, absolute), or `left`: it is no longer the account's lead. From the lead processor to the
    account processor on `segments.account-leads`, keyed by account_domain; update_id is deterministic (a
    re-sent update is recognised). version: the site definitions version the filters were evaluated with
    (the account processor catches up to it first). refresh: a segment or a board importing one was applied:
    the account's cards hear its memberships again (the import step). replaces: a lead that merged into
    this one, dropped from the account in the same update (its counts move over without a leave and an
    enter in between)."""

    update_id: str
    site_id: str
    account_domain: str
    lead_id: str
    filters: list[str]
    left: bool
    ts_ms: int
    cause: str
    version: int = 0
    refresh: bool = False
    replaces: str = ""


@dataclass(slots=True, frozen=True)
class DefinitionsMark(JsonRecord):
    """A site's definitions are at `version` (or later) from this point of a `leads.activity` partition on:
    the lead processor loads them before it handles what follows. The segment backfill job puts one on every
    partition and waits until the lead processor has passed them all: every event after a mark is counted
    by the new segments' counters, every event before it is in ClickHouse for the history queries."""

    mark_id: str
    site_id: str
    version: int


@dataclass(slots=True, frozen=True)
class SegmentBackfill(JsonRecord):
    """History for counts that a segment edit added, and the order to re-evaluate, for one lead (on
    `leads.activity`, keyed by lead). counters: counter key -> [[ts_ms, event digest], ...], newest first,
    read from ClickHouse `events` (processors.segment_history). version: the site definitions version it
    was computed for; as_of_ms: the newest event time the query covered."""

    backfill_id: str
    site_id: str
    lead_id: str
    version: int
    counters: dict[str, list[list[Any]]]
    as_of_ms: int
