"""Workflow automation: the pure rule engine. Plain Python over an explicit per-lead state; no I/O.

Every entry point takes a `LeadState`, returns an `Outcome` (the new state + the records to emit) and never
mutates its input, so the adapter can store the new state atomically with its offsets, and a replay from
the old state re-derives byte-identical records. Events are applied one at a time, in order: results do
not depend on how the caller batches them.

Firing once (DESIGN "Rules fire once"):
- per_lead rules fire at most once per lead, ever (`LeadState.fired`); per_event rules once per occurrence:
  per event (event triggers), per false->true transition (state triggers), per quiet spell (time triggers).
- State triggers fire on a false->true transition of (trigger and conditions); `LeadState.active` keeps
  which were true after the last pass. Actions may make other state triggers true: those chained rules run
  in the same pass (each rule at most once per pass, at most MAX_CHAIN_DEPTH links), so chains end.
- Firing ids are deterministic: hash(site, rule id, lead id, cause), where the cause is 'lead' for per_lead
  rules (one firing per lead whatever caused it) and otherwise the event id, the quiet spell (last activity
  time), the hour of the hourly pass, the merged lead, or the identity change. Record ids derive from it.
- A lead remembers digests of its last SEEN_EVENTS event ids: a re-delivered event changes nothing.
- Bot events never reach rules. The hourly pass works on hour boundaries: two passes in the same hour are
  one pass, and a pass never re-fires what already fired.
"""

from __future__ import annotations

import json
from bisect import insort
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from operator import attrgetter
from typing import Any, Literal, Self

from processors.conditions import Test, all_of, exact_matcher, field_test, has_value, url_matcher
from processors.segments import SegmentState
from schemas.companies import NO_COMPANIES, Company, CompanyCards
from schemas.conditions import duration_ms
from schemas.events import EVENT_TYPES, EnrichedEvent
from schemas.records import JsonRecord, digest, event_digest
from schemas.rules import (
    Action,
    CardMoveRequest,
    CardOwnerRequest,
    ChangeKind,
    Condition,
    LeadChange,
    Rule,
    RuleExecution,
    TriggerKind,
    WebhookRequest,
)

HOUR_MS = 3_600_000
MAX_CHAIN_DEPTH = 8
SEEN_EVENTS = 32
SCORE_MIN, SCORE_MAX = 0, 100
Scalar = str | int | float | bool

TagOrigin = Literal["rule", "user", "merge"]


@dataclass(slots=True, frozen=True)
class TagSource(JsonRecord):
    """Why a lead has a tag: the rule (and version, and causing event) or person that set it; 'merge' when
    it came over from a merged anonymous lead (rule/event fields then name its original cause)."""

    source: TagOrigin
    rule_id: str = ""
    rule_version: int = 0
    event_id: str = ""
    ts_ms: int = 0


@dataclass(slots=True)
class LeadState(JsonRecord):
    """What the rule engine keeps per lead (one small JSON blob in Redis).

    decaying: [expires_ms, points actually added, rule_id] per add_score with decays_after, by expiry.
    fired: per_lead rule ids that have fired. active: state-trigger rule ids true after the last pass.
    seen: digests of the last SEEN_EVENTS event ids, oldest first. checked_ms: the hour boundary the
    hourly pass has reached. merged_into / merged_from: the merge tombstone and the leads absorbed.
    segments: what segment membership needs (processors.segments), on a site with segments; the rule
    engine only reads it (in_segment), the segment core replaces it whole.
    awaiting / awaiting_until_ms / held: the lead processor's, not the rule engine's: the absorbed leads of
    merges this lead has been told of (`MergeNotice`) whose hand-overs it has not yet taken (hand-over ids in
    states written before), the stream time it stops waiting
    for them, and the records it holds meanwhile ([record type, JSON]); raw_marks: per raw partition, the
    highest raw offset of the events the lead had straight from the raw processor (a second delivery is
    at or below it, however long ago the first was).
    """

    lead_id: str
    site_id: str
    email: str = ""
    account_domain: str = ""
    tags: dict[str, TagSource] = field(default_factory=dict)
    score: int = 0
    decaying: list[list[Any]] = field(default_factory=list)
    properties: dict[str, Scalar] = field(default_factory=dict)
    fired: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    first_ts_ms: int = 0
    last_activity_ms: int = 0
    checked_ms: int = 0
    merged_into: str = ""
    merged_from: list[str] = field(default_factory=list)
    segments: SegmentState | None = None
    awaiting: list[str] = field(default_factory=list)
    awaiting_until_ms: int = 0
    held: list[list[str]] = field(default_factory=list)
    raw_marks: dict[str, int] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return bool(self.email)

    @property
    def email_domain(self) -> str:
        return self.email.rpartition("@")[2]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        tags = {tag: TagSource.from_dict(source) for tag, source in raw.get("tags", {}).items()}
        segments = raw.get("segments")
        return super(LeadState, cls).from_dict({  # explicit: slots classes are rebuilt
            **raw, "tags": tags, "segments": SegmentState.from_dict(segments) if segments else None})

    def copy(self) -> LeadState:
        """Independent containers (their items are immutable or replaced whole, never changed in place)."""
        return LeadState(
            self.lead_id, self.site_id, self.email, self.account_domain, dict(self.tags), self.score,
            list(self.decaying), dict(self.properties), list(self.fired), list(self.active), list(self.seen),
            self.first_ts_ms, self.last_activity_ms, self.checked_ms, self.merged_into, list(self.merged_from),
            self.segments, list(self.awaiting), self.awaiting_until_ms, list(self.held), dict(self.raw_marks),
        )


