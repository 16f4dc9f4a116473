"""The LeadStream API: the board API, the read API over ClickHouse, and the pages that use them.

`create_app` assembles what api/ defines: the routers (api/routes/, one per resource), the services they
share (api.dependencies), the problem answers (api.problems) and the rules every exchange follows
(api.middleware: security headers, the request body limit). It refuses to start with weak secrets
(Settings.refuse_weak_secrets): the API keys, the server secret and the stores' passwords.

Every /v1 call belongs to one site: an API key, sent in the `X-API-Key` header, is scoped to exactly one
site_id (LEADSTREAM_API_KEYS="site:key,site2:key2:ro"; `:ro`: a read-only key, GET only).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp

from api.analytics import Analytics
from api.dependencies import Live, Services
from api.keys import ApiKeys, server_secret
from api.middleware import BodyLimit, SecurityHeaders
from api.problems import install_handlers
from api.routes import (board_stream, boards, cards, erasures, handover, leads, pages, rules, segments,
                        summary)
from api.routes.pages import STATIC
from schemas.settings import Settings


class LeadStreamAPI(FastAPI):
    def build_middleware_stack(self) -> ASGIApp:
        """Security headers outside everything, so that they are also on the answer to a bug (a 500 leaves
        from Starlette's outermost middleware)."""
        return SecurityHeaders(super().build_middleware_stack())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    settings.refuse_weak_secrets(api=True)
    services = Services(settings, ApiKeys(settings.api_key_entries(), server_secret(settings)), Analytics(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with Live.running(settings) as live:
            services.live = live
            try:
                yield
            finally:
                services.live = None

    # No /docs or /redoc: their pages load scripts from a CDN, which would run with this origin's rights
    # (the board page keeps its key in this origin's sessionStorage). /openapi.json describes everything.
    app = LeadStreamAPI(title="LeadStream API", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.services = services
    install_handlers(app)
    for module in (summary, leads, boards, cards, board_stream, rules, segments, erasures, handover, pages):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)
    return app


def run_api(settings: Settings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="warning")
