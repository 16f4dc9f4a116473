"""Board-state API under /v1/sites/{site}/: LeadBoards, their cards, the Account Panel, the live stream, and
the site's rules and board definitions.

Reads come from the board store (Redis) and, for the Account Panel, from ClickHouse. Writes never touch board
state here: a POST becomes one `BoardCommand` on `board.commands` (keyed by card, so one card's commands keep
their order), and the board processor decides it with the same pure stage machine as every automatic move and
stores the outcome under the command id. The API pre-checks what it can (If-Match against the board
version, a backward move without force, an unknown stage) so that a person gets the refusal at once, then
waits a few seconds for the outcome: 200 with it, or 202 with the command id to look it up later.

The command id is derived from (site, board, card, Idempotency-Key): a retried request re-derives the same
id, which the board processor applies once.

EventSource cannot send headers, so the stream also accepts `?token=`: a short-lived token for one site's
board, signed with (and only checkable with) the API key it was issued for — never the key itself.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import dataclasses
import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import orjson
import redis.asyncio as aioredis
from clickhouse_driver.errors import ErrorCodes, ServerException
from fastapi import APIRouter, Body, Header, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api import automation_queries
from api.app import Problem, SiteGrant, unavailable
from api.lead_profile import (
    Account,
    AccountDetails,
    AccountLead,
    AccountSession,
    Identity,
    ProfileSession,
    Touch,
    account_panel,
    hand_added_account,
    lead_profile,
)
from processors.accounts import AccountRefused, manual_account
from processors.board_store import BoardStore, parse_stream_id
from processors.boards import (
    ARCHIVED,
    CARD_MERGED,
    EMPTY_NOTE,
    NOT_ON_BOARD,
    STAGE_REGRESSION,
    UNKNOWN_BOARD,
    UNKNOWN_STAGE,
    WRONG_CARD_KIND,
    CardState,
    Cause,
    MoveRequest,
    decide,
)
from processors.definitions_store import DefinitionsStore, StoredBoard
from processors.companies import CompanyStore, queue_wanted
from processors.lookup_tables import ip_ranges_key
from processors.runtime.producer import BatchProducer, Outputs
from schemas.boards import (
    CARD_ID,
    DEFINITION_ID,
    BoardCommand,
    BoardDefinition,
    CardNote,
    CardView,
    CommandResult,
    account_card_id,
)
from schemas.companies import Company
from schemas.definitions import DefinitionsError
from schemas.rules import Rule, RuleExecution
from schemas.settings import Settings
from schemas.topics import BOARD_COMMANDS

log = logging.getLogger(__name__)

COMMAND_WAIT_S = 5.0
COMMAND_POLL_S = 0.05
STREAM_TOKEN_TTL_MS = 5 * 60_000
STREAM_BLOCK_MS = 2_000  # well inside the Redis client's socket timeout (5 s by default)
STREAM_BATCH = 500
HEARTBEAT_S = 15
DEFAULT_CARDS_PER_STAGE = 50
MAX_CARDS_PER_STAGE = 500
VALID_ID = re.compile(DEFINITION_ID)

STALE_VERSION = "stale_version"  # If-Match is not the board's version (the API's 412; the board processor re-checks)

# How a refusal (the stage machine's code, stored by the board processor in CommandResult.code) answers over HTTP.
REFUSAL_STATUS = {
    STAGE_REGRESSION: 409, CARD_MERGED: 409, ARCHIVED: 409,
    UNKNOWN_STAGE: 422, WRONG_CARD_KIND: 422, EMPTY_NOTE: 422,
    UNKNOWN_BOARD: 404, NOT_ON_BOARD: 404,
    STALE_VERSION: 412,
}


# ---------------------------------------------------------------------------------------- request bodies


class AddCard(BaseModel):
    domain: str = Field(min_length=1, max_length=253, description="a domain, URL or email address of the company")
    name: str = Field("", max_length=128, description="company name; looked up when empty")


class MoveCard(BaseModel):
    to: str = Field(min_length=1, max_length=64, description="target stage id")
    force: bool = Field(False, description="needed (with a reason) to move a card back")
    reason: str = Field("", max_length=1000)


class AddNote(BaseModel):
    text: str = Field(min_length=1, max_length=2000)


class SetOwner(BaseModel):
    owner: str = Field(max_length=128, description="'' to unassign")


# ---------------------------------------------------------------------------------------- responses


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
    def of(cls, stored: StoredBoard) -> BoardSummary:
        board = stored.board
        return cls(id=board.id, name=board.name, card=board.card, version=stored.version,
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


class CommandOutcome(BaseModel):
    command_id: str
    status: Literal["applied", "pending"]
    result: CommandResult | None = None
    card: CardView | None = None


class StreamToken(BaseModel):
    token: str
    expires_ms: int


class AccountCardPanel(BaseModel):
    kind: Literal["account"]
    card: CardView
    notes: list[CardNote]
    account: AccountDetails
    leads: list[AccountLead]
    session_count: int
    page: int
    page_size: int
    sessions: list[AccountSession]
    has_more: bool


class LeadCardPanel(BaseModel):
    kind: Literal["lead"]
    card: CardView
    notes: list[CardNote]
    identity: Identity | None
    account: Account | None
    first_touch: Touch | None
    last_touch: Touch | None
    session_count: int
    page: int
    page_size: int
    sessions: list[ProfileSession]
    has_more: bool


class RuleList(BaseModel):
    rules: list[dict[str, Any]]


class RuleExecutions(BaseModel):
    rule_id: str
    executions: list[RuleExecution] = Field(description="newest first")
    next_offset: int | None = Field(None, description="the next page's offset; null after a short page")


IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255,
                                              description="a retried request with the same key acts once")]
IfMatch = Annotated[str | None, Header(alias="If-Match", max_length=255,
                                       description="the board's ETag; 412 when it is not current")]

PROBLEM = {"content": {"application/problem+json": {}}}
ERRORS = {status: {**PROBLEM, "description": text} for status, text in (
    (400, "malformed request"), (401, "API key required"), (403, "key not for this site, or read-only"),
    (404, "no such board, card or rule on this site"), (503, "a store is unavailable"))}
COMMAND_ERRORS = ERRORS | {status: {**PROBLEM, "description": text} for status, text in (
    (409, "refused by the stage machine (`code`: stage_regression, ...)"),
    (412, "If-Match is not the current board version"), (422, "invalid body, unknown stage, free-mail domain"))}


# ---------------------------------------------------------------------------------------- pure helpers


def command_id_for(site_id: str, board_id: str, card_id: str, idempotency_key: str | None) -> str:
    """Deterministic for a retried request (same Idempotency-Key), random without one."""
    if not idempotency_key:
        return "cmd_" + uuid.uuid4().hex
    text = "\x1f".join((site_id, board_id, card_id, idempotency_key))
    return "cmd_" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def key_id(api_key: str) -> str:
    """Names a key in actors and tokens without revealing it."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def etag(version: int) -> str:
    return f'"{version}"'


