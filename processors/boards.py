"""LeadBoards: the stage machine, a pure core over card-keyed state.

One function, `decide`, chooses every move whoever asks (a facts update from the lead processor, a rule's
move_card, the hourly pass, a person through the API, an import). Rules (DESIGN.md, "Stage machine"):
- A card's automatic stage is the rightmost stage whose condition it meets (`when_tag`,
  `when_score_at_least`; a stage without a condition is reached only by a directed move).
- Automation moves forward only; archived cards do not move automatically.
- A person moves forward freely and backward only with `force` and a non-empty reason, otherwise the move
  is refused with `stage_regression` (the API's 409). A move to the card's own stage is a no-op.
- A card enters a board once its facts reach it: straight into the rightmost stage it already meets, else
  into the entry stage (a board without an entry stage takes only cards that meet a stage, or by hand).
  Entering is one move ('' -> stage), like every other move: exactly one StageChange per move, its `seq`
  the card's move number on that board and its id a hash of (board, card, seq, cause).
- A board that imports a segment (`import: {segment: id}`) takes only cards of its members: a card is a
  member when one of its facts says so (a lead card's lead, an account card's leads, or the account itself
  for an account segment). When the member leaves, its card stays and is marked `left_segment`, or, with
  `on_leave: archive`, is archived; it comes back unmarked (and unarchived) when the member enters again.

Card kinds: boards with `card: account` show `account:<domain>` cards plus `lead:<id>` cards of leads
without an account; boards with `card: lead` show lead cards only. When a lead joins an account its lead
card leaves the account boards (merged into the account card, `account_card_id`); when an anonymous lead
merges into a known one, its card becomes a tombstone (`merged_into`) on every board. The survivor keeps
the further-right stage, the union of tags and the best score, so no card is ever shown twice.

Facts arrive as absolute values (a lead's current tags and score), not deltas: a replayed update finds
nothing to do, and the result of a sequence of updates does not depend on how it was cut into batches.
Functions here never modify their arguments; they return the new card state, the stage changes and the
card views to write (`ViewChange`, one per board whose view changed).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any, NotRequired, Self, TypedDict

from schemas.boards import (
    Actor,
    BoardCommand,
    BoardDefinition,
    CardNote,
    CardView,
    CommandResult,
    StageChange,
)
from schemas.records import JsonRecord, digest

OWN_FACTS = ""  # key of the card's own facts: the account's tags, or the lead's own tags and score
NOTES_KEPT = 20
COMMAND_IDS_KEPT = 64
VIEW_LEAD_IDS = 25
MAX_NOTE_LENGTH = 2000
MAX_OWNER_LENGTH = 128

# Decision codes: '' = the card moves; NOOP = nothing to do; anything else is a refusal.
NOOP = "noop"
STAGE_REGRESSION = "stage_regression"
UNKNOWN_STAGE = "unknown_stage"
UNKNOWN_BOARD = "unknown_board"
NOT_ON_BOARD = "not_on_board"
CARD_MERGED = "card_merged"
WRONG_CARD_KIND = "wrong_card_kind"
EMPTY_NOTE = "empty_note"
ARCHIVED = "archived"


class Facts(TypedDict):
    """What stage conditions read, for one lead (or for the card itself): its sorted, unique tags and its
    score, and what segment imports read: the imported segments it is a member of (only when there are
    some). A plain dict, so that decoding an account card with thousands of leads is orjson's work alone.
    Replaced, never changed in place: card copies share them."""

    tags: list[str]
    score: int
    segments: NotRequired[list[str]]


NO_FACTS: Facts = {"tags": [], "score": 0}


@dataclass(slots=True)
class BoardPlace(JsonRecord):
    """The card on one board. Kept after the card leaves the board (stage_id '') so that `seq` keeps
    counting: a stage change id is never reused."""

    stage_id: str = ""
    entered_stage_ms: int = 0
    seq: int = 0
    owner: str = ""
    notes: list[CardNote] = field(default_factory=list)  # the latest NOTES_KEPT
    notes_count: int = 0
    archived: bool = False
    left_segment: bool = False  # the board imports a segment and the card's member has left it

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        place = super(BoardPlace, cls).from_dict(raw)
        place.notes = [CardNote.from_dict(note) for note in place.notes]
        return place


@dataclass(slots=True)
class CardState(JsonRecord):
    """Everything the stage machine knows about one card, across all of its site's boards."""

    card_id: str
    site_id: str
    title: str = ""
    last_activity_ms: int = 0
    facts: dict[str, Facts] = field(default_factory=dict)  # OWN_FACTS and, on an account card, per lead
    account_card_id: str = ""  # a lead card whose lead joined an account: shown by that card on account boards
    merged_into: str = ""  # tombstone: the lead merged into another lead; the survivor card holds its history
    places: dict[str, BoardPlace] = field(default_factory=dict)  # by board id
    command_ids: list[str] = field(default_factory=list)  # the latest COMMAND_IDS_KEPT, so a retry acts once

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        card = super(CardState, cls).from_dict(raw)
        card.facts = dict(sorted(card.facts.items()))
        card.places = {key: BoardPlace.from_dict(value) for key, value in card.places.items()}
        return card

    def copy(self) -> CardState:
        """A copy the stage machine may change: new containers and board places (facts and notes are only
        ever replaced, so they are shared). Not a JSON round trip: that was 13 % of a worker's CPU."""
        return replace(self, facts=dict(self.facts), command_ids=list(self.command_ids),
                       places={board: replace(place, notes=list(place.notes)) for board, place in self.places.items()})

    @property
    def is_account(self) -> bool:
        return self.card_id.startswith("account:")

    @property
    def tags(self) -> list[str]:
        return sorted(set().union(*[facts["tags"] for facts in self.facts.values()]))

    @property
    def score(self) -> int:
        return max([facts["score"] for facts in self.facts.values()], default=0)

    @property
    def segments(self) -> frozenset[str]:
        """The imported segments the card is a member of: its lead's, any of its leads', its account's."""
        return frozenset().union(*[facts.get("segments", ()) for facts in self.facts.values()])

    @property
    def lead_ids(self) -> list[str]:
        if self.is_account:
            return [key for key in self.facts if key != OWN_FACTS]
        return [self.card_id.partition(":")[2]]

    def set_facts(self, key: str, facts: Facts) -> None:
        """Keeps `facts` in key order (as loading does), so that a view lists an account's first leads
        without sorting thousands of them."""
        joins = key not in self.facts
        self.facts[key] = facts
        if joins:
            self.facts = dict(sorted(self.facts.items()))

    def stage_on(self, board_id: str) -> str:
        place = self.places.get(board_id)
        return place.stage_id if place is not None else ""


