-- Every SQL statement run against PostgreSQL, loaded by name (see acode_sync/sql.py).
-- All tables live in the `acode` schema, always named with it (no search_path or other
-- startup parameter is needed, so PgBouncer can stand in between). Parameters are
-- always bound. `apply_entities` is a template: the <...> markers are filled once, at
-- import, from the constant table specs in acode_sync/pg_tables.py, never from input.

-- name: schema_exists
-- A scan of the catalog, not to_regclass(): that answers from the backend's cache, which
-- still says "no such table" after a migration committed while this transaction waited
-- for the migration lock.
SELECT EXISTS (
    SELECT FROM pg_catalog.pg_tables
    WHERE schemaname = 'acode' AND tablename = 'schema_migrations'
);

-- A daemon's first look, in one statement: the database's encoding (the apply path
-- converts payloads from UTF-8 into it) and whether the schema exists (as schema_exists).
-- name: schema_facts
SELECT current_setting('server_encoding') AS encoding,
       EXISTS (SELECT FROM pg_catalog.pg_tables
               WHERE schemaname = 'acode' AND tablename = 'schema_migrations') AS schema_exists;

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS acode;

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS acode.schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz
);

-- name: applied_migrations
SELECT version, checksum FROM acode.schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO acode.schema_migrations (version, name, checksum) VALUES ($1, $2, $3);

-- Migrations name their tables unqualified, and read a backslash in a literal as itself
-- (0007 holds a pattern with \d) whatever the database or role sets.
-- name: set_migration_search_path
SELECT set_config('search_path', 'acode', true),
       set_config('standard_conforming_strings', 'on', true);

-- name: migration_lock
SELECT pg_advisory_xact_lock($1, $2);

-- A daemon that finds migrations pending takes the lock only if it is free: while another
-- migrates, the others wait for it without holding a server connection (behind PgBouncer
-- a thousand waiters on the lock would hold every one and pass it on one at a time).
-- name: try_migration_lock
SELECT pg_try_advisory_xact_lock($1, $2);

-- A batch's opening, BEGIN and two statements in one exchange (a simple query:
-- behind a transaction-pooling PgBouncer, a statement with arguments is two round trips,
-- each holding a server connection). The values are numbers filled in by
-- postgres.batch_opening. First its statement and lock timeouts and planner settings,
-- per transaction so they also hold behind PgBouncer, in a statement of their own before
-- any lock is waited for (in one statement the locks would be taken before the settings).
-- A backslash in the statements' literals (a pattern's \d, a bytea's \x) is itself, as
-- the standard says, even where the database or role turned standard_conforming_strings
-- off (a statement is parsed when first run: in the transaction, after this).
-- Every batch statement is a set of primary-key probes, right at any table size, so its
-- plan is made once and reused (planning them per batch cost a third of the server's
-- time); with sequential scans, hash and merge joins off, a plan made while the tables
-- were small cannot turn into whole-table scans as they grow. JIT off: a plan that has
-- to scan (a disabled node costs 1e10) would be compiled by LLVM for seconds, for a few
-- rows.
-- Then the batch's session locks, taken in ascending order. They keep concurrent batches
-- of one session apart; correctness does not rest on them (a round locks the rows it
-- judges).
-- name: batch_opening
BEGIN;
SELECT set_config('statement_timeout', '<statement_timeout>', true),
       set_config('lock_timeout', '<lock_timeout>', true),
       set_config('plan_cache_mode', 'force_generic_plan', true),
       set_config('enable_seqscan', 'off', true), set_config('enable_hashjoin', 'off', true),
       set_config('enable_mergejoin', 'off', true), set_config('jit', 'off', true),
       set_config('standard_conforming_strings', 'on', true);
SELECT count(pg_advisory_xact_lock(<namespace>, k)) FROM unnest('{<locks>}'::int[]) AS k;

