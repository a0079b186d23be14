-- Every SQL statement the workspace store runs, loaded by name (see acode_sync/sql.py).
-- Parameters are always bound; nothing here is ever formatted with input.

-- name: get_meta
SELECT value FROM workspace_meta WHERE key = ?;

-- name: put_meta
INSERT INTO workspace_meta (key, value, created_at, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at;

-- name: version_sessions
SELECT created_at, updated_at, state, extra FROM sessions WHERE session_id = ?;

-- name: version_session_events
SELECT created_at, updated_at, NULL, extra FROM session_events WHERE event_id = ?;

-- name: version_session_tasks
SELECT created_at, updated_at, NULL, extra FROM session_tasks WHERE task_id = ?;

-- name: version_steps
SELECT created_at, updated_at, NULL, extra FROM steps WHERE step_id = ?;

-- name: version_tool_calls
SELECT created_at, updated_at, NULL, extra FROM tool_calls WHERE tool_call_id = ?;

-- name: version_artifacts
SELECT created_at, updated_at, NULL, extra FROM artifacts WHERE artifact_id = ?;

-- name: save_sessions
INSERT INTO sessions (session_id, state, title, metadata, created_at, updated_at)
VALUES (:session_id, :state, :title, :metadata, :created_at, :updated_at)
ON CONFLICT (session_id) DO UPDATE SET
    state = excluded.state, title = excluded.title, metadata = excluded.metadata,
    updated_at = excluded.updated_at;

-- name: save_session_events
INSERT INTO session_events (event_id, session_id, event_type, payload, created_at, updated_at)
VALUES (:event_id, :session_id, :event_type, :payload, :created_at, :updated_at)
ON CONFLICT (event_id) DO UPDATE SET
    session_id = excluded.session_id, event_type = excluded.event_type,
    payload = excluded.payload, updated_at = excluded.updated_at;

-- name: save_session_tasks
INSERT INTO session_tasks (task_id, session_id, status, title, created_at, updated_at)
VALUES (:task_id, :session_id, :status, :title, :created_at, :updated_at)
ON CONFLICT (task_id) DO UPDATE SET
    session_id = excluded.session_id, status = excluded.status, title = excluded.title,
    updated_at = excluded.updated_at;

-- name: save_steps
INSERT INTO steps (step_id, task_id, session_id, status, description, created_at, updated_at)
VALUES (:step_id, :task_id, :session_id, :status, :description, :created_at, :updated_at)
ON CONFLICT (step_id) DO UPDATE SET
    task_id = excluded.task_id, session_id = excluded.session_id, status = excluded.status,
    description = excluded.description, updated_at = excluded.updated_at;

-- name: save_tool_calls
INSERT INTO tool_calls (tool_call_id, step_id, session_id, name, arguments, result, status,
                        created_at, updated_at)
VALUES (:tool_call_id, :step_id, :session_id, :name, :arguments, :result, :status,
        :created_at, :updated_at)
ON CONFLICT (tool_call_id) DO UPDATE SET
    step_id = excluded.step_id, session_id = excluded.session_id, name = excluded.name,
    arguments = excluded.arguments, result = excluded.result, status = excluded.status,
    updated_at = excluded.updated_at;

-- name: save_artifacts
INSERT INTO artifacts (artifact_id, session_id, type, content, name, created_at, updated_at)
VALUES (:artifact_id, :session_id, :type, :content, :name, :created_at, :updated_at)
ON CONFLICT (artifact_id) DO UPDATE SET
    session_id = excluded.session_id, type = excluded.type, content = excluded.content,
    name = excluded.name, updated_at = excluded.updated_at;

-- name: get_sessions
SELECT session_id, state, title, metadata, created_at, updated_at
FROM sessions WHERE session_id = ?;

-- name: get_session_events
SELECT event_id, session_id, event_type, payload, created_at, updated_at
FROM session_events WHERE event_id = ?;

-- name: get_session_tasks
SELECT task_id, session_id, status, title, created_at, updated_at
FROM session_tasks WHERE task_id = ?;

-- name: get_steps
SELECT step_id, task_id, session_id, status, description, created_at, updated_at
FROM steps WHERE step_id = ?;

-- name: get_tool_calls
SELECT tool_call_id, step_id, session_id, name, arguments, result, status, created_at, updated_at
FROM tool_calls WHERE tool_call_id = ?;

-- name: get_artifacts
SELECT artifact_id, session_id, type, content, name, created_at, updated_at
FROM artifacts WHERE artifact_id = ?;

-- name: list_events
SELECT event_id, session_id, event_type, payload, created_at, updated_at
FROM session_events WHERE session_id = :session_id AND event_id > :after
ORDER BY event_id LIMIT :limit;

-- Keyset pagination, newest first: the cursor is the last row's (updated_at, session_id).
-- name: list_sessions
SELECT session_id, state, title, metadata, created_at, updated_at
FROM sessions
WHERE (updated_at, session_id) < (:before_updated_at, :before_session_id)
  AND updated_at >= :updated_since
ORDER BY updated_at DESC, session_id DESC
LIMIT :limit;

-- name: list_sessions_in_state
SELECT session_id, state, title, metadata, created_at, updated_at
FROM sessions
WHERE state = :state
  AND (updated_at, session_id) < (:before_updated_at, :before_session_id)
  AND updated_at >= :updated_since
ORDER BY updated_at DESC, session_id DESC
LIMIT :limit;

-- A plain insert through the outbox view writes only this record (docs/schema.md); the
-- store's also carries the payload's digests (payload_digests), which the view does not show.
-- name: insert_outbox
INSERT INTO outbox_records (idempotency_key, entity_type, entity_id, session_id, payload,
                            base_updated_at, created_at, payload_digests)
VALUES (?, ?, ?, ?, ?, ?, ?, ?);

-- name: table_counts
SELECT 'sessions', count(*) FROM sessions
UNION ALL SELECT 'session_events', count(*) FROM session_events
UNION ALL SELECT 'session_tasks', count(*) FROM session_tasks
UNION ALL SELECT 'steps', count(*) FROM steps
UNION ALL SELECT 'tool_calls', count(*) FROM tool_calls
UNION ALL SELECT 'artifacts', count(*) FROM artifacts
UNION ALL SELECT 'outbox', count(*) FROM outbox_records;

-- The syncer reads and writes the sync state in outbox_sync (the records with a state of
-- their own) and outbox_progress (the mark), never rewriting outbox_records; the `outbox`
-- view is for writers and people. A record with no sync row is pending past the mark
-- (the largest through_id) and processed below it.

-- Each count reads an index: the records past the mark through outbox_records_by_id.
-- name: outbox_counts
SELECT
    (SELECT count(*) FROM outbox_sync WHERE state = 'pending')
        + (SELECT count(*) FROM outbox_records WHERE outbox_id > (SELECT coalesce(max(through_id), 0) FROM outbox_progress))
        - (SELECT count(*) FROM outbox_sync WHERE outbox_id > (SELECT coalesce(max(through_id), 0) FROM outbox_progress)),
    (SELECT count(*) FROM outbox_sync WHERE state = 'dead'),
    (SELECT count(*) FROM outbox_sync WHERE state = 'processed')
        + (SELECT count(*) FROM outbox_records WHERE outbox_id <= (SELECT coalesce(max(through_id), 0) FROM outbox_progress))
        - (SELECT count(*) FROM outbox_sync WHERE outbox_id <= (SELECT coalesce(max(through_id), 0) FROM outbox_progress));

-- name: oldest_pending
SELECT created_at FROM (
    SELECT * FROM (SELECT outbox_id, created_at FROM outbox_sync
                   WHERE state = 'pending' ORDER BY outbox_id LIMIT 1)
    UNION ALL
    SELECT * FROM (SELECT r.outbox_id, r.created_at FROM outbox_records AS r
                   WHERE r.outbox_id > (SELECT coalesce(max(through_id), 0) FROM outbox_progress)
                     AND NOT EXISTS (SELECT 1 FROM outbox_sync AS s
                                     WHERE s.outbox_id = r.outbox_id)
                   ORDER BY r.outbox_id LIMIT 1))
ORDER BY outbox_id LIMIT 1;

-- Oldest first (AC-038), after the last record the drain has already claimed. A claim
-- reads two sides in one read transaction, each in outbox_id order up to :limit, and
-- merges them: the records with a pending sync row (claim_tracked) and the records past
-- the mark (claim_past_mark). A record waits while an earlier record of the same entity
-- is waiting out a backoff (X-004); records of other entities go on. With :with_blocked,
-- such records past the mark are returned too, flagged `blocked`, so that the mark can
-- pass them (they get a pending sync row); without it they are left out. The waiting
-- entities are few: gathered once, with the smallest waiting id of each.
-- <waiting_entities> in both claim queries is this block (outbox.CLAIM_STATEMENTS).
-- name: waiting_entities
waiting (entity_type, entity_id, first_id) AS MATERIALIZED (
    SELECT r.entity_type, r.entity_id, min(w.outbox_id)
    FROM outbox_sync AS w JOIN outbox_records AS r ON r.outbox_id = w.outbox_id
    WHERE w.state = 'pending' AND w.next_attempt_at IS NOT NULL AND w.next_attempt_at > :now
    GROUP BY r.entity_type, r.entity_id)

-- Both claim queries read only the columns stored before the payload (outbox_records'
-- column order), so no payload page is read; claim_payloads then reads the payloads.
-- name: claim_tracked
WITH <waiting_entities>
SELECT r.outbox_id, r.idempotency_key, r.entity_type, r.entity_id, r.session_id,
       s.attempts, 1, 0
FROM outbox_sync AS s JOIN outbox_records AS r ON r.outbox_id = s.outbox_id
WHERE s.state = 'pending'
  AND s.outbox_id > :after
  AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= :now)
  AND NOT EXISTS (
      SELECT 1 FROM waiting AS w
      WHERE w.entity_type = r.entity_type AND w.entity_id = r.entity_id
        AND w.first_id < r.outbox_id)
