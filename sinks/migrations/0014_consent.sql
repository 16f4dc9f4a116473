-- Consent (schemas/privacy.py): `consent` holds the purposes an event's `consent` field granted, sorted and
-- comma-separated ('' when it stated none); `may_identify` = 0 for an event stored for analytics only (no
-- marketing consent): it has no lead_id and no email, and never reached the lead feed. Rows stored before
-- this migration behaved as events that may identify: 1.
ALTER TABLE events ADD COLUMN consent String DEFAULT '' AFTER network_domain;
ALTER TABLE events ADD COLUMN may_identify UInt8 DEFAULT 1 AFTER consent;
