"""The pages and their files: the analytics page at `/`, the LeadBoard at `/board`, `/static/...`, and the
liveness check `/health`. No key: they hold no site data (the pages ask for the key in the browser)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

STATIC = Path(__file__).resolve().parents[1] / "static"

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/", response_class=HTMLResponse)
async def analytics_page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html")


@router.get("/board", include_in_schema=False)
async def board_page() -> FileResponse:
    return FileResponse(STATIC / "board.html")