@dataclass(slots=True)
class Outcome:
    """The new state and everything to emit. `retired` is the absorbed lead's tombstone (merge only)."""

    state: LeadState
    changes: list[LeadChange] = field(default_factory=list)
    executions: list[RuleExecution] = field(default_factory=list)
    webhooks: list[WebhookRequest] = field(default_factory=list)
    card_moves: list[CardMoveRequest] = field(default_factory=list)
    card_owners: list[CardOwnerRequest] = field(default_factory=list)
    retired: LeadState | None = None


def firing_id(site_id: str, rule_id: str, lead_id: str, cause: tuple[str, ...]) -> str:
    return "fire_" + digest(site_id, rule_id, lead_id, *cause)


PER_LEAD_CAUSE = ("lead",)


# ---- reading fields and testing conditions ----

class _Scope:
    """What conditions read: the lead's state, its account's company card and, for event triggers, the
    event (properties parsed once)."""

    __slots__ = ("state", "event", "companies", "_event_properties")

    def __init__(self, state: LeadState, event: EnrichedEvent | None, companies: CompanyCards) -> None:
        self.state = state
        self.event = event
        self.companies = companies
        self._event_properties: dict[str, Any] | None = None

    def company(self) -> Company | None:
        """The card of the lead's account as it is now (an action or an identity change may set it)."""
        domain = self.state.account_domain
        return self.companies.get(domain) if domain else None

    def event_properties(self) -> dict[str, Any]:
        if self._event_properties is None:
            text = self.event.properties if self.event is not None else ""
            self._event_properties = json.loads(text) if text else {}
        return self._event_properties


Getter = Callable[[_Scope], Any]
_LEAD_GETTERS: dict[str, Getter] = {
    "lead_id": lambda s: s.state.lead_id,
    "email": lambda s: s.state.email,
    "known": lambda s: s.state.known,
    "score": lambda s: s.state.score,
    "tags": lambda s: list(s.state.tags),
    "first_ts_ms": lambda s: s.state.first_ts_ms or None,
    "last_activity_ms": lambda s: s.state.last_activity_ms or None,
}


def _card_getter(read: Callable[[Company], Any]) -> Getter:
    """A company card's field; no value (None) when the account has no card or the card leaves it empty."""
    def get(s: _Scope) -> Any:
        card = s.company()
        return (read(card) or None) if card is not None else None
    return get


_ACCOUNT_GETTERS: dict[str, Getter] = {
    "domain": lambda s: s.state.account_domain,
    "name": _card_getter(attrgetter("name")),
    "industry": _card_getter(attrgetter("industry")),
    "employees": _card_getter(attrgetter("employees_min")),
    "country": _card_getter(attrgetter("country")),
}
_EVENT_FIELD_PREFIXES = {"geo": "geo_", "network": "network_"}
"""`geo.country` is the event's `geo_country`, `network.org` its `network_org`, ..."""