ORDER BY s.outbox_id
LIMIT :limit;

-- name: claim_past_mark
WITH <waiting_entities>
SELECT r.outbox_id, r.idempotency_key, r.entity_type, r.entity_id, r.session_id, 0, 0,
       EXISTS (SELECT 1 FROM waiting AS w
               WHERE w.entity_type = r.entity_type AND w.entity_id = r.entity_id
                 AND w.first_id < r.outbox_id) AS blocked
FROM outbox_records AS r
WHERE r.outbox_id > max(:after, (SELECT coalesce(max(through_id), 0) FROM outbox_progress))
  AND NOT EXISTS (SELECT 1 FROM outbox_sync AS s WHERE s.outbox_id = r.outbox_id)
  AND (:with_blocked OR NOT blocked)
ORDER BY r.outbox_id
LIMIT :limit;

-- The claimed records' payloads (and the columns stored after them), in outbox_id order;
-- Outbox._with_payloads reads the rows one at a time and stops at :max_bytes. The payload
-- comes as bytes: the syncer ships it as it is (no decoding, no copy).
-- name: claim_payloads
SELECT outbox_id, CAST(payload AS BLOB), base_updated_at, created_at, payload_digests
FROM outbox_records
WHERE outbox_id IN (SELECT value FROM json_each(:ids))
ORDER BY outbox_id;

