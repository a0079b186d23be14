-- The store computes each payload's canonical digest (the SHA-256 of its jsonb text, the
-- one PostgreSQL keeps as an entity row's canonical_digest) when it saves, so that a
-- syncer need not parse and respell every payload it ships. NULL where the writer left it
-- (plain-SQL writers, records written before this version, a payload the store cannot
-- spell with certainty): the syncer computes it then, and for a value that is not 32
-- bytes. A payload that changes without its digest loses the digest. (No CHECK: SQLite
-- would check it against every record held, a read of the whole outbox, while the
-- migrating agent holds the write lock.)
ALTER TABLE outbox_records ADD COLUMN jsonb_digest BLOB;

CREATE TRIGGER outbox_records_payload_changed AFTER UPDATE OF payload ON outbox_records
WHEN NEW.payload IS NOT OLD.payload AND NEW.jsonb_digest IS OLD.jsonb_digest
     AND NEW.jsonb_digest IS NOT NULL
BEGIN
    UPDATE outbox_records SET jsonb_digest = NULL WHERE outbox_id = NEW.outbox_id;
END;