@dataclass(slots=True, frozen=True)
class Cause:
    """Why something happened: recorded on the stage change it produces."""

    actor: Actor  # "rule:<id>@<version>", "user:<who>", "import", "system"
    ts_ms: int
    rule_id: str = ""
    event_id: str = ""
    reason: str = ""


@dataclass(slots=True, frozen=True)
class FactsUpdate:
    """The current facts of one lead of the card (lead_id '' or the lead card's own lead: the card's own
    facts, e.g. an account's own tags). None leaves a field as it is; `left` drops a lead from the card
    (it merged away or moved to another account)."""

    cause: Cause
    lead_id: str = OWN_FACTS
    tags: Sequence[str] | None = None
    score: int | None = None
    title: str = ""
    activity_ms: int = 0
    left: bool = False
    segments: Sequence[str] | None = None


@dataclass(slots=True, frozen=True)
class MoveRequest:
    """to_stage None: wherever the card's facts take it. Otherwise a directed move: by a rule or an
    import (forward only), or by a person (backward too, with force and a reason)."""

    cause: Cause
    to_stage: str | None = None
    by_person: bool = False
    force: bool = False


@dataclass(slots=True, frozen=True)
class Decision:
    to_stage: str = ""  # set when the card moves
    code: str = ""  # '' (it moves), NOOP, or a refusal code
    message: str = ""

    @property
    def refused(self) -> bool:
        return self.code not in ("", NOOP)


