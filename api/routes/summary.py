"""`GET /v1/sites/{site}/summary`: the figures the demo prints (api.site_summary)."""

from __future__ import annotations

from fastapi import APIRouter

from api.dependencies import AnalyticsDep, ReadGrant, SiteRoute
from api.lead_profile import QueryClient
from api.problems import ERRORS
from api.site_summary import SUMMARY

router = APIRouter(prefix="/v1/sites/{site_id}", tags=["summary"], route_class=SiteRoute, responses=ERRORS)


def _summary(client: QueryClient, site_id: str) -> dict[str, list[list]]:
    return {q.name: [list(row) for row in client.execute(q.sql, {"site": site_id})] for q in SUMMARY}


@router.get("/summary")
async def summary(grant: ReadGrant, analytics: AnalyticsDep) -> dict[str, list[list]]:
    return await analytics.read(_summary, grant.site)
