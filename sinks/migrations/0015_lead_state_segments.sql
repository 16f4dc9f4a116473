-- The lead segments each lead is a member of now (schemas.rules.LeadSnapshot.segments, sorted), beside its
-- score and last activity: a segment's members sorted by score or last seen are one read of lead_state
--   SELECT lead_id, score, last_activity_ms FROM lead_state FINAL
--   WHERE site_id = ... AND has(segments, ...) AND merged_into = '' ORDER BY score DESC, lead_id
-- while segment_membership keeps the history. Rows written before this migration have no segments.
ALTER TABLE lead_state ADD COLUMN segments Array(String);