@dataclass(slots=True, frozen=True)
class ViewChange:
    """One card's new view on one board for the board store. view None: the card left the board."""

    board_id: str
    card_id: str
    view: CardView | None
    left_stage: str = ""  # the column the card was in before, when it changed column or left the board
    notes: tuple[CardNote, ...] | None = None  # the latest notes, only when they changed


Outcome = tuple[CardState, list[StageChange], list[ViewChange]]


def belongs_on(board: BoardDefinition, card: CardState) -> bool:
    if card.merged_into:
        return False
    if card.is_account:
        return board.card == "account"
    return board.card == "lead" or not card.account_card_id


def _stage_index(board: BoardDefinition, stage_id: str) -> int:
    """-1 for '' (not on the board) and for a stage the board no longer has."""
    try:
        return board.stage_index(stage_id) if stage_id else -1
    except KeyError:
        return -1


class Shown:
    """A card's facts as boards see them (its tags, score, imported segments and the leads a view lists),
    derived once per card state. On an account card they fold every lead's facts: `refolded` derives the next
    state's from these when one lead's facts change, so a large account costs its size once per batch, not
    per update."""

    __slots__ = ("tags", "tag_set", "score", "segments", "lead_count", "first_lead_ids")

    def __init__(self, card: CardState, tags: list[str] | None = None, score: int | None = None,
                 segments: frozenset[str] | None = None) -> None:
        self.tags = card.tags if tags is None else tags
        self.tag_set = frozenset(self.tags)
        self.score = card.score if score is None else score
        self.segments = card.segments if segments is None else segments
        if card.is_account:
            self.lead_count = len(card.facts) - (OWN_FACTS in card.facts)
            self.first_lead_ids = list(islice((key for key in card.facts if key != OWN_FACTS), VIEW_LEAD_IDS))
        else:
            self.lead_count, self.first_lead_ids = 1, card.lead_ids

    def refolded(self, card: CardState, old: Facts | None, new: Facts | None) -> Shown:
        """Those of `card`, which differs from the card of these only in one entry of its facts (old -> new,
        None: absent). Folds everything again only when that entry may have been what these came from."""
        old_tags, new_tags = (old or NO_FACTS)["tags"], (new or NO_FACTS)["tags"]
        old_score, new_score = (old or NO_FACTS)["score"], (new or NO_FACTS)["score"]
        old_segments, new_segments = (old or NO_FACTS).get("segments", ()), (new or NO_FACTS).get("segments", ())
        if not set(old_tags).issubset(new_tags) or not set(old_segments).issubset(new_segments):
            return Shown(card)  # a tag (a segment) left this entry: another may still have it
        if new_score >= self.score:
            score = new_score
        elif old_score < self.score:
            score = self.score
        else:
            return Shown(card)  # the highest score went down: the next highest is elsewhere
        tags = self.tags if self.tag_set.issuperset(new_tags) else sorted(self.tag_set.union(new_tags))
        return Shown(card, tags, score, self.segments.union(new_segments))


def _met_index(board: BoardDefinition, shown: Shown) -> int:
    """The rightmost stage whose condition the card meets, -1 if none."""
    tags, score = shown.tag_set, shown.score
    for i in range(len(board.stages) - 1, -1, -1):
        stage = board.stages[i]
        if (stage.when_tag is not None and stage.when_tag in tags) or (
            stage.when_score_at_least is not None and score >= stage.when_score_at_least
        ):
            return i
    return -1


def _entry_index(board: BoardDefinition) -> int:
    return next((i for i, stage in enumerate(board.stages) if stage.entry), -1)


def _refusal_to_show(board: BoardDefinition, card: CardState) -> Decision | None:
    """Why the board cannot show this card at all (None: it can)."""
    if card.merged_into:
        return Decision(code=CARD_MERGED, message=f"{card.card_id} was merged into {card.merged_into}")
    if not belongs_on(board, card):
        shown_by = f"; it is shown by {card.account_card_id}" if card.account_card_id else ""
        return Decision(code=WRONG_CARD_KIND, message=f"board {board.id} shows {board.card} cards{shown_by}")
    return None


