"""Workflow automation read models for the API, over the ClickHouse tables `rule_executions` and
`lead_state` (sinks/migrations/0005_*.sql):
- `rule_executions`: a rule's latest firings, newest first, a page at a time (`GET rules/{id}/executions`).
- `lead_state`: a lead's current tags (with why it has each), score and properties (the Lead Profile's
  `tags`, `score`, `properties`: `full_lead_profile` is the profile with them).

Both tables are ReplacingMergeTree tables that a replay can write twice: the page reads with FINAL; the
lead lookup uses argMax (a point lookup, where FINAL on 18.16 would merge whole granules). The SQL texts
are module-level constants: docs/queries.md quotes them (next to the analyst queries over the same
tables), and its tests check they match.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import orjson

from api.lead_profile import QueryClient, lead_profile
from schemas.rules import RuleExecution

MAX_EXECUTIONS_PAGE = 500

RULE_EXECUTION_COLUMNS = tuple(f.name for f in fields(RuleExecution))

RULE_EXECUTIONS_SQL = f"""SELECT {', '.join(RULE_EXECUTION_COLUMNS)}
FROM rule_executions FINAL
WHERE site_id = %(site_id)s AND rule_id = %(rule_id)s
ORDER BY ts_ms DESC, execution_id DESC
LIMIT %(limit)s OFFSET %(offset)s"""

LEAD_STATE_SQL = """SELECT argMax(tags, version), argMax(tag_sources, version), argMax(score, version),
       argMax(properties, version)
FROM lead_state
WHERE site_id = %(site_id)s AND lead_id = %(lead_id)s
GROUP BY lead_id"""


def rule_executions(client: QueryClient, site_id: str, rule_id: str, limit: int = 50,
                    offset: int = 0) -> list[RuleExecution]:
    """A rule's firings, newest first, `limit` from `offset` (JSON-ready: orjson serialises records).
    Arguments are checked first, so a bad page is a ValueError and never a query."""
    if not 1 <= limit <= MAX_EXECUTIONS_PAGE or offset < 0:
        raise ValueError(f"limit must be 1..{MAX_EXECUTIONS_PAGE} and offset >= 0")
    rows = client.execute(RULE_EXECUTIONS_SQL,
                          {"site_id": site_id, "rule_id": rule_id, "limit": limit, "offset": offset})
    return [_execution(row) for row in rows]


def _execution(row: Any) -> RuleExecution:
    values = dict(zip(RULE_EXECUTION_COLUMNS, row))
    return RuleExecution(**{**values, "actions": list(values["actions"])})  # the driver may give a tuple


def lead_state(client: QueryClient, site_id: str, lead_id: str) -> dict[str, Any]:
    """The lead's current `tags`, `score` and `properties`, as the Lead Profile shows them; a lead no rule
    has touched yet has none of them."""
    rows = client.execute(LEAD_STATE_SQL, {"site_id": site_id, "lead_id": lead_id})
    if not rows:
        return {"tags": [], "score": 0, "properties": {}}
    tags, tag_sources, score, properties = rows[0]
    return {"tags": tag_list(tags, tag_sources), "score": int(score), "properties": orjson.loads(properties or "{}")}


def full_lead_profile(client: QueryClient, site_id: str, lead_id: str, page: int = 0) -> dict[str, Any] | None:
    """The Lead Profile (api.lead_profile) with the lead's `tags`, `score` and `properties`, JSON-ready; None if
    the site has no such lead."""
    found = lead_profile(client, site_id, lead_id, page=page)
    if found is None:
        return None
    return asdict(found) | lead_state(client, site_id, found.identity.lead_id)


def tag_list(tags: list[str], tag_sources: str) -> list[dict[str, Any]]:
    """Each tag with why the lead has it (tag_sources: tag -> {source, rule_id, rule_version, event_id,
    ts_ms}); a tag without a recorded source still shows, with empty provenance."""
    sources = orjson.loads(tag_sources or "{}")
    listed = []
    for tag in tags:
        source = sources.get(tag, {})
        listed.append({
            "tag": tag,
            "source": source.get("source", ""),
            "rule_id": source.get("rule_id", ""),
            "rule_version": int(source.get("rule_version", 0)),
            "event_id": source.get("event_id", ""),
            "ts_ms": int(source.get("ts_ms", 0)),
        })
    return listed
