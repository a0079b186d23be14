-- Split the outbox in two: the records (written once, ~1 KB payload each) and their sync
-- state (a narrow row the syncer rewrites). Marking a batch processed then rewrites only
-- the narrow rows and their index entries, not the pages holding the payloads, so the WAL
-- the agent's saves share grows by a few pages per batch instead of ~1.4 MB.
-- `outbox` becomes a view over both, with the same columns in the same order; INSTEAD OF
-- triggers keep INSERT (the writers' contract), UPDATE and DELETE working on it.
-- Runs in the migration transaction with foreign_keys ON: errors are copied to a new table
-- before the old outbox is dropped, so no ON DELETE CASCADE removes them.

CREATE TABLE outbox_records (
    outbox_id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL UNIQUE,
    entity_type TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    session_id TEXT,
    payload TEXT NOT NULL,
    base_updated_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT;

-- One row per record. created_at is the record's, copied so that backlog and age queries
-- read this table alone; updated_at is when the sync state last changed.
CREATE TABLE outbox_sync (
    outbox_id INTEGER PRIMARY KEY REFERENCES outbox_records (outbox_id) ON DELETE CASCADE,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'processed', 'dead')),
    processed_at TEXT,
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at TEXT,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT;

INSERT INTO outbox_records (outbox_id, idempotency_key, entity_type, entity_id, session_id,
                            payload, base_updated_at, created_at, updated_at)
SELECT outbox_id, idempotency_key, entity_type, entity_id, session_id,
       payload, base_updated_at, created_at, updated_at
FROM outbox ORDER BY outbox_id;

INSERT INTO outbox_sync (outbox_id, state, processed_at, attempts, next_attempt_at,
                         last_error, created_at, updated_at)
SELECT outbox_id, state, processed_at, attempts, next_attempt_at,
       last_error, created_at, updated_at
FROM outbox ORDER BY outbox_id;

-- AUTOINCREMENT never reuses an id: carry the old counter over (it may be above the largest
-- id left, after pruning or deletes). Dropping `outbox` below deletes its own counter row.
UPDATE sqlite_sequence
SET seq = max(seq, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0))
WHERE name = 'outbox_records';
INSERT INTO sqlite_sequence (name, seq)
SELECT 'outbox_records', seq FROM sqlite_sequence
WHERE name = 'outbox'
  AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'outbox_records');

-- outbox_errors now references outbox_records. Rows whose record is gone (possible only if
-- a record was deleted with foreign keys off) would fail the new foreign key: they are the
-- rows the cascade would have removed, and are not copied.
CREATE TABLE outbox_errors_new (
    error_id INTEGER PRIMARY KEY,
    outbox_id INTEGER NOT NULL REFERENCES outbox_records (outbox_id) ON DELETE CASCADE,
    attempt INTEGER NOT NULL,
    error TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT;
INSERT INTO outbox_errors_new (error_id, outbox_id, attempt, error, created_at, updated_at)
SELECT error_id, outbox_id, attempt, error, created_at, updated_at
FROM outbox_errors
WHERE outbox_id IN (SELECT outbox_id FROM outbox_records)
ORDER BY error_id;
DROP TABLE outbox_errors;
DROP TABLE outbox;
ALTER TABLE outbox_errors_new RENAME TO outbox_errors;
CREATE INDEX outbox_errors_by_record ON outbox_errors (outbox_id, attempt);

CREATE INDEX outbox_by_entity ON outbox_records (entity_type, entity_id, outbox_id);
CREATE INDEX outbox_pending ON outbox_sync (outbox_id) WHERE state = 'pending';
CREATE INDEX outbox_dead ON outbox_sync (outbox_id) WHERE state = 'dead';
-- Records waiting out a backoff (few): the claim looks them up by next_attempt_at > now.
CREATE INDEX outbox_waiting ON outbox_sync (next_attempt_at)
    WHERE state = 'pending' AND next_attempt_at IS NOT NULL;
CREATE INDEX outbox_processed ON outbox_sync (processed_at) WHERE state = 'processed';

-- The columns of the outbox table of schema version 1, in the same order.
CREATE VIEW outbox AS
SELECT r.outbox_id, r.idempotency_key, r.entity_type, r.entity_id, r.session_id, r.payload,
       r.base_updated_at, r.created_at, s.updated_at, s.state, s.processed_at, s.attempts,
       s.next_attempt_at, s.last_error
FROM outbox_records AS r JOIN outbox_sync AS s ON s.outbox_id = r.outbox_id;

-- The writers' plain INSERT (docs/schema.md): omitted columns take the table defaults.
-- A duplicate idempotency_key fails on outbox_records' UNIQUE constraint.
CREATE TRIGGER outbox_insert INSTEAD OF INSERT ON outbox
BEGIN
    INSERT INTO outbox_records (outbox_id, idempotency_key, entity_type, entity_id,
                                session_id, payload, base_updated_at, created_at, updated_at)
    VALUES (NEW.outbox_id, NEW.idempotency_key, NEW.entity_type, NEW.entity_id,
            NEW.session_id, NEW.payload, NEW.base_updated_at, NEW.created_at, NEW.updated_at);
    INSERT INTO outbox_sync (outbox_id, state, processed_at, attempts, next_attempt_at,
                             last_error, created_at, updated_at)
    VALUES (last_insert_rowid(), coalesce(NEW.state, 'pending'), NEW.processed_at,
            coalesce(NEW.attempts, 0), NEW.next_attempt_at, NEW.last_error, NEW.created_at,
            NEW.updated_at);
END;

-- Sync columns go to outbox_sync; the record is rewritten only if one of its own columns
-- changed. An outbox_id never changes.
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
    UPDATE outbox_sync
    SET state = NEW.state, processed_at = NEW.processed_at, attempts = NEW.attempts,
        next_attempt_at = NEW.next_attempt_at, last_error = NEW.last_error,
        created_at = NEW.created_at, updated_at = NEW.updated_at
    WHERE outbox_id = OLD.outbox_id
      AND (NEW.state IS NOT OLD.state
           OR NEW.processed_at IS NOT OLD.processed_at
           OR NEW.attempts IS NOT OLD.attempts
           OR NEW.next_attempt_at IS NOT OLD.next_attempt_at
           OR NEW.last_error IS NOT OLD.last_error
           OR NEW.created_at IS NOT OLD.created_at
           OR NEW.updated_at IS NOT OLD.updated_at);
END;

-- Explicit deletes, so that they also hold on a connection with foreign keys off.
CREATE TRIGGER outbox_delete INSTEAD OF DELETE ON outbox
BEGIN
    DELETE FROM outbox_errors WHERE outbox_id = OLD.outbox_id;
    DELETE FROM outbox_sync WHERE outbox_id = OLD.outbox_id;
    DELETE FROM outbox_records WHERE outbox_id = OLD.outbox_id;
END;