def decide(board: BoardDefinition, card: CardState, request: MoveRequest, shown: Shown | None = None) -> Decision:
    """The one place that decides whether and where a card moves on a board (`shown`: the card's facts, if
    the caller already derived them)."""
    refusal = _refusal_to_show(board, card)
    if refusal is not None:
        return refusal
    place = card.places.get(board.id)
    current = _stage_index(board, place.stage_id if place else "")
    archived = place is not None and place.archived
    if current < 0 and not request.by_person and board.import_ is not None and \
            board.import_.segment not in (shown or Shown(card)).segments:
        return Decision(code=NOOP, message=f"board {board.id} takes only members of segment {board.import_.segment}")
    if request.to_stage is None:
        if archived:
            return Decision(code=NOOP, message="archived cards do not move automatically")
        target = _met_index(board, shown or Shown(card))
        if current < 0 and target < 0:
            target = _entry_index(board)
        if target <= current:
            return Decision(code=NOOP)
        return Decision(to_stage=board.stages[target].id)
    target = _stage_index(board, request.to_stage)
    if target < 0:
        return Decision(code=UNKNOWN_STAGE, message=f"board {board.id} has no stage {request.to_stage!r}")
    if archived and not request.by_person:
        return Decision(code=ARCHIVED, message="archived cards do not move automatically")
    if target == current:
        return Decision(code=NOOP, message=f"already in {request.to_stage}")
    if target < current:
        current_id = board.stages[current].id
        if not request.by_person:
            return Decision(code=STAGE_REGRESSION, message=f"automation never moves a card back ({current_id} -> "
                                                           f"{request.to_stage})")
        if not (request.force and request.cause.reason.strip()):
            return Decision(code=STAGE_REGRESSION, message=f"moving back from {current_id} to {request.to_stage} "
                                                           "needs force and a reason")
    return Decision(to_stage=request.to_stage)


def stage_change_id(site_id: str, board_id: str, card_id: str, seq: int, cause: Cause) -> str:
    return "sc_" + digest(site_id, board_id, card_id, str(seq), cause.actor, cause.event_id, str(cause.ts_ms))


def _move(board: BoardDefinition, card: CardState, to_stage: str, cause: Cause) -> StageChange:
    """Moves the card (in place) and returns the one stage change that records it."""
    place = card.places.setdefault(board.id, BoardPlace())
    from_stage = place.stage_id
    place.stage_id, place.entered_stage_ms, place.seq = to_stage, cause.ts_ms, place.seq + 1
    return StageChange(
        site_id=card.site_id, board_id=board.id, card_id=card.card_id, from_stage=from_stage, to_stage=to_stage,
        actor=cause.actor, rule_id=cause.rule_id, event_id=cause.event_id, reason=cause.reason, ts_ms=cause.ts_ms,
        seq=place.seq, stage_change_id=stage_change_id(card.site_id, board.id, card.card_id, place.seq, cause),
    )


def _view(board: BoardDefinition, card: CardState, shown: Shown) -> CardView | None:
    place = card.places.get(board.id)
    if place is None or not place.stage_id or not belongs_on(board, card):
        return None
    return CardView(
        card_id=card.card_id, stage_id=place.stage_id, title=card.title or card.card_id.partition(":")[2],
        tags=shown.tags, score=shown.score, last_activity_ms=card.last_activity_ms,
        entered_stage_ms=place.entered_stage_ms, owner=place.owner, notes_count=place.notes_count,
        archived=place.archived, lead_ids=shown.first_lead_ids, lead_count=shown.lead_count,
        left_segment=place.left_segment,
    )


def view_changes(boards: Iterable[BoardDefinition], before: CardState, after: CardState,
                 shown_before: Shown | None = None, shown_after: Shown | None = None) -> list[ViewChange]:
    """One ViewChange per board whose view of the card differs between two states of it."""
    changes = []
    shown_before, shown_after = shown_before or Shown(before), shown_after or Shown(after)
    for board in boards:
        old, new = _view(board, before, shown_before), _view(board, after, shown_after)
        if old == new:
            continue
        old_stage = old.stage_id if old is not None else ""
        left_stage = old_stage if new is None or new.stage_id != old_stage else ""
        notes = None
        if new is not None and (old is None or old.notes_count != new.notes_count):
            notes = tuple(after.places[board.id].notes)
        changes.append(ViewChange(board.id, after.card_id, new, left_stage, notes))
    return changes