-- A round: at most one record per entity, of every entity type, in one statement (one
-- round trip). The statement is assembled in acode_sync/pg_tables.py:
--   WITH <incoming block per table>, <apply block per table>
--   <round_outcome per table>
-- Block names are prefixed with their table's (<t>_incoming, ...). $1 is the origin. Last
-- write wins on (updated_at, origin_id, key); a record not based on the version held is a
-- conflict, stored with both versions and returned as 'conflict'. Every version delivered
-- keeps its key and digest: the version held in its row; a version it replaced, and a
-- version that lost, in applied_keys (written here, as it is replaced or loses). So a
-- record is a delivery again, returned as 'duplicate', if its key and digest are the
-- row's, or those of a replaced or lost version (applied_keys; or, from before those were
-- kept, a record that lost a conflict: conflicts). Only a record that loses, or ties, can
-- be one of the latter, so only those look them up. A new entity that another
-- transaction created meanwhile fails the round with a unique violation of its table's
-- primary key or id; a losing record whose row another transaction changed since the
-- statement's snapshot, or whose conflict another transaction recorded since then, is
-- returned as 'raced' (it looked for its key in a snapshot from before it was written):
-- either way the caller rolls the batch back and runs it again (acode_sync/postgres.py).
-- name: incoming_entities
<t>_incoming AS (
    -- <fields>: [entity_id, session_id, version, base, session_unseen] per record (JSON;
    -- session_unseen: the sender could not tell that the payload's session is the
    -- record's, acode_sync/postgres.session_is_the_records); <payloads>: the
    -- payloads, end to end, at offsets <starts> with lengths <lengths>; <digests>: per
    -- record its payload digest and the digest of its jsonb text (canonical_sent;
    -- <no_canonical_digest>, all zeros, where the sender left it to this statement), 32
    -- bytes each, end to end. The key is rebuilt: EntityType:entity_id:version.
    -- session_id is the entity's session: <session> (the payload's, else the record's).
    -- The payload itself is parsed only where a record is written or recorded (below):
    -- carried through the blocks as jsonb, it was copied into every one of them.
    SELECT r.*, <session> AS session_id
    FROM (
        SELECT '<entity_type>:' || (i.f->>0) || ':' || (i.f->>2) AS idempotency_key,
               i.f->>0 AS entity_id, i.f->>1 AS record_session,
               (i.f->>4)::boolean AS session_unseen, i.start, i.length,
               (i.f->>2)::timestamptz AS version, i.f->>2 AS version_text,
               (i.f->>3)::timestamptz AS base,
               substring(<digests>::bytea FROM (i.n::int - 1) * 64 + 1 FOR 32) AS digest,
               nullif(substring(<digests>::bytea FROM (i.n::int - 1) * 64 + 33 FOR 32),
                      <no_canonical_digest>) AS canonical_sent,
               $1::text AS origin_id
        FROM ROWS FROM (jsonb_array_elements(<fields>::jsonb), unnest(<starts>::int[]),
                        unnest(<lengths>::int[]))
             WITH ORDINALITY AS i(f, start, length, n)
        -- OFFSET 0 keeps the fields columns of their own: under row-level security a
        -- lookup by an expression over the JSON (->> is not leakproof) may not use the
        -- table's index, and would scan the whole table for every record.
        OFFSET 0
    ) AS r
)

-- name: apply_entities
-- <payload> is a record's payload as jsonb, parsed from the round's blob (see
-- <t>_incoming). <t>_parsed parses it, in a subquery that OFFSET 0 keeps apart, once per
-- record that is written or recorded as a conflict, with the digest of a version written;
-- the conflicts, the writes and the history read it there. The other records are
-- duplicates, whose digest is that of a payload parsed before.
<t>_judged AS (
    SELECT n.*,
           -- The entity is held under its id, whatever the session: a record naming
           -- another session fails here (refuse_session_move), never a second row.
           CASE WHEN c.updated_at IS NULL THEN false
                WHEN c.session_id = n.session_id THEN true
                ELSE acode.refuse_session_move('<entity_type> ' || n.entity_id, c.session_id,
                                               n.session_id)
           END AS has_current,
           c.updated_at AS current_updated_at,
           c.origin_id AS current_origin,
           c.idempotency_key AS current_key,
           c.payload_digest AS current_digest,
           c.row_version AS current_row_version,
           c.held AS current_row,
           -- (A row written before digests were kept has none: not the same.)
           coalesce(c.idempotency_key = n.idempotency_key AND c.payload_digest = n.digest,
                    false) AS same,
           c.updated_at IS NULL
               OR (n.version, n.origin_id, n.idempotency_key)
                  > (c.updated_at, c.origin_id, c.idempotency_key) AS newer
    FROM <t>_incoming AS n
    -- One primary-key lookup per record, whatever the planner thinks of the batch size
    -- (a hash join would scan the whole table). FOR UPDATE: the version judged is the
    -- one PostgreSQL holds when the row is written (a concurrent batch's version, once
    -- it commits), and nobody changes it before this transaction ends.
    LEFT JOIN LATERAL (
        SELECT t.updated_at, t.session_id, t.origin_id, t.idempotency_key, t.payload_digest,
               t.xmin AS row_version, t AS held
        FROM acode.<t> AS t
        WHERE t.<id_column> = n.entity_id
        FOR UPDATE
    ) AS c ON true
),
-- A record is a winner (written), a conflict (recorded), or a duplicate (neither): the
-- row's version; or, for one that loses or ties (another origin's version under the row's
-- key), a version delivered before.
<t>_decided AS (
    SELECT p.*,
           p.newer AND NOT p.same AND NOT p.delivered AS wins,
           p.has_current AND NOT p.same AND NOT p.delivered AND (
               NOT p.newer
               OR CASE WHEN p.base IS NULL THEN p.version <= p.current_updated_at
                       ELSE p.base <> p.current_updated_at END
           ) AS in_conflict
    FROM (
        SELECT j.*,
               -- Delivered before if a replaced or lost version's key holds its key and
               -- digest, or a recorded conflict does (a tie's loser; and from before lost
               -- versions' keys were kept). Raced if its locked row is not the one the
               -- snapshot reads: the transaction that replaced it wrote a key this
               -- snapshot cannot see. xmin, not the key: in a tie two origins' versions
               -- share one key.
               CASE WHEN j.has_current AND NOT j.same
                         AND (NOT j.newer OR j.idempotency_key = j.current_key) THEN
                   EXISTS (SELECT FROM acode.applied_keys AS a
                           WHERE a.idempotency_key = j.idempotency_key
                             AND a.session_id = j.session_id AND a.version = j.version
                             AND a.payload_digest = j.digest)
                   OR EXISTS (SELECT FROM acode.conflicts AS c
                              WHERE c.incoming_key = j.idempotency_key
                                AND c.incoming_digest = j.digest
                                AND c.session_id = j.session_id
                                AND c.incoming_updated_at = j.version)
               ELSE false END AS delivered,
               CASE WHEN j.has_current AND NOT j.same
                         AND (NOT j.newer OR j.idempotency_key = j.current_key) THEN
                   j.current_row_version IS DISTINCT FROM (
                       SELECT t.xmin FROM acode.<t> AS t WHERE t.<id_column> = j.entity_id)
               ELSE false END AS raced
        -- In the order the sender sorted the records (by entity id, as "C" sorts them):
        -- each block reads a CTE back as stored, so every batch locks and writes rows in
        -- one order, and no sort here copies what the rows carry. OFFSET 0: each probe
        -- runs once per record, not once per use.
        FROM <t>_judged AS j
        OFFSET 0
    ) AS p
),
<t>_parsed AS (
    SELECT d.*,
           -- A version written (and, with the history on, appended): its canonical
           -- digest, the sender's, else computed once here.
           CASE WHEN d.wins THEN coalesce(d.canonical_sent, sha256(convert_to(d.p::text, 'UTF8')))
           END AS canonical
    FROM (SELECT d.*, <payload> AS p FROM <t>_decided AS d
          WHERE d.in_conflict OR d.wins OFFSET 0) AS d
),
<t>_recorded AS (
    INSERT INTO acode.conflicts (
        entity_type, entity_id, session_id, incoming_key, incoming_digest, incoming_origin,
        incoming_updated_at, incoming_base_updated_at, incoming_version, current_key,
        current_origin, current_updated_at, current_version, winner)
    SELECT '<entity_type>', d.entity_id, d.session_id,
           d.idempotency_key, d.digest, d.origin_id, d.version, d.base, d.p,
           d.current_key, d.current_origin, d.current_updated_at,
           (to_jsonb(d.current_row) - '{extra,origin_id,idempotency_key,synced_at,payload_digest,canonical_digest}'::text[])
               || (d.current_row).extra,
           CASE WHEN d.wins THEN 'incoming' ELSE 'current' END
    FROM <t>_parsed AS d
    WHERE d.in_conflict
    ON CONFLICT (incoming_key, incoming_digest, session_id, incoming_updated_at) DO NOTHING
    RETURNING conflict_id, incoming_key, current_key, incoming_updated_at, current_updated_at,
              incoming_origin, current_origin, winner
),
-- The versions no row holds keep their keys for the key retention, whatever the
-- conflicts' retention: the version a winner replaces below, and a version that lost
-- (also kept, with both versions, in conflicts). One may be there already: a release
-- before schema version 10 recorded every key as it applied it, and two origins'
-- versions of one entity in one microsecond share a key (its one place here goes to the
-- first version to leave the row; the other is known by its conflict).
<t>_replaced AS (
    INSERT INTO acode.applied_keys (session_id, idempotency_key, version, payload_digest,
                                    origin_id)
    SELECT d.session_id, d.current_key, d.current_updated_at, d.current_digest,
           d.current_origin
    FROM <t>_decided AS d
    WHERE d.wins AND d.has_current AND d.current_digest IS NOT NULL
    UNION ALL
    SELECT d.session_id, d.idempotency_key, d.version, d.digest, d.origin_id
    FROM <t>_decided AS d
    -- (A loser with the key of the version held, a tie, leaves the key's one place to
    -- that version, kept when it is replaced; the loser is in conflicts.)
    WHERE d.in_conflict AND NOT d.wins AND d.idempotency_key <> d.current_key
    ON CONFLICT (idempotency_key, session_id, version) DO NOTHING
),
-- A version over the one held (locked above): the upsert's condition is the judgment's.
<t>_written AS (
    INSERT INTO acode.<t> AS t (<columns>, extra, origin_id, idempotency_key, synced_at,
                                payload_digest, canonical_digest)
    SELECT <values>, d.p - '<known_keys>'::text[], d.origin_id, d.idempotency_key, now(),
           d.digest, d.canonical
    FROM <t>_parsed AS d
    WHERE d.wins AND d.has_current
    ON CONFLICT (<key_columns>) DO UPDATE SET
        <updates>, extra = excluded.extra, origin_id = excluded.origin_id,
        idempotency_key = excluded.idempotency_key, synced_at = excluded.synced_at,
        payload_digest = excluded.payload_digest, canonical_digest = excluded.canonical_digest
    WHERE (t.updated_at, t.origin_id, t.idempotency_key)
          < (excluded.updated_at, excluded.origin_id, excluded.idempotency_key)
    RETURNING 1
),
-- A new entity, inserted without ON CONFLICT (its check would probe the key the lookup
-- above just probed). A round holds one record per entity, so a unique violation of the
-- table's primary key, or of its id under another session, means that another
-- transaction created the entity since this statement's snapshot: the caller takes it as
-- 'raced', rolls the batch back and judges it again against that version
-- (acode_sync/postgres.py).
<t>_created AS (
    INSERT INTO acode.<t> AS t (<columns>, extra, origin_id, idempotency_key, synced_at,
                                payload_digest, canonical_digest)
    SELECT <values>, d.p - '<known_keys>'::text[], d.origin_id, d.idempotency_key, now(),
           d.digest, d.canonical
    FROM <t>_parsed AS d
    WHERE NOT d.has_current
)

-- With [postgres] keep_history on, the round also appends every version it writes (a
-- record that wins: created, or updated over the version held) to the version history,
-- in this same statement. <written_versions>: one SELECT per table from its decided
-- records; the last argument is the history's retention, an interval: an older version
-- would only be dropped with its partition, so it is not kept.
-- name: append_history
history_appended AS (
    INSERT INTO acode.entity_history (entity_type, entity_id, session_id, version,
                                      previous_version, origin_id, idempotency_key, payload,
                                      payload_digest, canonical_digest)
    <written_versions>
    ON CONFLICT DO NOTHING
)

-- name: history_versions
SELECT '<entity_type>', d.entity_id, coalesce(d.p->>'session_id', d.session_id), d.version,
       d.current_updated_at, d.origin_id, d.idempotency_key, d.p, d.digest, d.canonical
FROM <t>_parsed AS d
WHERE d.wins AND d.version >= now() - <retention>::interval

-- A round's outcome, per table (joined by UNION ALL): its conflicts, duplicates and races.
-- name: round_outcome
SELECT 'conflict' AS outcome, incoming_key, conflict_id, current_key, incoming_updated_at,
       current_updated_at, incoming_origin, current_origin, winner
FROM <t>_recorded
UNION ALL
SELECT CASE WHEN NOT d.raced AND (d.same OR d.delivered) THEN 'duplicate' ELSE 'raced' END,
       d.idempotency_key, NULL::bigint, NULL::text, NULL::timestamptz, NULL::timestamptz,
       NULL::text, NULL::text, NULL::text
FROM <t>_decided AS d
WHERE d.same OR d.delivered OR d.raced
      -- a loser's conflict that another transaction recorded since the snapshot
      OR d.in_conflict AND NOT d.wins
         AND NOT EXISTS (SELECT FROM <t>_recorded AS r WHERE r.incoming_key = d.idempotency_key)

-- name: list_conflicts
SELECT conflict_id, entity_type, entity_id, session_id, incoming_key, current_key,
       incoming_updated_at, current_updated_at, incoming_origin, current_origin, winner,
       detected_at, incoming_version, current_version
FROM acode.conflicts
WHERE ($1::text IS NULL OR session_id = $1)
ORDER BY conflict_id DESC
LIMIT $2;

-- Retention (acode_sync/retention.py, beside partitions.py): the rows of a partition
-- about to be dropped, and the DEFAULT partition's rows before the cutoff (few: versions
-- older than every partition). <partition>, <default>, <column> come from constant specs.
-- name: retention_lock_timeout
SELECT set_config('lock_timeout', $1, true);

