"""Hand-over to sales, a pure core: who a card entering an assigning stage gets (`assign: ...` on a board
stage), a rule's assign_owner, and the body of a board's `stage.changed` webhook.

Round robin takes turns per board stage: `Turns` (stage id -> how many cards the stage has assigned so far) is
the board processor's committed state, one per (site, board, input partition), written in the same commit as
the cards it assigned. A replayed batch re-reads the turns it started from, so it assigns the same owners and a
SIGKILL can neither skip nor repeat a turn in the final state. Cards of one board spread over the partitions of
`board.commands`; each partition takes its own turns, so over a board each owner's count differs from another's
by at most the number of partitions.

`assign_on_entry` looks at the stage changes one record made (in order): a card that entered a stage with
`assign`, or moved forward past one, and has no owner on that board gets one, and the board's view of the card
shows it. Functions here
never modify their arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from processors.boards import CardState, Shown, ViewChange, view_changes
from schemas.boards import BoardDefinition, Owner, StageAssign, StageChange, StageDefinition
from schemas.companies import Company

Turns = dict[str, int]  # stage id -> assignments made by round robin on that stage (per board and partition)
STAGE_CHANGED = "stage.changed"


@dataclass(frozen=True, slots=True)
class CardAccount:
    """What assignment and the webhook read of a card's account ('' when the card has none)."""

    domain: str = ""
    country: str = ""


def card_account_domain(card: CardState) -> str:
    """The card's account: its own domain (an account card), the account its lead joined, or ''."""
    if card.is_account:
        return card.card_id.partition(":")[2]
    return card.account_card_id.partition(":")[2] if card.account_card_id else ""


def pick_owner(assign: StageAssign, stage_id: str, turns: Mapping[str, int], account: CardAccount
               ) -> tuple[str, Turns]:
    """(the owner, the turns after) for one card entering the stage. '' when a map names no owner for the
    card's account and there is no default. Only a round-robin assignment takes a turn."""
    if assign.round_robin:
        turn = turns.get(stage_id, 0)
        return assign.round_robin[turn % len(assign.round_robin)], {**turns, stage_id: turn + 1}
    if assign.by == "account.country":
        value, mapping = account.country.upper(), {key.upper(): owner for key, owner in (assign.map or {}).items()}
    else:
        value, mapping = account.domain.lower(), {key.lower(): owner for key, owner in (assign.map or {}).items()}
    return (mapping.get(value) if value else None) or assign.default or "", dict(turns)


def assign_on_entry(boards: Sequence[BoardDefinition], card: CardState, changes: Sequence[StageChange],
                    turns: Mapping[str, Turns], account: CardAccount, views: Sequence[ViewChange]
                    ) -> tuple[CardState, dict[str, Turns], list[ViewChange], list[tuple[str, str]]]:
    """After a record moved `card` (the stage changes it made, in order, and the views they wrote): on each
    board where the card entered or moved forward past a stage with `assign` and has no owner, it gets one.
    Returns the card, the turns (board id -> Turns) after, the views (those of boards that assigned show the
    owner) and the assignments made as (board id, owner)."""
    after, new_turns, assigned = card, {board: dict(t) for board, t in turns.items()}, []
    for board in boards:
        place = card.places.get(board.id)
        if place is None or place.owner:
            continue
        stage = assigning_stage_reached(board, [c for c in changes if c.board_id == board.id
                                                and c.card_id == card.card_id], place.stage_id)
        if stage is None:
            continue
        owner, new_turns[board.id] = pick_owner(stage.assign, stage.id, new_turns.get(board.id, {}), account)
        if not owner:
            continue
        if after is card:
            after = card.copy()
        after.places[board.id].owner = owner
        assigned.append((board.id, owner))
    if not assigned:
        return card, new_turns, list(views), []
    return after, new_turns, _with_owners(boards, card, after, views, {board for board, _ in assigned}), assigned