-- Records with a sync row, shipped.
-- name: mark_processed
-- Only the record as claimed: a record re-inserted under its id or edited since the claim
-- (another key or payload) stays pending. The payload is compared only for records with
-- a sync row, which are few. Both compare as the bytes stored (a key a writer stored as
-- text that is not UTF-8 comes back from a tolerant claim with its bytes escaped).
UPDATE outbox_sync
SET state = 'processed', processed_at = :now, next_attempt_at = NULL, updated_at = :now
WHERE outbox_id = :outbox_id AND state = 'pending'
  AND EXISTS (SELECT 1 FROM outbox_records AS r
              WHERE r.outbox_id = :outbox_id AND CAST(r.idempotency_key AS BLOB) = :key
                AND CAST(r.payload AS BLOB) = :payload);

-- Records that stay pending while the mark passes them (held back, or about to fail):
-- each gets a sync row of its own, if it has none.
-- name: track_pending
INSERT INTO outbox_sync (outbox_id, state, attempts, created_at, updated_at)
SELECT r.outbox_id, 'pending', 0, r.created_at, :now
FROM outbox_records AS r
WHERE r.outbox_id IN (SELECT value FROM json_each(:ids))
ON CONFLICT (outbox_id) DO NOTHING;

-- A batch shipped: the records past the mark up to :through, with no sync row, are
-- processed now. The mark only moves forward.
-- name: advance_mark
INSERT INTO outbox_progress (through_id, processed_at, created_at)
SELECT :through, :now, :now
WHERE :through > (SELECT coalesce(max(through_id), 0) FROM outbox_progress);