def _move_everywhere(boards: Iterable[BoardDefinition], card: CardState, cause: Cause,
                     shown: Shown | None = None) -> list[StageChange]:
    changes, shown = [], shown or Shown(card)  # moves change places, never facts
    for board in boards:
        decision = decide(board, card, MoveRequest(cause), shown)
        if decision.to_stage:
            changes.append(_move(board, card, decision.to_stage, cause))
    return changes


def _fold_facts(card: CardState, update: FactsUpdate) -> tuple[Facts | None, Facts | None]:
    """Folds the update into the card (in place); returns the entry of its facts it changed, before and after."""
    own_lead = "" if card.is_account else card.card_id.partition(":")[2]
    key = OWN_FACTS if update.lead_id in (OWN_FACTS, own_lead) else update.lead_id
    if key != OWN_FACTS and not card.is_account:
        raise ValueError(f"lead {update.lead_id} cannot update the card of another lead, {card.card_id}")
    old = card.facts.get(key)
    if update.left:
        if key != OWN_FACTS:
            card.facts.pop(key, None)
    else:
        current = old or NO_FACTS
        tags = sorted(set(update.tags)) if update.tags is not None else current["tags"]
        score = min(100, max(0, update.score)) if update.score is not None else current["score"]
        segments = sorted(set(update.segments)) if update.segments is not None else current.get("segments", [])
        card.set_facts(key, {"tags": tags, "score": score, "segments": segments} if segments else
                       {"tags": tags, "score": score})
    if update.title:
        card.title = update.title
    card.last_activity_ms = max(card.last_activity_ms, update.activity_ms)
    return old, card.facts.get(key)


def fold_updates(boards: Sequence[BoardDefinition], card: CardState, updates: Iterable[FactsUpdate],
                 shown: Shown | None = None) -> tuple[CardState, list[StageChange], list[ViewChange], Shown]:
    """Folds facts updates into the card in order, moving it after each one as its facts now allow.
    Evaluating after every update (not once per batch) is what makes the result, stage changes included,
    independent of batch boundaries. A tombstone takes no updates: the caller routes them to the survivor.
    `shown`: the card's `Shown`, if the caller kept it from the previous call; the new state's comes back."""
    shown_before = shown or Shown(card)
    after, shown = card.copy(), shown_before
    changes: list[StageChange] = []
    if not after.merged_into:
        for update in updates:
            old, new = _fold_facts(after, update)
            was, shown = shown, shown.refolded(after, old, new)
            if was.segments != shown.segments:
                _follow_imports(boards, after, was.segments, shown.segments)
            changes += _move_everywhere(boards, after, update.cause, shown)
    return after, changes, view_changes(boards, card, after, shown_before, shown), shown


def _follow_imports(boards: Iterable[BoardDefinition], card: CardState, before: frozenset[str],
                    after: frozenset[str]) -> None:
    """The card's member left (entered) a segment some board imports: on each such board the card is on,
    it is marked `left_segment` (and, with `on_leave: archive`, archived), or unmarked again (in place)."""
    for board in boards:
        place = card.places.get(board.id)
        if board.import_ is None or place is None or not place.stage_id:
            continue
        segment = board.import_.segment
        if segment in before and segment not in after:
            place.left_segment = True
            place.archived = place.archived or board.on_leave == "archive"
        elif segment in after and segment not in before and place.left_segment:
            place.left_segment = False
            place.archived = place.archived and board.on_leave != "archive"