def _getter(path: str) -> Getter:
    """A field path (validated by schemas.rules.field_kind) as a function of the scope."""
    scope, _, rest = path.partition(".")
    if rest.startswith("properties."):
        key = rest[len("properties."):]
        if scope == "event":
            return lambda s: s.event_properties().get(key)
        return lambda s: s.state.properties.get(key)
    if scope == "event":
        read = attrgetter(rest)
        return lambda s: read(s.event)
    if scope in _EVENT_FIELD_PREFIXES:  # 0 (an unknown AS number) and "" are no value
        read = attrgetter(_EVENT_FIELD_PREFIXES[scope] + rest)
        return lambda s: read(s.event) or None
    if scope == "account":
        return _ACCOUNT_GETTERS[rest]
    return _LEAD_GETTERS[rest]


def _leaf(condition: Condition) -> Test:
    """A field test, or in_segment: the lead is a member of that segment as of its last evaluation."""
    if condition.in_segment is not None:
        segment = condition.in_segment
        return lambda s: s.state.segments is not None and s.state.segments.is_member(segment)
    return field_test(_getter(condition.field or ""), condition.op or "", condition.value)


def _all_of(conditions: Iterable[Condition]) -> Test:
    return all_of(conditions, _leaf)


# ---- compiled rules and actions ----

class _Run:
    """One pass over one lead: the state being changed and the records collected so far."""

    __slots__ = ("ruleset", "state", "event", "event_id", "ts_ms", "scope", "out", "fired_now")

    def __init__(self, ruleset: RuleSet, state: LeadState, event: EnrichedEvent | None, event_id: str,
                 ts_ms: int, companies: CompanyCards) -> None:
        self.ruleset = ruleset
        self.state = state
        self.event = event
        self.event_id = event_id
        self.ts_ms = ts_ms
        self.scope = _Scope(state, event, companies)
        self.out = Outcome(state)
        self.fired_now: set[str] = set()

    def change(self, change_id: str, kind: ChangeKind, name: str, value: str = "", rule: _Compiled | None = None,
               on: Literal["lead", "account"] = "lead", actor: str = "") -> None:
        state = self.state
        self.out.changes.append(LeadChange(
            change_id, state.site_id, state.lead_id, kind, name, value, state.score,
            rule.rule_id if rule else "", rule.version if rule else 0, self.event_id, self.ts_ms,
            state.account_domain, on, actor))

    def add_points(self, points: int) -> int:
        """Adds (clamped to 0..100) and returns the points actually added."""
        before = self.state.score
        self.state.score = min(SCORE_MAX, max(SCORE_MIN, before + points))
        return self.state.score - before


@dataclass(slots=True, frozen=True)
class _Firing:
    rule: _Compiled
    firing_id: str


# An action runs against the pass and returns (a line for the execution record, whether it did anything).
ActionFn = Callable[[_Run, _Firing, int], tuple[str, bool]]


def _tag_action(tag: str, on: str, add: bool) -> ActionFn:
    verb = "add_tag" if add else "remove_tag"
    kind: ChangeKind = "tag_added" if add else "tag_removed"
    label = f"{verb} {tag}" + (" on account" if on == "account" else "")

    def run(r: _Run, f: _Firing, index: int) -> tuple[str, bool]:
        change_id = "chg_" + digest(f.firing_id, str(index))
        if on == "account":
            if not r.state.account_domain:
                return f"{label} (lead has no account)", False
            r.change(change_id, kind, tag, rule=f.rule, on="account")
            return label, True
        tags = r.state.tags
        if (tag in tags) == add:
            return f"{label} (already {'set' if add else 'absent'})", False
        if add:
            tags[tag] = TagSource("rule", f.rule.rule_id, f.rule.version, r.event_id, r.ts_ms)
        else:
            del tags[tag]
        r.change(change_id, kind, tag, rule=f.rule)
        return label, True
    return run


def _score_action(points: int, decays_ms: int | None) -> ActionFn:
    def run(r: _Run, f: _Firing, index: int) -> tuple[str, bool]:
        added = r.add_points(points)
        if not added:
            return f"add_score {points:+d} (score stays {r.state.score})", False
        if decays_ms is not None:
            insort(r.state.decaying, [r.ts_ms + decays_ms, added, f.rule.rule_id])
        r.change("chg_" + digest(f.firing_id, str(index)), "score_changed", "score", f"{added:+d}", f.rule)
        return f"add_score {points:+d} -> {r.state.score}", True
    return run


