"""The site's workflow automation rules: `GET rules`, `GET|PUT|DELETE rules/{id}`, `GET rules/{id}/executions`.

Rules come back as their author wrote them, with their version. A webhook's URL may carry the receiver's
credentials (a token in its path or query), so a read-only key sees it redacted.
"""

from __future__ import annotations

from typing import Annotated, Any

from clickhouse_driver.errors import ErrorCodes, ServerException
from fastapi import APIRouter, Body, Query, Response
from pydantic import BaseModel, Field

from api import automation_queries
from api.commands import etag
from api.definitions import stored, valid_id, validated
from api.dependencies import AnalyticsDep, DefinitionsDep, ReadGrant, SiteRoute, WriteGrant
from api.keys import SiteGrant
from api.lead_profile import QueryClient
from api.problems import ERRORS, WRITE_ERRORS, Problem, unavailable
from schemas.rules import Rule, RuleExecution

REDACTED = "(redacted: needs a read-write key)"

router = APIRouter(prefix="/v1/sites/{site_id}", tags=["rules"], route_class=SiteRoute)


class RuleList(BaseModel):
    rules: list[dict[str, Any]]


class RuleExecutions(BaseModel):
    rule_id: str
    executions: list[RuleExecution] = Field(description="newest first")
    next_offset: int | None = Field(None, description="the next page's offset; null after a short page")


def rule_json(rule: Rule, grant: SiteGrant) -> dict[str, Any]:
    """The rule as its author wrote it (no filled-in defaults), with its version; webhook URLs only for a
    read-write key."""
    content = rule.content()
    if grant.read_only:
        for action in content["then"]:
            if "webhook" in action:
                action["webhook"]["url"] = REDACTED
    return {"id": rule.id, **content, "version": rule.version}


@router.get("/rules", response_model=RuleList, responses=ERRORS)
async def list_rules(grant: ReadGrant, definitions: DefinitionsDep) -> RuleList:
    return RuleList(rules=[rule_json(rule, grant) for rule in await definitions.list_rules(grant.site)])


@router.get("/rules/{rule_id}", responses=ERRORS)
async def get_rule(grant: ReadGrant, rule_id: str, definitions: DefinitionsDep) -> dict[str, Any]:
    rule = await definitions.get_rule(grant.site, rule_id) if valid_id(rule_id) else None
    if rule is None:
        raise Problem(404, "no such rule", rule_id)
    return rule_json(rule, grant)


@router.put("/rules/{rule_id}", responses=WRITE_ERRORS)
async def put_rule(grant: WriteGrant, rule_id: str, response: Response, definitions: DefinitionsDep,
                   definition: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    rule = validated(Rule, definition, rule_id)
    version = await stored(definitions.put_rule(grant.site, rule))
    response.headers["ETag"] = etag(version)
    return rule_json(rule.model_copy(update={"version": version}), grant)


@router.delete("/rules/{rule_id}", status_code=204, responses=ERRORS)
async def delete_rule(grant: WriteGrant, rule_id: str, definitions: DefinitionsDep) -> Response:
    if not valid_id(rule_id) or not await definitions.delete_rule(grant.site, rule_id):
        raise Problem(404, "no such rule", rule_id)
    return Response(status_code=204)


@router.get("/rules/{rule_id}/executions", response_model=RuleExecutions, responses=ERRORS)
async def rule_executions(grant: ReadGrant, rule_id: str, analytics: AnalyticsDep,
                          limit: int = Query(50, ge=1, le=automation_queries.MAX_EXECUTIONS_PAGE),
                          offset: int = Query(0, ge=0, le=1_000_000)) -> RuleExecutions:
    """Every firing of the rule (also of its earlier versions, and after it was deleted), newest first."""
    if not valid_id(rule_id):
        raise Problem(404, "no such rule", rule_id)
    executions = await analytics.read(_executions, grant.site, rule_id, limit, offset)
    return RuleExecutions(rule_id=rule_id, executions=executions,
                          next_offset=offset + limit if len(executions) == limit else None)


def _executions(client: QueryClient, site_id: str, rule_id: str, limit: int, offset: int) -> list[RuleExecution]:
    """automation_queries.rule_executions; a database the migrations have not reached yet is a clear 503."""
    try:
        return automation_queries.rule_executions(client, site_id, rule_id, limit, offset)
    except ServerException as err:
        if err.code != ErrorCodes.UNKNOWN_TABLE:
            raise
        raise unavailable("rule executions are not recorded yet",
                          "ClickHouse has no rule_executions table: run the migrations (`leadstream migrate`)") from err