-- name: count_partition
SELECT count(*) FROM acode.<partition>;

-- name: forget_default_rows
DELETE FROM acode.<default> WHERE <column> < $1;

-- name: probe
SELECT 1;

-- `acode-syncd check-config --connect`: who and where this connection is.
-- name: connection_facts
SELECT current_user AS role, current_setting('server_version') AS version,
       coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false) AS tls,
       has_database_privilege(current_database(), 'CREATE') AS may_create_schema;

-- The server process behind this transaction. A connection pooler answers the login
-- itself with a process id of its own (PgBouncer's is random), so a different one here
-- shows a pooler; two clients given the same one in turn share server connections.
-- name: backend_pid
SELECT pg_backend_pid();

-- The privileges asked for ($1 kind: schema, table or function; $2 its name; $3 the
-- privilege) that the current role lacks; a missing object lacks them all.
-- name: missing_privileges
SELECT w.kind, w.object, w.privilege
FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS w(kind, object, privilege, n)
WHERE NOT CASE w.kind
    WHEN 'schema' THEN CASE WHEN to_regnamespace(w.object) IS NULL THEN false
                            ELSE has_schema_privilege(w.object, w.privilege) END
    WHEN 'table' THEN CASE WHEN to_regclass(w.object) IS NULL THEN false
                           ELSE has_table_privilege(w.object, w.privilege) END
    ELSE CASE WHEN to_regprocedure(w.object) IS NULL THEN false
              ELSE has_function_privilege(w.object, w.privilege) END
END
ORDER BY w.n;

-- `acode db verify`: the versions PostgreSQL holds of a page of one workspace's entities.
-- A template, filled once per table from the constant specs (postgres.VERSIONS_SQL).
-- name: entity_versions
SELECT <id_column> AS entity_id, updated_at, origin_id, idempotency_key, payload_digest
FROM acode.<t>
WHERE <id_column> = ANY($1::text[]);

-- A restore (acode_sync/restore.py) reads in one read-only REPEATABLE READ transaction,
-- so every table is read at one moment. `restore_entities` is a template filled at import
-- from the constant table specs: <selected> is the row as the workspace stores it (times
-- in canonical text, jsonb as its text), <where> one of the restore's three selections.
-- name: restore_entities
SELECT <selected>, canonical_digest FROM acode.<t> WHERE <where>;

-- A restore as of a time ($1): per entity, the newest version at or before it. The current
-- row if its version is (it is the newest of all), else the history's newest (last write
-- wins: version, then origin) if the history also holds the version that replaced it
-- (history_followed: nothing applied without the history in between), its payload made
-- into the row as the round made it (<from_payload>; version_text is the payload's own
-- updated_at, which the round checked against the key's). <where> is one of the
-- restore's selections, numbered from $2.
-- name: restore_entities_as_of
SELECT <selected>, canonical_digest FROM acode.<t>
WHERE updated_at <= $1::timestamptz AND <where>
UNION ALL
SELECT <selected>, canonical_digest FROM (
    SELECT <from_payload>, d.canonical_digest, d.origin_id
    FROM (
        SELECT DISTINCT ON (h.entity_id) h.entity_id, h.session_id, h.version,
               h.payload->>'updated_at' AS version_text, h.payload AS p, h.canonical_digest,
               h.origin_id
        FROM acode.entity_history AS h
        WHERE h.entity_type = '<entity_type>' AND h.version <= $1::timestamptz
        ORDER BY h.entity_id DESC, h.version DESC, h.origin_id DESC
    ) AS d
    WHERE NOT EXISTS (SELECT 1 FROM acode.<t> AS c
                      WHERE c.<id_column> = d.entity_id AND c.updated_at <= $1::timestamptz)
      AND acode.history_followed('<entity_type>', d.entity_id, d.version)
) AS <t>
WHERE <where>;

-- A restore's transaction opens with a simple query. It reads a backslash in its
-- statements' literals (the created_at pattern's \d) as itself, as the round does
-- (batch_opening). Its cursors are named prepared statements (asyncpg's, numbered from 1
-- in each process, whatever statement_cache_size says): behind a transaction-pooling
-- PgBouncer the server connection may still hold an earlier restore's of the same names,
-- so it drops them first (our other clients prepare none: statement_cache_size = 0).
-- name: restore_opening
DEALLOCATE ALL;
SELECT set_config('standard_conforming_strings', 'on', true);

