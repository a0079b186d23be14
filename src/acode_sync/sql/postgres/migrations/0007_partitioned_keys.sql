-- applied_keys and conflicts grow with every change: they become range-partitioned by
-- the version time their key carries, so retention drops whole partitions (no DELETE,
-- no vacuum debt; acode_sync/retention.py, docs/postgres.md#retention). applied_keys
-- keeps one partition per UTC day, conflicts one per UTC month; rows outside every
-- partition (a version older than
-- the oldest kept, or far ahead) land in the DEFAULT partition, so no record ever fails
-- for want of a partition. A partitioned table cannot be made by ALTER: each is created
-- anew, filled from the old one, and swapped in here, in the migration's transaction.

-- The keys, with their session and version. The unique key (idempotency_key, session_id,
-- version) says what UNIQUE (idempotency_key) said (the key names its version, and an
-- entity's session is fixed), and a key is always found in the partition of its version,
-- however late its resend.
ALTER TABLE applied_keys RENAME TO applied_keys_unpartitioned;
ALTER INDEX applied_keys_idempotency_key_key RENAME TO applied_keys_unpartitioned_key;
ALTER INDEX applied_keys_applied_at RENAME TO applied_keys_unpartitioned_applied_at;
CREATE TABLE applied_keys (
    session_id text COLLATE "C" NOT NULL,
    idempotency_key text COLLATE "C" NOT NULL,
    version timestamptz NOT NULL,
    payload_digest bytea NOT NULL,
    origin_id text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    tenant text COLLATE "C" NOT NULL DEFAULT current_user,
    CONSTRAINT applied_keys_key UNIQUE (idempotency_key, session_id, version)
) PARTITION BY RANGE (version);
CREATE TABLE applied_keys_default PARTITION OF applied_keys DEFAULT;

-- Both versions of every conflict, by the incoming version's time. conflict_id stays the
-- order conflicts were recorded in.
ALTER TABLE conflicts RENAME TO conflicts_unpartitioned;
ALTER INDEX conflicts_pkey RENAME TO conflicts_unpartitioned_pkey;
ALTER INDEX conflicts_incoming_key_incoming_digest_key RENAME TO conflicts_unpartitioned_key;
ALTER INDEX conflicts_session RENAME TO conflicts_unpartitioned_session;
ALTER INDEX conflicts_entity RENAME TO conflicts_unpartitioned_entity;
ALTER INDEX conflicts_detected_at RENAME TO conflicts_unpartitioned_detected_at;
CREATE TABLE conflicts (
    conflict_id bigint GENERATED ALWAYS AS IDENTITY,
    entity_type text COLLATE "C" NOT NULL,
    entity_id text COLLATE "C" NOT NULL,
    session_id text COLLATE "C" NOT NULL,
    incoming_key text COLLATE "C" NOT NULL,
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
    tenant text COLLATE "C" NOT NULL DEFAULT current_user,
    CONSTRAINT conflicts_pkey PRIMARY KEY (session_id, conflict_id, incoming_updated_at),
    CONSTRAINT conflicts_key UNIQUE (incoming_key, incoming_digest, session_id, incoming_updated_at)
) PARTITION BY RANGE (incoming_updated_at);
CREATE TABLE conflicts_default PARTITION OF conflicts DEFAULT;
CREATE INDEX conflicts_session ON conflicts (session_id, conflict_id);
CREATE INDEX conflicts_entity ON conflicts (entity_type, entity_id);
CREATE INDEX conflicts_detected_at ON conflicts (detected_at);

-- Partitions for the rows held (keys of the last 60 days, conflicts of the last 12 months;
-- older ones go to the default, which the next retention run empties of what it no
-- longer keeps) and the periods ahead, named as
-- acode_sync/partitions.py names them (<table>_pYYYYMMDD, <table>_pYYYYMM), which keeps
-- them from then on. A one-off loop: no function is left behind.
DO $$
DECLARE
    plan record;
    lower_bound timestamptz;
    upper_bound timestamptz;
BEGIN
    FOR plan IN
        SELECT 'applied_keys' AS t, 'day' AS period, 'YYYYMMDD' AS suffix,
               greatest(coalesce((SELECT min(applied_at) FROM applied_keys_unpartitioned), now()),
                        now() - interval '60 days') AS first_time,
               now() + interval '3 days' AS last_time
        UNION ALL
        SELECT 'conflicts', 'month', 'YYYYMM',
               -- Bounded like the keys': one conflict dated 1970 must not make 687 months
               -- of partitions; older conflicts are kept in the DEFAULT partition.
               greatest(coalesce((SELECT min(incoming_updated_at) FROM conflicts_unpartitioned),
                                 now()),
                        now() - interval '12 months'),
               now() + interval '2 months'
    LOOP
        lower_bound := date_trunc(plan.period, plan.first_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
        WHILE lower_bound <= plan.last_time LOOP
            upper_bound := (lower_bound AT TIME ZONE 'UTC' + ('1 ' || plan.period)::interval)
                           AT TIME ZONE 'UTC';
            EXECUTE format('CREATE TABLE acode.%I PARTITION OF acode.%I FOR VALUES FROM (%L) TO (%L)',
                           plan.t || '_p' || to_char(lower_bound AT TIME ZONE 'UTC', plan.suffix),
                           plan.t, lower_bound, upper_bound);
            lower_bound := upper_bound;
        END LOOP;
    END LOOP;
END
$$;

-- A key's session: its entity row's (the key names the entity: EntityType:id:version).
INSERT INTO applied_keys (session_id, idempotency_key, version, payload_digest, origin_id,
                          applied_at, tenant)
SELECT coalesce(CASE k.entity_type
           WHEN 'Session' THEN k.entity_id
           WHEN 'SessionEvent' THEN (SELECT e.session_id FROM session_events AS e
                                     WHERE e.event_id = k.entity_id)
           WHEN 'SessionTask' THEN (SELECT e.session_id FROM session_tasks AS e
                                    WHERE e.task_id = k.entity_id)
           WHEN 'Step' THEN (SELECT e.session_id FROM steps AS e WHERE e.step_id = k.entity_id)
           WHEN 'ToolCall' THEN (SELECT e.session_id FROM tool_calls AS e
                                 WHERE e.tool_call_id = k.entity_id)
           WHEN 'Artifact' THEN (SELECT e.session_id FROM artifacts AS e
                                 WHERE e.artifact_id = k.entity_id)
       END, ''),
       k.idempotency_key, k.version, k.payload_digest, k.origin_id, k.applied_at, k.tenant
FROM (
    SELECT a.*, split_part(a.idempotency_key, ':', 1) AS entity_type,
           substr(a.idempotency_key, length(split_part(a.idempotency_key, ':', 1)) + 2,
                  length(a.idempotency_key) - length(split_part(a.idempotency_key, ':', 1)) - 29)
               AS entity_id,
           CASE WHEN right(a.idempotency_key, 27) ~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$'
                THEN right(a.idempotency_key, 27)::timestamptz
                ELSE a.applied_at END AS version
    FROM applied_keys_unpartitioned AS a
) AS k;

INSERT INTO conflicts (conflict_id, entity_type, entity_id, session_id, incoming_key,
                       incoming_digest, incoming_origin, incoming_updated_at,
                       incoming_base_updated_at, incoming_version, current_key,
                       current_origin, current_updated_at, current_version, winner,
                       detected_at, tenant)
OVERRIDING SYSTEM VALUE
SELECT conflict_id, entity_type, entity_id, session_id, incoming_key, incoming_digest,
       incoming_origin, incoming_updated_at, incoming_base_updated_at, incoming_version,
       current_key, current_origin, current_updated_at, current_version, winner,
       detected_at, tenant
FROM conflicts_unpartitioned;
SELECT setval(pg_get_serial_sequence('conflicts', 'conflict_id'),
              greatest((SELECT max(conflict_id) FROM conflicts_unpartitioned), 1),
              (SELECT max(conflict_id) FROM conflicts_unpartitioned) IS NOT NULL);

-- What the old tables were given (`acode db grant`, `acode db tenants enable`), the new
-- ones are given too; then the old tables go.
DO $$
DECLARE
    pair record;
    grant_row record;
BEGIN
    FOR pair IN SELECT * FROM (VALUES ('applied_keys'), ('conflicts')) AS p(t) LOOP
        FOR grant_row IN
            SELECT g.grantee, g.privilege_type
            FROM pg_class AS c, aclexplode(c.relacl) AS g
            WHERE c.oid = format('acode.%I', pair.t || '_unpartitioned')::regclass
              AND g.grantee <> c.relowner AND g.grantee <> 0
        LOOP
            EXECUTE format('GRANT %s ON acode.%I TO %I', grant_row.privilege_type, pair.t,
                           (SELECT rolname FROM pg_roles WHERE oid = grant_row.grantee));
        END LOOP;
        IF (SELECT relrowsecurity FROM pg_class
            WHERE oid = format('acode.%I', pair.t || '_unpartitioned')::regclass) THEN
            EXECUTE format('ALTER TABLE acode.%I ENABLE ROW LEVEL SECURITY', pair.t);
            EXECUTE format('CREATE POLICY tenant_rows ON acode.%I USING (tenant = current_user) '
                           'WITH CHECK (tenant = current_user)', pair.t);
        END IF;
    END LOOP;
END
$$;
DROP TABLE applied_keys_unpartitioned;
DROP TABLE conflicts_unpartitioned;
