"""A board's cards: add an account by domain, the Account Panel (an account card's; a lead card's shows its
Lead Profile), move, notes, owner, archive, and the outcome of a command (api.commands sends them to the
board processor and waits for the outcome). Both panels carry the card's lead time on the board
(api.lead_time).

A move is pre-checked here with the same pure stage machine the board processor applies (If-Match against
the board version, a backward move without force, an unknown stage), so a person gets the refusal at once.
"""

from __future__ import annotations

import csv
import dataclasses
from typing import Annotated, Any, Literal

import redis.asyncio as aioredis
from fastapi import APIRouter, Header, Query, Response
from pydantic import BaseModel, Field

from api.analytics import Analytics
from api.automation_queries import full_lead_profile
from api.commands import REFUSAL_STATUS, STALE_VERSION, CommandBus, CommandOutcome, etag, now_ms, person_command
from api.dependencies import (
    AnalyticsDep,
    BoardStoreDep,
    CommandsDep,
    CompaniesDep,
    DefinitionsDep,
    ReadGrant,
    RedisDep,
    SettingsDep,
    SiteBoard,
    SiteRoute,
    WriteGrant,
)
from api.keys import SiteGrant
from api.lead_profile import (
    PAGE_SIZE,
    Account,
    AccountDetails,
    AccountSession,
    Identity,
    PanelLead,
    ProfileSession,
    Touch,
    account_panel,
    hand_added_account,
)
from api.lead_time import CardLeadTime, read_card_lead_time
from api.problems import COMMAND_ERRORS, ERRORS, Problem
from processors.accounts import AccountRefused, manual_account
from processors.board_store import BoardStore
from processors.boards import EMPTY_NOTE, WRONG_CARD_KIND, CardState, Cause, MoveRequest, decide
from processors.companies import CompanyStore, queue_wanted
from processors.runtime.writes import RedisWrites
from schemas.boards import CARD_ID, BoardDefinition, CardNote, CardView, CommandResult, account_card_id
from schemas.companies import Company
from schemas.redis_keys import RedisKeys
from schemas.settings import Settings

router = APIRouter(prefix="/v1/sites/{site_id}", tags=["cards"], route_class=SiteRoute)


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


class AccountCardPanel(BaseModel):
    kind: Literal["account"]
    card: CardView
    notes: list[CardNote]
    account: AccountDetails
    leads: list[PanelLead] = Field(description="the most recently active current leads, at most the server's "
                                               "api_max_account_leads, each with what it did and its score and tags")
    session_count: int
    page: int
    page_size: int
    sessions: list[AccountSession]
    has_more: bool
    lead_time: CardLeadTime = Field(description="from first seen to each stage the card arrived in on this board")


class LeadTag(BaseModel):
    tag: str
    source: str
    rule_id: str
    rule_version: int
    event_id: str
    ts_ms: int


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
    tags: list[LeadTag] = Field(description="the lead's tags, each with why it has it, as in its Lead Profile")
    score: int
    properties: dict[str, Any]
    lead_time: CardLeadTime = Field(description="from first seen to each stage the card arrived in on this board")


IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255,
                                              description="a retried request with the same key acts once")]
IfMatch = Annotated[str | None, Header(alias="If-Match", max_length=255,
                                       description="the board's ETag; 412 when it is not current")]


def matches(if_match: str | None, version: int) -> bool:
    """RFC 9110 If-Match against the board version: absent or `*` always matches; weak tags compare too."""
    if if_match is None or if_match.strip() == "*":
        return True
    tags = (tag.strip().removeprefix("W/").strip('"') for tag in if_match.split(","))
    return str(version) in tags


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


async def company_card(companies: CompanyStore, redis: aioredis.Redis, settings: Settings, domain: str
                       ) -> Company | None:
    """The account's company card, None when nobody loaded one; queued for the enrichment provider then,
    when one is set."""
    card = (await companies.get_many([domain])).get(domain)
    if card is None and settings.company_provider_url:
        async with redis.pipeline(transaction=False) as pipe:
            queue_wanted(RedisWrites(pipe), settings.name("ls"), [domain], now_ms())
            await pipe.execute()
    return card


