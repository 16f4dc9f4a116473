"""The read API over ClickHouse: recent leads, the Lead Profile, an account's leads and leads by acquisition
channel (read models in api.lead_profile and api.automation_queries). A lead is a known contact or an
anonymous employee of a company (an account is known); lists and counts leave other visitors out."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Query

from api.automation_queries import full_lead_profile
from api.dependencies import AnalyticsDep, ReadGrant, SettingsDep, SiteRoute
from api.lead_profile import account_leads, leads_by_channel
from api.problems import ERRORS, Problem
from processors.accounts import normalise_host

# Sort and group by aliases, never by position: ClickHouse 18.16 reads `ORDER BY 2` as a constant.
# Leads only: known contacts and anonymous employees of an account; other visitors are not leads.
RECENT_LEADS_SQL = """SELECT lead_id, email, account_domain, length(visitors), last_ts_ms
FROM leads FINAL WHERE site_id = %(site)s AND merged_into = '' AND (email != '' OR account_domain != '')
ORDER BY last_ts_ms DESC, lead_id LIMIT %(limit)s"""

router = APIRouter(prefix="/v1/sites/{site_id}", tags=["leads"], route_class=SiteRoute, responses=ERRORS)


@router.get("/leads")
async def recent_leads(grant: ReadGrant, analytics: AnalyticsDep, limit: int = Query(20, ge=1, le=200)
                       ) -> list[dict]:
    """The most recently active leads: known contacts and anonymous employees of an account (`known`: false,
    `email`: ''). A visitor who is neither is not a lead."""
    rows = await analytics.read(lambda client: client.execute(RECENT_LEADS_SQL, {"site": grant.site, "limit": limit}))
    return [dict(zip(("lead_id", "email", "account", "visitors", "last_ts_ms"), row), known=bool(row[1]))
            for row in rows]


@router.get("/leads/{lead_id}")
async def profile(grant: ReadGrant, lead_id: str, analytics: AnalyticsDep,
                  page: int = Query(0, ge=0, le=10_000)) -> dict[str, Any]:
    found = await analytics.read(full_lead_profile, grant.site, lead_id, page=page)
    if found is None:
        raise Problem(404, "no such lead", lead_id)
    return found


@router.get("/accounts/{domain}/leads")
async def account(grant: ReadGrant, domain: str, analytics: AnalyticsDep, settings: SettingsDep,
                  limit: int | None = Query(None, ge=1, description="the most recently active; at most the "
                                                                     "server's api_max_account_leads")
                  ) -> list[dict]:
    """`domain` as typed (`bücher.de`) finds the account stored as `xn--bcher-kva.de`."""
    limit = min(limit or settings.api_max_account_leads, settings.api_max_account_leads)
    leads = await analytics.read(account_leads, grant.site, normalise_host(domain) or domain, limit)
    return [dataclasses.asdict(lead) for lead in leads]


@router.get("/leads-by-channel")
async def by_channel(grant: ReadGrant, analytics: AnalyticsDep,
                     touch: str = Query("first", pattern="^(first|last)$")) -> dict:
    return await analytics.read(leads_by_channel, grant.site, touch)
