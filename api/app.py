"""Thin read API over ClickHouse (and the dashboard page that uses it).

Every /v1 call belongs to one site: an API key (header `X-API-Key` or `?key=`) is scoped to exactly one
site_id, configured as LEADSTREAM_API_KEYS="site:key,site2:key2". Errors are JSON problem bodies
(RFC 9457) with a 4xx status; a database outage is a 503, never a 500 with a stack trace.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.lead_profile import account_leads, lead_profile, leads_by_channel
from leadstream.config import Settings
from sinks import clickhouse

_SITE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DASHBOARD = Path(__file__).with_name("dashboard.html")


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str = ""):
        self.status, self.title, self.detail = status, title, detail


def _problem(status: int, title: str, detail: str = "") -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def parse_api_keys(text: str) -> dict[str, str]:
    """"site:key,site2:key2" -> {key: site}."""
    keys = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        site, _, key = item.partition(":")
        if not site or not key:
            raise ValueError(f"LEADSTREAM_API_KEYS entry {item!r} is not site:key")
        keys[key] = site
    return keys


# Sort and group by aliases, never by position: ClickHouse 18.16 reads `ORDER BY 2` as a constant.
SUMMARY_QUERIES = {
    "events_by_type": "SELECT type, count() AS n FROM events WHERE site_id = %(site)s GROUP BY type ORDER BY n DESC",
    "events_by_channel": "SELECT channel, count() AS n FROM events WHERE site_id = %(site)s AND is_bot = 0"
                         " GROUP BY channel ORDER BY n DESC",
    "sessions_by_channel": "SELECT channel, count() AS n FROM sessions FINAL WHERE site_id = %(site)s"
                           " AND merged_into = '' AND is_bot = 0 GROUP BY channel ORDER BY n DESC",
    "leads": "SELECT if(email = '', 'anonymous', 'known') AS kind, count() AS n FROM leads FINAL"
             " WHERE site_id = %(site)s AND merged_into = '' GROUP BY kind ORDER BY kind",
    "top_accounts": "SELECT account_domain, count() AS n FROM leads FINAL WHERE site_id = %(site)s AND merged_into = ''"
                    " AND account_domain != '' GROUP BY account_domain ORDER BY n DESC, account_domain LIMIT 10",
    "bots": "SELECT 'bot events', count() FROM events WHERE site_id = %(site)s AND is_bot = 1",
}

RECENT_LEADS_SQL = """SELECT lead_id, email, account_domain, length(visitors), last_ts_ms
FROM leads FINAL WHERE site_id = %(site)s AND merged_into = '' AND email != ''
ORDER BY last_ts_ms DESC LIMIT %(limit)s"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    api_keys = parse_api_keys(os.environ.get("LEADSTREAM_API_KEYS", ""))
    app = FastAPI(title="LeadStream API", version="1")

    @app.exception_handler(Problem)
    async def on_problem(_: Request, exc: Problem):
        return _problem(exc.status, exc.title, exc.detail)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException):
        return _problem(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _problem(400, "invalid request", detail)

    def authorise(request: Request, site_id: str) -> None:
        if not _SITE.match(site_id):
            raise Problem(400, "invalid site id", "letters, digits, '.', '_' and '-' only, at most 64")
        key = request.headers.get("x-api-key") or request.query_params.get("key")
        if not key:
            raise Problem(401, "API key required", "send it as the X-API-Key header")
        if api_keys.get(key) != site_id:
            raise Problem(403, "this API key is not for this site")

    def read(fn, *args, **kwargs):
        """Run a read against ClickHouse; any driver or network error is an outage to the caller (503)."""
        try:
            return fn(clickhouse.connect(settings), *args, **kwargs)
        except Problem:
            raise
        except Exception as err:  # noqa: BLE001
            raise Problem(503, "analytics store unavailable", type(err).__name__) from err

    def query(sql: str, params: dict) -> list:
        return read(lambda client: client.execute(sql, params))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/sites/{site_id}/summary")
    def summary(site_id: str, request: Request) -> dict:
        authorise(request, site_id)
        return {name: [list(row) for row in query(sql, {"site": site_id})] for name, sql in SUMMARY_QUERIES.items()}

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
        return dataclasses.asdict(found)

    @app.get("/v1/sites/{site_id}/accounts/{domain}/leads")
    def account(site_id: str, domain: str, request: Request) -> list[dict]:
        authorise(request, site_id)
        return [dataclasses.asdict(lead) for lead in read(account_leads, site_id, domain)]

    @app.get("/v1/sites/{site_id}/leads-by-channel")
    def by_channel(site_id: str, request: Request, touch: str = Query("first", pattern="^(first|last)$")) -> dict:
        authorise(request, site_id)
        return read(leads_by_channel, site_id, touch)

    @app.get("/", response_class=HTMLResponse)
    def dashboard() -> str:
        return DASHBOARD.read_text()

    return app


def run_api(settings: Settings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="warning")
