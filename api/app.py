"""Thin API over ClickHouse and the board store (and the pages that use it).

Every /v1 call belongs to one site: an API key, sent in the `X-API-Key` header, is scoped to exactly one
site_id, configured as LEADSTREAM_API_KEYS="site:key,site2:key2:ro" (`:ro`: a read-only key, GET only).
A key in the URL is refused (URLs end up in access logs and browser history). Errors are JSON problem
bodies (RFC 9457) with a 4xx status; an outage of a store is a 503 whose body names only what is
unavailable and a request id, under which the server log has the cause. The board API (api/boards.py)
adds LeadBoards, rules and the kanban page at /board.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.automation_queries import lead_state
from api.lead_profile import account_leads, lead_profile, leads_by_channel
from api.site_summary import SUMMARY
from processors.accounts import normalise_host
from schemas.settings import Settings
from sinks import clickhouse

log = logging.getLogger(__name__)

_SITE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DASHBOARD = Path(__file__).with_name("dashboard.html")
STATIC = Path(__file__).with_name("static")
READ_ONLY_METHODS = frozenset(("GET", "HEAD"))


class Problem(Exception):
    """A 4xx/503 answer. `code` is a machine-readable reason (also the problem `type`, as a URN); `extra`
    adds members to the body (e.g. the command id of a refused command)."""

    def __init__(self, status: int, title: str, detail: str = "", code: str = "", **extra):
        self.status, self.title, self.detail, self.code, self.extra = status, title, detail, code, extra


def _log_cause(what: str, cause: BaseException | str) -> str:
    """Logs why a request failed under a new request id, which the answer carries instead of the cause (an
    exception's class and text tell a caller about the internals)."""
    request_id = uuid.uuid4().hex[:16]
    log.error("%s [request %s]: %s", what, request_id, cause if isinstance(cause, str) else repr(cause),
              exc_info=cause if isinstance(cause, BaseException) else None)
    return request_id


def unavailable(what: str, cause: BaseException | str) -> Problem:
    """A 503 naming only `what` is unavailable; the cause goes to the server log."""
    request_id = _log_cause(f"503 {what}", cause)
    return Problem(503, what, f"try again later; the server log has the cause under request id {request_id}",
                   "unavailable", request_id=request_id)


def _problem(status: int, title: str, detail: str = "", code: str = "", **extra) -> JSONResponse:
    body = {"type": f"urn:leadstream:problem:{code}" if code else "about:blank", "title": title,
            "status": status, "detail": detail}
    if code:
        body["code"] = code
    return JSONResponse(body | extra, status_code=status, media_type="application/problem+json")


class SiteGrant(str):
    """The site an API key is for. A str (equal to the site id), so that the key table reads as
    {key: site}; `read_only` keys may only GET."""

    read_only: bool

    def __new__(cls, site: str, read_only: bool = False) -> "SiteGrant":
        grant = super().__new__(cls, site)
        grant.read_only = read_only
        return grant


def parse_api_keys(text: str) -> dict[str, SiteGrant]:
    """"site:key,site2:key2:ro" -> {key: site}; a `:ro` suffix makes the key read-only."""
    keys = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        site, _, key = item.partition(":")
        key, read_only = (key[:-3], True) if key.endswith(":ro") else (key, False)
        if not site or not key:
            raise ValueError(f"LEADSTREAM_API_KEYS entry {item!r} is not site:key or site:key:ro")
        keys[key] = SiteGrant(site, read_only)
    return keys


# Sort and group by aliases, never by position: ClickHouse 18.16 reads `ORDER BY 2` as a constant.
RECENT_LEADS_SQL = """SELECT lead_id, email, account_domain, length(visitors), last_ts_ms
FROM leads FINAL WHERE site_id = %(site)s AND merged_into = '' AND email != ''
ORDER BY last_ts_ms DESC LIMIT %(limit)s"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    api_keys = parse_api_keys(settings.api_keys)
    clickhouse_pool = clickhouse.ClientPool(settings.clickhouse())
    from api.boards import BoardServices, board_router  # here: api.boards imports Problem from this module

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with BoardServices.running(settings) as services:
            app.state.board_services = services
            yield

    app = FastAPI(title="LeadStream API", version="1", lifespan=lifespan)

    @app.exception_handler(Problem)
    async def on_problem(_: Request, exc: Problem):
        return _problem(exc.status, exc.title, exc.detail, exc.code, **exc.extra)

    @app.exception_handler(RedisError)
    async def on_redis_down(request: Request, exc: RedisError):
        return await on_problem(request, unavailable("board store unavailable", exc))

    @app.exception_handler(Exception)
    async def on_bug(_: Request, exc: Exception):
        """A bug: a 500 with a request id; the traceback goes to the server log, never to the caller."""
        request_id = _log_cause("500 internal error", exc)
        return _problem(500, "internal error", f"the server log has the cause under request id {request_id}",
                        request_id=request_id)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException):
        return _problem(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError):
        """400 for a malformed request (path, query, headers, unparsable JSON); 422 for a well-formed JSON
        body whose content is wrong, naming the field."""
        errors = exc.errors()
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        in_body = all(e["loc"][:1] == ("body",) and e["type"] != "json_invalid" for e in errors)
        return _problem(422 if errors and in_body else 400, "invalid request", detail)

    def authorise(request: Request, site_id: str) -> str:
        """The request's API key, once it is known to be for `site_id` (and allowed to write, unless the
        request only reads)."""
        if not _SITE.match(site_id):
            raise Problem(400, "invalid site id", "letters, digits, '.', '_' and '-' only, at most 64")
        if "key" in request.query_params:
            raise Problem(401, "API key in the URL", "send it as the X-API-Key header, never in the URL (URLs "
                          "end up in logs); the board stream takes a token from .../stream-token")
        key = request.headers.get("x-api-key")
        if not key:
            raise Problem(401, "API key required", "send it as the X-API-Key header")
        grant = api_keys.get(key)
        if grant != site_id:
            raise Problem(403, "this API key is not for this site")
        if grant.read_only and request.method not in READ_ONLY_METHODS:
            raise Problem(403, "this API key is read-only", f"{request.method} needs a read-write key")
        return key

    def read(fn, *args, **kwargs):
        """Run a read against ClickHouse; any driver or network error is an outage to the caller (503)."""
        try:
            with clickhouse_pool.client() as client:
                return fn(client, *args, **kwargs)
        except Problem:
            raise
        except Exception as err:  # noqa: BLE001
            raise unavailable("analytics store unavailable", err) from err

    def query(sql: str, params: dict) -> list:
        return read(lambda client: client.execute(sql, params))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/sites/{site_id}/summary")
    def summary(site_id: str, request: Request) -> dict:
        authorise(request, site_id)
        return {q.name: [list(row) for row in query(q.sql, {"site": site_id})] for q in SUMMARY}

    @app.get("/v1/sites/{site_id}/leads")
    def recent_leads(site_id: str, request: Request, limit: int = Query(20, ge=1, le=200)) -> list[dict]:
        authorise(request, site_id)
        rows = query(RECENT_LEADS_SQL, {"site": site_id, "limit": limit})
        return [dict(zip(("lead_id", "email", "account", "visitors", "last_ts_ms"), row)) for row in rows]

    @app.get("/v1/sites/{site_id}/leads/{lead_id}")
    def profile(site_id: str, lead_id: str, request: Request, page: int = Query(0, ge=0, le=10_000)) -> dict:
        authorise(request, site_id)
        found = read(lead_profile, site_id, lead_id, page=page)
        if found is None:
            raise Problem(404, "no such lead", lead_id)
        return dataclasses.asdict(found) | read(lead_state, site_id, found.identity.lead_id)

    @app.get("/v1/sites/{site_id}/accounts/{domain}/leads")
    def account(site_id: str, domain: str, request: Request) -> list[dict]:
        """`domain` as typed (`bücher.de`) finds the account stored as `xn--bcher-kva.de`."""
        authorise(request, site_id)
        return [dataclasses.asdict(lead) for lead in read(account_leads, site_id, normalise_host(domain) or domain)]

    @app.get("/v1/sites/{site_id}/leads-by-channel")
    def by_channel(site_id: str, request: Request, touch: str = Query("first", pattern="^(first|last)$")) -> dict:
        authorise(request, site_id)
        return read(leads_by_channel, site_id, touch)

    @app.get("/", response_class=HTMLResponse)
    def dashboard() -> str:
        return DASHBOARD.read_text()

    @app.get("/board", response_class=FileResponse, include_in_schema=False)
    def board_page() -> FileResponse:
        return FileResponse(STATIC / "board.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(board_router(api_keys, authorise, read))
    return app


def run_api(settings: Settings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="warning")