def matches(if_match: str | None, version: int) -> bool:
    """RFC 9110 If-Match against the board version: absent or `*` always matches; weak tags compare too."""
    if if_match is None or if_match.strip() == "*":
        return True
    tags = (tag.strip().removeprefix("W/").strip('"') for tag in if_match.split(","))
    return str(version) in tags


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_stream_token(api_key: str, site_id: str, board_id: str, now_ms: int) -> StreamToken:
    expires_ms = now_ms + STREAM_TOKEN_TTL_MS
    payload = orjson.dumps({"s": site_id, "b": board_id, "e": expires_ms, "k": key_id(api_key)})
    signature = hmac.new(api_key.encode(), payload, hashlib.sha256).digest()
    return StreamToken(token=f"{_b64(payload)}.{_b64(signature)}", expires_ms=expires_ms)


def check_stream_token(token: str, api_keys: dict[str, SiteGrant], site_id: str, board_id: str, now_ms: int) -> bool:
    """True when `token` was signed with a configured key of this site, for this board, and is unexpired."""
    try:
        payload_text, signature_text = token.split(".")
        payload = _unb64(payload_text)
        claims = orjson.loads(payload)
        signature = _unb64(signature_text)
    except (ValueError, orjson.JSONDecodeError):
        return False
    if not isinstance(claims, dict) or (claims.get("s"), claims.get("b")) != (site_id, board_id):
        return False
    if not isinstance(claims.get("e"), int) or claims["e"] < now_ms:
        return False
    return any(
        site == site_id and key_id(key) == claims.get("k")
        and hmac.compare_digest(hmac.new(key.encode(), payload, hashlib.sha256).digest(), signature)
        for key, site in api_keys.items()
    )


