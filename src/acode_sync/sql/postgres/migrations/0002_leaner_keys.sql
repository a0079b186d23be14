-- Keys and entity ids are ASCII identifiers: compare them byte by byte (COLLATE "C")
-- instead of through the database's locale, which costs a strcoll() call per comparison
-- on every index insert and lookup of a batch. For ASCII text the order is the same.
-- The indexes on these columns are rebuilt; the tables are not rewritten.

ALTER TABLE applied_keys ALTER COLUMN idempotency_key TYPE text COLLATE "C";

-- The key names its entity (EntityType:entity_id:timestamp): a key need not carry them
-- again. Keys of one entity: WHERE starts_with(idempotency_key, 'Session:sess_x:') (the
-- C collation lets that prefix search use the unique index).
ALTER TABLE applied_keys DROP COLUMN entity_type, DROP COLUMN entity_id;

ALTER TABLE sessions ALTER COLUMN session_id TYPE text COLLATE "C";

ALTER TABLE session_events
    ALTER COLUMN event_id TYPE text COLLATE "C",
    ALTER COLUMN session_id TYPE text COLLATE "C";

ALTER TABLE session_tasks
    ALTER COLUMN task_id TYPE text COLLATE "C",
    ALTER COLUMN session_id TYPE text COLLATE "C";

ALTER TABLE steps
    ALTER COLUMN step_id TYPE text COLLATE "C",
    ALTER COLUMN task_id TYPE text COLLATE "C",
    ALTER COLUMN session_id TYPE text COLLATE "C";

ALTER TABLE tool_calls
    ALTER COLUMN tool_call_id TYPE text COLLATE "C",
    ALTER COLUMN step_id TYPE text COLLATE "C",
    ALTER COLUMN session_id TYPE text COLLATE "C";

ALTER TABLE artifacts
    ALTER COLUMN artifact_id TYPE text COLLATE "C",
    ALTER COLUMN session_id TYPE text COLLATE "C";

ALTER TABLE conflicts
    ALTER COLUMN incoming_key TYPE text COLLATE "C",
    ALTER COLUMN entity_type TYPE text COLLATE "C",
    ALTER COLUMN entity_id TYPE text COLLATE "C",
    ALTER COLUMN session_id TYPE text COLLATE "C";
