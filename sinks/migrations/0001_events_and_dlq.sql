-- Enriched events: exactly one row per raw Kafka message that passed validation.
-- (raw_partition, raw_offset) is the sink's idempotency watermark: after any redelivery it skips
-- rows whose raw offset it already stored, so a MergeTree (no FINAL needed) never holds duplicates.
-- Epoch milliseconds in UInt64: ClickHouse 18.16 has no DateTime64.
CREATE TABLE IF NOT EXISTS events (
    event_id String,
    site_id String,
    type String,
    ts_ms UInt64,
    received_ms UInt64,
    visitor_id String,
    url String,
    url_host String,
    url_path String,
    url_domain String,
    referrer String,
    referrer_host String,
    referrer_domain String,
    channel String,
    search_engine String,
    utm_source String,
    utm_medium String,
    utm_campaign String,
    utm_term String,
    utm_content String,
    click_id_type String,
    click_id String,
    title String,
    ip String,
    user_agent String,
    browser String,
    browser_version String,
    os String,
    device String,
    is_bot UInt8,
    email String,
    email_domain String,
    name String,
    campaign String,
    properties String,
    extra String,
    raw_partition Int32,
    raw_offset Int64,
    session_id String,
    is_late UInt8,
    lead_id String,
    ts DateTime DEFAULT toDateTime(intDiv(ts_ms, 1000)),
    event_date Date DEFAULT toDate(intDiv(ts_ms, 1000))
) ENGINE = MergeTree
PARTITION BY toYYYYMM(event_date)
ORDER BY (site_id, visitor_id, ts_ms, event_id);

-- Dead letters: every rejected raw message with its reason and its original bytes, untouched.
-- (raw_partition, raw_offset) = where it came from in events.raw, also the sink's watermark.
CREATE TABLE IF NOT EXISTS dlq (
    reason String,
    message String,
    raw String,
    topic String,
    raw_partition Int32,
    raw_offset Int64,
    received_ms UInt64,
    received_date Date DEFAULT toDate(intDiv(received_ms, 1000))
) ENGINE = MergeTree
PARTITION BY toYYYYMM(received_date)
ORDER BY (reason, received_ms, raw_partition, raw_offset);
