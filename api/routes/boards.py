"""LeadBoards: `GET boards`, `GET boards/{board}` (the columns with their cards), `GET boards/{board}/lead-time`
(per stage, the median and p90 of the cards' lead times: api.lead_time) and `PUT boards/{board}`.

A board page is one consistent snapshot from the board store (cards, counts, version, feed position). One
request reads at most `api_max_board_cards` cards: on a board with many stages the per-stage `limit` is
lowered to fit, and each column's `next_cursor` pages on from what was returned.

A PUT that deletes a stage moves the cards in it: one `stage_deleted` command per card to the board
processor, which moves each to the nearest kept stage on its left (docs/boards.md, "Deleting a stage").
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Response
from pydantic import BaseModel, Field

from api.commands import etag
from api.definitions import stored, validated
from api.dependencies import (
    AnalyticsDep,
    BoardStoreDep,
    CommandsDep,
    DefinitionsDep,
    ReadGrant,
    SettingsDep,
    SiteBoard,
    SiteRoute,
    WriteGrant,
)
from api.lead_time import BoardLeadTime, read_board_lead_time
from api.problems import ERRORS, WRITE_ERRORS, Problem
from schemas.boards import BoardDefinition, CardView
from schemas.definitions import DefinitionsFile

DEFAULT_CARDS_PER_STAGE = 50
MAX_CARDS_PER_STAGE = 500

router = APIRouter(prefix="/v1/sites/{site_id}", tags=["boards"], route_class=SiteRoute)


class StageSummary(BaseModel):
    id: str
    name: str
    entry: bool


class BoardSummary(BaseModel):
    id: str
    name: str
    card: Literal["account", "lead"]
    stages: list[StageSummary]
    version: int = Field(description="the definition's version: a PUT that changes it bumps it")

    @classmethod
    def of(cls, board: BoardDefinition, version: int) -> BoardSummary:
        return cls(id=board.id, name=board.name, card=board.card, version=version,
                   stages=[StageSummary(id=s.id, name=s.name, entry=s.entry) for s in board.stages])


class BoardList(BaseModel):
    boards: list[BoardSummary]


class BoardRef(BaseModel):
    id: str
    name: str
    card: Literal["account", "lead"]


class StageColumn(BaseModel):
    id: str
    name: str
    count: int = Field(description="every card in the stage, not only this page")
    cards: list[CardView]
    next_cursor: str | None = Field(None, description="pass as ?stage=ID&cursor=... for the stage's next page")


class BoardView(BaseModel):
    board: BoardRef
    version: int = Field(description="the board version, also the ETag")
    feed_id: str = Field(description="the stream position of this snapshot: open the stream with it as "
                                     "Last-Event-ID to miss nothing and repeat nothing")
    stages: list[StageColumn]


@router.get("/boards", response_model=BoardList, responses=ERRORS)
async def list_boards(grant: ReadGrant, definitions: DefinitionsDep) -> BoardList:
    return BoardList(boards=[BoardSummary.of(b.board, b.version) for b in await definitions.list_boards(grant.site)])


@router.get("/boards/{board_id}", response_model=BoardView, responses=ERRORS)
async def get_board(grant: ReadGrant, board: SiteBoard, response: Response, store: BoardStoreDep,
                    settings: SettingsDep,
                    limit: int = Query(DEFAULT_CARDS_PER_STAGE, ge=1, le=MAX_CARDS_PER_STAGE,
                                       description="cards per stage (lowered on boards with many stages)"),
                    stage: str | None = Query(None, description="only this stage (to page it with cursor)"),
                    cursor: str | None = Query(None, pattern=r"^[0-9]{1,9}$", description="a stage's next_cursor"),
                    ) -> BoardView:
    shown = board
    if stage is not None:
        shown = board.model_copy(update={"stages": [s for s in board.stages if s.id == stage]})
        if not shown.stages:
            raise Problem(404, "no such stage", stage)
    elif cursor is not None:
        raise Problem(400, "cursor needs stage", "a cursor pages one stage: pass ?stage=ID&cursor=...")
    limit = max(1, min(limit, settings.api_max_board_cards // len(shown.stages)))
    page = await store.board(grant.site, shown, limit, {stage: int(cursor)} if cursor else None)
    response.headers["ETag"] = etag(page.version)
    stages = [StageColumn(id=c.stage_id, name=c.name, count=c.count, cards=c.cards,
                          next_cursor=str(c.offset + limit) if c.count > c.offset + limit else None)
              for c in page.columns]
    return BoardView(board=BoardRef(id=board.id, name=board.name, card=board.card), version=page.version,
                     feed_id=page.feed_id, stages=stages)


@router.get("/boards/{board_id}/lead-time", response_model=BoardLeadTime, responses=ERRORS)
async def get_lead_time(grant: ReadGrant, board: SiteBoard, analytics: AnalyticsDep) -> BoardLeadTime:
    """Per stage, in board order: how many of the board's cards arrived there, and the median and 90th
    percentile of the time they took from first seen (milliseconds; null when no card arrived). `lead_time`
    is the final stage's: the board's lead time. From the stage changes in ClickHouse, a moment behind the
    board."""
    return await analytics.read(read_board_lead_time, grant.site, board)


@router.put("/boards/{board_id}", response_model=BoardSummary, responses=WRITE_ERRORS)
async def put_board(grant: WriteGrant, board_id: str, response: Response, definitions: DefinitionsDep,
                    commands: CommandsDep, definition: Annotated[dict[str, Any], Body()]) -> BoardSummary:
    board = validated(BoardDefinition, definition, board_id)
    result = await stored(definitions.apply(grant.site, DefinitionsFile(boards=[board])))
    version = result.versions[f"board:{board.id}"]
    replaced = result.replaced.get(f"board:{board.id}")
    if isinstance(replaced, BoardDefinition):
        await commands.move_out_of_deleted_stages(grant.site, grant.actor, replaced, board, version)
    response.headers["ETag"] = etag(version)
    return BoardSummary.of(board, version)
