-- Payload keys this program does not know, per entity row (a JSON object, or NULL when
-- there are none). A restore from PostgreSQL writes them (they are the central `extra`),
-- and the store sends them again in the payload of the entity's next save, so a version
-- saved after a restore keeps what another writer put there.
ALTER TABLE sessions ADD COLUMN extra TEXT CHECK (extra IS NULL OR json_valid(extra));
ALTER TABLE session_events ADD COLUMN extra TEXT CHECK (extra IS NULL OR json_valid(extra));
ALTER TABLE session_tasks ADD COLUMN extra TEXT CHECK (extra IS NULL OR json_valid(extra));
ALTER TABLE steps ADD COLUMN extra TEXT CHECK (extra IS NULL OR json_valid(extra));
ALTER TABLE tool_calls ADD COLUMN extra TEXT CHECK (extra IS NULL OR json_valid(extra));
ALTER TABLE artifacts ADD COLUMN extra TEXT CHECK (extra IS NULL OR json_valid(extra));