async def card_view(store: BoardStore, site_id: str, board_id: str, card_id: str) -> CardView:
    view = await store.card(site_id, board_id, card_id) if CARD_ID.match(card_id) else None
    if view is None:
        raise Problem(404, "no such card on this board", card_id)
    return view


@router.post("/boards/{board_id}/cards", response_model=CommandOutcome, responses=COMMAND_ERRORS, status_code=200)
async def add_card(grant: WriteGrant, board: SiteBoard, body: AddCard, response: Response, commands: CommandsDep,
                   analytics: AnalyticsDep, companies: CompaniesDep, redis: RedisDep, settings: SettingsDep,
                   idempotency_key: IdempotencyKey = None) -> CommandOutcome:
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
    card = await company_card(companies, redis, settings, domain)
    name = (body.name.strip() or (await analytics.read(hand_added_account, grant.site, domain))[0]
            or (card.name if card is not None else ""))
    if not name:
        ranges = await redis.get(RedisKeys.of(settings).ip_ranges)
        name = company_from_ip_ranges(ranges.decode(), domain) if ranges else ""
    command = person_command(grant, board.id, account_card_id(domain), "add", idempotency_key, text=name)
    return await commands.run(command, response)


@router.get("/boards/{board_id}/cards/{card_id}", response_model=AccountCardPanel | LeadCardPanel, responses=ERRORS)
async def get_card(grant: ReadGrant, board: SiteBoard, card_id: str, store: BoardStoreDep, analytics: AnalyticsDep,
                   companies: CompaniesDep, redis: RedisDep, settings: SettingsDep,
                   page: int = Query(0, ge=0, le=10_000, description="5 sessions a page, newest first"),
                   ) -> dict[str, Any]:
    view = await card_view(store, grant.site, board.id, card_id)
    notes = await store.card_notes(grant.site, board.id, card_id)
    kind, _, ident = card_id.partition(":")
    if kind == "account":
        company = await company_card(companies, redis, settings, ident)
        panel = dataclasses.asdict(await analytics.read(account_panel, grant.site, ident, page=page,
                                                        max_leads=settings.api_max_account_leads, company=company))
        panel["account"]["company_name"] = panel["account"]["company_name"] or view.title
        first_seen_ms = panel["account"]["first_seen_ms"]
    else:
        panel = await _lead_panel(analytics, grant.site, ident, page)
        first_seen_ms = panel["identity"]["first_seen_ms"] if panel["identity"] else 0
    lead_time = await analytics.read(read_card_lead_time, grant.site, board, card_id, first_seen_ms,
                                     current=(view.stage_id, view.entered_stage_ms))
    return {"kind": kind, "card": view, "notes": notes, **panel, "lead_time": lead_time}


async def _lead_panel(analytics: Analytics, site_id: str, lead_id: str, page: int) -> dict[str, Any]:
    """The Lead Profile with the lead's tags, score and properties; a lead ClickHouse has no rows for yet has
    an empty one."""
    profile = await analytics.read(full_lead_profile, site_id, lead_id, page=page)
    if profile is None:
        return {"identity": None, "account": None, "first_touch": None, "last_touch": None, "session_count": 0,
                "page": page, "page_size": PAGE_SIZE, "sessions": [], "has_more": False, "tags": [], "score": 0,
                "properties": {}}
    return profile