-- The entities that existed at $1 (created by then) whose version then neither PostgreSQL
-- nor its history holds: the history began later, dropped it, or lacks a version applied
-- while it was off (the newest it holds before $1 is not followed by its successor). A
-- restore as of $1 reports them.
-- name: restore_unknown_as_of
SELECT <id_column> FROM acode.<t> AS c
WHERE c.updated_at > $1::timestamptz AND c.created_at <= $1::timestamptz AND <where>
  AND NOT coalesce((SELECT acode.history_followed('<entity_type>', h.entity_id, h.version)
                    FROM acode.entity_history AS h
                    WHERE h.entity_type = '<entity_type>' AND h.entity_id = c.<id_column>
                      AND h.version <= $1::timestamptz
                    ORDER BY h.version DESC, h.origin_id DESC
                    LIMIT 1), false);

-- name: restore_missing_sessions
SELECT array(SELECT unnest($1::text[]) EXCEPT
             SELECT session_id FROM acode.sessions WHERE session_id = ANY($1::text[]));

-- name: restore_origin_exists
SELECT EXISTS (SELECT 1 FROM acode.sessions WHERE origin_id = $1)
    OR EXISTS (SELECT 1 FROM acode.session_events WHERE origin_id = $1)
    OR EXISTS (SELECT 1 FROM acode.session_tasks WHERE origin_id = $1)
    OR EXISTS (SELECT 1 FROM acode.steps WHERE origin_id = $1)
    OR EXISTS (SELECT 1 FROM acode.tool_calls WHERE origin_id = $1)
    OR EXISTS (SELECT 1 FROM acode.artifacts WHERE origin_id = $1);

