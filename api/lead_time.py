"""Lead time: how long a card takes from first seen to each stage of a LeadBoard, and to the board's final
(rightmost) stage — DESIGN.md's "time from a lead's first event to its arrival in the final stage".

- A card's **start** is when it was first seen: its lead's first event (a lead card), the earliest first
  event of the account's current leads (an account card). An account added by hand before anyone from it
  visited counts from when it entered the board: the start is the earlier of the two, so a lead time is
  never negative.
- Its **arrival** in a stage is the first time it entered it: a card forced back and moved on again keeps
  its first arrival.
- Its **lead time to a stage** is arrival - start; its lead time is the one to the final stage, once reached.
- A board's figures per stage: the median and the 90th percentile (nearest rank: 90 % of the cards took at
  most that long) over every card that arrived in the stage and still belongs on the board. A lead card
  merged into another lead, or (on a board of account cards) into its account's card, is counted by the
  card that absorbed it: that card arrived in the stage too, when the merge took it there.

Where it comes from: ClickHouse (`stage_changes`, the contract's record of every move, and `leads`), not
the board state in Redis. The history is already there, for every card that ever moved, including the
moves made before this feature existed; the card state in Redis keeps only the current stage
(`entered_stage_ms`), and keeping every arrival there would grow the state the board processor reads and
writes on its hot path for a read-side figure. A board's median and p90 need all its cards: one bounded
ClickHouse query (`BOARD_LEAD_TIME_SQL`, its own endpoint) instead of a scan of every card in Redis, and
`GET boards/{board}` stays a Redis read. The price is the sinks' delay: a move reaches ClickHouse a moment
after the board shows it, so a card's lead time takes the card's current stage from its view when
ClickHouse has not recorded that arrival yet.

Every SQL text is a module-level constant that docs/queries.md quotes (its tests check they match).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from textwrap import indent

from api.lead_profile import QueryClient
from schemas.boards import BoardDefinition

# The first arrival of card %(card_id)s in each stage it ever entered.
CARD_ARRIVALS_SQL = """SELECT to_stage, min(ts_ms)
FROM stage_changes
WHERE site_id = %(site_id)s AND board_id = %(board_id)s AND card_id = %(card_id)s AND to_stage != ''
GROUP BY to_stage"""

_BOARD_CHANGES = "FROM stage_changes\nWHERE site_id = %(site_id)s AND board_id = %(board_id)s"

# When each card of the board was first seen, and whether it is gone from the board (see the module's
# docstring): lead cards from their lead's newest row; account cards from their current leads (the
# leads_by_account lookup, as the Account Panel counts them). Only the cards the board ever had are read.
_FIRST_SEEN = f"""SELECT concat('lead:', lead_id) AS card_id, argMax(first_ts_ms, version) AS first_seen_ms,
       toUInt8(argMax(merged_into, version) != ''
               OR (%(account_board)s = 1 AND argMax(account_domain, version) != '')) AS gone
FROM leads
WHERE site_id = %(site_id)s AND lead_id IN (
    SELECT substring(card_id, 6)
    {indent(_BOARD_CHANGES, ' ' * 4).lstrip()} AND card_id LIKE 'lead:%%')
GROUP BY lead_id
UNION ALL
SELECT concat('account:', latest_domain) AS card_id, min(latest_first_ts_ms) AS first_seen_ms, toUInt8(0) AS gone
FROM (
    SELECT lead_id, argMax(account_domain, version) AS latest_domain,
           argMax(first_ts_ms, version) AS latest_first_ts_ms
    FROM leads
    WHERE site_id = %(site_id)s AND lead_id IN (
        SELECT lead_id
        FROM leads_by_account
        WHERE site_id = %(site_id)s AND account_domain IN (
            SELECT substring(card_id, 9)
            {indent(_BOARD_CHANGES, ' ' * 12).lstrip()} AND card_id LIKE 'account:%%')
        GROUP BY lead_id
        HAVING argMax(merged_into, version) = '')
    GROUP BY lead_id
)
GROUP BY latest_domain"""

# Per stage of board %(board_id)s: how many of its cards (still on the board) ever arrived there, and the
# median and 90th percentile of their lead times to it, by nearest rank: the ceil(n/2)-th and ceil(9n/10)-th
# smallest. ClickHouse 18.16 joins two tables
# per SELECT, hence the nesting; a replayed stage change (before the table's merges) changes no minimum.
BOARD_LEAD_TIME_SQL = f"""SELECT to_stage, cards, sorted_ms[intDiv(cards + 1, 2)] AS median_ms,
       sorted_ms[intDiv(9 * cards + 9, 10)] AS p90_ms
