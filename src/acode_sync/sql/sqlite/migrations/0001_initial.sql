-- The workspace store: run-state tables and the outbox.
-- Timestamps are ISO-8601 UTC text with microseconds: '2026-01-15T10:30:00.123456Z'.
-- JSON columns hold JSON text. Columns the acceptance criteria do not name are optional.

CREATE TABLE workspace_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT;

CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'CREATED' CHECK (state IN (
        'CREATED', 'PLANNING', 'AWAITING_APPROVAL', 'EXECUTING',
        'PAUSED', 'COMPLETED', 'FAILED', 'CANCELLED')),
    title TEXT,
    metadata TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT;
CREATE INDEX sessions_by_updated ON sessions (updated_at, session_id);
CREATE INDEX sessions_by_state_updated ON sessions (state, updated_at, session_id);

CREATE TABLE session_events (
    event_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (session_id),
    event_type TEXT NOT NULL,
    payload TEXT CHECK (payload IS NULL OR json_valid(payload)),
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT;
CREATE INDEX session_events_by_session ON session_events (session_id, event_id);

CREATE TABLE session_tasks (
    task_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (session_id),
    status TEXT NOT NULL,
    title TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT;
CREATE INDEX session_tasks_by_session ON session_tasks (session_id, task_id);

CREATE TABLE steps (
    step_id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL REFERENCES session_tasks (task_id),
    session_id TEXT REFERENCES sessions (session_id),
    status TEXT NOT NULL,
    description TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT;
CREATE INDEX steps_by_task ON steps (task_id, step_id);
CREATE INDEX steps_by_session ON steps (session_id);

CREATE TABLE tool_calls (
    tool_call_id TEXT PRIMARY KEY,
    step_id TEXT NOT NULL REFERENCES steps (step_id),
    session_id TEXT REFERENCES sessions (session_id),
    name TEXT NOT NULL,
    arguments TEXT CHECK (arguments IS NULL OR json_valid(arguments)),
    result TEXT CHECK (result IS NULL OR json_valid(result)),
    status TEXT NOT NULL DEFAULT 'pending',
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT;
CREATE INDEX tool_calls_by_step ON tool_calls (step_id, tool_call_id);
CREATE INDEX tool_calls_by_session ON tool_calls (session_id);

CREATE TABLE artifacts (
    artifact_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (session_id),
    type TEXT NOT NULL,
    content TEXT NOT NULL,
    name TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT;
CREATE INDEX artifacts_by_session ON artifacts (session_id, artifact_id);

-- One row per change, written in the same transaction as the entity row.
-- outbox_id order is commit order ("oldest first"); AUTOINCREMENT never reuses an id.
CREATE TABLE outbox (
    outbox_id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL UNIQUE,
    entity_type TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    session_id TEXT,
    payload TEXT NOT NULL,
    base_updated_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'processed', 'dead')),
    processed_at TEXT,
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at TEXT,
    last_error TEXT
) STRICT;
CREATE INDEX outbox_pending ON outbox (outbox_id) WHERE state = 'pending';
CREATE INDEX outbox_by_entity ON outbox (entity_type, entity_id, outbox_id);
CREATE INDEX outbox_dead ON outbox (outbox_id) WHERE state = 'dead';
-- Records waiting out a backoff: a later record of the same entity must wait too.
CREATE INDEX outbox_waiting ON outbox (entity_type, entity_id, outbox_id)
    WHERE state = 'pending' AND next_attempt_at IS NOT NULL;
CREATE INDEX outbox_processed ON outbox (processed_at) WHERE state = 'processed';

-- Every failed delivery attempt, kept when a dead record is replayed.
CREATE TABLE outbox_errors (
    error_id INTEGER PRIMARY KEY,
    outbox_id INTEGER NOT NULL REFERENCES outbox (outbox_id) ON DELETE CASCADE,
    attempt INTEGER NOT NULL,
    error TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT;
CREATE INDEX outbox_errors_by_record ON outbox_errors (outbox_id, attempt);
