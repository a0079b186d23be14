-- Tenants: every row is stamped by the server with the role that wrote it (never with
-- anything from a payload). Nothing is enforced until `acode db tenants enable` turns on
-- row-level security and the guard trigger below (docs/postgres.md#tenants): a
-- single-tenant deployment pays only the column. The default is evaluated once here for
-- the rows already held (they belong to the migrating role), so no table is rewritten.
ALTER TABLE sessions ADD COLUMN tenant text COLLATE "C" NOT NULL DEFAULT current_user;
ALTER TABLE session_events ADD COLUMN tenant text COLLATE "C" NOT NULL DEFAULT current_user;
ALTER TABLE session_tasks ADD COLUMN tenant text COLLATE "C" NOT NULL DEFAULT current_user;
ALTER TABLE steps ADD COLUMN tenant text COLLATE "C" NOT NULL DEFAULT current_user;
ALTER TABLE tool_calls ADD COLUMN tenant text COLLATE "C" NOT NULL DEFAULT current_user;
ALTER TABLE artifacts ADD COLUMN tenant text COLLATE "C" NOT NULL DEFAULT current_user;
ALTER TABLE applied_keys ADD COLUMN tenant text COLLATE "C" NOT NULL DEFAULT current_user;
ALTER TABLE conflicts ADD COLUMN tenant text COLLATE "C" NOT NULL DEFAULT current_user;

-- Whether the entity, or the session it names, is held by a tenant other than `mine`.
-- SECURITY DEFINER: row-level security hides other tenants' rows from the caller, and an
-- INSERT ... ON CONFLICT DO NOTHING against a hidden row would silently do nothing.
-- EXECUTE is granted to syncer roles only (`acode db grant`).
CREATE FUNCTION held_by_another_tenant(entity_table text, entity_id text, session_id text,
                                       mine text) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    holder text;
BEGIN
    CASE entity_table
        WHEN 'sessions' THEN
            SELECT t.tenant INTO holder FROM acode.sessions AS t WHERE t.session_id = entity_id;
        WHEN 'session_events' THEN
            SELECT t.tenant INTO holder FROM acode.session_events AS t WHERE t.event_id = entity_id;
        WHEN 'session_tasks' THEN
            SELECT t.tenant INTO holder FROM acode.session_tasks AS t WHERE t.task_id = entity_id;
        WHEN 'steps' THEN
            SELECT t.tenant INTO holder FROM acode.steps AS t WHERE t.step_id = entity_id;
        WHEN 'tool_calls' THEN
            SELECT t.tenant INTO holder FROM acode.tool_calls AS t WHERE t.tool_call_id = entity_id;
        WHEN 'artifacts' THEN
            SELECT t.tenant INTO holder FROM acode.artifacts AS t WHERE t.artifact_id = entity_id;
    END CASE;
    IF holder IS DISTINCT FROM mine AND holder IS NOT NULL THEN
        RETURN true;
    END IF;
    IF entity_table = 'sessions' OR session_id IS NULL THEN
        RETURN false;
    END IF;
    SELECT t.tenant INTO holder FROM acode.sessions AS t WHERE t.session_id = held_by_another_tenant.session_id;
    RETURN holder IS NOT NULL AND holder <> mine;
END
$$;
REVOKE ALL ON FUNCTION held_by_another_tenant(text, text, text, text) FROM PUBLIC;

-- BEFORE INSERT on each entity table once tenants are enabled (an upsert fires it too):
-- stamps the row with the writing role, and fails the record (SQLSTATE 23T01, a record's
-- fault: it is retried, then a dead letter) when the entity or its session belongs to
-- another tenant. (Each branch is compiled only for the table it names.)
CREATE FUNCTION guard_tenant() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    entity_id text;
    parent_table text;  -- a Step's task, a ToolCall's step: a child is its parent's tenant's
    parent_id text;
BEGIN
    CASE TG_TABLE_NAME
        WHEN 'sessions' THEN entity_id := NEW.session_id;
        WHEN 'session_events' THEN entity_id := NEW.event_id;
        WHEN 'session_tasks' THEN entity_id := NEW.task_id;
        WHEN 'steps' THEN
            entity_id := NEW.step_id;
            parent_table := 'session_tasks';
            parent_id := NEW.task_id;
        WHEN 'tool_calls' THEN
            entity_id := NEW.tool_call_id;
            parent_table := 'steps';
            parent_id := NEW.step_id;
        WHEN 'artifacts' THEN entity_id := NEW.artifact_id;
    END CASE;
    NEW.tenant := current_user;
    IF acode.held_by_another_tenant(TG_TABLE_NAME, entity_id, NEW.session_id, NEW.tenant)
       OR (parent_id IS NOT NULL
           AND acode.held_by_another_tenant(parent_table, parent_id, NULL, NEW.tenant)) THEN
        RAISE EXCEPTION USING
            ERRCODE = '23T01',
            MESSAGE = format('%s %s (session %s%s) belongs to another tenant; role %s writes '
                             'only its own tenant''s rows', TG_TABLE_NAME, entity_id,
                             coalesce(NEW.session_id, 'none'),
                             CASE WHEN parent_id IS NULL THEN ''
                                  ELSE format(', parent %s %s', parent_table, parent_id) END,
                             current_user);
    END IF;
    RETURN NEW;
END
$$;
