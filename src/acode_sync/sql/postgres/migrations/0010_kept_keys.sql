-- From this version a round keeps in applied_keys only the keys it does not keep anywhere
-- else: of the version a winner replaces and of a version that loses. The version an
-- entity row holds keeps its key and digest in the row (docs/postgres.md#applied_keys).
-- The tables do not change; the contract does. A release before it keeps the key of each
-- version it applies, not of the version it replaces: beside this one, a resend of a
-- version it replaced would be taken for a conflict. So its schema version says it: a
-- daemon of an earlier release, when it starts (it reads the version once per process),
-- refuses this schema (a newer one than it knows, a refusal that waits and charges no
-- record) until it is upgraded. docs/operations.md#upgrading: stop them first.
COMMENT ON TABLE applied_keys IS
    'Keys and digests of versions replaced or lost; a version held keeps its own in its row';
