-- Citus-shaped keys: the distribution column, session_id, is in every primary and unique
-- key and NOT NULL (docs/postgres.md#past-one-server). On one server this costs nothing:
-- each table's index on (session_id, ...) becomes its primary key, and the index on the
-- entity id alone stays, as a unique constraint that keeps one row per entity (a record
-- that names another session than the row held fails; it never becomes a second row).
-- An entity's session is fixed at creation (docs/sync.md#an-entitys-session).

-- Rows a writer left without a session (a Step or ToolCall written by plain SQL) take
-- their parent's; a row whose parent PostgreSQL does not hold takes '' (no session
-- known), which a later version naming a session fails against, visibly.
UPDATE steps AS s
SET session_id = coalesce((SELECT t.session_id FROM session_tasks AS t
                           WHERE t.task_id = s.task_id), '')
WHERE s.session_id IS NULL;
UPDATE tool_calls AS c
SET session_id = coalesce((SELECT s.session_id FROM steps AS s
                           WHERE s.step_id = c.step_id), '')
WHERE c.session_id IS NULL;
UPDATE conflicts SET session_id = '' WHERE session_id IS NULL;
ALTER TABLE steps ALTER COLUMN session_id SET NOT NULL;
ALTER TABLE tool_calls ALTER COLUMN session_id SET NOT NULL;
ALTER TABLE conflicts ALTER COLUMN session_id SET NOT NULL;

ALTER TABLE session_events
    DROP CONSTRAINT session_events_pkey,
    ADD CONSTRAINT session_events_pkey PRIMARY KEY (session_id, event_id),
    ADD CONSTRAINT session_events_event_id_key UNIQUE (event_id);
DROP INDEX session_events_session;

ALTER TABLE session_tasks
    DROP CONSTRAINT session_tasks_pkey,
    ADD CONSTRAINT session_tasks_pkey PRIMARY KEY (session_id, task_id),
    ADD CONSTRAINT session_tasks_task_id_key UNIQUE (task_id);
DROP INDEX session_tasks_session;

ALTER TABLE steps
    DROP CONSTRAINT steps_pkey,
    ADD CONSTRAINT steps_pkey PRIMARY KEY (session_id, step_id),
    ADD CONSTRAINT steps_step_id_key UNIQUE (step_id);
DROP INDEX steps_session;

ALTER TABLE tool_calls
    DROP CONSTRAINT tool_calls_pkey,
    ADD CONSTRAINT tool_calls_pkey PRIMARY KEY (session_id, tool_call_id),
    ADD CONSTRAINT tool_calls_tool_call_id_key UNIQUE (tool_call_id);
DROP INDEX tool_calls_session;

ALTER TABLE artifacts
    DROP CONSTRAINT artifacts_pkey,
    ADD CONSTRAINT artifacts_pkey PRIMARY KEY (session_id, artifact_id),
    ADD CONSTRAINT artifacts_artifact_id_key UNIQUE (artifact_id);
DROP INDEX artifacts_session;

-- A record whose session is not the one of the entity PostgreSQL holds fails with this
-- message (SQLSTATE 23T02, a record's fault: retried, then a dead letter with the reason).
CREATE FUNCTION refuse_session_move(entity text, held text, incoming text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = '23T02',
        MESSAGE = format('%s belongs to session %s; a version naming session %s is refused '
                         '(an entity''s session is fixed at creation)',
                         entity, coalesce(nullif(held, ''), '(none known)'),
                         coalesce(incoming, '(none)'));
END
$$;