-- A failing record's attempts so far, if it is still the record as claimed.
-- name: record_attempts
SELECT s.attempts FROM outbox_sync AS s JOIN outbox_records AS r USING (outbox_id)
WHERE s.outbox_id = :outbox_id AND CAST(r.idempotency_key AS BLOB) = :key
  AND CAST(r.payload AS BLOB) = :payload;

-- name: mark_failed
UPDATE outbox_sync
SET attempts = attempts + 1,
    last_error = :error,
    state = CASE WHEN attempts + 1 >= :max_attempts THEN 'dead' ELSE 'pending' END,
    next_attempt_at = CASE WHEN attempts + 1 >= :max_attempts THEN NULL ELSE :next_attempt_at END,
    updated_at = :now
WHERE outbox_id = :outbox_id AND state = 'pending'
RETURNING attempts, state;

-- name: record_error
INSERT INTO outbox_errors (outbox_id, attempt, error, created_at) VALUES (?, ?, ?, ?);

-- name: replay
UPDATE outbox_sync SET state = 'pending', attempts = 0, next_attempt_at = NULL, updated_at = :now
WHERE state = 'dead' AND outbox_id IN (SELECT value FROM json_each(:ids));

-- name: replay_all
UPDATE outbox_sync SET state = 'pending', attempts = 0, next_attempt_at = NULL, updated_at = :now
WHERE state = 'dead';

-- Walks of the partial indexes and of the records past the mark, merged in outbox_id
-- order: processed rows are not read.
-- name: list_outbox
SELECT s.outbox_id, r.idempotency_key, r.entity_type, r.entity_id, r.session_id, s.state,
       s.attempts, s.created_at, s.processed_at, s.next_attempt_at, s.last_error
FROM outbox_sync AS s JOIN outbox_records AS r ON r.outbox_id = s.outbox_id
WHERE s.state = 'pending' AND 'pending' IN (SELECT value FROM json_each(:states))
UNION ALL
SELECT r.outbox_id, r.idempotency_key, r.entity_type, r.entity_id, r.session_id, 'pending',
       0, r.created_at, NULL, NULL, NULL
FROM outbox_records AS r
WHERE r.outbox_id > (SELECT coalesce(max(through_id), 0) FROM outbox_progress)
  AND NOT EXISTS (SELECT 1 FROM outbox_sync AS s WHERE s.outbox_id = r.outbox_id)
  AND 'pending' IN (SELECT value FROM json_each(:states))
UNION ALL
SELECT s.outbox_id, r.idempotency_key, r.entity_type, r.entity_id, r.session_id, s.state,
       s.attempts, s.created_at, s.processed_at, s.next_attempt_at, s.last_error
FROM outbox_sync AS s JOIN outbox_records AS r ON r.outbox_id = s.outbox_id
WHERE s.state = 'dead' AND 'dead' IN (SELECT value FROM json_each(:states))
ORDER BY 1
LIMIT :limit;

-- The oldest pending record's created_at is taken in outbox_id order past the mark
-- (reading created_at of every record there would read their pages).
-- name: backlog
WITH past_mark (outbox_id, created_at) AS (
    SELECT r.outbox_id, r.created_at FROM outbox_records AS r
    WHERE r.outbox_id > (SELECT coalesce(max(through_id), 0) FROM outbox_progress)
      AND NOT EXISTS (SELECT 1 FROM outbox_sync AS s WHERE s.outbox_id = r.outbox_id)
    ORDER BY r.outbox_id LIMIT 1)
SELECT (SELECT count(*) FROM outbox_sync WHERE state = 'pending')
           + (SELECT count(*) FROM outbox_records WHERE outbox_id > (SELECT coalesce(max(through_id), 0) FROM outbox_progress))
           - (SELECT count(*) FROM outbox_sync WHERE outbox_id > (SELECT coalesce(max(through_id), 0) FROM outbox_progress)),
       (SELECT min(created_at) FROM (
            SELECT min(created_at) AS created_at FROM outbox_sync WHERE state = 'pending'
            UNION ALL SELECT created_at FROM past_mark)),
       (SELECT min(next_attempt_at) FROM outbox_sync WHERE state = 'pending');

-- Deleting a record deletes its sync row and its errors (ON DELETE CASCADE: the syncer's
-- connection has foreign keys on). Records with a sync row go by their processed_at:
-- name: prune_processed
DELETE FROM outbox_records WHERE outbox_id IN (
    SELECT outbox_id FROM outbox_sync
    WHERE state = 'processed' AND processed_at < :before
    ORDER BY processed_at
    LIMIT :limit);