def _property_text(value: Scalar) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _property_action(name: str, fixed: Scalar | None, source: str | None) -> ActionFn:
    read = _getter(source) if source else None

    def run(r: _Run, f: _Firing, index: int) -> tuple[str, bool]:
        value = read(r.scope) if read is not None else fixed
        if isinstance(value, list):
            value = ",".join(map(str, value))
        if not has_value(value):
            return f"set_property {name} (no value in {source})", False
        current = r.state.properties.get(name)
        if current == value and type(current) is type(value):
            return f"set_property {name} (unchanged)", False
        r.state.properties[name] = value
        r.change("chg_" + digest(f.firing_id, str(index)), "property_set", name, _property_text(value), f.rule)
        return f"set_property {name}={_property_text(value)}", True
    return run


def _move_action(board: str, stage: str) -> ActionFn:
    def run(r: _Run, f: _Firing, index: int) -> tuple[str, bool]:
        state, rule = r.state, f.rule
        r.out.card_moves.append(CardMoveRequest(
            "mv_" + digest(f.firing_id, str(index)), state.site_id, state.lead_id, board, stage, rule.rule_id,
            rule.version, r.event_id, state.account_domain, r.ts_ms))
        return f"move_card {board}/{stage}", True
    return run


def _owner_action(owner: str) -> ActionFn:
    def run(r: _Run, f: _Firing, index: int) -> tuple[str, bool]:
        state, rule = r.state, f.rule
        r.out.card_owners.append(CardOwnerRequest(
            "ow_" + digest(f.firing_id, str(index)), state.site_id, state.lead_id, owner, rule.rule_id,
            rule.version, r.event_id, state.account_domain, r.ts_ms))
        return f"assign_owner {owner}", True
    return run


def _iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def _webhook_action(url: str, secret_env: str) -> ActionFn:
    def run(r: _Run, f: _Firing, index: int) -> tuple[str, bool]:
        state, rule = r.state, f.rule
        webhook_id = "wh_" + digest(f.firing_id, str(index))
        payload = {
            "type": "lead.rule_fired",
            "timestamp": _iso(r.ts_ms),
            "data": {
                "site_id": state.site_id, "rule_id": rule.rule_id, "rule_version": rule.version,
                "execution_id": f.firing_id, "event_id": r.event_id,
                "lead": {"lead_id": state.lead_id, "email": state.email, "account_domain": state.account_domain,
                         "score": state.score, "tags": sorted(state.tags), "properties": dict(state.properties)},
            },
        }
        r.out.webhooks.append(WebhookRequest(webhook_id, state.site_id, url, secret_env, payload, rule.rule_id,
                                             rule.version, state.lead_id, r.ts_ms))
        return f"webhook {webhook_id}", True
    return run


def _compile_action(action: Action) -> ActionFn:
    if action.add_tag is not None:
        return _tag_action(action.add_tag.tag, action.add_tag.on, add=True)
    if action.remove_tag is not None:
        return _tag_action(action.remove_tag.tag, action.remove_tag.on, add=False)
    if action.add_score is not None:
        return _score_action(action.add_score, duration_ms(action.decays_after) if action.decays_after else None)
    if action.set_property is not None:
        prop = action.set_property
        return _property_action(prop.name, prop.value, prop.from_)
    if action.move_card is not None:
        return _move_action(action.move_card.board, action.move_card.stage)
    if action.assign_owner is not None:
        return _owner_action(action.assign_owner)
    assert action.webhook is not None
    return _webhook_action(action.webhook.url, action.webhook.secret_env)


@dataclass(slots=True, frozen=True)
class _Compiled:
    rule_id: str
    version: int
    kind: TriggerKind
    per_lead: bool
    holds: Test  # the conditions; for state triggers also the trigger itself
    actions: tuple[ActionFn, ...]
    matches_url: Callable[[str], bool] | None = None
    matches_fields: Callable[[EnrichedEvent], bool] | None = None
    quiet_ms: int = 0
    permanent_points: int = 0  # points its non-decaying add_score actions add (merges de-duplicate them)


