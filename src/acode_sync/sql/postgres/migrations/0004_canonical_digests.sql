-- payload_digest is over the payload bytes as the origin wrote them; jsonb keeps neither
-- their key order nor their spacing nor a number's spelling, so a row cannot be turned
-- back into those bytes. canonical_digest is the SHA-256 of the payload's jsonb text
-- (payload::jsonb::text: keys sorted, one spelling per value), which a restore can
-- rebuild from the row and so prove it holds, value for value, what the origin sent.
-- Rows written before this migration have none (NULL): a restore reports them apart.
ALTER TABLE sessions ADD COLUMN canonical_digest bytea;
ALTER TABLE session_events ADD COLUMN canonical_digest bytea;
ALTER TABLE session_tasks ADD COLUMN canonical_digest bytea;
ALTER TABLE steps ADD COLUMN canonical_digest bytea;
ALTER TABLE tool_calls ADD COLUMN canonical_digest bytea;
ALTER TABLE artifacts ADD COLUMN canonical_digest bytea;
