"""A board's live stream: `GET boards/{board}/stream` (server-sent events) and the token that opens it.

EventSource cannot send headers, so the page first gets a short-lived token (`stream-token`, api.keys) and
opens `stream?token=`; scripts may send `X-API-Key` instead. A stream opened with a token ends when the token
expires (the page then gets a new one and resumes from the last event id it saw: nothing is lost). Open
streams are limited per key and in all (api.streams).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.commands import now_ms
from api.dependencies import (
    DefinitionsDep,
    KeysDep,
    ReadGrant,
    SiteBoard,
    SiteRoute,
    StreamsDep,
    find_board,
    read_grant,
)
from api.keys import StreamPass, StreamToken
from api.problems import ERRORS, STREAM_ERRORS, Problem
from api.streams import StreamSlot
from processors.board_store import BoardStore, parse_stream_id
from schemas.boards import BoardDefinition

log = logging.getLogger(__name__)

STREAM_BLOCK_MS = 2_000  # well inside the Redis client's socket timeout (5 s by default)
STREAM_BATCH = 500
HEARTBEAT_S = 15

router = APIRouter(prefix="/v1/sites/{site_id}", tags=["board stream"], route_class=SiteRoute)


@router.get("/boards/{board_id}/stream-token", response_model=StreamToken, responses=ERRORS)
async def stream_token(grant: ReadGrant, board: SiteBoard, response: Response, keys: KeysDep) -> StreamToken:
    """A token for `GET .../stream?token=` (EventSource cannot send the key header). A GET, so that
    read-only keys get one too; never cached."""
    response.headers["Cache-Control"] = "no-store"
    return keys.stream_token(grant, board.id, now_ms())


def stream_pass(request: Request, site_id: str, board_id: str, keys: KeysDep,
                token: Annotated[str | None, Query(max_length=1000, description="from stream-token")] = None
                ) -> StreamPass:
    """The token's pass, or the X-API-Key's grant (a pass that does not expire: `expires_ms` 0)."""
    if token is not None and "x-api-key" not in request.headers:
        found = keys.check_stream_token(token, site_id, board_id, now_ms())
        if found is None:
            raise Problem(401, "stream token invalid or expired", "get a new one from .../stream-token")
        return found
    return StreamPass(read_grant(request, site_id), expires_ms=0)


@router.get("/boards/{board_id}/stream", response_class=EventSourceResponse, responses=STREAM_ERRORS | {
    200: {"content": {"text/event-stream": {}}, "description": "events `stage_change`, `card`, `reset`"}})
async def stream(opened: Annotated[StreamPass, Depends(stream_pass)], board_id: str, definitions: DefinitionsDep,
                 streams: StreamsDep,
                 last_event_id_query: str | None = Query(None, alias="last_event_id", max_length=64),
                 last_event_id: str | None = Header(None, alias="Last-Event-ID", max_length=64)):
    board = await find_board(definitions, opened.grant.site, board_id)
    resume_from = last_event_id or last_event_id_query
    if resume_from is not None:
        try:
            parse_stream_id(resume_from)
        except ValueError as err:
            raise Problem(400, "invalid Last-Event-ID", str(err)) from err
    slot = streams.slots.take(opened.grant.key_id)
    events = _feed_events(streams.store, opened.grant.site, board, resume_from, opened.expires_ms, slot)
    slot.release_with(events)
    return EventSourceResponse(events, ping=HEARTBEAT_S, headers={"Cache-Control": "no-store"})


async def _feed_events(store: BoardStore, site_id: str, board: BoardDefinition, last_id: str | None,
                       expires_ms: int, slot: StreamSlot) -> AsyncIterator[ServerSentEvent]:
    """The board's feed after `last_id` (from now when None), then live. When the feed no longer reaches
    back to `last_id`, a `reset` (reload the board) whose id is the feed's head, and on from there. After
    each batch a `version` event (no id) carries the board version, the If-Match for the next move.
    Ends when the client goes away (sse-starlette cancels this generator), when the token it was opened with
    expires (`expires_ms`; 0: never), or when Redis fails: the client reconnects from the last id it saw, so
    nothing is lost."""
    try:
        if last_id is None:
            last_id = (await store.board(site_id, board, 0)).feed_id
        page = await store.feed_after(site_id, board.id, last_id, STREAM_BATCH)
        while True:
            if page.trimmed:
                last_id = (await store.board(site_id, board, 0)).feed_id
                yield ServerSentEvent(id=last_id, event="reset", data='{"reason": "feed trimmed"}')
            for entry in page.entries:
                last_id = entry.id
                yield ServerSentEvent(id=entry.id, event=entry.type, data=entry.data.decode())
            if page.entries:
                version = await store.version(site_id, board.id)
                yield ServerSentEvent(event="version", data=orjson.dumps({"version": version}).decode())
            block_ms = STREAM_BLOCK_MS
            if expires_ms:
                block_ms = min(block_ms, expires_ms - now_ms())
                if block_ms <= 0:
                    return
            page = await store.wait_feed(site_id, board.id, last_id, block_ms, STREAM_BATCH)
    except RedisError as err:
        log.warning("board stream %s/%s ended: %s", site_id, board.id, err)
    finally:
        slot.release()
