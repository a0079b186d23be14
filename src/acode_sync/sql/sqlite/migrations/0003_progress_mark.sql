-- A progress mark instead of one sync row per record. Marking a batch used to update a
-- thousand outbox_sync rows (and their index entries) while holding the write lock the
-- agent's saves wait for; a save also wrote a sync row of its own. Now:
-- - outbox_progress holds one row per marked batch: every record up to its through_id
--   (and past the row before) that has no outbox_sync row was processed at its
--   processed_at. The largest through_id is the mark: records past it are pending.
-- - outbox_sync keeps a row only for a record with a state of its own: one that failed,
--   was held back behind an earlier record of its entity, was given sync columns by a
--   writer, or was inserted below the mark (an explicit outbox_id). Rows of schema 2
--   are kept as they are: each is such a state.
-- The `outbox` view shows the same columns as before, derived where there is no sync row.

CREATE TABLE outbox_progress (
    through_id INTEGER PRIMARY KEY,
    processed_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT;

-- Every record of schema 2 has its sync row: the mark starts after the last of them.
INSERT INTO outbox_progress (through_id, processed_at, created_at)
SELECT max(outbox_id), strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
       strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
FROM outbox_records
HAVING max(outbox_id) IS NOT NULL;

-- Counting the records past the mark reads this narrow index, not the payloads' pages.
CREATE INDEX outbox_records_by_id ON outbox_records (outbox_id);

-- A record whose id is below the largest id ever given (an explicit outbox_id filling a
-- gap) could land below the mark: it is given its own pending sync row, so that it is
-- never taken for processed. A plain insert (the next AUTOINCREMENT id) writes no row.
CREATE TRIGGER outbox_records_backfill AFTER INSERT ON outbox_records
WHEN NEW.outbox_id < (SELECT seq FROM sqlite_sequence WHERE name = 'outbox_records')
BEGIN
    INSERT INTO outbox_sync (outbox_id, state, attempts, created_at)
    VALUES (NEW.outbox_id, 'pending', 0, NEW.created_at)
    ON CONFLICT (outbox_id) DO NOTHING;
END;

DROP VIEW outbox;

-- The columns of the outbox table of schema version 1, in the same order. A record with
-- no sync row is pending past the mark; below it, processed when its progress row says.
CREATE VIEW outbox AS
SELECT r.outbox_id, r.idempotency_key, r.entity_type, r.entity_id, r.session_id, r.payload,
       r.base_updated_at, r.created_at,
       iif(s.outbox_id IS NULL, p.processed_at, s.updated_at) AS updated_at,
       coalesce(s.state, iif(p.through_id IS NULL, 'pending', 'processed')) AS state,
       iif(s.outbox_id IS NULL, p.processed_at, s.processed_at) AS processed_at,
       coalesce(s.attempts, 0) AS attempts,
       s.next_attempt_at, s.last_error
FROM outbox_records AS r
LEFT JOIN outbox_sync AS s ON s.outbox_id = r.outbox_id
LEFT JOIN outbox_progress AS p ON p.through_id = (
    SELECT min(through_id) FROM outbox_progress WHERE through_id >= r.outbox_id);

-- The writers' plain INSERT (docs/schema.md): omitted columns take the defaults. A sync
-- row is written only if a sync column is given. A duplicate idempotency_key fails on
-- outbox_records' UNIQUE constraint.
CREATE TRIGGER outbox_insert INSTEAD OF INSERT ON outbox
BEGIN
    INSERT INTO outbox_records (outbox_id, idempotency_key, entity_type, entity_id,
                                session_id, payload, base_updated_at, created_at, updated_at)
    VALUES (NEW.outbox_id, NEW.idempotency_key, NEW.entity_type, NEW.entity_id,
            NEW.session_id, NEW.payload, NEW.base_updated_at, NEW.created_at, NEW.updated_at);
    INSERT INTO outbox_sync (outbox_id, state, processed_at, attempts, next_attempt_at,
                             last_error, created_at, updated_at)
    SELECT last_insert_rowid(), coalesce(NEW.state, 'pending'), NEW.processed_at,
           coalesce(NEW.attempts, 0), NEW.next_attempt_at, NEW.last_error, NEW.created_at,
           NEW.updated_at
    WHERE coalesce(NEW.state, 'pending') <> 'pending' OR NEW.processed_at IS NOT NULL
       OR coalesce(NEW.attempts, 0) <> 0 OR NEW.next_attempt_at IS NOT NULL
       OR NEW.last_error IS NOT NULL OR NEW.updated_at IS NOT NULL
    ON CONFLICT (outbox_id) DO UPDATE SET
        state = excluded.state, processed_at = excluded.processed_at,
        attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at,
        last_error = excluded.last_error, updated_at = excluded.updated_at;
END;

-- Sync columns go to the record's sync row (written if it had none); the record is
-- rewritten only if one of its own columns changed. An outbox_id never changes.
CREATE TRIGGER outbox_update INSTEAD OF UPDATE ON outbox
BEGIN
    SELECT RAISE(ABORT, 'outbox_id cannot change') WHERE NEW.outbox_id IS NOT OLD.outbox_id;
    UPDATE outbox_records
    SET idempotency_key = NEW.idempotency_key, entity_type = NEW.entity_type,
        entity_id = NEW.entity_id, session_id = NEW.session_id, payload = NEW.payload,
        base_updated_at = NEW.base_updated_at, created_at = NEW.created_at
    WHERE outbox_id = OLD.outbox_id
      AND (NEW.idempotency_key IS NOT OLD.idempotency_key
           OR NEW.entity_type IS NOT OLD.entity_type
           OR NEW.entity_id IS NOT OLD.entity_id
           OR NEW.session_id IS NOT OLD.session_id
           OR NEW.payload IS NOT OLD.payload
           OR NEW.base_updated_at IS NOT OLD.base_updated_at
           OR NEW.created_at IS NOT OLD.created_at);
    INSERT INTO outbox_sync (outbox_id, state, processed_at, attempts, next_attempt_at,
                             last_error, created_at, updated_at)
    SELECT OLD.outbox_id, NEW.state, NEW.processed_at, NEW.attempts, NEW.next_attempt_at,
           NEW.last_error, NEW.created_at, NEW.updated_at
    WHERE NEW.state IS NOT OLD.state
       OR NEW.processed_at IS NOT OLD.processed_at
       OR NEW.attempts IS NOT OLD.attempts
       OR NEW.next_attempt_at IS NOT OLD.next_attempt_at
       OR NEW.last_error IS NOT OLD.last_error
       OR NEW.created_at IS NOT OLD.created_at
       OR NEW.updated_at IS NOT OLD.updated_at
    ON CONFLICT (outbox_id) DO UPDATE SET
        state = excluded.state, processed_at = excluded.processed_at,
        attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at,
        last_error = excluded.last_error, created_at = excluded.created_at,
        updated_at = excluded.updated_at;
END;

-- Explicit deletes, so that they also hold on a connection with foreign keys off.
CREATE TRIGGER outbox_delete INSTEAD OF DELETE ON outbox
BEGIN
    DELETE FROM outbox_errors WHERE outbox_id = OLD.outbox_id;
    DELETE FROM outbox_sync WHERE outbox_id = OLD.outbox_id;
    DELETE FROM outbox_records WHERE outbox_id = OLD.outbox_id;
END;
