-- Identity graph, as seen by analysts. The live graph is in Redis; these tables are its audit trail
-- and its read model. All are upsert tables: read with FINAL (or argMax on the version column).

-- Every link, merge, refusal, creation and account link, exactly once by its deterministic id.
CREATE TABLE IF NOT EXISTS identity_events (
    identity_event_id String,
    site_id String,
    kind String,
    event_id String,
    ts_ms UInt64,
    visitor_id String,
    lead_id String,
    from_lead_id String,
    email String,
    account_domain String,
    reason String,
    event_date Date DEFAULT toDate(intDiv(ts_ms, 1000))
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_date)
ORDER BY (site_id, identity_event_id);

-- Versioned visitor -> lead mapping. A visitor's events with ts_ms >= since_ts_ms belong to lead_id
-- (since_ts_ms = 0: the whole history, the usual case after an anonymous visitor identifies).
-- A shared computer that identifies as a second known contact gets a second row with a later since_ts_ms.
CREATE TABLE IF NOT EXISTS visitor_leads (
    site_id String,
    visitor_id String,
    since_ts_ms UInt64,
    lead_id String,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY (site_id, visitor_id, since_ts_ms);

-- Leads (the latest record wins). merged_into <> '' marks an anonymous lead merged away.
CREATE TABLE IF NOT EXISTS leads (
    lead_id String,
    site_id String,
    email String,
    visitors Array(String),
    account_domain String,
    merged_into String,
    first_ts_ms UInt64,
    last_ts_ms UInt64,
    created_event_id String,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY (site_id, lead_id);

-- Accounts added by hand (`leadstream account add DOMAIN`); accounts from emails and IP ranges are
-- read from leads.account_domain.
CREATE TABLE IF NOT EXISTS manual_accounts (
    site_id String,
    domain String,
    company_name String,
    added_ms UInt64
) ENGINE = ReplacingMergeTree(added_ms)
ORDER BY (site_id, domain);
