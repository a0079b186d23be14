-- Version history (docs/postgres.md#version-history): with [postgres] keep_history on, a
-- daemon's apply round appends every version it writes to an entity table (created or
-- updated, never a conflict's loser) here, in the same statement. Append-only: nothing
-- updates a row; whole partitions past the retention are dropped
-- (acode_sync/partitions.py, `acode db history maintain`). Off, nothing is written here.
--
-- Partitioned by RANGE on `version` (the entity's updated_at): that is the time
-- `acode db restore --as-of` asks about, so a restore as of T reads only the partitions
-- up to T, and the retention drops versions by their own age. The key includes it (a
-- partitioned table's unique key must): one row per version an origin wrote, so a
-- resend, a batch run again or a re-applied backup appends nothing twice.
--
-- `payload` is the record's payload as applied (its unknown keys included): a restore
-- maps it onto the workspace's columns as the apply round maps it onto the entity table,
-- and proves each row by canonical_digest (the SHA-256 of payload::text, migration 0004).
-- `previous_version` is the version it replaced (NULL: it created the entity): a version
-- applied while the history was off leaves a gap that the next recorded version shows.
-- The DEFAULT partition takes a version no range partition covers, so an apply never
-- fails for want of a partition; maintenance moves those rows into the partition it
-- creates for their range.
CREATE TABLE entity_history (
    entity_type text COLLATE "C" NOT NULL,
    entity_id text COLLATE "C" NOT NULL,
    session_id text COLLATE "C" NOT NULL,
    version timestamptz NOT NULL,
    previous_version timestamptz,
    origin_id text COLLATE "C" NOT NULL,
    idempotency_key text COLLATE "C" NOT NULL,
    payload jsonb NOT NULL,
    payload_digest bytea NOT NULL,
    canonical_digest bytea NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    tenant text COLLATE "C" NOT NULL DEFAULT current_user,
    -- session_id, the distribution column (migration 6), last: an entity's session is
    -- fixed, so it changes nothing of the key, and lookups by entity keep the prefix.
    PRIMARY KEY (entity_type, entity_id, version, origin_id, session_id)
) PARTITION BY RANGE (version);

CREATE TABLE entity_history_default PARTITION OF entity_history DEFAULT;

-- With tenants enabled (`acode db tenants enable`, before this table existed), the history
-- holds a tenant's versions under the same row security as its entity rows: otherwise
-- every syncer role could read, and add to, every tenant's history.
DO $$
BEGIN
    IF (SELECT relrowsecurity FROM pg_class WHERE oid = 'acode.sessions'::regclass) THEN
        ALTER TABLE acode.entity_history ENABLE ROW LEVEL SECURITY;
        CREATE POLICY tenant_rows ON acode.entity_history
            USING (tenant = current_user) WITH CHECK (tenant = current_user);
    END IF;
END
$$;

-- Whether the version of an entity recorded at `v` is followed in the history by the
-- version that replaced it (no version applied without the history in between): then it
-- is the entity's state from `v` until that next version, and a restore as of a time in
-- that span is exact.
CREATE FUNCTION history_followed(kind text, id text, v timestamptz) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT n.previous_version = v
                     FROM acode.entity_history AS n
                     WHERE n.entity_type = kind AND n.entity_id = id AND n.version > v
                     ORDER BY n.version, n.origin_id
                     LIMIT 1), false)
$$;