-- Before migrating: who this connection is and whether it may migrate (it owns the schema
-- acode, or is a member of its owner; with no schema yet, it may create one).
-- name: may_migrate
SELECT current_user AS role,
       CASE WHEN to_regnamespace('acode') IS NULL
            THEN has_database_privilege(current_database(), 'CREATE')
            ELSE pg_has_role((SELECT nspowner FROM pg_namespace WHERE nspname = 'acode'),
                             'USAGE')
       END AS may_migrate;

-- `acode db grant ROLE`: the role and the database as identifiers, quoted by the server
-- (NULL role: no such role). The GRANT statements are built from these and the constant
-- list of a syncer's privileges (acode_sync/roles.py), never from raw input.
-- name: grant_names
SELECT (SELECT quote_ident(rolname) FROM pg_roles WHERE rolname = $1) AS role,
       quote_ident(current_database()) AS database;

-- `acode db tenants enable`: row-level security on one table (a template: <t> is filled
-- from the constant table names in acode_sync/roles.py). A role sees and writes only its
-- own tenant's rows; the table's owner (who migrates) is not subject to it.
-- name: enable_tenant_rows
ALTER TABLE acode.<t> ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_rows ON acode.<t>;
CREATE POLICY tenant_rows ON acode.<t>
    USING (tenant = current_user) WITH CHECK (tenant = current_user);

