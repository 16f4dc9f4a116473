"""Workflow automation and LeadBoards read models and analyst queries, over the ClickHouse tables
`rule_executions`, `lead_state`, `lead_changes` and `stage_changes` (sinks/migrations/0005_*.sql).

Two read models for the API:
- `rule_executions`: a rule's latest firings, newest first, a page at a time (`GET rules/{id}/executions`).
- `lead_state`: a lead's current tags (with why it has each), score and properties (the Lead Profile's
  `tags`, `score`, `properties`).
The other constants are the analyst queries docs/queries.md quotes ("Workflow automation and
LeadBoards"): which rules fire most, time to a tag, score by account, time in stage, stage conversion,
lead time and who moves cards.

Every table here is a ReplacingMergeTree that a replay can write twice. Whole-site aggregates read it with
FINAL; the lead lookup uses argMax (a point lookup, where FINAL on 18.16 would merge whole granules).
Stage order is not in ClickHouse (board definitions live in Redis), so board queries order stages by what
the data shows: bottlenecks first, or most-entered first. Every SQL text is a module-level constant:
docs/queries.md quotes them, and its tests check they match.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import orjson

from api.lead_profile import QueryClient
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

RULES_BY_FIRINGS_SQL = """SELECT rule_id,
       count() AS executions,
       uniqExact(lead_id) AS leads,
       countIf(outcome = 'changed') AS changed,
       countIf(depth > 0) AS chained,
       max(ts_ms) AS last_fired_ms
FROM rule_executions FINAL
WHERE site_id = %(site_id)s AND ts_ms >= %(from_ms)s
GROUP BY rule_id
ORDER BY executions DESC, rule_id"""

TIME_TO_TAG_SQL = """SELECT tag,
       count() AS leads,
       round(avg(hours_to_tag), 1) AS avg_hours,
       round(quantileExact(0.5)(hours_to_tag), 1) AS median_hours
FROM (
    SELECT name AS tag, (toInt64(min(ts_ms)) - toInt64(any(first_ts_ms))) / 3600000 AS hours_to_tag
    FROM (
        SELECT lead_id, name, ts_ms FROM lead_changes FINAL
        WHERE site_id = %(site_id)s AND kind = 'tag_added' AND on = 'lead'
    ) AS tag_changes
    ALL INNER JOIN (
        SELECT lead_id, first_ts_ms FROM leads FINAL
        WHERE site_id = %(site_id)s AND merged_into = '' AND first_ts_ms > 0
    ) AS current_leads USING lead_id
    GROUP BY lead_id, tag
)
GROUP BY tag
ORDER BY leads DESC, tag"""

SCORE_BY_ACCOUNT_SQL = """SELECT account_domain,
       count() AS leads,
       round(avg(score), 1) AS avg_score,
       max(score) AS top_score,
       countIf(score < 25) AS score_0_24,
       countIf(score >= 25 AND score < 50) AS score_25_49,
       countIf(score >= 50 AND score < 75) AS score_50_74,
       countIf(score >= 75) AS score_75_100
FROM lead_state FINAL
WHERE site_id = %(site_id)s AND account_domain != '' AND merged_into = ''
GROUP BY account_domain
ORDER BY avg_score DESC, account_domain"""

TIME_IN_STAGE_SQL = """SELECT board_id,
       stage,
       countIf(left_ms = 0) AS cards_now,
       countIf(left_ms > 0) AS completed_stays,
       if(completed_stays = 0, NULL, round(avgIf(left_ms - entered_ms, left_ms > 0) / 3600000, 1)) AS avg_hours,
       if(completed_stays = 0, NULL,
          round(quantileExactIf(0.5)(left_ms - entered_ms, left_ms > 0) / 3600000, 1)) AS median_hours
FROM (
    SELECT board_id, card_id, arraySort(groupArray((seq, to_stage, ts_ms))) AS moves
    FROM stage_changes FINAL
    WHERE site_id = %(site_id)s
    GROUP BY board_id, card_id
)
ARRAY JOIN
    arrayMap(move -> tupleElement(move, 2), moves) AS stage,
    arrayMap(move -> tupleElement(move, 3), moves) AS entered_ms,
    arrayPushBack(arrayPopFront(arrayMap(move -> tupleElement(move, 3), moves)), toUInt64(0)) AS left_ms
GROUP BY board_id, stage
ORDER BY board_id, avg_hours DESC, stage"""

STAGE_CONVERSION_SQL = """SELECT board_id, stage, next_stage, moved_cards, entered_cards,
       round(moved_cards / entered_cards, 2) AS conversion
FROM (
    SELECT board_id, from_stage AS stage, to_stage AS next_stage, uniqExact(card_id) AS moved_cards
    FROM stage_changes FINAL
    WHERE site_id = %(site_id)s AND from_stage != ''
    GROUP BY board_id, stage, next_stage
) AS moves
ALL INNER JOIN (
    SELECT board_id, to_stage AS stage, uniqExact(card_id) AS entered_cards
    FROM stage_changes FINAL
    WHERE site_id = %(site_id)s
    GROUP BY board_id, stage
) AS entries USING (board_id, stage)
ORDER BY board_id, entered_cards DESC, stage, moved_cards DESC, next_stage"""

LEAD_TIME_SQL = """SELECT card_id,
       first_event_ms,
       arrived_ms,
       round((toInt64(arrived_ms) - toInt64(first_event_ms)) / 3600000, 1) AS lead_time_hours
FROM (
    SELECT card_id, min(ts_ms) AS arrived_ms
    FROM stage_changes FINAL
    WHERE site_id = %(site_id)s AND board_id = %(board_id)s AND to_stage = %(final_stage)s
    GROUP BY card_id
) AS arrivals
ALL INNER JOIN (
    SELECT concat('lead:', lead_id) AS card_id, first_ts_ms AS first_event_ms
    FROM leads FINAL
    WHERE site_id = %(site_id)s AND merged_into = '' AND first_ts_ms > 0
    UNION ALL
    SELECT concat('account:', account_domain) AS card_id, min(first_ts_ms) AS first_event_ms
    FROM leads FINAL
    WHERE site_id = %(site_id)s AND merged_into = '' AND first_ts_ms > 0 AND account_domain != ''
    GROUP BY card_id
) AS first_events USING card_id
ORDER BY lead_time_hours DESC, card_id"""

STAGE_CHANGES_BY_ACTOR_SQL = """SELECT board_id,
       to_stage,
       count() AS moves,
       countIf(changed_by = 'rule') AS by_rule,
       countIf(changed_by = 'person') AS by_person,
       countIf(changed_by = 'other') AS by_other
FROM (
    SELECT board_id, to_stage,
           multiIf(startsWith(actor, 'rule:'), 'rule', startsWith(actor, 'user:'), 'person', 'other') AS changed_by
    FROM stage_changes FINAL
    WHERE site_id = %(site_id)s
)
GROUP BY board_id, to_stage
ORDER BY board_id, moves DESC, to_stage"""


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
