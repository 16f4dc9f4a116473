"""LeadBoards (contract v1): board definitions as users write them, the card as the board shows it, and
the stage change — the one event every move of a card emits.

Card ids: `account:<registrable domain>` or `lead:<lead_id>`. A board's stages are ordered left to right;
the entry stage takes every lead of the site (or, with account cards, its account) or, with
`import: {segment: id}`, only that segment's members; `on_leave` says what happens to a card whose member
leaves the segment (keep it, or archive it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.conditions import SEGMENT_ID
from schemas.records import JsonRecord

DEFINITION_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ENV_NAME = r"^[A-Z_][A-Z0-9_]{0,127}$"
HTTP_URL = r"^https?://[^\s/$.?#][^\s]*$"
EMAIL = r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]{1,253}$"
MAX_ASSIGN_MAP = 500
AssignBy = Literal["account.country", "account.domain"]
CardKind = Literal["account", "lead"]
OnLeave = Literal["keep", "archive"]


class Owner(BaseModel):
    """One of a site's users (definitions kind `owners`): who a card can be assigned to."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=DEFINITION_ID)
    name: str = Field(min_length=1, max_length=128)
    email: str = Field(pattern=EMAIL, max_length=254)

    def content(self) -> dict:
        return self.model_dump(mode="json", exclude_unset=True)


class StageAssign(BaseModel):
    """Who gets a card that enters the stage without an owner: `round_robin: [owner ids]` (each in turn, per
    board), or `by: account.country | account.domain` with `map: {value: owner id}` and a `default` owner
    for a value the map does not name (no default: such a card stays unassigned)."""

    model_config = ConfigDict(extra="forbid")

    round_robin: list[str] | None = Field(default=None, min_length=1, max_length=50)
    by: AssignBy | None = None
    map: dict[str, str] | None = Field(default=None, max_length=MAX_ASSIGN_MAP)
    default: str | None = Field(default=None, pattern=DEFINITION_ID)

    @model_validator(mode="after")
    def _one_way(self) -> "StageAssign":
        if (self.round_robin is None) == (self.by is None):
            raise ValueError("assign has exactly one of: round_robin, by")
        if self.round_robin is not None and (self.map is not None or self.default is not None):
            raise ValueError("map and default go with by, not with round_robin")
        if self.by is not None and not self.map and self.default is None:
            raise ValueError("assign by needs a map and/or a default")
        for owner in [*(self.round_robin or ()), *(self.map or {}).values()]:
            if not re.fullmatch(DEFINITION_ID, owner):
                raise ValueError(f"{owner!r} is not an owner id (1-64 letters, digits, '.', '_' or '-')")
        for key in self.map or {}:
            if not key or len(key) > 253:
                raise ValueError("a map key is 1-253 characters")
        return self

    def owner_ids(self) -> list[str]:
        """Every owner the rule names (sorted, unique)."""
        named = [*(self.round_robin or ()), *(self.map or {}).values()]
        return sorted(set(named + ([self.default] if self.default else [])))


class StageDefinition(BaseModel):
    """One column. Conditions are alternatives: a card meets the stage when any given condition holds.
    A stage with no condition is reached only by hand (or by a rule's move_card action). `assign`: who a card
    entering the stage without an owner gets (StageAssign)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=DEFINITION_ID)
    name: str = Field(min_length=1, max_length=128)
    entry: bool = False
    when_tag: str | None = Field(default=None, min_length=1, max_length=128)
    when_score_at_least: int | None = Field(default=None, ge=0, le=100)
    assign: StageAssign | None = None


class OnStageChange(BaseModel):
    """A signed webhook (`stage.changed`) on every stage change of the board, by a rule or by a person;
    `to`: only changes into these stages. The secret variable and the URL are checked like a rule's webhook
    when the board is stored for a site (processors.webhooks.board_webhook_problems)."""

    model_config = ConfigDict(extra="forbid")

    webhook: str = Field(pattern=HTTP_URL, max_length=2048)
    secret_env: str = Field(pattern=ENV_NAME)
    to: list[str] | None = Field(default=None, min_length=1, max_length=50)


class SegmentImport(BaseModel):
    """Where a board's cards come from: the members of one segment (a lead segment, or with account
    cards also an account segment)."""

    model_config = ConfigDict(extra="forbid")

    segment: str = Field(pattern=SEGMENT_ID)


class BoardDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str = Field(pattern=DEFINITION_ID)
    name: str = Field(min_length=1, max_length=128)
    card: CardKind = "account"
    stages: list[StageDefinition] = Field(min_length=1, max_length=50)
    import_: SegmentImport | None = Field(default=None, alias="import")
    on_leave: OnLeave | None = None  # keep (the default) | archive; only with import
    on_stage_change: OnStageChange | None = None

    @model_validator(mode="after")
    def _one_entry_unique_ids(self) -> "BoardDefinition":
        ids = [s.id for s in self.stages]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"stage ids must be unique, repeated: {', '.join(dupes)}")
        entries = [s.id for s in self.stages if s.entry]
        if len(entries) > 1:
            raise ValueError(f"at most one entry stage, found: {', '.join(entries)}")
        if self.on_leave is not None and self.import_ is None:
            raise ValueError("on_leave goes with import: {segment: ID} (it says what a card does when its "
                             "member leaves the segment)")
        unknown = [stage for stage in (self.on_stage_change.to or ()) if stage not in ids] \
            if self.on_stage_change is not None else []
        if unknown:
            raise ValueError(f"on_stage_change.to names no stage of this board: {', '.join(unknown)}")
        return self

    def owner_ids(self) -> list[str]:
        """Every owner the board's assignment rules name."""
        return sorted({owner for stage in self.stages if stage.assign for owner in stage.assign.owner_ids()})

    def content(self) -> dict:
        """The board as written (what GET shows)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def stage_index(self, stage_id: str) -> int:
        for i, stage in enumerate(self.stages):
            if stage.id == stage_id:
                return i
        raise KeyError(stage_id)


def account_card_id(domain: str) -> str:
    return f"account:{domain}"


def lead_card_id(lead_id: str) -> str:
    return f"lead:{lead_id}"


CARD_ID = re.compile(r"^(account|lead):[^\x00-\x1f\x7f]{1,255}$")


@dataclass(slots=True)
class CardView(JsonRecord):
    """A card as the board-state API and the dashboard show it (DESIGN.md: `GET boards/{board}`)."""

    card_id: str
    stage_id: str
    title: str = ""
    tags: list[str] = field(default_factory=list)
    score: int = 0
    last_activity_ms: int = 0
    entered_stage_ms: int = 0
    owner: str = ""
    notes_count: int = 0
    archived: bool = False
    lead_ids: list[str] = field(default_factory=list)  # an account card lists its first leads only
    lead_count: int = 0  # all of the card's leads
    left_segment: bool = False  # the board imports a segment and the card's member has left it since


Actor = str  # "rule:<rule_id>@<version>" | "user:<name or key id>" | "import" | "system"


@dataclass(slots=True, frozen=True)
class StageChange(JsonRecord):
    """One move of one card: on `board.stage-changes`, in ClickHouse `stage_changes`, in the board's Redis
    feed. `from_stage` is '' when the card enters the board. `seq` is the card's move number on this board
    (1 for entering it, then 2, 3, ...): deterministic, so a replayed move re-derives the same
    (board_id, card_id, seq) and is stored once. The board's own version (its ETag) lives in Redis."""

    site_id: str
    board_id: str
    card_id: str
    from_stage: str
    to_stage: str
    actor: Actor
    rule_id: str = ""
    event_id: str = ""
    reason: str = ""
    ts_ms: int = 0
    seq: int = 0
    stage_change_id: str = ""  # deterministic (hash of its cause): replays re-derive it and are skipped


