-- Erasures (right to be forgotten, api/erasure.py): one row per state of an erasure — when it was asked for
-- (status pending) and when every ClickHouse mutation it started was done (status done). `stores` and
-- `counts` are parallel: rows removed per table, keys per Redis store (`redis:<store>`). requested_by is
-- the API key's id (or `cli`). The audit record that an erasure happened: no email, no visitor id, no
-- lead id — nothing of the person. Read the newest state with FINAL or argMax(status, version).
CREATE TABLE IF NOT EXISTS erasures (
    erasure_id String,
    site_id String,
    requested_by String,
    requested_ms UInt64,
    finished_ms UInt64,
    status String,
    stores Array(String),
    counts Array(UInt64),
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY (site_id, erasure_id);
