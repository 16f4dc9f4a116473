-- Workflow automation and LeadBoards, as seen by analysts. Each table's columns are its record's fields,
-- in order (schemas.rules, schemas.boards); bool is UInt8, epoch milliseconds are UInt64 (no DateTime64
-- on ClickHouse 18.16). Every record has a deterministic id, so a replayed record is the same row again:
-- ReplacingMergeTree collapses it after merges; read with FINAL (or argMax) for exact counts.
-- Partitioned tables: a replay re-derives a record's ts_ms too, so its copies share a monthly partition.

-- Every change a rule (or a merge) made to a lead: tags added/removed, score deltas, properties set.
CREATE TABLE IF NOT EXISTS lead_changes (
    change_id String,
    site_id String,
    lead_id String,
    kind String,
    name String,
    value String,
    score Int64,
    rule_id String,
    rule_version UInt64,
    event_id String,
    ts_ms UInt64,
    account_domain String,
    on String,
    ts_date Date DEFAULT toDate(intDiv(ts_ms, 1000))
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts_date)
ORDER BY (site_id, lead_id, change_id);

-- A lead's current tags, score and properties: the highest version wins. tag_sources is a JSON object
-- (tag -> {source, rule_id, rule_version, event_id, ts_ms}); properties is a JSON object.
-- Not partitioned: a lead's versions must stay in one partition to collapse.
CREATE TABLE IF NOT EXISTS lead_state (
    site_id String,
    lead_id String,
    email String,
    account_domain String,
    tags Array(String),
    tag_sources String,
    score Int64,
    properties String,
    first_ts_ms UInt64,
    last_activity_ms UInt64,
    merged_into String,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY (site_id, lead_id);

-- One row per firing of a rule for a lead (execution_id is the firing id); actions: one line per action.
CREATE TABLE IF NOT EXISTS rule_executions (
    execution_id String,
    site_id String,
    rule_id String,
    rule_version UInt64,
    lead_id String,
    trigger String,
    event_id String,
    actions Array(String),
    outcome String,
    ts_ms UInt64,
    depth UInt64,
    ts_date Date DEFAULT toDate(intDiv(ts_ms, 1000))
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts_date)
ORDER BY (site_id, rule_id, execution_id);

-- Every move of a card on a board (contract). seq is the card's move number on the board (1 = entered):
-- a replayed move re-derives the same (board_id, card_id, seq). Not partitioned, so that key collapses
-- even if a replay ever carried another ts_ms (a board has few moves per card; the table stays small).
CREATE TABLE IF NOT EXISTS stage_changes (
    site_id String,
    board_id String,
    card_id String,
    from_stage String,
    to_stage String,
    actor String,
    rule_id String,
    event_id String,
    reason String,
    ts_ms UInt64,
    seq UInt64,
    stage_change_id String
) ENGINE = ReplacingMergeTree
ORDER BY (site_id, board_id, card_id, seq);