-- And, on an entity table, the guard that stamps the tenant and fails a record for
-- another tenant's entity or session (migration 0005).
-- name: enable_tenant_guard
CREATE OR REPLACE TRIGGER guard_tenant BEFORE INSERT ON acode.<t>
    FOR EACH ROW EXECUTE FUNCTION acode.guard_tenant();

-- name: disable_tenants
DROP TRIGGER IF EXISTS guard_tenant ON acode.<t>;
DROP POLICY IF EXISTS tenant_rows ON acode.<t>;
ALTER TABLE acode.<t> DISABLE ROW LEVEL SECURITY;

-- Partition maintenance (acode_sync/partitions.py). The templates' <...> markers are
-- filled from a constant PartitionSpec (checked identifiers) and computed bounds, never
-- from input. One maintainer at a time per table: the advisory lock is per transaction.
-- name: partition_lock
SELECT pg_advisory_xact_lock($1, hashtext($2));

-- A table's partitions, read from the catalog by a query (a fresh snapshot after the
-- lock), not from the backend's relation cache.
-- name: partition_list
SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' AS is_default
FROM pg_catalog.pg_inherits AS i
JOIN pg_catalog.pg_class AS c ON c.oid = i.inhrelid
JOIN pg_catalog.pg_class AS p ON p.oid = i.inhparent
JOIN pg_catalog.pg_namespace AS n ON n.oid = p.relnamespace
WHERE n.nspname = $1 AND p.relname = $2
ORDER BY c.relname;

-- name: partition_create_default
CREATE TABLE IF NOT EXISTS <schema>.<table>_default PARTITION OF <schema>.<table> DEFAULT;

-- A range partition, built beside the table, given the DEFAULT partition's rows in its
-- range (with their identity values, if the table has an identity column), then attached
-- (all in the caller's transaction).
-- name: partition_create
CREATE TABLE <schema>.<partition> (LIKE <schema>.<table> INCLUDING ALL);
WITH moved AS (
    DELETE FROM <schema>.<default> WHERE <column> >= <start> AND <column> < <end> RETURNING *
)
INSERT INTO <schema>.<partition> OVERRIDING SYSTEM VALUE SELECT * FROM moved;
ALTER TABLE <schema>.<table> ATTACH PARTITION <schema>.<partition>
    FOR VALUES FROM (<start>) TO (<end>);

-- name: partition_drop
ALTER TABLE <schema>.<table> DETACH PARTITION <schema>.<partition>;
DROP TABLE <schema>.<partition>;

-- name: partition_count_default
SELECT count(*) FROM <schema>.<default>;
