-- Webhook delivery log: one row per attempt to deliver a rule's webhook, plus one per deferral while the
-- endpoint's circuit breaker was open (outcome circuit_open, no request sent). outcome is one of
-- delivered | retrying | failed | circuit_open; status_code 0 means no HTTP response (timeout, refused
-- connection, missing secret). A flush retried after an insert that did land stores the same rows again:
-- ReplacingMergeTree collapses them (same key), so read with FINAL for exact counts.
-- Epoch milliseconds in UInt64: ClickHouse 18.16 has no DateTime64.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    webhook_id String,
    site_id String,
    rule_id String,
    url String,
    attempt UInt32,
    status_code UInt16,
    outcome String,
    error String,
    duration_ms UInt32,
    ts_ms UInt64,
    next_attempt_ms UInt64,
    ts_date Date DEFAULT toDate(intDiv(ts_ms, 1000))
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts_date)
ORDER BY (site_id, webhook_id, attempt, ts_ms);