CommandKind = Literal["move", "add", "note", "owner", "archive", "unarchive", "stage_deleted"]


@dataclass(slots=True, frozen=True)
class BoardCommand(JsonRecord):
    """A person's (or an import's) request on `board.commands`, keyed by card_id. The board processor decides
    it with the same stage machine as every automatic move and stores its outcome under `command_id`
    (derived from the request's Idempotency-Key), so a retried request acts once.

    `stage_deleted`: an edit of the board (at the site's `definitions_version`) deleted the card's stage;
    `board_before` is the board's definition before that edit (JSON), from which the card's new stage is
    found (processors.boards.delete_stage)."""

    command_id: str
    site_id: str
    board_id: str
    card_id: str
    kind: CommandKind
    actor: Actor
    to_stage: str = ""
    force: bool = False
    reason: str = ""
    text: str = ""  # the note (kind note), the owner (kind owner), the company name (kind add)
    if_match: int = -1  # the board version the person saw; -1: no precondition
    ts_ms: int = 0
    board_before: str = ""
    definitions_version: int = 0


@dataclass(slots=True, frozen=True)
class CardNote(JsonRecord):
    """A person's note on a card, on one board (the Account Panel shows the latest ones)."""

    ts_ms: int
    actor: Actor
    text: str


@dataclass(slots=True, frozen=True)
class CommandResult(JsonRecord):
    """The outcome of one BoardCommand, stored under its command_id for the API to answer with.
    `code` is '' when the command changed something, `noop` when there was nothing to do (a retry, a move
    to the card's own stage), else a refusal: stage_regression (HTTP 409), unknown_stage, unknown_board,
    not_on_board, card_merged, wrong_card_kind, empty_note, archived."""

    command_id: str
    site_id: str
    board_id: str
    card_id: str
    ok: bool
    code: str = ""
    message: str = ""
    stage_change_id: str = ""  # the move this command made, if any


CardUpdateKind = Literal["facts", "account_tag", "move", "merge", "handover", "segment", "assign"]


@dataclass(slots=True, frozen=True)
class CardUpdate(JsonRecord):
    """The lead processor's word to the board processor, on `board.commands` keyed by card_id.

    - facts: lead `lead_id` of this card now has `tags` and `score` (absolute values) and is a member of
      `segments` (of those some board of the site imports; None: not said); `left`: it no longer belongs
      to this card.
    - account_tag: a rule tagged the account itself: `tags` holds the one tag, `left` means removed.
    - move: a rule's move_card to `to_stage` on `board_id` (forward only, decided by the stage machine).
    - merge: this card folds into `into_card_id` (its anonymous lead merged into a known one, or its
      lead joined an account); the board processor hands the card's state over to that card.
    - handover: `card_state` is the state of a card that folded into this one.
    - segment: the account of this card is a member of `segments` (the account segments some board of
      the site imports), from the account processor.
    - assign: a rule's assign_owner: the card gets `owner` on every board it is on.
    update_id is deterministic, so a re-sent update is recognised. `definitions_version`: the site
    definitions version the sender read (memberships depend on them): the board processor catches up first."""

    update_id: str
    site_id: str
    card_id: str
    kind: CardUpdateKind
    actor: Actor
    lead_id: str = ""
    tags: list[str] | None = None
    score: int | None = None
    title: str = ""
    activity_ms: int = 0
    left: bool = False
    board_id: str = ""
    to_stage: str = ""
    into_card_id: str = ""
    card_state: str = ""
    rule_id: str = ""
    event_id: str = ""
    ts_ms: int = 0
    segments: list[str] | None = None
    definitions_version: int = 0
    owner: str = ""
