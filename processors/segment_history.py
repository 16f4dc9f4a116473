"""History for the counts a segment edit adds: what a lead's counter would hold had it been counting all
along, read from ClickHouse `events`, as `SegmentBackfill` records for the lead processor.

A lead's counters only know the events that arrived while their count existed. When a segment is created
or edited, `SegmentSet.counters_needing_history` names the counters that are new or must now keep more
(a longer window, a higher threshold); for each, one query (EVENTS_HISTORY_SQL, or SESSIONS_HISTORY_SQL for
`distinct: session`) reads every lead's newest `keep` matching events in the window, and
`backfill_records` turns the rows into one record per lead. Every lead of the site gets a record, with or
without history, because an edit can change the membership of any lead; the lead processor merges the
entries (a digest already counted counts once, so events that also arrived live are not doubled) and
re-evaluates (processors.segments.on_backfill).

The SQL texts are constants: every value travels as a query parameter, filters that a count does not use
are given as '' and match everything. Event time is capped at arrival (least(ts_ms, received_ms)), as
the lead processor counts it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from processors.segments import SegmentSet, session_digest
from schemas.conditions import EVENT_FILTER_KEYS
from schemas.records import digest, event_digest
from schemas.segments import CountOf, SegmentBackfill

_MATCHING = """
      site_id = %(site_id)s
      AND event_date >= toDate(intDiv(%(from_ms)s, 1000)) AND ts_ms > %(from_ms)s
      AND least(ts_ms, received_ms) > %(from_ms)s AND least(ts_ms, received_ms) <= %(as_of_ms)s
      AND is_bot = 0 AND lead_id != ''
      AND (%(type)s = 'any' OR type = %(type)s)
      AND match(lowerUTF8(url), %(url)s)
      AND (%(channel)s = '' OR lowerUTF8(channel) = %(channel)s)
      AND (%(utm_source)s = '' OR lowerUTF8(utm_source) = %(utm_source)s)
      AND (%(utm_medium)s = '' OR lowerUTF8(utm_medium) = %(utm_medium)s)
      AND (%(utm_campaign)s = '' OR lowerUTF8(utm_campaign) = %(utm_campaign)s)
      AND (%(name)s = '' OR lowerUTF8(name) = %(name)s)
      AND (%(campaign)s = '' OR lowerUTF8(campaign) = %(campaign)s)"""

# Each lead's newest `keep` matching events: (lead_id, event time, event_id).
EVENTS_HISTORY_SQL = f"""
SELECT lead_id, least(ts_ms, received_ms) AS ts, event_id
FROM events
WHERE{_MATCHING}
ORDER BY lead_id, ts DESC, event_id DESC
LIMIT %(keep)s BY lead_id"""

# Each lead's `keep` sessions with the newest matching events: (lead_id, that event's time, session_id).
SESSIONS_HISTORY_SQL = f"""
SELECT lead_id, max(least(ts_ms, received_ms)) AS ts, session_id
FROM events
WHERE{_MATCHING}
      AND session_id != ''
GROUP BY lead_id, session_id
ORDER BY lead_id, ts DESC, session_id DESC
LIMIT %(keep)s BY lead_id"""


def glob_regex(glob: str | None) -> str:
    """A URL glob (`*`, `?`, `[...]`) as the re2 pattern ClickHouse's match() takes, for the lowercased URL
    (case-insensitive like processors.conditions.url_matcher; 18.16's match() ignores a (?i) flag when it
    looks for the pattern's literal part first). No glob: '' (matches every URL)."""
    if not glob:
        return ""
    glob, out, i = glob.lower(), [], 0
    while i < len(glob):
        char = glob[i]
        end = glob.find("]", i + 2) if char == "[" else -1
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif end > 0:
            body = glob[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "^" + "".join(out) + "$"


def history_query(site_id: str, count: CountOf, keep: int, window_ms: int, as_of_ms: int) -> tuple[str, dict[str, Any]]:
    """(SQL, parameters) reading every lead's history for one counter."""
    params: dict[str, Any] = {name: (getattr(count, name) or "").casefold() for name in EVENT_FILTER_KEYS[1:]}
    params.update(site_id=site_id, type=count.event or "any", url=glob_regex(count.url), keep=keep,
                  from_ms=max(0, as_of_ms - window_ms), as_of_ms=as_of_ms)
    return (SESSIONS_HISTORY_SQL if count.distinct == "session" else EVENTS_HISTORY_SQL), params


def history_queries(segset: SegmentSet, before: SegmentSet, site_id: str, as_of_ms: int
                    ) -> dict[str, tuple[str, dict[str, Any]]]:
    """counter key -> (SQL, parameters), for the counters an edit from `before` to `segset` needs."""
    return {counter.key: history_query(site_id, counter.count, counter.keep, counter.window_ms, as_of_ms)
            for counter in segset.counters_needing_history(before)}


def backfill_records(segset: SegmentSet, site_id: str, as_of_ms: int, leads: Iterable[str],
                     rows_by_counter: dict[str, list[tuple[str, int, str]]]) -> list[SegmentBackfill]:
    """One record per lead (every lead of the site in `leads`, and any lead the rows name), carrying its
    entries per counter, newest first, for the definitions version of `segset`."""
    per_lead: dict[str, dict[str, list[list[Any]]]] = {lead_id: {} for lead_id in leads}
    for key, rows in rows_by_counter.items():
        ident = session_digest if segset.counters[key].sessions else event_digest
        for lead_id, ts_ms, source_id in rows:
            per_lead.setdefault(lead_id, {}).setdefault(key, []).append([ts_ms, ident(source_id)])
    version = segset.version
    return [SegmentBackfill("bf_" + digest(site_id, lead_id, str(version)), site_id, lead_id, version,
                            {key: sorted(entries, reverse=True) for key, entries in counters.items()}, as_of_ms)
            for lead_id, counters in sorted(per_lead.items())]