def assigning_stage_reached(board: BoardDefinition, changes: Sequence[StageChange], now_on: str
                            ) -> StageDefinition | None:
    """The stage whose `assign` applies to a card's moves on `board`: the rightmost assigning stage that a
    forward move entered or passed, and that the card (now on `now_on`) has not gone back before. A card may
    jump several stages at once (its automatic stage is the rightmost it meets), and whether it stops on the
    way depends on how its facts were cut into updates: the hottest leads, which jump, must not skip the
    hand-over."""
    ids = [stage.id for stage in board.stages]
    if now_on not in ids:
        return None
    crossed: set[int] = set()
    for change in changes:
        if change.to_stage in ids:
            start = ids.index(change.from_stage) if change.from_stage in ids else -1
            crossed.update(range(start + 1, ids.index(change.to_stage) + 1))
    assigning = [i for i in crossed if i <= ids.index(now_on) and board.stages[i].assign is not None]
    return board.stages[max(assigning)] if assigning else None


def assign_by_rule(boards: Sequence[BoardDefinition], card: CardState, owner: str
                   ) -> tuple[CardState, list[ViewChange]]:
    """A rule's assign_owner: the card gets `owner` on every board it is on (a person's choice is replaced
    too: the rule is the site's own word)."""
    after = card.copy()
    for board in boards:
        place = after.places.get(board.id)
        if place is not None and place.stage_id:
            place.owner = owner
    return after, view_changes(boards, card, after)


def _with_owners(boards: Sequence[BoardDefinition], before: CardState, after: CardState,
                 views: Sequence[ViewChange], assigned: set[str]) -> list[ViewChange]:
    """The record's views, those of boards that assigned showing the owner (a board whose view the record
    did not change gets one now)."""
    shown = Shown(after)
    out, seen = [], set()
    for change in views:
        if change.board_id in assigned and change.card_id == after.card_id and change.view is not None:
            change = replace(change, view=replace(change.view, owner=after.places[change.board_id].owner))
            seen.add(change.board_id)
        out.append(change)
    missing = [board for board in boards if board.id in assigned and board.id not in seen]
    if missing:
        out += view_changes(missing, before, after, shown_after=shown)
    return out


def owner_json(owner_text: str, owners: Mapping[str, Owner]) -> dict[str, str] | None:
    """The card's owner as a webhook shows it: the site's owner (id, name, email), or a free-text owner
    (a site without owners) as its name; None when the card has none."""
    if not owner_text:
        return None
    owner = owners.get(owner_text)
    if owner is None:
        return {"id": "", "name": owner_text, "email": ""}
    return {"id": owner.id, "name": owner.name, "email": owner.email}


def account_json(domain: str, company: Company | None) -> dict[str, Any] | None:
    """The card's account with its company card's fields where known; None for a card without one."""
    if not domain:
        return None
    account: dict[str, Any] = {"domain": domain, "name": "", "country": ""}
    if company is not None:
        account.update(name=company.name, country=company.country, industry=company.industry,
                       employees=company.employees, website=company.website, linkedin_url=company.linkedin_url)
    return account


def wants_webhook(board: BoardDefinition, change: StageChange) -> bool:
    hook = board.on_stage_change
    return hook is not None and (hook.to is None or change.to_stage in hook.to)


def stage_changed_payload(board: BoardDefinition, change: StageChange, card: CardState, shown: Shown,
                          owners: Mapping[str, Owner], company: Company | None) -> dict[str, Any]:
    """The `data` of a `stage.changed` webhook: the board, the card, from/to stage (ids and names), the cause
    (actor, rule, reason), the account and the owner as they are after the change."""
    names = {stage.id: stage.name for stage in board.stages}
    place = card.places.get(board.id)
    return {
        "stage_change_id": change.stage_change_id,
        "board": {"id": board.id, "name": board.name},
        "card": {"id": card.card_id, "title": card.title or card.card_id.partition(":")[2], "tags": shown.tags,
                 "score": shown.score, "lead_ids": shown.first_lead_ids, "lead_count": shown.lead_count},
        "from_stage": {"id": change.from_stage, "name": names.get(change.from_stage, "")} if change.from_stage
        else None,
        "to_stage": {"id": change.to_stage, "name": names.get(change.to_stage, "")},
        "cause": {"actor": change.actor, "rule_id": change.rule_id, "event_id": change.event_id,
                  "reason": change.reason},
        "seq": change.seq,
        "ts_ms": change.ts_ms,
        "account": account_json(card_account_domain(card), company),
        "owner": owner_json(place.owner if place is not None else "", owners),
    }
