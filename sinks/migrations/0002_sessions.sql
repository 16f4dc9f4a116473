-- Sessions arrive as upserts: every change of a session is a new row with a higher `version`.
-- ReplacingMergeTree keeps the latest version per (site_id, visitor_id, session_id) after merges;
-- read with FINAL (or argMax(..., version)) to see exactly one row per session.
-- A session superseded by a merge keeps its last row with merged_into = the surviving session_id.
CREATE TABLE IF NOT EXISTS sessions (
    session_id String,
    site_id String,
    visitor_id String,
    session_index UInt32,
    previous_session_id String,
    start_ms UInt64,
    end_ms UInt64,
    duration_ms UInt64,
    event_count UInt32,
    pageview_count UInt32,
    landing_url String,
    exit_url String,
    referrer String,
    channel String,
    utm_source String,
    utm_medium String,
    utm_campaign String,
    utm_term String,
    utm_content String,
    click_id_type String,
    click_id String,
    utm_source_last String,
    utm_medium_last String,
    utm_campaign_last String,
    click_id_last String,
    device String,
    browser String,
    os String,
    is_bot UInt8,
    email String,
    is_closed UInt8,
    merged_into String,
    version UInt64,
    start_date Date DEFAULT toDate(intDiv(start_ms, 1000))
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(start_date)
ORDER BY (site_id, visitor_id, session_id);