def company_from_ip_ranges(csv_text: str, domain: str) -> str:
    """The company name an IP-range table (`cidr,domain,company_name[,kind]`) gives `domain` (an account
    domain; the table's domains are read as the table loader reads them), or ''."""
    for cells in csv.reader(csv_text.splitlines()):
        if len(cells) >= 3 and cells[2].strip() and (len(cells) < 4 or cells[3].strip().lower() in ("", "company")):
            try:
                if manual_account(cells[1]).domain == domain:
                    return cells[2].strip()
            except AccountRefused:
                continue
    return ""


def pre_check_move(board: BoardDefinition, card: CardState, body: MoveCard, actor: str, now_ms: int) -> None:
    """Refuse at once what the board processor would refuse (it re-checks authoritatively): the same `decide`."""
    decision = decide(board, card, MoveRequest(Cause(actor, now_ms, reason=body.reason), body.to, by_person=True,
                                               force=body.force))
    if decision.refused:
        raise Problem(REFUSAL_STATUS.get(decision.code, 409), "move refused", decision.message, decision.code)


# ---------------------------------------------------------------------------------------- services


@dataclasses.dataclass
class BoardServices:
    """What the board endpoints share, created in the app's lifespan (inside its event loop)."""

    settings: Settings
    redis: aioredis.Redis
    boards: BoardStore
    definitions: DefinitionsStore
    companies: CompanyStore
    producer: BatchProducer
    _producer_started: bool = False
    _producer_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    @classmethod
    @asynccontextmanager
    async def running(cls, settings: Settings) -> AsyncIterator[BoardServices]:
        redis = aioredis.from_url(settings.redis_url)
        prefix = settings.name("ls")
        services = cls(settings, redis, BoardStore(redis, prefix), DefinitionsStore(redis, prefix),
                       CompanyStore(redis, prefix), BatchProducer(settings.kafka()))
        try:
            yield services
        finally:
            if services._producer_started:
                await services.producer.stop()
            await redis.aclose()

    async def send(self, command: BoardCommand) -> None:
        """Produce one command; the producer starts on first use, so the read API runs without Kafka."""
        try:
            async with self._producer_lock:
                if not self._producer_started:
                    await self.producer.start()
                    self._producer_started = True
            outputs = Outputs(self.settings.partitions)
            outputs.add(BOARD_COMMANDS, command.card_id.encode(), command.to_json())
            await self.producer.send(outputs)
        except Exception as err:  # noqa: BLE001 - any broker error is an outage to the caller
            raise unavailable("command bus unavailable", err) from err

    async def wait_for_result(self, site_id: str, command_id: str) -> CommandResult | None:
        deadline = time.monotonic() + COMMAND_WAIT_S
        while True:
            result = await self.boards.command_result(site_id, command_id)
            if result is not None or time.monotonic() >= deadline:
                return result
            await asyncio.sleep(COMMAND_POLL_S)

    async def company_name_from_ip_ranges(self, domain: str) -> str:
        ranges = await self.redis.get(ip_ranges_key(self.settings.name("ls")))
        return company_from_ip_ranges(ranges.decode(), domain) if ranges else ""

    async def company(self, domain: str) -> Company | None:
        """The account's company card, None when nobody loaded one; queued for the enrichment provider then,
        when one is set."""
        card = (await self.companies.get_many([domain])).get(domain)
        if card is None and self.settings.company_provider_url:
            async with self.redis.pipeline(transaction=False) as pipe:
                queue_wanted(pipe, self.settings.name("ls"), [domain], _now_ms())
                await pipe.execute()
        return card


