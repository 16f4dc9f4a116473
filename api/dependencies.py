"""What every router shares, as FastAPI dependencies: the caller's grant for the site, and the services.

The grant: a route under /v1/sites/{site_id} takes `ReadGrant` (any key of the site) or `WriteGrant` (a
read-write key). The key comes from the `X-API-Key` header only; a key in the URL is refused (URLs end up in
logs). `SiteRoute` checks a route's grant before FastAPI reads the request body, so a caller without a valid
key never gets a body read (FastAPI itself reads the body before it solves dependencies).

The services, one set per app (`Services`, on `app.state.services`): settings, the API keys and ClickHouse
reads are made with the app; the Redis board store and definitions store, the Kafka command bus and the
streams' own Redis pool are made in the app's lifespan, inside its event loop (`Live`). A route asks for
the one it uses (`BoardStoreDep`, `DefinitionsDep`, `CompaniesDep`, `AnalyticsDep`, `CommandsDep`,
`StreamsDep`, `KeysDep`, `SettingsDep`, and `RedisDep` for what has no store of its own).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute

from api.analytics import Analytics
from api.commands import CommandBus
from api.definitions import valid_id
from api.keys import ApiKeys, SiteGrant
from api.problems import Problem, unavailable
from api.streams import Streams
from processors.board_store import BoardStore
from processors.companies import CompanyStore
from processors.definitions_store import DefinitionsStore
from processors.runtime.redis_client import redis_from_url
from processors.webhooks import WebhookTargets
from schemas.boards import BoardDefinition
from schemas.settings import Settings

SITE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class Live:
    """The services bound to the app's event loop."""

    redis: aioredis.Redis
    boards: BoardStore
    definitions: DefinitionsStore
    companies: CompanyStore
    commands: CommandBus
    streams: Streams

    @classmethod
    @asynccontextmanager
    async def running(cls, settings: Settings) -> AsyncIterator[Live]:
        redis = redis_from_url(settings.redis_url)
        prefix = settings.name("ls")
        boards = BoardStore(redis, prefix)
        commands = CommandBus(settings, boards)
        try:
            async with Streams.running(settings) as streams:
                definitions = DefinitionsStore(redis, prefix, settings.definition_limits(),
                                               webhook_targets=WebhookTargets.parse(settings.webhook_allowed_targets))
                yield cls(redis, boards, definitions, CompanyStore(redis, prefix), commands, streams)
        finally:
            await commands.stop()
            await redis.aclose()


@dataclass
class Services:
    settings: Settings
    keys: ApiKeys
    analytics: Analytics
    live: Live | None = None  # set while the app's lifespan runs


def services(request: Request) -> Services:
    return request.app.state.services


def _live(request: Request) -> Live:
    live = services(request).live
    if live is None:  # an app driven without its lifespan (a TestClient outside `with`)
        raise unavailable("board services not started", "the app's lifespan has not run")
    return live


# ---------------------------------------------------------------------------------------- the grant


def _grant(request: Request, site_id: str, write: bool) -> SiteGrant:
    if not SITE_ID.match(site_id):
        raise Problem(400, "invalid site id", "letters, digits, '.', '_' and '-' only, at most 64")
    if "key" in request.query_params:
        raise Problem(401, "API key in the URL", "send it as the X-API-Key header, never in the URL (URLs "
                      "end up in logs); the board stream takes a token from .../stream-token")
    key = request.headers.get("x-api-key")
    if not key:
        raise Problem(401, "API key required", "send it as the X-API-Key header")
    grant = services(request).keys.grant(key)
    if grant is None or grant.site != site_id:
        raise Problem(403, "this API key is not for this site")
    if write and grant.read_only:
        raise Problem(403, "this API key is read-only", f"{request.method} needs a read-write key")
    return grant


def read_grant(request: Request, site_id: str) -> SiteGrant:
    """Any key of the site."""
    return _grant(request, site_id, write=False)


def write_grant(request: Request, site_id: str) -> SiteGrant:
    """A read-write key of the site."""
    return _grant(request, site_id, write=True)


ReadGrant = Annotated[SiteGrant, Depends(read_grant)]
WriteGrant = Annotated[SiteGrant, Depends(write_grant)]
GRANT_CHECKS: tuple[Callable[[Request, str], SiteGrant], ...] = (read_grant, write_grant)


class SiteRoute(APIRoute):
    """A route that checks its grant dependency before FastAPI reads the request body (FastAPI reads the
    body first, then solves dependencies, which check the grant again: one HMAC and a dictionary lookup)."""

    def get_route_handler(self) -> Callable:
        handle = super().get_route_handler()
        checks = [dependency.call for dependency in self.dependant.dependencies if dependency.call in GRANT_CHECKS]
        if self.body_field is None or not checks:
            return handle

        async def key_before_body(request: Request) -> Response:
            for check in checks:
                check(request, request.path_params.get("site_id", ""))
            return await handle(request)

        return key_before_body


# ---------------------------------------------------------------------------------------- the services


def settings(request: Request) -> Settings:
    return services(request).settings


def api_keys(request: Request) -> ApiKeys:
    return services(request).keys


def analytics(request: Request) -> Analytics:
    return services(request).analytics


def redis_client(request: Request) -> aioredis.Redis:
    return _live(request).redis


def board_store(request: Request) -> BoardStore:
    return _live(request).boards


def definitions(request: Request) -> DefinitionsStore:
    return _live(request).definitions


def companies(request: Request) -> CompanyStore:
    return _live(request).companies


def command_bus(request: Request) -> CommandBus:
    return _live(request).commands


def streams(request: Request) -> Streams:
    return _live(request).streams


SettingsDep = Annotated[Settings, Depends(settings)]
KeysDep = Annotated[ApiKeys, Depends(api_keys)]
AnalyticsDep = Annotated[Analytics, Depends(analytics)]
RedisDep = Annotated[aioredis.Redis, Depends(redis_client)]
BoardStoreDep = Annotated[BoardStore, Depends(board_store)]
DefinitionsDep = Annotated[DefinitionsStore, Depends(definitions)]
CompaniesDep = Annotated[CompanyStore, Depends(companies)]
CommandsDep = Annotated[CommandBus, Depends(command_bus)]
StreamsDep = Annotated[Streams, Depends(streams)]


async def find_board(definitions: DefinitionsStore, site_id: str, board_id: str) -> BoardDefinition:
    """The site's board `board_id`, or 404."""
    found = await definitions.get_board(site_id, board_id) if valid_id(board_id) else None
    if found is None:
        raise Problem(404, "no such board", board_id)
    return found.board


async def site_board(grant: ReadGrant, board_id: str, store: DefinitionsDep) -> BoardDefinition:
    return await find_board(store, grant.site, board_id)


SiteBoard = Annotated[BoardDefinition, Depends(site_board)]
