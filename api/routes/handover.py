"""Hand-over to sales: a site's owners (`GET owners`, `GET|PUT|DELETE owners/{id}`) and tags by hand
(`POST leads/{id}/tags`, `DELETE leads/{id}/tags/{tag}`).

An owner is a definition like a rule or a board (same versioned store): a delete is refused (409 `in_use`)
while a board stage's `assign` or a rule's `assign_owner` names the owner. A tag by hand becomes one
`TagByHand` record on `leads.activity` (keyed by the lead, so it keeps its order with the lead's events); the
lead processor applies it like any change, with the API key's id as actor: rules, score, segments and boards
react (a stage's `when_tag` moves the card). The answer is 202 with the command id: the change is applied as
soon as the lead processor reaches it. An Idempotency-Key makes a retried request act once.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Response
from pydantic import BaseModel, Field

from api.commands import etag, now_ms
from api.definitions import stored, valid_id, validated
from api.dependencies import CommandsDep, DefinitionsDep, ReadGrant, RedisDep, SiteRoute, WriteGrant
from api.keys import SiteGrant
from api.problems import DELETE_ERRORS, ERRORS, WRITE_ERRORS, Problem
from schemas.boards import Owner
from schemas.redis_keys import RedisKeys
from schemas.rules import TAG_PATTERN, TagByHand

router = APIRouter(prefix="/v1/sites/{site_id}", tags=["owners and tags"], route_class=SiteRoute)

LEAD_ID = re.compile(r"^[^\x00-\x1f\x7f/]{1,255}$")
TAG = re.compile(TAG_PATTERN)
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255,
                                              description="a retried request with the same key acts once")]


class OwnerList(BaseModel):
    owners: list[Owner]


class AddTag(BaseModel):
    tag: str = Field(min_length=1, max_length=128, pattern=TAG_PATTERN)


class TagCommand(BaseModel):
    command_id: str
    status: Literal["queued"] = "queued"
    lead_id: str
    tag: str
    present: bool


@router.get("/owners", response_model=OwnerList, responses=ERRORS)
async def list_owners(grant: ReadGrant, definitions: DefinitionsDep) -> OwnerList:
    return OwnerList(owners=await definitions.list_owners(grant.site))


@router.get("/owners/{owner_id}", response_model=Owner, responses=ERRORS)
async def get_owner(grant: ReadGrant, owner_id: str, definitions: DefinitionsDep) -> Owner:
    owner = await definitions.get_owner(grant.site, owner_id) if valid_id(owner_id) else None
    if owner is None:
        raise Problem(404, "no such owner", owner_id)
    return owner


@router.put("/owners/{owner_id}", response_model=Owner, responses=WRITE_ERRORS)
async def put_owner(grant: WriteGrant, owner_id: str, response: Response, definitions: DefinitionsDep,
                    definition: Annotated[dict[str, Any], Body()]) -> Owner:
    owner = validated(Owner, definition, owner_id)
    response.headers["ETag"] = etag(await stored(definitions.put_owner(grant.site, owner)))
    return owner


@router.delete("/owners/{owner_id}", status_code=204, responses=DELETE_ERRORS)
async def delete_owner(grant: WriteGrant, owner_id: str, definitions: DefinitionsDep) -> Response:
    if not valid_id(owner_id) or not await stored(definitions.delete_owner(grant.site, owner_id)):
        raise Problem(404, "no such owner", owner_id)
    return Response(status_code=204)


def tag_command_id(site_id: str, lead_id: str, tag: str, present: bool, idempotency_key: str | None) -> str:
    """Deterministic for a retried request (same Idempotency-Key), random without one."""
    if not idempotency_key:
        return "tag_" + uuid.uuid4().hex
    text = "\x1f".join((site_id, lead_id, tag, "add" if present else "remove", idempotency_key))
    return "tag_" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


async def _tag(grant: SiteGrant, lead_id: str, tag: str, present: bool, redis, commands, response: Response,
               idempotency_key: str | None) -> TagCommand:
    if not LEAD_ID.match(lead_id):
        raise Problem(404, "no such lead", lead_id)
    if not TAG.match(tag):
        raise Problem(422, "invalid request", "tag: 1-128 characters, no control characters")
    if not await redis.exists(RedisKeys(commands.prefix).lead_state(grant.site, lead_id)):
        raise Problem(404, "no such lead", f"the lead processor has no lead {lead_id!r} on this site")
    record = TagByHand(tag_command_id(grant.site, lead_id, tag, present, idempotency_key), grant.site, lead_id, tag,
                       present, grant.actor, now_ms())
    await commands.send_lead_record(record)
    response.status_code = 202
    return TagCommand(command_id=record.command_id, lead_id=lead_id, tag=tag, present=present)


@router.post("/leads/{lead_id}/tags", response_model=TagCommand, status_code=202, responses=WRITE_ERRORS)
async def add_tag(grant: WriteGrant, lead_id: str, body: AddTag, response: Response, redis: RedisDep,
                  commands: CommandsDep, idempotency_key: IdempotencyKey = None) -> TagCommand:
    return await _tag(grant, lead_id, body.tag, True, redis, commands, response, idempotency_key)


@router.delete("/leads/{lead_id}/tags/{tag}", response_model=TagCommand, status_code=202, responses=ERRORS)
async def remove_tag(grant: WriteGrant, lead_id: str, tag: str, response: Response, redis: RedisDep,
                     commands: CommandsDep, idempotency_key: IdempotencyKey = None) -> TagCommand:
    return await _tag(grant, lead_id, tag, False, redis, commands, response, idempotency_key)
