-- The entity tables keep only the indexes a statement of acode-sync reads: their primary
-- key (session_id, id) and the unique id. The nine secondary indexes of migration 1 (by
-- created_at, state, task_id, step_id) served no statement here, and every record the
-- drain wrote paid for each of them on the central server (docs/performance.md). A
-- deployment that queries the central tables by those columns creates what it needs, with
-- CREATE INDEX CONCURRENTLY, as docs/postgres.md#indexes shows; later migrations never
-- depend on their absence.
DROP INDEX IF EXISTS sessions_created_at;
DROP INDEX IF EXISTS sessions_state_updated;
DROP INDEX IF EXISTS session_events_created_at;
DROP INDEX IF EXISTS session_tasks_created_at;
DROP INDEX IF EXISTS steps_task;
DROP INDEX IF EXISTS steps_created_at;
DROP INDEX IF EXISTS tool_calls_step;
DROP INDEX IF EXISTS tool_calls_created_at;
DROP INDEX IF EXISTS artifacts_created_at;
