-- Each entity row keeps the digest of the payload it was written from: a resend of the
-- version held is recognised by the row itself (a duplicate), whether or not its applied
-- key is still kept, and the digest is what a restore or a verify compares against.
-- Rows written before this migration have none (NULL): they compare as unknown.
ALTER TABLE sessions ADD COLUMN payload_digest bytea;
ALTER TABLE session_events ADD COLUMN payload_digest bytea;
ALTER TABLE session_tasks ADD COLUMN payload_digest bytea;
ALTER TABLE steps ADD COLUMN payload_digest bytea;
ALTER TABLE tool_calls ADD COLUMN payload_digest bytea;
ALTER TABLE artifacts ADD COLUMN payload_digest bytea;

-- Ids are at most 200 characters (docs/schema.md), whichever field of the payload they
-- come from: a longer one fails its record (SQLSTATE 23514). NOT VALID: rows already held
-- are not rescanned.
ALTER TABLE sessions ADD CONSTRAINT sessions_ids_length
    CHECK (length(session_id) <= 200) NOT VALID;
ALTER TABLE session_events ADD CONSTRAINT session_events_ids_length
    CHECK (length(event_id) <= 200 AND length(session_id) <= 200) NOT VALID;
ALTER TABLE session_tasks ADD CONSTRAINT session_tasks_ids_length
    CHECK (length(task_id) <= 200 AND length(session_id) <= 200) NOT VALID;
ALTER TABLE steps ADD CONSTRAINT steps_ids_length
    CHECK (length(step_id) <= 200 AND length(task_id) <= 200 AND length(session_id) <= 200)
    NOT VALID;
ALTER TABLE tool_calls ADD CONSTRAINT tool_calls_ids_length
    CHECK (length(tool_call_id) <= 200 AND length(step_id) <= 200
           AND length(session_id) <= 200) NOT VALID;
ALTER TABLE artifacts ADD CONSTRAINT artifacts_ids_length
    CHECK (length(artifact_id) <= 200 AND length(session_id) <= 200) NOT VALID;

-- A payload time that is not canonical RFC 3339 UTC ('yesterday', 'epoch', no zone, hour
-- 24 ...), or an updated_at other than the key's version, fails its record with this
-- message (SQLSTATE 22007). Called only on that path.
CREATE FUNCTION refuse_timestamp(field text, value text, reason text) RETURNS timestamptz
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'invalid_datetime_format',
        MESSAGE = format('%s %s: %s', field, reason, left(value, 40));
END
$$;