-- ... records without one by their progress row's processed_at, oldest first:
-- name: prune_passed
DELETE FROM outbox_records WHERE outbox_id IN (
    SELECT r.outbox_id FROM outbox_records AS r
    WHERE r.outbox_id <= (SELECT max(through_id) FROM outbox_progress
                          WHERE processed_at < :before)
      AND NOT EXISTS (SELECT 1 FROM outbox_sync AS s WHERE s.outbox_id = r.outbox_id)
    ORDER BY r.outbox_id
    LIMIT :limit);

-- ... and the progress rows that no record needs any more (never the mark itself): those
-- below the oldest record without a sync row (found by reading ids in order, from the
-- narrow index, up to the first such record).
-- name: prune_progress
DELETE FROM outbox_progress
WHERE through_id < (SELECT max(through_id) FROM outbox_progress)
  AND through_id < coalesce(
      (SELECT r.outbox_id FROM outbox_records AS r INDEXED BY outbox_records_by_id
       WHERE NOT EXISTS (SELECT 1 FROM outbox_sync AS s WHERE s.outbox_id = r.outbox_id)
       ORDER BY r.outbox_id LIMIT 1),
      (SELECT max(through_id) FROM outbox_progress));

-- `acode db verify` and `acode db flush` (acode_sync/verify.py, acode_sync/flush.py).
-- A page of one table's entities in id order, each with its current version's outbox
-- record if it is still kept (its sync state and the payload as shipped). The <...>
-- markers are filled once, at import, from the constant entity classes (verify.py).
-- name: verify_entities
SELECT <columns>, t.extra, r.outbox_id, s.state, CAST(r.payload AS BLOB)
FROM <table> AS t
LEFT JOIN outbox_records AS r
    ON r.idempotency_key = '<entity_type>:' || t.<id_column> || ':' || t.updated_at
LEFT JOIN outbox_sync AS s ON s.outbox_id = r.outbox_id
WHERE t.<id_column> > :after
ORDER BY t.<id_column>
LIMIT :limit;

-- name: verify_entity
SELECT <columns>, t.extra, r.outbox_id, s.state, CAST(r.payload AS BLOB)
FROM <table> AS t
LEFT JOIN outbox_records AS r
    ON r.idempotency_key = '<entity_type>:' || t.<id_column> || ':' || t.updated_at
LEFT JOIN outbox_sync AS s ON s.outbox_id = r.outbox_id
WHERE t.<id_column> = :entity_id;

-- name: progress_mark
SELECT coalesce(max(through_id), 0) FROM outbox_progress;

-- name: record_by_key
SELECT outbox_id FROM outbox_records WHERE idempotency_key = ?;

-- A record back to pending through the view's trigger (attempts start over), based on
-- the version PostgreSQL holds (verify --repair).
-- name: requeue_record
UPDATE outbox SET state = 'pending', base_updated_at = ? WHERE outbox_id = ?;

-- name: last_outbox_id
SELECT coalesce(max(outbox_id), 0) FROM outbox_records;

-- The records up to :through still pending, and those dead.
-- name: flush_progress
SELECT
    (SELECT count(*) FROM outbox_sync WHERE state = 'pending' AND outbox_id <= :through)
        + (SELECT count(*) FROM outbox_records
           WHERE outbox_id > (SELECT coalesce(max(through_id), 0) FROM outbox_progress)
             AND outbox_id <= :through)
        - (SELECT count(*) FROM outbox_sync
           WHERE outbox_id > (SELECT coalesce(max(through_id), 0) FROM outbox_progress)
             AND outbox_id <= :through),
    (SELECT count(*) FROM outbox_sync WHERE state = 'dead' AND outbox_id <= :through);

-- A restore's statements (acode_sync/restore.py), templates filled at import from the
-- constant table specs; the ids of a chunk are bound as one JSON array.
-- name: restore_local_versions
SELECT <id_column>, updated_at FROM <t> WHERE <id_column> IN (SELECT value FROM json_each(?));

-- name: restore_present_ids
SELECT value FROM json_each(?) WHERE value IN (SELECT <id_column> FROM <t>);

-- name: restore_entity
INSERT INTO <t> (<columns>) VALUES (<placeholders>)
ON CONFLICT (<id_column>) DO UPDATE SET <updates>;

-- name: restore_read_back
SELECT <columns> FROM <t> WHERE <id_column> IN (SELECT value FROM json_each(?));
