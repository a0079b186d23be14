-- An entity's session is fixed at creation (docs/sync.md#an-entitys-session): the central
-- store keys every entity by (session_id, id), so a version naming another session could
-- only be refused there, after the change was committed here. It is refused here, at the
-- save, instead. A Step or ToolCall written without a session may be given one once.
CREATE TRIGGER session_events_session_fixed BEFORE UPDATE OF session_id ON session_events
WHEN NEW.session_id IS NOT OLD.session_id
BEGIN
    SELECT RAISE(ABORT, 'a SessionEvent''s session is fixed at creation');
END;
CREATE TRIGGER session_tasks_session_fixed BEFORE UPDATE OF session_id ON session_tasks
WHEN NEW.session_id IS NOT OLD.session_id
BEGIN
    SELECT RAISE(ABORT, 'a SessionTask''s session is fixed at creation');
END;
CREATE TRIGGER steps_session_fixed BEFORE UPDATE OF session_id ON steps
WHEN OLD.session_id IS NOT NULL AND NEW.session_id IS NOT OLD.session_id
BEGIN
    SELECT RAISE(ABORT, 'a Step''s session is fixed at creation');
END;
CREATE TRIGGER tool_calls_session_fixed BEFORE UPDATE OF session_id ON tool_calls
WHEN OLD.session_id IS NOT NULL AND NEW.session_id IS NOT OLD.session_id
BEGIN
    SELECT RAISE(ABORT, 'a ToolCall''s session is fixed at creation');
END;
CREATE TRIGGER artifacts_session_fixed BEFORE UPDATE OF session_id ON artifacts
WHEN NEW.session_id IS NOT OLD.session_id
BEGIN
    SELECT RAISE(ABORT, 'an Artifact''s session is fixed at creation');
END;

-- Every outbox record carries its entity's session (the central distribution column): a
-- record written without one takes its payload's session_id, else, for a Step or a
-- ToolCall, its task's or step's session as this workspace holds it at enqueue time.
CREATE TRIGGER outbox_records_session AFTER INSERT ON outbox_records
WHEN NEW.session_id IS NULL
BEGIN
    UPDATE outbox_records
    SET session_id = coalesce(
        CASE WHEN json_valid(NEW.payload) THEN json_extract(NEW.payload, '$.session_id') END,
        CASE NEW.entity_type
            WHEN 'Session' THEN NEW.entity_id
            WHEN 'Step' THEN (
                SELECT t.session_id FROM session_tasks AS t
                WHERE t.task_id = CASE WHEN json_valid(NEW.payload)
                                       THEN json_extract(NEW.payload, '$.task_id') END)
            WHEN 'ToolCall' THEN (
                SELECT coalesce(s.session_id, t.session_id)
                FROM steps AS s LEFT JOIN session_tasks AS t ON t.task_id = s.task_id
                WHERE s.step_id = CASE WHEN json_valid(NEW.payload)
                                       THEN json_extract(NEW.payload, '$.step_id') END)
        END)
    WHERE outbox_id = NEW.outbox_id;
END;

-- The records already queued without a session are given theirs the same way.
UPDATE outbox_records
SET session_id = coalesce(
    CASE WHEN json_valid(payload) THEN json_extract(payload, '$.session_id') END,
    CASE entity_type
        WHEN 'Session' THEN entity_id
        WHEN 'Step' THEN (
            SELECT t.session_id FROM session_tasks AS t
            WHERE t.task_id = CASE WHEN json_valid(outbox_records.payload)
                                   THEN json_extract(outbox_records.payload, '$.task_id') END)
        WHEN 'ToolCall' THEN (
            SELECT coalesce(s.session_id, t.session_id)
            FROM steps AS s LEFT JOIN session_tasks AS t ON t.task_id = s.task_id
            WHERE s.step_id = CASE WHEN json_valid(outbox_records.payload)
                                   THEN json_extract(outbox_records.payload, '$.step_id') END)
    END)
WHERE session_id IS NULL;
