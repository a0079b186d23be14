-- The central store: mirrors of the workspace tables, applied keys, conflicts.
-- Entity tables carry sync metadata (origin_id, idempotency_key of the version held,
-- synced_at) and `extra`: payload keys this program does not know, kept as sent.
-- No cross-entity foreign keys: a child may arrive before its parent.

CREATE TABLE sessions (
    session_id text PRIMARY KEY,
    state text NOT NULL CHECK (state IN (
        'CREATED', 'PLANNING', 'AWAITING_APPROVAL', 'EXECUTING',
        'PAUSED', 'COMPLETED', 'FAILED', 'CANCELLED')),
    title text,
    metadata jsonb,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    extra jsonb NOT NULL DEFAULT '{}',
    origin_id text NOT NULL,
    idempotency_key text NOT NULL,
    synced_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sessions_created_at ON sessions (created_at);
CREATE INDEX sessions_state_updated ON sessions (state, updated_at);

CREATE TABLE session_events (
    event_id text PRIMARY KEY,
    session_id text NOT NULL,
    event_type text NOT NULL,
    payload jsonb,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    extra jsonb NOT NULL DEFAULT '{}',
    origin_id text NOT NULL,
    idempotency_key text NOT NULL,
    synced_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX session_events_session ON session_events (session_id, event_id);
CREATE INDEX session_events_created_at ON session_events (created_at);

CREATE TABLE session_tasks (
    task_id text PRIMARY KEY,
    session_id text NOT NULL,
    status text NOT NULL,
    title text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    extra jsonb NOT NULL DEFAULT '{}',
    origin_id text NOT NULL,
    idempotency_key text NOT NULL,
    synced_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX session_tasks_session ON session_tasks (session_id);
CREATE INDEX session_tasks_created_at ON session_tasks (created_at);

CREATE TABLE steps (
    step_id text PRIMARY KEY,
    task_id text NOT NULL,
    session_id text,
    status text NOT NULL,
    description text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    extra jsonb NOT NULL DEFAULT '{}',
    origin_id text NOT NULL,
    idempotency_key text NOT NULL,
    synced_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX steps_task ON steps (task_id);
CREATE INDEX steps_session ON steps (session_id);
CREATE INDEX steps_created_at ON steps (created_at);

CREATE TABLE tool_calls (
    tool_call_id text PRIMARY KEY,
    step_id text NOT NULL,
    session_id text,
    name text NOT NULL,
    arguments jsonb,
    result jsonb,
    status text NOT NULL DEFAULT 'pending',
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    extra jsonb NOT NULL DEFAULT '{}',
    origin_id text NOT NULL,
    idempotency_key text NOT NULL,
    synced_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tool_calls_step ON tool_calls (step_id);
CREATE INDEX tool_calls_session ON tool_calls (session_id);
CREATE INDEX tool_calls_created_at ON tool_calls (created_at);

CREATE TABLE artifacts (
    artifact_id text PRIMARY KEY,
    session_id text NOT NULL,
    type text NOT NULL,
    content text NOT NULL,
    name text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    extra jsonb NOT NULL DEFAULT '{}',
    origin_id text NOT NULL,
    idempotency_key text NOT NULL,
    synced_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX artifacts_session ON artifacts (session_id);
CREATE INDEX artifacts_created_at ON artifacts (created_at);

-- Every delivered change, by key (AC-045). The digest tells a resend (same payload:
-- a duplicate) from a different change that happens to carry the same key.
CREATE TABLE applied_keys (
    idempotency_key text NOT NULL UNIQUE,
    payload_digest bytea NOT NULL,
    entity_type text NOT NULL,
    entity_id text NOT NULL,
    origin_id text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
-- Keys arrive in time order: a BRIN index serves pruning by age at almost no cost per key.
CREATE INDEX applied_keys_applied_at ON applied_keys USING brin (applied_at);

-- Both versions of every conflict, for audit (AC-052). A change whose key collided with
-- another change's key is recorded here too, which also makes its resend a duplicate.
CREATE TABLE conflicts (
    conflict_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity_type text NOT NULL,
    entity_id text NOT NULL,
    session_id text,
    incoming_key text NOT NULL,
    incoming_digest bytea NOT NULL,
    incoming_origin text NOT NULL,
    incoming_updated_at timestamptz NOT NULL,
    incoming_base_updated_at timestamptz,
    incoming_version jsonb NOT NULL,
    current_key text NOT NULL,
    current_origin text NOT NULL,
    current_updated_at timestamptz NOT NULL,
    current_version jsonb NOT NULL,
    winner text NOT NULL CHECK (winner IN ('incoming', 'current')),
    detected_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (incoming_key, incoming_digest)
);
CREATE INDEX conflicts_session ON conflicts (session_id, conflict_id);
CREATE INDEX conflicts_entity ON conflicts (entity_type, entity_id);
CREATE INDEX conflicts_detected_at ON conflicts (detected_at);
