-- Dead letters keep at most a prefix of the original bytes (64 KiB, so a letter stays far below the
-- broker's record limit), with the full size and the SHA-256 of the original; raw_truncated = 1 when
-- `raw` is only the prefix. Letters stored before this migration kept their bytes whole: the defaults
-- compute the same values from them.
ALTER TABLE dlq ADD COLUMN raw_size UInt64 DEFAULT length(raw) AFTER raw;
ALTER TABLE dlq ADD COLUMN raw_sha256 String DEFAULT lower(hex(SHA256(raw))) AFTER raw_size;
ALTER TABLE dlq ADD COLUMN raw_truncated UInt8 DEFAULT 0 AFTER raw_sha256;

-- The full (prefixed) name of the events.raw topic an event came from: the sink's raw-offset watermark
-- is per (raw_topic, raw_partition), so pipelines with different topic prefixes can share the table.
-- Rows stored before this migration have '' and count for no topic.
ALTER TABLE events ADD COLUMN raw_topic String DEFAULT '' AFTER raw_offset;
