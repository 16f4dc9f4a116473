"""Erasure and the access request (read-write keys only): `POST erasures` (202, an id to poll),
`GET erasures/{id}` (pending while ClickHouse still deletes, then done, with counts per table and store) and
`GET people/{email}/export` (everything stored on a person, as one JSON document). The work is api.erasure's;
docs/erasure.md says what is erased where, and what the ledger keeps."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.dependencies import RedisDep, SettingsDep, SiteRoute, WriteGrant
from api.erasure import ERASURE_ID_CHARS, Erasures, InvalidPerson
from api.problems import ERRORS, WRITE_ERRORS, Problem, unavailable
from schemas.events import EMAIL_MAX_CHARS

router = APIRouter(prefix="/v1/sites/{site_id}", tags=["privacy"], route_class=SiteRoute)


class ErasureRequest(BaseModel):
    """Whom to erase: an email (their known lead, the leads merged into it, every visitor of theirs), or a
    lead id (an anonymous lead, say); both may be given."""

    model_config = ConfigDict(extra="forbid")
    email: str | None = Field(None, min_length=3, max_length=EMAIL_MAX_CHARS)
    lead_id: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")

    @model_validator(mode="after")
    def _someone(self) -> "ErasureRequest":
        if not self.email and not self.lead_id:
            raise ValueError("give an email or a lead_id")
        return self


class ErasureStatus(BaseModel):
    id: str
    site_id: str
    status: str = Field(description="pending (ClickHouse mutations still running) or done")
    requested_by: str = Field(description="the id of the API key that asked (`cli`: leadstream erase)")
    requested_ms: int
    finished_ms: int | None
    counts: dict[str, int] = Field(description="rows removed per ClickHouse table, keys per Redis store (redis:...)")


def _erasures(redis, settings) -> Erasures:
    return Erasures(redis, settings.name("ls"), settings.clickhouse(), settings.erasure_key)


async def _guarded(call):
    try:
        return await call
    except InvalidPerson as err:
        raise Problem(422, "invalid person", str(err)) from err
    except Problem:
        raise
    except Exception as err:  # noqa: BLE001 - a store that failed is an outage to the caller, never a 500
        raise unavailable("a store is unavailable during the erasure or export", err) from err


@router.post("/erasures", status_code=202, responses=WRITE_ERRORS)
async def request_erasure(grant: WriteGrant, redis: RedisDep, settings: SettingsDep, response: Response,
                          request: Annotated[ErasureRequest, Body()]) -> ErasureStatus:
    """Erase a person everywhere and keep them erased (the ledger drops their later events, replays too).
    Answers once Redis is clean and the ClickHouse deletions are started; poll the Location for `done`."""
    job = await _guarded(_erasures(redis, settings).erase(grant.site, grant.key_id, request.email or "",
                                                          request.lead_id or ""))
    response.headers["Location"] = f"/v1/sites/{grant.site}/erasures/{job.erasure_id}"
    return ErasureStatus(**job.public())


@router.get("/erasures/{erasure_id}", responses=ERRORS)
async def erasure_status(grant: WriteGrant, redis: RedisDep, settings: SettingsDep,
                         erasure_id: Annotated[str, Path(max_length=ERASURE_ID_CHARS)]) -> ErasureStatus:
    job = await _guarded(_erasures(redis, settings).status(grant.site, erasure_id))
    if job is None:
        raise Problem(404, "no such erasure", erasure_id)
    return ErasureStatus(**job.public())


@router.get("/people/{email}/export", responses=WRITE_ERRORS)
async def export_person(grant: WriteGrant, redis: RedisDep, settings: SettingsDep,
                        email: Annotated[str, Path(min_length=3, max_length=EMAIL_MAX_CHARS)]) -> dict[str, Any]:
    """Everything stored on the person with this email (access request): their leads, visitors, the rows of
    every ClickHouse table that holds them, their lead state, identity records, cards and queued webhooks."""
    return await _guarded(_erasures(redis, settings).export(grant.site, email))