def apply_move(boards: Sequence[BoardDefinition], card: CardState, board_id: str, request: MoveRequest
               ) -> tuple[CardState, Decision, list[StageChange], list[ViewChange]]:
    """A directed move (a rule's move_card, an import, a person) on one board."""
    board = next((b for b in boards if b.id == board_id), None)
    if board is None:
        return card, Decision(code=UNKNOWN_BOARD, message=f"no board {board_id!r}"), [], []
    decision = decide(board, card, request)
    if not decision.to_stage:
        return card, decision, [], []
    after = card.copy()
    change = _move(board, after, decision.to_stage, request.cause)
    return after, decision, [change], view_changes(boards, card, after)


def _edit(board: BoardDefinition, card: CardState, command: BoardCommand, now_ms: int) -> Decision:
    """Edits the card's place on the board (in place) for note, owner, archive and unarchive commands."""
    refusal = _refusal_to_show(board, card)
    if refusal is not None:
        return refusal
    place = card.places.get(board.id)
    if place is None or not place.stage_id:
        return Decision(code=NOT_ON_BOARD, message=f"{card.card_id} is not on board {board.id}")
    if command.kind == "note":
        text = command.text.strip()[:MAX_NOTE_LENGTH]
        if not text:
            return Decision(code=EMPTY_NOTE, message="a note needs text")
        place.notes = [*place.notes, CardNote(now_ms, command.actor, text)][-NOTES_KEPT:]
        place.notes_count += 1
        return Decision()
    if command.kind == "owner":
        owner = command.text.strip()[:MAX_OWNER_LENGTH]
        changed, place.owner = owner != place.owner, owner
    else:
        archived = command.kind == "archive"
        changed, place.archived = archived != place.archived, archived
    return Decision() if changed else Decision(code=NOOP)


def apply_command(boards: Sequence[BoardDefinition], card: CardState, command: BoardCommand, now_ms: int
                  ) -> tuple[CardState, CommandResult, list[StageChange], list[ViewChange]]:
    """A person's (or an import's) command, decided by the same stage machine as every automatic move (a
    `stage_deleted` command: by `delete_stage`, against the board as it is now).
    The command id is remembered on the card, so a redelivered command acts once. `if_match` is the
    caller's business: it compares it with the board version the store holds."""
    if command.card_id != card.card_id or command.site_id != card.site_id:
        raise ValueError(f"command for {command.site_id}/{command.card_id} applied to {card.site_id}/{card.card_id}")

    def result(decision: Decision, change_id: str = "") -> CommandResult:
        return CommandResult(command.command_id, command.site_id, command.board_id, command.card_id,
                             not decision.refused, decision.code, decision.message, change_id)

    if command.command_id in card.command_ids:
        return card, result(Decision(code=NOOP, message="already applied")), [], []
    after = card.copy()
    after.command_ids = [*after.command_ids, command.command_id][-COMMAND_IDS_KEPT:]
    board = next((b for b in boards if b.id == command.board_id), None)
    changes: list[StageChange] = []
    if board is None:
        decision = Decision(code=UNKNOWN_BOARD, message=f"no board {command.board_id!r}")
    elif command.kind == "stage_deleted":
        cause = Cause(command.actor, now_ms, reason=command.reason)
        after, changes, _ = delete_stage(BoardDefinition.model_validate_json(command.board_before), board, after, cause)
        decision = Decision() if changes else Decision(code=NOOP, message="the card is not in a deleted stage")
    elif command.kind in ("move", "add"):
        to_stage = command.to_stage
        if command.kind == "add":
            if command.text and not after.title:
                after.title = command.text.strip()[:MAX_OWNER_LENGTH]
            entry = _entry_index(board)
            to_stage = after.stage_on(board.id) or board.stages[max(entry, 0)].id
        cause = Cause(command.actor, now_ms, reason=command.reason)
        decision = decide(board, after, MoveRequest(cause, to_stage, by_person=True, force=command.force))
        if decision.to_stage:
            changes.append(_move(board, after, decision.to_stage, cause))
    else:
        decision = _edit(board, after, command, now_ms)
    change_id = changes[0].stage_change_id if changes else ""
    return after, result(decision, change_id), changes, view_changes(boards, card, after)


