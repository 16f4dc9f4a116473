-- Retention (sinks/retention.py): one row per table per retention run. `action` says what was done:
-- ttl / ttl_removed / ttl_kept (a server with table TTL: the TTL was set, removed or already right),
-- dropped (whole monthly partitions older than `cutoff`, listed in `partitions`), deleted (a DELETE
-- mutation for the rows before `cutoff`), dropped_and_deleted, nothing, pending (an earlier mutation of
-- the table was still running). `rows`: rows older than the cutoff when the run looked. The record that
-- retention happened, and how sink processes that share a table keep to one run a day. No personal data.
CREATE TABLE IF NOT EXISTS retention_runs (
    table_name String,
    days UInt32,
    cutoff Date,
    action String,
    partitions Array(String),
    rows UInt64,
    ts_ms UInt64
) ENGINE = MergeTree
ORDER BY (table_name, ts_ms);