def _compile(rule: Rule) -> _Compiled:
    when, conditions = rule.when, _all_of(rule.if_)
    holds = conditions
    if when.kind == "state":
        threshold, tag = when.score_at_least, when.tag

        def holds(s: _Scope) -> bool:
            state = s.state
            return ((threshold is None or state.score >= threshold) and (tag is None or tag in state.tags)
                    and conditions(s))
    return _Compiled(
        rule.id, rule.version, when.kind, rule.once == "per_lead", holds,
        tuple(map(_compile_action, rule.then)),
        url_matcher(when.url) if when.kind == "event" else None,
        exact_matcher(when) if when.kind == "event" else None,
        duration_ms(when.inactive_for) if when.inactive_for else 0,
        sum(a.add_score for a in rule.then if a.add_score is not None and a.decays_after is None),
    )


URL_CACHE_SIZE = 4096


@dataclass(slots=True, frozen=True)
class RuleSet:
    """A site's rules compiled once (URL globs, conditions, actions). Rules run in id order.

    `by_page` caches, per (event type, URL), the event rules whose URL glob matches: a site's pages repeat,
    and matching each pageview against every glob was the largest single cost of the lead processor."""

    version: int
    by_event_type: dict[str, tuple[_Compiled, ...]]
    state_rules: tuple[_Compiled, ...]
    time_rules: tuple[_Compiled, ...]
    permanent_points: dict[str, int]
    state_reads_segments: bool = False  # some state rule's conditions name a segment (see `settle`)
    by_page: dict[tuple[str, str], tuple[_Compiled, ...]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def compile(cls, rules: Iterable[Rule], version: int = 0) -> RuleSet:
        """`version` is the site's definitions version the rules were loaded at; each rule keeps its own."""
        ordered = sorted(rules, key=attrgetter("id"))
        compiled = [(rule.when.event, _compile(rule)) for rule in ordered]
        by_type = {t: tuple(c for event, c in compiled if c.kind == "event" and event in (t, "any"))
                   for t in EVENT_TYPES}
        return cls(version, by_type, tuple(c for _, c in compiled if c.kind == "state"),
                   tuple(c for _, c in compiled if c.kind == "time"),
                   {c.rule_id: c.permanent_points for _, c in compiled},
                   any(rule.when.kind == "state" and any(c.segments() for c in rule.if_) for rule in ordered))

    def event_rules(self, event: EnrichedEvent) -> tuple[_Compiled, ...]:
        """The event rules of the event's type whose URL glob matches its URL, in id order."""
        key = (event.type, event.url)
        rules = self.by_page.get(key)
        if rules is None:
            if len(self.by_page) >= URL_CACHE_SIZE:  # bounded: unique URLs (query strings) must not grow it
                self.by_page.clear()
            rules = self.by_page[key] = tuple(rule for rule in self.by_event_type.get(event.type, ())
                                              if rule.matches_url(event.url))  # type: ignore[misc]
        return rules


# ---- firing ----

def _fire(run: _Run, rule: _Compiled, trigger: TriggerKind, depth: int, cause: tuple[str, ...]) -> None:
    state = run.state
    firing = _Firing(rule, firing_id(state.site_id, rule.rule_id, state.lead_id,
                                     PER_LEAD_CAUSE if rule.per_lead else cause))
    if rule.per_lead:
        insort(state.fired, rule.rule_id)
    run.fired_now.add(rule.rule_id)
    lines, changed = [], False
    for index, action in enumerate(rule.actions):
        line, did = action(run, firing, index)
        lines.append(line)
        changed = changed or did
    run.out.executions.append(RuleExecution(
        firing.firing_id, state.site_id, rule.rule_id, rule.version, state.lead_id, trigger, run.event_id,
        lines, "changed" if changed else "no_change", run.ts_ms, depth))


def _settle(run: _Run, cause: tuple[str, ...]) -> None:
    """Fires the state rules that became true, then those their actions made true, and so on: each rule at
    most once per pass, at most MAX_CHAIN_DEPTH links. A rule made true by the last link is left inactive,
    so it fires on the lead's next pass instead of being lost."""
    state, scope = run.state, run.scope
    for depth in range(1, MAX_CHAIN_DEPTH + 1):
        true_now = [rule for rule in run.ruleset.state_rules if rule.holds(scope)]
        was_active = set(state.active)
        state.active = [rule.rule_id for rule in true_now]
        rising = [rule for rule in true_now if rule.rule_id not in was_active and rule.rule_id not in run.fired_now
                  and not (rule.per_lead and rule.rule_id in state.fired)]
        if not rising:
            return
        for rule in rising:
            _fire(run, rule, "state", depth, cause)


def _passthrough(state: LeadState) -> Outcome:
    return Outcome(state)


def settle(ruleset: RuleSet, state: LeadState, ts_ms: int, cause: str, companies: CompanyCards = NO_COMPANIES
           ) -> Outcome:
    """The lead's segment memberships changed (`state.segments` is new; `cause` says why, as the segment
    change does): state rules that name a segment in their conditions may have become true. Fires them (and
    their chains) as any pass does; without such rules, or when none became true, nothing changes."""
    if state.merged_into or not ruleset.state_reads_segments:
        return _passthrough(state)
    new = state.copy()
    run = _Run(ruleset, new, None, "", ts_ms, companies)
    _settle(run, ("segments", cause))
    return run.out


def apply_event(ruleset: RuleSet, state: LeadState, event: EnrichedEvent, companies: CompanyCards = NO_COMPANIES
                ) -> Outcome:
    """One (non-bot) event of this lead: event triggers, then state triggers it made true. `companies`
    are the cards `account.*` conditions read (here and in every entry point below)."""
    if event.is_bot or state.merged_into:
        return _passthrough(state)
    seen = event_digest(event.event_id)
    if seen in state.seen:
        return _passthrough(state)
    new = state.copy()
    new.seen.append(seen)
    del new.seen[:-SEEN_EVENTS]
    new.first_ts_ms = min(new.first_ts_ms, event.ts_ms) if new.first_ts_ms else event.ts_ms
    new.last_activity_ms = max(new.last_activity_ms, event.ts_ms)
    run = _Run(ruleset, new, event, event.event_id, event.ts_ms, companies)
    cause = ("event", event.event_id)
    for rule in ruleset.event_rules(event):
        if rule.per_lead and rule.rule_id in new.fired:
            continue
        if (rule.matches_fields is None or rule.matches_fields(event)) and rule.holds(run.scope):
            _fire(run, rule, "event", 0, cause)
    _settle(run, cause)
    return run.out


def hour_start(ts_ms: int) -> int:
    return ts_ms - ts_ms % HOUR_MS


def hourly_pass(ruleset: RuleSet, state: LeadState, now_ms: int, companies: CompanyCards = NO_COMPANIES) -> Outcome:
    """Takes back decayed points, fires time triggers that came due, then state triggers. Works at the
    start of now's hour: every pass within one hour gives the same result, and the first one does it all."""
    hour = hour_start(now_ms)
    if state.merged_into or hour <= state.checked_ms:
        return _passthrough(state)
    new = state.copy()
    run = _Run(ruleset, new, None, "", hour, companies)
    expired = [grant for grant in new.decaying if grant[0] <= hour]
    if expired:
        del new.decaying[:len(expired)]
        taken = run.add_points(-sum(grant[1] for grant in expired))
        if taken:
            run.change("chg_" + digest(new.site_id, new.lead_id, "decay", *(f"{e}/{p}/{r}" for e, p, r in expired)),
                       "score_changed", "score", f"{taken:+d}")
    if new.last_activity_ms:
        spell = ("quiet", str(new.last_activity_ms))
        for rule in ruleset.time_rules:
            due = new.last_activity_ms + rule.quiet_ms
            if new.checked_ms < due <= hour and not (rule.per_lead and rule.rule_id in new.fired) \
                    and rule.holds(run.scope):
                _fire(run, rule, "time", 0, spell)
    _settle(run, ("hour", str(hour)))
    new.checked_ms = hour
    return run.out


def _hour_ceiling(ts_ms: int) -> int:
    return -(-ts_ms // HOUR_MS) * HOUR_MS


def next_due_ms(ruleset: RuleSet, state: LeadState) -> int | None:
    """When this lead next needs the hourly pass (an hour boundary), or None if nothing is pending."""
    if state.merged_into:
        return None
    due = [state.decaying[0][0]] if state.decaying else []
    if state.last_activity_ms:
        due.extend(state.last_activity_ms + rule.quiet_ms for rule in ruleset.time_rules
                   if not (rule.per_lead and rule.rule_id in state.fired)
                   and state.last_activity_ms + rule.quiet_ms > state.checked_ms)
    return max(_hour_ceiling(min(due)), state.checked_ms + HOUR_MS) if due else None


def set_identity(ruleset: RuleSet, state: LeadState, ts_ms: int, *, email: str | None = None,
                 account_domain: str | None = None, event_id: str = "", companies: CompanyCards = NO_COMPANIES
                 ) -> Outcome:
    """The raw processor's identity step learned the lead's email or account: state triggers may become true."""
    new_email = state.email if email is None else email
    new_domain = state.account_domain if account_domain is None else account_domain
    if state.merged_into or (new_email, new_domain) == (state.email, state.account_domain):
        return _passthrough(state)
    new = state.copy()
    new.email, new.account_domain = new_email, new_domain
    run = _Run(ruleset, new, None, event_id, ts_ms, companies)
    _settle(run, ("identity", new_email, new_domain, event_id))
    return run.out


def tag_by_hand(ruleset: RuleSet, state: LeadState, tag: str, present: bool, ts_ms: int, command_id: str,
                companies: CompanyCards = NO_COMPANIES, actor: str = "") -> Outcome:
    """A person added or removed a tag (command_id: the request's idempotency id, kept as the cause; actor:
    who, "user:<key id>", recorded on the lead change)."""
    if state.merged_into or (tag in state.tags) == present:
        return _passthrough(state)
    new = state.copy()
    if present:
        new.tags[tag] = TagSource("user", event_id=command_id, ts_ms=ts_ms)
    else:
        del new.tags[tag]
    run = _Run(ruleset, new, None, command_id, ts_ms, companies)
    run.change("chg_" + digest(new.site_id, new.lead_id, "user", command_id), "tag_added" if present else
               "tag_removed", tag, actor=actor)
    _settle(run, ("user", command_id))
    return run.out


def merge(ruleset: RuleSet, survivor: LeadState, absorbed: LeadState, ts_ms: int, event_id: str = "",
          companies: CompanyCards = NO_COMPANIES) -> Outcome:
    """An anonymous lead merged into a known one: its tags, score, properties and firings come over once.

    The survivor keeps its own tags and properties where both have one. Points from a per_lead rule that
    fired for both leads count once. Applying the same merge again (with the absorbed lead before or after,
    i.e. its tombstone) changes nothing. `Outcome.retired` is the absorbed lead's tombstone."""
    if (absorbed.lead_id == survivor.lead_id or absorbed.merged_into == survivor.lead_id
            or absorbed.lead_id in survivor.merged_from or survivor.merged_into):
        return _passthrough(survivor)
    new = survivor.copy()
    run = _Run(ruleset, new, None, event_id, ts_ms, companies)
    cause = ("merge", absorbed.lead_id)

    def change_id(*what: str) -> str:
        return "chg_" + digest(new.site_id, new.lead_id, *cause, *what)

    for tag, source in absorbed.tags.items():
        if tag not in new.tags:
            new.tags[tag] = replace(source, source="merge")
            run.change(change_id("tag", tag), "tag_added", tag)
    both = set(new.fired) & set(absorbed.fired)
    carried = [grant for grant in absorbed.decaying if grant[2] not in both]
    counted_twice = sum(ruleset.permanent_points.get(rule_id, 0) for rule_id in both) + sum(
        grant[1] for grant in absorbed.decaying if grant[2] in both)
    added = run.add_points(absorbed.score - counted_twice)
    if added:
        run.change(change_id("score"), "score_changed", "score", f"{added:+d}")
    new.decaying = sorted(new.decaying + carried)
    for name, value in absorbed.properties.items():
        if name not in new.properties:
            new.properties[name] = value
            run.change(change_id("property", name), "property_set", name, _property_text(value))
    new.fired = sorted(set(new.fired) | set(absorbed.fired))
    new.active = sorted(set(new.active) | set(absorbed.active))
    new.seen = (absorbed.seen + [s for s in new.seen if s not in absorbed.seen])[-SEEN_EVENTS:]
    new.first_ts_ms = min(t for t in (new.first_ts_ms, absorbed.first_ts_ms) if t) if (
        new.first_ts_ms or absorbed.first_ts_ms) else 0
    new.last_activity_ms = max(new.last_activity_ms, absorbed.last_activity_ms)
    new.checked_ms = max(new.checked_ms, absorbed.checked_ms)
    new.email = new.email or absorbed.email
    new.account_domain = new.account_domain or absorbed.account_domain
    new.merged_from = sorted({*new.merged_from, absorbed.lead_id, *absorbed.merged_from})
    _settle(run, cause)
    run.out.retired = LeadState(absorbed.lead_id, absorbed.site_id, merged_into=survivor.lead_id)
    return run.out
