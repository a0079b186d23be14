-- The outbox's columns always agree, and no record can be taken for processed unsent.
-- - outbox_records_backfill: an AFTER INSERT trigger sees sqlite_sequence as it was before
--   the statement (SQLite writes the counter when the statement ends). A record re-inserted
--   with the largest id ever given (after a delete) has NEW.outbox_id = seq, and
--   `NEW.outbox_id < seq` let it through without a sync row: below the mark it read as
--   processed and was never sent. Now any id at or below the largest id ever given, or at
--   or below the mark, gets its pending sync row. A plain insert (the next AUTOINCREMENT
--   id, above both) still writes none.
-- - outbox_sync gets a CHECK: state 'processed' if and only if processed_at is set.
--   Rows that broke it (written through the old view) keep their state: a processed row
--   without processed_at takes its updated_at (when the state last changed), any other
--   row loses its processed_at.
-- - a record edited through the view gets a sync row of its own (the mark passes only
--   records without one), so a batch that claimed it before the edit leaves it pending.
-- - the view's INSERT and UPDATE triggers mean what the columns say (docs/schema.md):
--   clearing processed_at or setting state 'pending' re-queues a record (attempts reset),
--   setting state 'processed' stamps processed_at, and a processed_at without state
--   'processed' is refused.
-- The view and its triggers are dropped first, so that no trigger names outbox_sync while
-- it is rebuilt; the view comes back unchanged.

DROP VIEW outbox;
DROP TRIGGER outbox_records_backfill;

CREATE TABLE outbox_sync_new (
    outbox_id INTEGER PRIMARY KEY REFERENCES outbox_records (outbox_id) ON DELETE CASCADE,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'processed', 'dead')),
    processed_at TEXT,
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at TEXT,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT,
    CHECK ((state = 'processed') = (processed_at IS NOT NULL))
) STRICT;

INSERT INTO outbox_sync_new (outbox_id, state, processed_at, attempts, next_attempt_at,
                             last_error, created_at, updated_at)
SELECT outbox_id, state,
       iif(state = 'processed',
           coalesce(processed_at, updated_at, strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
           NULL),
       attempts, next_attempt_at, last_error, created_at, updated_at
FROM outbox_sync ORDER BY outbox_id;

DROP TABLE outbox_sync;
ALTER TABLE outbox_sync_new RENAME TO outbox_sync;
CREATE INDEX outbox_pending ON outbox_sync (outbox_id) WHERE state = 'pending';
CREATE INDEX outbox_dead ON outbox_sync (outbox_id) WHERE state = 'dead';
CREATE INDEX outbox_waiting ON outbox_sync (next_attempt_at)
    WHERE state = 'pending' AND next_attempt_at IS NOT NULL;
CREATE INDEX outbox_processed ON outbox_sync (processed_at) WHERE state = 'processed';

-- Inside the statement that inserts the record, seq is the largest id given before it.
CREATE TRIGGER outbox_records_backfill AFTER INSERT ON outbox_records
WHEN NEW.outbox_id <= max(
    coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox_records'), 0),
    coalesce((SELECT max(through_id) FROM outbox_progress), 0))
BEGIN
    INSERT INTO outbox_sync (outbox_id, state, attempts, created_at)
    VALUES (NEW.outbox_id, 'pending', 0, NEW.created_at)
    ON CONFLICT (outbox_id) DO NOTHING;
END;

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
-- row is written only if a sync column is given; state 'processed' without processed_at
-- is processed now. A duplicate idempotency_key fails on outbox_records' UNIQUE constraint.
CREATE TRIGGER outbox_insert INSTEAD OF INSERT ON outbox
BEGIN
    SELECT RAISE(ABORT, 'outbox: processed_at is set only with state = ''processed''')
    WHERE NEW.processed_at IS NOT NULL AND coalesce(NEW.state, 'pending') <> 'processed';
    INSERT INTO outbox_records (outbox_id, idempotency_key, entity_type, entity_id,
                                session_id, payload, base_updated_at, created_at, updated_at)
    VALUES (NEW.outbox_id, NEW.idempotency_key, NEW.entity_type, NEW.entity_id,
            NEW.session_id, NEW.payload, NEW.base_updated_at, NEW.created_at, NEW.updated_at);
    INSERT INTO outbox_sync (outbox_id, state, processed_at, attempts, next_attempt_at,
                             last_error, created_at, updated_at)
    SELECT last_insert_rowid(), coalesce(NEW.state, 'pending'),
           iif(NEW.state = 'processed',
               coalesce(NEW.processed_at, strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
               NULL),
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
-- rewritten only if one of its own columns changed. An outbox_id never changes. A column
-- counts as set when its value changes. The new state:
-- - state set: that state; else processed_at cleared on a processed record: 'pending'.
-- - 'processed': processed_at as given, or now; any other state: processed_at NULL, and
--   a processed_at given with it is refused.
-- - a record becoming pending again (from processed or dead) starts over: attempts 0
--   unless given; next_attempt_at is kept only for a pending record.
-- - updated_at: as given, or now.
CREATE TRIGGER outbox_update INSTEAD OF UPDATE ON outbox
BEGIN
    SELECT RAISE(ABORT, 'outbox_id cannot change') WHERE NEW.outbox_id IS NOT OLD.outbox_id;
    SELECT RAISE(ABORT, 'outbox: processed_at is set only with state = ''processed''')
    WHERE NEW.processed_at IS NOT NULL AND NEW.processed_at IS NOT OLD.processed_at
      AND NEW.state IS NOT 'processed';
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
    SELECT OLD.outbox_id, v.state,
           iif(v.state = 'processed', coalesce(NEW.processed_at, v.now), NULL),
           iif(v.state = 'pending' AND OLD.state <> 'pending' AND NEW.attempts IS OLD.attempts,
               0, NEW.attempts),
           iif(v.state = 'pending', NEW.next_attempt_at, NULL),
           NEW.last_error, NEW.created_at,
           iif(NEW.updated_at IS OLD.updated_at, v.now, NEW.updated_at)
    FROM (SELECT iif(NEW.state IS OLD.state AND OLD.state = 'processed'
                     AND NEW.processed_at IS NULL, 'pending', NEW.state) AS state,
                 strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z' AS now) AS v
    WHERE NEW.state IS NOT OLD.state
       OR NEW.processed_at IS NOT OLD.processed_at
       OR NEW.attempts IS NOT OLD.attempts
       OR NEW.next_attempt_at IS NOT OLD.next_attempt_at
       OR NEW.last_error IS NOT OLD.last_error
       OR NEW.created_at IS NOT OLD.created_at
       OR NEW.updated_at IS NOT OLD.updated_at
       -- An edited record gets a sync row of its own: a batch in flight that claimed it
       -- before the edit cannot take it for shipped as the mark passes it.
       OR NEW.idempotency_key IS NOT OLD.idempotency_key
       OR NEW.payload IS NOT OLD.payload
       OR NEW.entity_type IS NOT OLD.entity_type
       OR NEW.entity_id IS NOT OLD.entity_id
       OR NEW.session_id IS NOT OLD.session_id
       OR NEW.base_updated_at IS NOT OLD.base_updated_at
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
