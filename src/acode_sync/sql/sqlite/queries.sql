-- Every SQL statement the workspace store runs, loaded by name (see acode_sync/sql.py).
-- Parameters are always bound; nothing here is ever formatted with input.

-- name: get_meta
SELECT value FROM workspace_meta WHERE key = ?;

-- name: put_meta
INSERT INTO workspace_meta (key, value, created_at, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at;

-- name: version_sessions
SELECT created_at, updated_at, state FROM sessions WHERE session_id = ?;

-- name: version_session_events
SELECT created_at, updated_at, NULL FROM session_events WHERE event_id = ?;

-- name: version_session_tasks
SELECT created_at, updated_at, NULL FROM session_tasks WHERE task_id = ?;

-- name: version_steps
SELECT created_at, updated_at, NULL FROM steps WHERE step_id = ?;

-- name: version_tool_calls
SELECT created_at, updated_at, NULL FROM tool_calls WHERE tool_call_id = ?;

-- name: version_artifacts
SELECT created_at, updated_at, NULL FROM artifacts WHERE artifact_id = ?;

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

-- name: insert_outbox
INSERT INTO outbox (idempotency_key, entity_type, entity_id, session_id, payload,
                    base_updated_at, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?);

-- name: table_counts
SELECT 'sessions', count(*) FROM sessions
UNION ALL SELECT 'session_events', count(*) FROM session_events
UNION ALL SELECT 'session_tasks', count(*) FROM session_tasks
UNION ALL SELECT 'steps', count(*) FROM steps
UNION ALL SELECT 'tool_calls', count(*) FROM tool_calls
UNION ALL SELECT 'artifacts', count(*) FROM artifacts
UNION ALL SELECT 'outbox', count(*) FROM outbox_sync;

-- The syncer reads and writes the sync state in outbox_sync (narrow rows), never rewriting
-- outbox_records; the `outbox` view is for writers and people.

-- Each count reads its state's partial index.
-- name: outbox_counts
SELECT
    (SELECT count(*) FROM outbox_sync WHERE state = 'pending'),
    (SELECT count(*) FROM outbox_sync WHERE state = 'dead'),
    (SELECT count(*) FROM outbox_sync WHERE state = 'processed');

-- name: oldest_pending
SELECT created_at FROM outbox_sync WHERE state = 'pending' ORDER BY outbox_id LIMIT 1;

-- Oldest first (AC-038), after the last record the drain has already claimed. A record
-- waits while an earlier record of the same entity is waiting out a backoff (X-004);
-- records of other entities go on. The waiting records are few: their entities, with the
-- smallest waiting id of each, are gathered once, not probed for every pending row.
-- name: claim_pending
WITH waiting (entity_type, entity_id, first_id) AS MATERIALIZED (
    SELECT r.entity_type, r.entity_id, min(w.outbox_id)
    FROM outbox_sync AS w JOIN outbox_records AS r ON r.outbox_id = w.outbox_id
    WHERE w.state = 'pending' AND w.next_attempt_at IS NOT NULL AND w.next_attempt_at > :now
    GROUP BY r.entity_type, r.entity_id)
-- The payload comes as bytes: the syncer ships it as it is (no decoding, no copy).
SELECT r.outbox_id, r.idempotency_key, r.entity_type, r.entity_id, r.session_id,
       CAST(r.payload AS BLOB), r.base_updated_at, r.created_at, s.attempts
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

-- name: mark_processed
UPDATE outbox_sync
SET state = 'processed', processed_at = :now, next_attempt_at = NULL, updated_at = :now
WHERE outbox_id IN (SELECT value FROM json_each(:ids)) AND state = 'pending';

-- name: record_attempts
SELECT attempts FROM outbox_sync WHERE outbox_id = ?;

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

-- Two walks of the partial indexes, merged in outbox_id order: processed rows are not read.
-- name: list_outbox
SELECT s.outbox_id, r.idempotency_key, r.entity_type, r.entity_id, r.session_id, s.state,
       s.attempts, s.created_at, s.processed_at, s.next_attempt_at, s.last_error
FROM outbox_sync AS s JOIN outbox_records AS r ON r.outbox_id = s.outbox_id
WHERE s.state = 'pending' AND 'pending' IN (SELECT value FROM json_each(:states))
UNION ALL
SELECT s.outbox_id, r.idempotency_key, r.entity_type, r.entity_id, r.session_id, s.state,
       s.attempts, s.created_at, s.processed_at, s.next_attempt_at, s.last_error
FROM outbox_sync AS s JOIN outbox_records AS r ON r.outbox_id = s.outbox_id
WHERE s.state = 'dead' AND 'dead' IN (SELECT value FROM json_each(:states))
ORDER BY 1
LIMIT :limit;

-- name: backlog
SELECT count(*), min(created_at), min(next_attempt_at) FROM outbox_sync WHERE state = 'pending';

-- Deleting a record deletes its sync row and its errors (ON DELETE CASCADE: the syncer's
-- connection has foreign keys on).
-- name: prune_processed
DELETE FROM outbox_records WHERE outbox_id IN (
    SELECT outbox_id FROM outbox_sync
    WHERE state = 'processed' AND processed_at < :before
    ORDER BY processed_at
    LIMIT :limit);
