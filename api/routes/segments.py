"""Segments: `GET segments` (with member counts), `GET|PUT|DELETE segments/{id}`, and the members lists
`GET segments/{id}/members` (a page, as JSON) and `GET segments/{id}/members.csv` (all of them, streamed).

Definitions come back as their author wrote them, with their version, like rules (api.routes.rules). A PUT
is refused whole with one line per problem (422); deleting a segment that a board imports, or that a rule or
another segment names, is refused with 409 until nothing refers to it. Members are read from ClickHouse
(api.segment_members): only leads count, and a lead segment's list carries what a person scans.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from api import segment_members as sm
from api.analytics import Analytics
from api.commands import etag
from api.definitions import refused, stored, valid_id, validated
from api.dependencies import AnalyticsDep, DefinitionsDep, ReadGrant, SiteRoute, WriteGrant
from api.problems import DELETE_ERRORS, ERRORS, WRITE_ERRORS, Problem
from api.segment_members import AccountMember, LeadMember, MembersPage
from processors.definitions_store import DefinitionsStore
from schemas.segments import Segment

router = APIRouter(prefix="/v1/sites/{site_id}", tags=["segments"], route_class=SiteRoute)

SortQuery = Annotated[sm.Sort, Query(description="highest first: the lead's score (an account's: its best lead's) "
                                                 "or when it was last active")]
CursorQuery = Annotated[str | None, Query(max_length=sm.MAX_CURSOR_CHARS, pattern=r"^[A-Za-z0-9_-]+$",
                                          description="a page's next_cursor, for the page after it")]


class SegmentSummary(BaseModel):
    id: str
    name: str
    description: str | None = None
    of: Literal["lead", "account"]
    conditions: int = Field(description="how many conditions, nested ones included")
    version: int = Field(description="the site's definitions version at which it last changed")
    members: int = Field(description="current members; a lead segment counts only leads (known, or with an "
                                     "account)")
    imported_by: list[str] = Field(description="the boards that import their cards from it")


class SegmentList(BaseModel):
    segments: list[SegmentSummary]


class SegmentMembers(BaseModel):
    segment_id: str
    of: Literal["lead", "account"] = Field(description="which kind of member the list holds")
    sort: Literal["score", "last_seen"]
    count: int = Field(description="every current member, not only this page")
    members: list[LeadMember] | list[AccountMember]
    next_cursor: str | None = Field(None, description="pass as ?cursor=... (with the same sort) for the next page; "
                                                      "null after the last")


async def find_segment(definitions: DefinitionsStore, site_id: str, segment_id: str) -> Segment:
    found = await definitions.get_segment(site_id, segment_id) if valid_id(segment_id) else None
    if found is None:
        raise Problem(404, "no such segment", segment_id)
    return found


@router.get("/segments", response_model=SegmentList, responses=ERRORS)
async def list_segments(grant: ReadGrant, definitions: DefinitionsDep, analytics: AnalyticsDep) -> SegmentList:
    site = await definitions.load(grant.site)
    counts = await analytics.read(sm.member_counts, grant.site, [s.id for s in site.segments])
    importers: dict[str, list[str]] = {}
    for stored_board in site.boards:
        if stored_board.board.import_ is not None:
            importers.setdefault(stored_board.board.import_.segment, []).append(stored_board.board.id)
    return SegmentList(segments=[
        SegmentSummary(id=s.id, name=s.name, description=s.description, of=s.of, conditions=len(s.conditions()),
                       version=s.version, members=counts.get(s.id, 0), imported_by=importers.get(s.id, []))
        for s in site.segments])


# A segment comes back as written (what was left out stays out, no defaults filled in), with its version.
AS_WRITTEN = {"response_model": Segment, "response_model_exclude_unset": True, "response_model_by_alias": True}


@router.get("/segments/{segment_id}", responses=ERRORS, **AS_WRITTEN)
async def get_segment(grant: ReadGrant, segment_id: str, definitions: DefinitionsDep) -> Segment:
    return await find_segment(definitions, grant.site, segment_id)


@router.put("/segments/{segment_id}", responses=WRITE_ERRORS, **AS_WRITTEN)
async def put_segment(grant: WriteGrant, segment_id: str, response: Response, definitions: DefinitionsDep,
                      definition: Annotated[dict[str, Any], Body()]) -> Segment:
    """Creates or replaces the segment; refused whole, one line per problem, when it (or the site's set of
    definitions with it) does not hold. The same segment again changes nothing, its version included."""
    segment = validated(Segment, definition, segment_id)
    version = await stored(definitions.put_segment(grant.site, segment))
    response.headers["ETag"] = etag(version)
    return segment.model_copy(update={"version": version})


@router.delete("/segments/{segment_id}", status_code=204, responses=DELETE_ERRORS)
async def delete_segment(grant: WriteGrant, segment_id: str, definitions: DefinitionsDep) -> Response:
    """Refused (409) while a board imports it or a rule or segment names it. Its membership history stays in
    ClickHouse."""
    if not valid_id(segment_id) or not await stored(definitions.delete_segment(grant.site, segment_id)):
        raise Problem(404, "no such segment", segment_id)
    return Response(status_code=204)


async def _page(analytics: Analytics, site_id: str, segment: Segment, sort: sm.Sort, limit: int,
                cursor: str | None) -> MembersPage:
    try:
        sm.decode_cursor(cursor, sort)
    except sm.BadCursor as err:
        raise refused(400, "invalid cursor", [f"cursor: {err}"]) from err
    return await analytics.read(sm.members_page, site_id, segment.id, segment.of, sort, limit, cursor)


@router.get("/segments/{segment_id}/members", response_model=SegmentMembers, responses=ERRORS)
async def members(grant: ReadGrant, segment_id: str, definitions: DefinitionsDep, analytics: AnalyticsDep,
                  sort: SortQuery = "score",
                  limit: int = Query(50, ge=1, le=sm.MAX_PAGE), cursor: CursorQuery = None) -> SegmentMembers:
    """The segment's current members, `limit` at a time, highest `sort` first (ties by member id)."""
    segment = await find_segment(definitions, grant.site, segment_id)
    page = await _page(analytics, grant.site, segment, sort, limit, cursor)
    count = (await analytics.read(sm.member_counts, grant.site, [segment.id]))[segment.id]
    return SegmentMembers(segment_id=segment.id, of=segment.of, sort=sort, count=count, members=list(page.members),
                          next_cursor=page.next_cursor)