@router.post("/boards/{board_id}/cards/{card_id}/move", response_model=CommandOutcome, responses=COMMAND_ERRORS)
async def move_card(grant: WriteGrant, board: SiteBoard, card_id: str, body: MoveCard, response: Response,
                    store: BoardStoreDep, commands: CommandsDep, idempotency_key: IdempotencyKey = None,
                    if_match: IfMatch = None) -> CommandOutcome:
    version = await store.version(grant.site, board.id)
    command = person_command(grant, board.id, card_id, "move", idempotency_key,
                             if_match=version if if_match is not None else -1,
                             to_stage=body.to, force=body.force, reason=body.reason.strip())
    if await store.command_result(grant.site, command.command_id) is None:  # a retry of an applied move: answer it
        if not matches(if_match, version):
            raise Problem(412, "the board changed", f"If-Match {if_match} is not the current version "
                          f"{etag(version)}", STALE_VERSION)
        await card_view(store, grant.site, board.id, card_id)
        card = (await store.load_cards(grant.site, [card_id]))[card_id]
        if card is not None:
            pre_check_move(board, card, body, command.actor, command.ts_ms)
    return await commands.run(command, response)


async def _edit_card(grant: SiteGrant, board: BoardDefinition, card_id: str, kind: str, response: Response,
                     store: BoardStore, commands: CommandBus, idempotency_key: str | None, text: str = ""
                     ) -> CommandOutcome:
    if kind == "note" and not text.strip():
        raise Problem(422, "invalid request", "body.text: a note needs text", EMPTY_NOTE)
    await card_view(store, grant.site, board.id, card_id)
    return await commands.run(person_command(grant, board.id, card_id, kind, idempotency_key, text=text), response)


@router.post("/boards/{board_id}/cards/{card_id}/notes", response_model=CommandOutcome, responses=COMMAND_ERRORS)
async def add_note(grant: WriteGrant, board: SiteBoard, card_id: str, body: AddNote, response: Response,
                   store: BoardStoreDep, commands: CommandsDep, idempotency_key: IdempotencyKey = None
                   ) -> CommandOutcome:
    return await _edit_card(grant, board, card_id, "note", response, store, commands, idempotency_key, body.text)


@router.post("/boards/{board_id}/cards/{card_id}/owner", response_model=CommandOutcome, responses=COMMAND_ERRORS)
async def set_owner(grant: WriteGrant, board: SiteBoard, card_id: str, body: SetOwner, response: Response,
                    store: BoardStoreDep, commands: CommandsDep, definitions: DefinitionsDep,
                    idempotency_key: IdempotencyKey = None) -> CommandOutcome:
    """A site that declares owners (`owners:`) takes only their ids; without owners, any text (compatibility)."""
    owners = [owner.id for owner in await definitions.list_owners(grant.site)]
    if owners and body.owner.strip() and body.owner.strip() not in owners:
        raise Problem(422, "unknown owner", f"owner: {body.owner.strip()!r} is not one of the site's owners "
                      f"({', '.join(owners)})", "unknown_owner")
    return await _edit_card(grant, board, card_id, "owner", response, store, commands, idempotency_key, body.owner)


@router.post("/boards/{board_id}/cards/{card_id}/archive", response_model=CommandOutcome, responses=COMMAND_ERRORS)
async def archive(grant: WriteGrant, board: SiteBoard, card_id: str, response: Response, store: BoardStoreDep,
                  commands: CommandsDep, idempotency_key: IdempotencyKey = None) -> CommandOutcome:
    return await _edit_card(grant, board, card_id, "archive", response, store, commands, idempotency_key)


@router.post("/boards/{board_id}/cards/{card_id}/unarchive", response_model=CommandOutcome,
             responses=COMMAND_ERRORS)
async def unarchive(grant: WriteGrant, board: SiteBoard, card_id: str, response: Response, store: BoardStoreDep,
                    commands: CommandsDep, idempotency_key: IdempotencyKey = None) -> CommandOutcome:
    return await _edit_card(grant, board, card_id, "unarchive", response, store, commands, idempotency_key)


@router.get("/boards/{board_id}/commands/{command_id}", response_model=CommandResult, responses=ERRORS)
async def command_outcome(grant: ReadGrant, board_id: str, command_id: str, store: BoardStoreDep) -> CommandResult:
    result = await store.command_result(grant.site, command_id)
    if result is None or result.board_id != board_id:
        raise Problem(404, "no outcome for this command (yet)", command_id)
    return result