def _fold_place(survivor: BoardPlace, absorbed: BoardPlace, survivor_on_board: bool) -> None:
    """Owner, notes and archive flag of a merged card: the survivor's win, the absorbed card's fill gaps."""
    survivor.owner = survivor.owner or absorbed.owner
    survivor.notes = sorted([*survivor.notes, *absorbed.notes], key=lambda note: note.ts_ms)[-NOTES_KEPT:]
    survivor.notes_count += absorbed.notes_count
    if not survivor_on_board:
        survivor.archived = absorbed.archived


def merge_cards(boards: Sequence[BoardDefinition], survivor: CardState, absorbed: CardState, cause: Cause
                ) -> tuple[CardState, CardState, list[StageChange], list[ViewChange]]:
    """Two cards become one, so that no lead is ever shown twice on a board.
    - lead into lead (an anonymous lead merged into a known one): the absorbed card becomes a tombstone
      and leaves every board; the survivor takes its facts.
    - lead into account (the lead joined the account): the lead card leaves the account boards (it stays
      on lead boards); the account card takes the lead's facts.
    On each board the absorbed card left, the survivor keeps the further-right stage (or the stage its
    merged facts now meet, if further still): at most one stage change per board."""
    if survivor.merged_into or absorbed.is_account or survivor.site_id != absorbed.site_id:
        raise ValueError(f"cannot merge {absorbed.card_id} into {survivor.card_id}")
    if absorbed.card_id == survivor.card_id or survivor.card_id in (absorbed.merged_into, absorbed.account_card_id):
        return survivor, absorbed, [], []
    new_survivor, new_absorbed = survivor.copy(), absorbed.copy()
    absorbed_facts = absorbed.facts.get(OWN_FACTS, NO_FACTS)
    if survivor.is_account:
        new_survivor.set_facts(absorbed.lead_ids[0], absorbed_facts)
        new_absorbed.account_card_id = survivor.card_id
    else:
        own = new_survivor.facts.get(OWN_FACTS, NO_FACTS)
        new_survivor.set_facts(OWN_FACTS, {"tags": sorted({*own["tags"], *absorbed_facts["tags"]}),
                                           "score": max(own["score"], absorbed_facts["score"])})
        new_absorbed.merged_into = survivor.card_id
    new_survivor.last_activity_ms = max(survivor.last_activity_ms, absorbed.last_activity_ms)
    changes, shown = [], Shown(new_survivor)
    for board in boards:
        absorbed_stage = absorbed.stage_on(board.id)
        if not absorbed_stage or belongs_on(board, new_absorbed) or not belongs_on(board, new_survivor):
            continue
        on_board = bool(survivor.stage_on(board.id))
        place = new_survivor.places.setdefault(board.id, BoardPlace())
        _fold_place(place, absorbed.places[board.id], on_board)
        new_absorbed.places[board.id].stage_id = ""
        automatic = -1 if place.archived else _met_index(board, shown)
        target = max(_stage_index(board, absorbed_stage), automatic)
        if target > _stage_index(board, place.stage_id):
            changes.append(_move(board, new_survivor, board.stages[target].id, cause))
    if absorbed.facts:  # its merged facts may take it further; without any, nothing about it changed
        changes += _move_everywhere(boards, new_survivor, cause, shown)
    views = view_changes(boards, survivor, new_survivor, shown_after=shown) + view_changes(boards, absorbed,
                                                                                           new_absorbed)
    return new_survivor, new_absorbed, changes, views


def delete_stage(board_old: BoardDefinition, board_new: BoardDefinition, card: CardState, cause: Cause) -> Outcome:
    """After a board edit that deleted stages: a card in a deleted stage moves to the nearest kept stage to
    its left (the new first stage if none is left of it), with one stage change."""
    stage = card.stage_on(board_old.id)
    kept = {s.id for s in board_new.stages}
    if not stage or stage in kept or _stage_index(board_old, stage) < 0:
        return card, [], []
    left_of = board_old.stages[:board_old.stage_index(stage)]
    target = next((s.id for s in reversed(left_of) if s.id in kept), board_new.stages[0].id)
    after = card.copy()
    change = _move(board_new, after, target, replace(cause, reason=cause.reason or f"stage {stage} deleted"))
    return after, [change], view_changes([board_new], card, after)
