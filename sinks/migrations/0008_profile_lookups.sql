-- Lookups for the Lead Profile and the Account Panel. `leads` is keyed by lead and `visitor_leads` by
-- visitor, so "the leads of an account" and "the visitors of a lead" would read the whole site; these two
-- tables hold the same pairs keyed the other way round, filled by materialized views on every insert.

-- A lead's versions under its account; the newest says whether it was merged away. A lead's account never
-- changes once set (processors.identity: "once set, an account sticks"; a lead merged away keeps it), so
-- the newest version here is the lead's newest. Read with argMax(merged_into, version) or FINAL.
CREATE TABLE IF NOT EXISTS leads_by_account (
    site_id String,
    account_domain String,
    lead_id String,
    merged_into String,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY (site_id, account_domain, lead_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS leads_by_account_mv TO leads_by_account AS
SELECT site_id, account_domain, lead_id, merged_into, version FROM leads WHERE account_domain != '';

-- Rows written before the view existed (a repeat of a row the view also copied is dropped on merge).
INSERT INTO leads_by_account (site_id, account_domain, lead_id, merged_into, version)
SELECT site_id, account_domain, lead_id, merged_into, version FROM leads WHERE account_domain != '';

-- Every lead a visitor was ever linked to. It only narrows a search: a visitor that moved to another lead
-- keeps its row here, and readers take the visitor's links from visitor_leads. Hence no version: the
-- ReplacingMergeTree only drops repeated pairs.
CREATE TABLE IF NOT EXISTS visitors_by_lead (
    site_id String,
    lead_id String,
    visitor_id String
) ENGINE = ReplacingMergeTree
ORDER BY (site_id, lead_id, visitor_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS visitors_by_lead_mv TO visitors_by_lead AS
SELECT site_id, lead_id, visitor_id FROM visitor_leads;

INSERT INTO visitors_by_lead (site_id, lead_id, visitor_id)
SELECT site_id, lead_id, visitor_id FROM visitor_leads;
