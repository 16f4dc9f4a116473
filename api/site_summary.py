"""The site summary read model: what the demo prints and `GET /v1/sites/{site}/summary` returns.

Named SQL constants, one list: the demo and the API show the same figures. Sort and group by aliases,
never by position: ClickHouse 18.16 reads `ORDER BY 2` as a constant.

Leads are counted as the product defines them: a known contact, or an anonymous employee of a company (an
account is known). Every other visitor stays a visitor: counted among visitors, never among leads.
"""

from __future__ import annotations

from dataclasses import dataclass


# A current lead (collapsed rows of `leads` or `lead_state`) that is a lead: known, or with an account.
_CURRENT_LEAD = "merged_into = '' AND (email != '' OR account_domain != '')"


@dataclass(frozen=True)
class SummaryQuery:
    name: str
    title: str
    headers: tuple[str, ...]
    sql: str


SUMMARY = (
    SummaryQuery("events_by_type", "Events by type", ("type", "events"),
                 "SELECT type, count() AS n FROM events WHERE site_id = %(site)s GROUP BY type ORDER BY n DESC"),
    SummaryQuery("events_by_channel", "Events by channel (humans only)", ("channel", "events", "visitors"),
                 "SELECT channel, count() AS n, uniqExact(visitor_id) AS visitors FROM events"
                 " WHERE site_id = %(site)s AND is_bot = 0 GROUP BY channel ORDER BY n DESC"),
    SummaryQuery("sessions_by_channel", "Sessions", ("channel", "sessions", "avg length s", "closed"),
                 "SELECT channel, count() AS sessions, toUInt64(avg(duration_ms) / 1000) AS avg_s,"
                 " sum(is_closed) AS closed FROM sessions FINAL WHERE site_id = %(site)s AND merged_into = ''"
                 " AND is_bot = 0 GROUP BY channel ORDER BY sessions DESC"),
    SummaryQuery("landing_pages", "Top landing pages", ("landing page", "sessions"),
                 "SELECT landing_url, count() AS n FROM sessions FINAL WHERE site_id = %(site)s AND merged_into = ''"
                 " AND is_bot = 0 AND landing_url != '' GROUP BY landing_url ORDER BY n DESC LIMIT 5"),
    SummaryQuery("visitors_by_country", "Visitors by country (humans only)", ("country", "visitors", "events"),
                 "SELECT if(geo_country = '', '(unknown)', geo_country) AS country, uniqExact(visitor_id) AS visitors,"
                 " count() AS n FROM events WHERE site_id = %(site)s AND is_bot = 0 GROUP BY country"
                 " ORDER BY visitors DESC, country LIMIT 8"),
    SummaryQuery("bots", "Bots (stored, flagged)", ("agent", "events"),
                 "SELECT browser, count() AS n FROM events WHERE site_id = %(site)s AND is_bot = 1 GROUP BY browser"
                 " ORDER BY n DESC LIMIT 5"),
    SummaryQuery("leads", "Visitors and leads (a lead is a known contact or has an account)", ("who", "count"),
                 "SELECT who, n FROM ("
                 " SELECT 0 AS position, 'visitors' AS who, uniqExact(visitor_id) AS n FROM events"
                 " WHERE site_id = %(site)s AND is_bot = 0"
                 " UNION ALL"
                 " SELECT position, who, n FROM ("
                 " SELECT countIf(email != '') AS known, countIf(email = '' AND account_domain != '') AS anonymous,"
                 " countIf(email = '' AND account_domain = '') AS not_leads FROM leads FINAL"
                 " WHERE site_id = %(site)s AND merged_into = ''"
                 ") ARRAY JOIN [1, 2, 3, 4] AS position,"
                 " ['leads', 'known', 'anonymous, with an account', 'visitors who are not leads'] AS who,"
                 " [known + anonymous, known, anonymous, not_leads] AS n"
                 ") ORDER BY position"),
    SummaryQuery("top_accounts", "Top accounts, with their company cards",
                 ("account", "leads", "known", "company", "industry", "employees", "country"),
                 "SELECT account_domain, leads, known, name, industry, employees, country FROM ("
                 " SELECT account_domain, count() AS leads, countIf(email != '') AS known FROM leads FINAL"
                 " WHERE site_id = %(site)s AND merged_into = '' AND account_domain != '' GROUP BY account_domain"
                 ") AS accounts ANY LEFT JOIN (SELECT domain AS account_domain, name, industry, employees, country"
                 " FROM companies FINAL) AS cards USING account_domain ORDER BY leads DESC, account_domain LIMIT 8"),
    SummaryQuery("identity_events", "Identity events", ("kind", "events"),
                 "SELECT kind, count() AS n FROM identity_events FINAL WHERE site_id = %(site)s"
                 " GROUP BY kind ORDER BY n DESC"),
    SummaryQuery("rule_firings", "Rule firings", ("rule", "firings", "leads"),
                 "SELECT rule_id, count() AS firings, uniqExact(lead_id) AS leads FROM rule_executions FINAL"
                 " WHERE site_id = %(site)s GROUP BY rule_id ORDER BY firings DESC, rule_id"),
    SummaryQuery("lead_tags", "Leads by tag", ("tag", "leads"),
                 "SELECT tag, count() AS leads FROM lead_state FINAL ARRAY JOIN tags AS tag"
                 f" WHERE site_id = %(site)s AND {_CURRENT_LEAD} GROUP BY tag ORDER BY leads DESC, tag"),
    SummaryQuery("score_distribution", "Lead scores", ("score", "leads"),
                 "SELECT concat(toString(intDiv(least(score, 99), 20) * 20), '-',"
                 " toString(intDiv(least(score, 99), 20) * 20 + if(score >= 80, 20, 19))) AS band, count() AS leads"
                 f" FROM lead_state FINAL WHERE site_id = %(site)s AND {_CURRENT_LEAD} GROUP BY band ORDER BY min(score)"),
    SummaryQuery("stage_changes_by_cause", "Stage changes by cause", ("actor", "changes"),
                 "SELECT if(actor LIKE 'rule:%%', concat('rule ', rule_id), actor) AS cause, count() AS changes"
                 " FROM stage_changes FINAL WHERE site_id = %(site)s GROUP BY cause ORDER BY changes DESC, cause"),
)