FROM (
    SELECT to_stage, count() AS cards, arraySort(groupArray(entered_ms - start_ms)) AS sorted_ms
    FROM (
        SELECT card_id, to_stage, min(ts_ms) AS entered_ms
        {indent(_BOARD_CHANGES, ' ' * 8).lstrip()} AND to_stage != ''
        GROUP BY card_id, to_stage
    ) AS arrivals
    ALL INNER JOIN (
        SELECT card_id, if(first_seen_ms > 0, least(first_seen_ms, board_entry_ms), board_entry_ms) AS start_ms
        FROM (
            SELECT card_id, min(ts_ms) AS board_entry_ms
            {indent(_BOARD_CHANGES, ' ' * 12).lstrip()}
            GROUP BY card_id
        ) AS entries
        ANY LEFT JOIN (
{indent(_FIRST_SEEN, ' ' * 12)}
        ) AS first_seen USING card_id
        WHERE gone = 0
    ) AS starts USING card_id
    GROUP BY to_stage
)"""


@dataclass(frozen=True, slots=True)
class StageArrival:
    stage_id: str
    name: str
    entered_ms: int
    lead_time_ms: int


@dataclass(frozen=True, slots=True)
class CardLeadTime:
    """One card's lead times on one board. `start_ms`: first seen (or when it entered the board, if earlier);
    `stages`: the stages it arrived in, in board order; `lead_time_ms`: to `final_stage_id`, None until it
    arrives there."""

    start_ms: int
    stages: tuple[StageArrival, ...]
    final_stage_id: str
    lead_time_ms: int | None


@dataclass(frozen=True, slots=True)
class StageLeadTime:
    """A board's lead time to one stage over the `cards` that arrived there; None when none did."""

    stage_id: str
    name: str
    cards: int
    median_ms: int | None
    p90_ms: int | None


@dataclass(frozen=True, slots=True)
class BoardLeadTime:
    """Per stage, in board order, and `lead_time` (the final stage's, repeated: the board's lead time)."""

    board_id: str
    final_stage_id: str
    stages: tuple[StageLeadTime, ...]
    lead_time: StageLeadTime


def card_lead_time(board: BoardDefinition, first_seen_ms: int, arrivals: Mapping[str, int],
                   current: tuple[str, int] | None = None) -> CardLeadTime:
    """A card's lead times from when it was first seen (0: unknown) and its first arrival in each stage.
    `current`: the card's stage and when it entered it, as its board view says; used when `arrivals` (from
    ClickHouse, a moment behind) do not have that stage yet. Stages the board no longer has are left out."""
    arrived = dict(arrivals)
    if current is not None and current[0] and current[0] not in arrived:
        arrived[current[0]] = current[1]
    entered = [ms for ms in arrived.values() if ms > 0]
    start = min([first_seen_ms] * (first_seen_ms > 0) + entered, default=0)
    stages = tuple(StageArrival(stage.id, stage.name, arrived[stage.id], arrived[stage.id] - start)
                   for stage in board.stages if stage.id in arrived)
    final = board.stages[-1].id
    reached = next((s.lead_time_ms for s in stages if s.stage_id == final), None)
    return CardLeadTime(start, stages, final, reached)


def read_card_lead_time(client: QueryClient, site_id: str, board: BoardDefinition, card_id: str,
                        first_seen_ms: int, current: tuple[str, int] | None = None) -> CardLeadTime:
    rows = client.execute(CARD_ARRIVALS_SQL, {"site_id": site_id, "board_id": board.id, "card_id": card_id})
    return card_lead_time(board, first_seen_ms, dict(rows), current)


def board_lead_time(rows: Mapping[str, tuple[int, int, int]], board: BoardDefinition) -> BoardLeadTime:
    """The board's figures from BOARD_LEAD_TIME_SQL's rows (stage -> (cards, median, p90)), in board order;
    rows of stages the board no longer has are left out."""
    stages = []
    for stage in board.stages:
        cards, median, p90 = rows.get(stage.id, (0, 0, 0))
        stages.append(StageLeadTime(stage.id, stage.name, cards, median if cards else None, p90 if cards else None))
    return BoardLeadTime(board.id, board.stages[-1].id, tuple(stages), stages[-1])


def read_board_lead_time(client: QueryClient, site_id: str, board: BoardDefinition) -> BoardLeadTime:
    rows = client.execute(BOARD_LEAD_TIME_SQL, {"site_id": site_id, "board_id": board.id,
                                                "account_board": int(board.card == "account")})
    return board_lead_time({stage: (cards, median, p90) for stage, cards, median, p90 in rows}, board)