def _csv_text(rows: list[tuple[str, ...]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


@router.get("/segments/{segment_id}/members.csv", response_class=StreamingResponse,
            responses=ERRORS | {200: {"content": {"text/csv": {}}, "description": "every current member, one a row"}})
async def members_csv(grant: ReadGrant, segment_id: str, definitions: DefinitionsDep, analytics: AnalyticsDep,
                      sort: SortQuery = "score") -> StreamingResponse:
    """Every current member as CSV (a header row, then one row per member, in `sort` order), streamed a page
    of 2,000 at a time, so that a segment of any size never sits in memory whole. The first page is read
    before the answer starts (an outage is still a 503); a failure later cuts the download short, so an
    incomplete file never looks complete."""
    segment = await find_segment(definitions, grant.site, segment_id)
    first = await _page(analytics, grant.site, segment, sort, sm.EXPORT_PAGE, None)
    header = sm.LEAD_CSV_HEADER if segment.of == "lead" else sm.ACCOUNT_CSV_HEADER

    async def pages() -> AsyncIterator[str]:
        page = first
        yield _csv_text([header, *map(sm.csv_row, page.members)])
        while page.next_cursor is not None:
            page = await analytics.read(sm.members_page, grant.site, segment.id, segment.of, sort, sm.EXPORT_PAGE,
                                        page.next_cursor)
            yield _csv_text([sm.csv_row(member) for member in page.members])

    return StreamingResponse(pages(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="segment-{segment.id}.csv"'})
