-- Segment membership (contract): every time a member entered (entered = 1) or left (0) a segment. The
-- columns are schemas.segments.SegmentChange's fields, in order: member_id is a lead id, or an account's
-- domain (`of` says which); seq numbers a member's changes in one segment (odd: it entered); version is the
-- segment's definition version; cause says what changed it (an event, a window running out, a merge, ...).
-- A replayed change re-derives the same row, key (site_id, segment_id, member_id, ts_ms, seq) included:
-- the ReplacingMergeTree keeps one. A member's current membership: argMax(entered, (ts_ms, seq)).
CREATE TABLE IF NOT EXISTS segment_membership (
    site_id String,
    segment_id String,
    member_id String,
    entered UInt8,
    ts_ms UInt64,
    cause String,
    version UInt64,
    of String,
    seq UInt64,
    change_id String,
    account_domain String,
    ts_date Date DEFAULT toDate(intDiv(ts_ms, 1000))
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts_date)
ORDER BY (site_id, segment_id, member_id, ts_ms, seq);