# ---------------------------------------------------------------------------------------- the router


def board_router(api_keys: dict[str, SiteGrant], authorise: Callable[[Request, str], str],
                 read: Callable) -> APIRouter:
    """`authorise(request, site)` checks the key (X-API-Key header only) and returns it; `read(fn, *args)` runs
    a ClickHouse read (an outage is a 503)."""
    router = APIRouter(prefix="/v1/sites/{site_id}", tags=["boards"])

    async def read_off_loop(fn: Callable, *args, **kwargs):
        """ClickHouse reads block: run them in the thread pool, never on the event loop the streams share."""
        return await run_in_threadpool(read, fn, *args, **kwargs)

    def services(request: Request) -> BoardServices:
        try:
            return request.app.state.board_services
        except AttributeError:  # an app driven without its lifespan (a TestClient outside `with`)
            raise unavailable("board services not started", "the app's lifespan has not run") from None

    async def board_definition(request: Request, site_id: str, board_id: str) -> BoardDefinition:
        if not _valid_id(board_id):
            raise Problem(404, "no such board", board_id)
        stored = await services(request).definitions.get_board(site_id, board_id)
        if stored is None:
            raise Problem(404, "no such board", board_id)
        return stored.board

    async def card_view(request: Request, site_id: str, board_id: str, card_id: str) -> CardView:
        view = await services(request).boards.card(site_id, board_id, card_id) if CARD_ID.match(card_id) else None
        if view is None:
            raise Problem(404, "no such card on this board", card_id)
        return view

    async def run_command(request: Request, response: Response, command: BoardCommand) -> CommandOutcome:
        """Send (unless a retry finds it applied), wait for the outcome, answer it."""
        board_services = services(request)
        result = await board_services.boards.command_result(command.site_id, command.command_id)
        if result is None:
            await board_services.send(command)
            result = await board_services.wait_for_result(command.site_id, command.command_id)
        response.headers["ETag"] = etag(await board_services.boards.version(command.site_id, command.board_id))
        if result is None:
            response.status_code = 202
            response.headers["Location"] = (f"/v1/sites/{command.site_id}/boards/{command.board_id}"
                                            f"/commands/{command.command_id}")
            return CommandOutcome(command_id=command.command_id, status="pending")
        if not result.ok:
            raise Problem(REFUSAL_STATUS.get(result.code, 409), f"{command.kind} refused", result.message,
                          result.code, command_id=command.command_id)
        card = await board_services.boards.card(command.site_id, command.board_id, command.card_id)
        return CommandOutcome(command_id=command.command_id, status="applied", result=result, card=card)

    def new_command(api_key: str, site_id: str, board_id: str, card_id: str, kind: str,
                    idempotency_key: str | None, if_match: int = -1, **fields: Any) -> BoardCommand:
        return BoardCommand(command_id=command_id_for(site_id, board_id, card_id, idempotency_key),
                            site_id=site_id, board_id=board_id, card_id=card_id, kind=kind,  # type: ignore[arg-type]
                            actor=f"user:key-{key_id(api_key)}", if_match=if_match, ts_ms=_now_ms(), **fields)

    # ------------------------------------------------------------------------------------ boards

    @router.get("/boards", response_model=BoardList, responses=ERRORS)
    async def list_boards(site_id: str, request: Request) -> BoardList:
        authorise(request, site_id)
        return BoardList(boards=[BoardSummary.of(b) for b in await services(request).definitions.list_boards(site_id)])

    @router.get("/boards/{board_id}", response_model=BoardView, responses=ERRORS)
    async def get_board(site_id: str, board_id: str, request: Request, response: Response,
                        limit: int = Query(DEFAULT_CARDS_PER_STAGE, ge=1, le=MAX_CARDS_PER_STAGE,
                                           description="cards per stage"),
                        stage: str | None = Query(None, description="only this stage (to page it with cursor)"),
                        cursor: str | None = Query(None, pattern=r"^[0-9]{1,9}$",
                                                   description="a stage's next_cursor")) -> BoardView:
        authorise(request, site_id)
        board = await board_definition(request, site_id, board_id)
        if stage is not None and all(s.id != stage for s in board.stages):
            raise Problem(404, "no such stage", stage)
        if cursor is not None and stage is None:
            raise Problem(400, "cursor needs stage", "a cursor pages one stage: pass ?stage=ID&cursor=...")
        page = await services(request).boards.board(site_id, board, limit, {stage: int(cursor)} if cursor else None)
        response.headers["ETag"] = etag(page.version)
        stages = [
            StageColumn(id=c.stage_id, name=c.name, count=c.count, cards=c.cards,
                        next_cursor=str(c.offset + limit) if c.count > c.offset + limit else None)
            for c in page.columns if stage in (None, c.stage_id)
        ]
        return BoardView(board=BoardRef(id=board.id, name=board.name, card=board.card), version=page.version,
                         feed_id=page.feed_id, stages=stages)

    @router.put("/boards/{board_id}", response_model=BoardSummary, responses=COMMAND_ERRORS)
    async def put_board(site_id: str, board_id: str, request: Request, response: Response,
                        definition: Annotated[dict[str, Any], Body()]) -> BoardSummary:
        authorise(request, site_id)
        board = _validated(BoardDefinition, definition, board_id)
        version = await _stored(services(request).definitions.put_board(site_id, board))
        response.headers["ETag"] = etag(version)
        return BoardSummary.of(StoredBoard(board, version))

    # ------------------------------------------------------------------------------------ cards

    @router.post("/boards/{board_id}/cards", response_model=CommandOutcome, responses=COMMAND_ERRORS,
                 status_code=200)
    async def add_card(site_id: str, board_id: str, body: AddCard, request: Request, response: Response,
                       idempotency_key: IdempotencyKey = None) -> CommandOutcome:
        api_key = authorise(request, site_id)
        board = await board_definition(request, site_id, board_id)
        if board.card != "account":
            raise Problem(422, "this board shows lead cards", "accounts are added to boards with account cards",
                          WRONG_CARD_KIND)
        try:
            domain = manual_account(body.domain).domain
        except AccountRefused as refused:
            reason = str(refused)
            detail = (f"{body.domain!r} is a free-mail or disposable email provider, not a company"
                      if reason == "personal_email_domain" else f"{body.domain!r} is not a domain name")
            raise Problem(422, "cannot be an account", detail, reason) from refused
        card = await services(request).company(domain)
        name = (body.name.strip() or (await read_off_loop(hand_added_account, site_id, domain))[0]
                or (card.name if card is not None else "") or await services(request).company_name_from_ip_ranges(domain))
        command = new_command(api_key, site_id, board_id, account_card_id(domain), "add", idempotency_key, text=name)
        return await run_command(request, response, command)

    @router.get("/boards/{board_id}/cards/{card_id}", response_model=AccountCardPanel | LeadCardPanel,
                responses=ERRORS)
    async def get_card(site_id: str, board_id: str, card_id: str, request: Request,
                       page: int = Query(0, ge=0, le=10_000, description="5 sessions a page, newest first")
                       ) -> dict[str, Any]:
        authorise(request, site_id)
        await board_definition(request, site_id, board_id)
        view = await card_view(request, site_id, board_id, card_id)
        notes = await services(request).boards.card_notes(site_id, board_id, card_id)
        kind, _, ident = card_id.partition(":")
        if kind == "account":
            company = await services(request).company(ident)
            panel = dataclasses.asdict(await read_off_loop(account_panel, site_id, ident, page=page, company=company))
            panel["account"]["company_name"] = panel["account"]["company_name"] or view.title
        else:
            profile = await read_off_loop(lead_profile, site_id, ident, page=page)
            panel = dataclasses.asdict(profile) if profile is not None else _empty_profile(page)
        return {"kind": kind, "card": view, "notes": notes, **panel}

    @router.post("/boards/{board_id}/cards/{card_id}/move", response_model=CommandOutcome, responses=COMMAND_ERRORS)
    async def move_card(site_id: str, board_id: str, card_id: str, body: MoveCard, request: Request,
                        response: Response, idempotency_key: IdempotencyKey = None,
                        if_match: IfMatch = None) -> CommandOutcome:
        api_key = authorise(request, site_id)
        board = await board_definition(request, site_id, board_id)
        store = services(request).boards
        version = await store.version(site_id, board_id)
        command = new_command(api_key, site_id, board_id, card_id, "move", idempotency_key,
                              if_match=version if if_match is not None else -1,
                              to_stage=body.to, force=body.force, reason=body.reason.strip())
        if await store.command_result(site_id, command.command_id) is None:  # a retry of an applied move: answer it
            if not matches(if_match, version):
                raise Problem(412, "the board changed", f"If-Match {if_match} is not the current version "
                              f"{etag(version)}", STALE_VERSION)
            await card_view(request, site_id, board_id, card_id)
            card = (await store.load_cards(site_id, [card_id]))[card_id]
            if card is not None:
                pre_check_move(board, card, body, command.actor, command.ts_ms)
        return await run_command(request, response, command)

    async def edit_card(request: Request, response: Response, site_id: str, board_id: str, card_id: str,
                        kind: str, idempotency_key: str | None, text: str = "") -> CommandOutcome:
        api_key = authorise(request, site_id)
        if kind == "note" and not text.strip():
            raise Problem(422, "invalid request", "body.text: a note needs text", EMPTY_NOTE)
        await board_definition(request, site_id, board_id)
        await card_view(request, site_id, board_id, card_id)
        return await run_command(request, response, new_command(api_key, site_id, board_id, card_id, kind,
                                                                idempotency_key, text=text))

    @router.post("/boards/{board_id}/cards/{card_id}/notes", response_model=CommandOutcome, responses=COMMAND_ERRORS)
    async def add_note(site_id: str, board_id: str, card_id: str, body: AddNote, request: Request,
                       response: Response, idempotency_key: IdempotencyKey = None) -> CommandOutcome:
        return await edit_card(request, response, site_id, board_id, card_id, "note", idempotency_key, body.text)

    @router.post("/boards/{board_id}/cards/{card_id}/owner", response_model=CommandOutcome, responses=COMMAND_ERRORS)
    async def set_owner(site_id: str, board_id: str, card_id: str, body: SetOwner, request: Request,
                        response: Response, idempotency_key: IdempotencyKey = None) -> CommandOutcome:
        return await edit_card(request, response, site_id, board_id, card_id, "owner", idempotency_key, body.owner)

    @router.post("/boards/{board_id}/cards/{card_id}/archive", response_model=CommandOutcome,
                 responses=COMMAND_ERRORS)
    async def archive(site_id: str, board_id: str, card_id: str, request: Request, response: Response,
                      idempotency_key: IdempotencyKey = None) -> CommandOutcome:
        return await edit_card(request, response, site_id, board_id, card_id, "archive", idempotency_key)

    @router.post("/boards/{board_id}/cards/{card_id}/unarchive", response_model=CommandOutcome,
                 responses=COMMAND_ERRORS)
    async def unarchive(site_id: str, board_id: str, card_id: str, request: Request, response: Response,
                        idempotency_key: IdempotencyKey = None) -> CommandOutcome:
        return await edit_card(request, response, site_id, board_id, card_id, "unarchive", idempotency_key)

    @router.get("/boards/{board_id}/commands/{command_id}", response_model=CommandResult, responses=ERRORS)
    async def command_outcome(site_id: str, board_id: str, command_id: str, request: Request) -> CommandResult:
        authorise(request, site_id)
        result = await services(request).boards.command_result(site_id, command_id)
        if result is None or result.board_id != board_id:
            raise Problem(404, "no outcome for this command (yet)", command_id)
        return result

    # ------------------------------------------------------------------------------------ live stream

    @router.get("/boards/{board_id}/stream-token", response_model=StreamToken, responses=ERRORS)
    async def stream_token(site_id: str, board_id: str, request: Request, response: Response) -> StreamToken:
        """A token for `GET .../stream?token=` (EventSource cannot send the key header). A GET, so that
        read-only keys get one too; never cached."""
        api_key = authorise(request, site_id)
        await board_definition(request, site_id, board_id)
        response.headers["Cache-Control"] = "no-store"
        return sign_stream_token(api_key, site_id, board_id, _now_ms())

    @router.get("/boards/{board_id}/stream", response_class=EventSourceResponse, responses=ERRORS | {
        200: {"content": {"text/event-stream": {}}, "description": "events `stage_change`, `card`, `reset`"}})
    async def stream(site_id: str, board_id: str, request: Request,
                     token: str | None = Query(None, max_length=1000, description="from stream-token"),
                     last_event_id_query: str | None = Query(None, alias="last_event_id", max_length=64),
                     last_event_id: str | None = Header(None, alias="Last-Event-ID", max_length=64)):
        if token is not None and "x-api-key" not in request.headers:
            if not check_stream_token(token, api_keys, site_id, board_id, _now_ms()):
                raise Problem(401, "stream token invalid or expired", "get a new one from .../stream-token")
        else:
            authorise(request, site_id)
        board = await board_definition(request, site_id, board_id)
        resume_from = last_event_id or last_event_id_query
        if resume_from is not None:
            try:
                parse_stream_id(resume_from)
            except ValueError as err:
                raise Problem(400, "invalid Last-Event-ID", str(err)) from err
        store = services(request).boards
        return EventSourceResponse(_feed_events(store, site_id, board, resume_from), ping=HEARTBEAT_S,
                                   headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------------------------------ rules

    @router.get("/rules", response_model=RuleList, responses=ERRORS)
    async def list_rules(site_id: str, request: Request) -> RuleList:
        authorise(request, site_id)
        rules = await services(request).definitions.list_rules(site_id)
        return RuleList(rules=[_rule_json(rule) for rule in rules])

    @router.get("/rules/{rule_id}", responses=ERRORS)
    async def get_rule(site_id: str, rule_id: str, request: Request) -> dict[str, Any]:
        authorise(request, site_id)
        rule = await services(request).definitions.get_rule(site_id, rule_id) if _valid_id(rule_id) else None
        if rule is None:
            raise Problem(404, "no such rule", rule_id)
        return _rule_json(rule)

    @router.put("/rules/{rule_id}", responses=COMMAND_ERRORS)
    async def put_rule(site_id: str, rule_id: str, request: Request, response: Response,
                       definition: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        authorise(request, site_id)
        rule = _validated(Rule, definition, rule_id)
        version = await _stored(services(request).definitions.put_rule(site_id, rule))
        response.headers["ETag"] = etag(version)
        return _rule_json(rule.model_copy(update={"version": version}))

    @router.delete("/rules/{rule_id}", status_code=204, responses=ERRORS)
    async def delete_rule(site_id: str, rule_id: str, request: Request) -> Response:
        authorise(request, site_id)
        if not _valid_id(rule_id) or not await services(request).definitions.delete_rule(site_id, rule_id):
            raise Problem(404, "no such rule", rule_id)
        return Response(status_code=204)

    @router.get("/rules/{rule_id}/executions", response_model=RuleExecutions, responses=ERRORS)
    async def rule_executions(site_id: str, rule_id: str, request: Request,
                              limit: int = Query(50, ge=1, le=automation_queries.MAX_EXECUTIONS_PAGE),
                              offset: int = Query(0, ge=0, le=1_000_000)
                              ) -> RuleExecutions:
        """Every firing of the rule (also of its earlier versions, and after it was deleted), newest first."""
        authorise(request, site_id)
        if not _valid_id(rule_id):
            raise Problem(404, "no such rule", rule_id)
        executions = await read_off_loop(_rule_executions, site_id, rule_id, limit, offset)
        return RuleExecutions(rule_id=rule_id, executions=executions,
                              next_offset=offset + limit if len(executions) == limit else None)

    return router


async def _feed_events(store: BoardStore, site_id: str, board: BoardDefinition, last_id: str | None
                       ) -> AsyncIterator[ServerSentEvent]:
    """The board's feed after `last_id` (from now when None), then live. When the feed no longer reaches
    back to `last_id`, a `reset` (reload the board) whose id is the feed's head, and on from there. After
    each batch a `version` event (no id) carries the board version, the If-Match for the next move.
    Ends when the client goes away (sse-starlette cancels this generator), or when Redis fails: the client
    reconnects from the last id it saw, so nothing is lost."""
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
            page = await store.wait_feed(site_id, board.id, last_id, STREAM_BLOCK_MS, STREAM_BATCH)
    except aioredis.RedisError as err:
        log.warning("board stream %s/%s ended: %s", site_id, board.id, err)


def _rule_executions(client, site_id: str, rule_id: str, limit: int, offset: int) -> list[RuleExecution]:
    """automation_queries.rule_executions; a database the migrations have not reached yet is a clear 503."""
    try:
        return automation_queries.rule_executions(client, site_id, rule_id, limit, offset)
    except ServerException as err:
        if err.code != ErrorCodes.UNKNOWN_TABLE:
            raise
        raise unavailable("rule executions are not recorded yet",
                          "ClickHouse has no rule_executions table: run the migrations (`leadstream migrate`)") from err


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _valid_id(ident: str) -> bool:
    return VALID_ID.match(ident) is not None


def _rule_json(rule: Rule) -> dict[str, Any]:
    """The rule as its author wrote it (no filled-in defaults), with its version."""
    return {"id": rule.id, **rule.content(), "version": rule.version}


def _validated(model: type[BaseModel], data: dict[str, Any], path_id: str):
    """A definition from a PUT body (its id may be left out): 422 naming the field when invalid."""
    if not _valid_id(path_id):
        raise Problem(404, "no such definition", path_id)
    data = {"id": path_id, **data}
    if data["id"] != path_id:
        raise Problem(422, "invalid definition", f"id: {data['id']!r} does not match the path ({path_id!r})")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise Problem(422, "invalid definition", "; ".join(map(_field_problem, err.errors()))) from err


def _field_problem(error: Mapping[str, Any]) -> str:
    """`when.url: ...` for a field, the bare message for the definition as a whole."""
    message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
    path = ".".join(map(str, error["loc"]))
    return f"{path}: {message}" if path else message


async def _stored(write) -> int:
    """A definitions write; refused whole (422, every problem named) when the site's set would not hold."""
    try:
        return await write
    except DefinitionsError as err:
        raise Problem(422, "invalid definition", "; ".join(err.problems)) from err


def _empty_profile(page: int) -> dict[str, Any]:
    """A lead card whose lead has no rows in ClickHouse yet."""
    return {"identity": None, "account": None, "first_touch": None, "last_touch": None, "session_count": 0,
            "page": page, "page_size": 5, "sessions": [], "has_more": False}
