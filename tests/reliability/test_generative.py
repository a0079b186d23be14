"""X-015: a seeded random simulation of several writers and their syncers under faults,
checked against a reference model (tests/reliability/model.py) after every step.

Three workspaces (three origins) write overlapping entities through the plain-INSERT
contract of docs/schema.md; the real `WorkspaceSyncer` with a `PostgresTarget` (through
a TCP proxy, as a role of its own) ships them into the real PostgreSQL while faults are
injected. Every step is drawn from `random.Random(seed)`; a failure prints the seed,
the features, the steps and the problems, with the command that replays it.

Environment: ACODE_GEN_SEEDS (comma-separated seeds), ACODE_GEN_FEATURES (`all`, or
`+name` / `-name` to change the default set, or plain names for exactly those),
ACODE_GEN_STEPS (steps per seed), ACODE_GEN_MINUTES (soak: fresh seeds until then).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import sqlite3
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import format_timestamp
from acode_sync.errors import AcodeError
from acode_sync.pg_tables import TABLES
from acode_sync.postgres import PostgresTarget
from acode_sync.restore import RestoreRequest, Selection, restore
from acode_sync.sql import queries
from acode_sync.store import WorkspaceDatabase, outbox_row
from acode_sync.sync import WorkspaceSyncer
from acode_sync.workspace import database_path
from tests.faults import AtNth
from tests.pg import (
    ADMIN_URL,
    AUDIT_TABLE,
    create_database_async,
    database_url,
    drop_database_async,
    install_audit,
)
from tests.proxy import TcpProxy
from tests.reliability import plugin
from tests.reliability.model import (
    ConflictRow,
    Entity,
    Held,
    Model,
    Observed,
    OutboxRow,
    Version,
    Write,
    final_problems,
    invariants,
)

pytestmark = [pytest.mark.anyio, pytest.mark.reliability, pytest.mark.postgres]

# Generator features that work on the engine as it is.
FEATURES: Final = frozenset(
    {
        "base",  # records carry base_updated_at (the writer's own last version)
        "ties",  # a version in the same microsecond as another origin's (the same key)
        "explicit_ids",  # explicit outbox_ids: above the top, and in the slot of a deleted record
        "delete_reinsert",  # a pending record deleted through the view, later inserted again
        "requeue",  # a processed record re-queued through the view (state, processed_at)
        "poison",  # a record PostgreSQL refuses (a state outside its CHECK): a dead letter
        "concurrent",  # two workspaces drained at once, batches of one entity interleaving
        "cut",  # the proxy resets every connection before a COMMIT
        "down",  # the proxy refuses connections from before a COMMIT until the drain ends
        "raise_before_commit",  # a failure inside the transaction
        "raise_after_commit",  # an ambiguous commit, sometimes followed by a restart
        "kill_after_mark",  # the syncer dies after marking a batch, then restarts
        "read_only",  # the role turned read-only (a failover onto a standby)
        "revoke",  # INSERT revoked from the role on the tables a round writes
        "lock",  # LOCK TABLE held by another connection past the statement timeout
        "entity_across_sessions",  # one entity's records filed under several session ids
        "explicit_id_at_top",  # a record re-inserted with the largest id ever given
        "prune_resend",  # applied keys pruned, then a late resend
        "payload_stamp_mismatch",  # a payload updated_at other than its key's version
        "requeue_processed_at_only",  # UPDATE outbox SET processed_at = NULL
    }
)
# Features that exercise a hole not yet closed: off by default, on with
# ACODE_GEN_FEATURES=all. Every hole found so far is closed.
KNOWN_HOLES: Final[dict[str, str]] = {}
ALL_FEATURES: Final = FEATURES | frozenset(KNOWN_HOLES)
# A session's first version is an INSERT into sessions, a later one also one into
# applied_keys (the version it replaces): the revoked grant fails either.
REVOKED: Final = "acode.sessions, acode.applied_keys"
CI_SEEDS: Final = (1, 2, 3, 4, 5, 6)
CI_STEPS: Final = 80
SESSIONS: Final = 4
ARTIFACTS: Final = 3
ORIGINS: Final = 3
SYNC: Final = SyncSettings(
    batch_max_records=4, max_attempts=3, retry_base_seconds=0.01, retry_cap_seconds=0.05
)


class InjectedFault(Exception):
    """Raised at an engine fault point: a failure there."""


class InjectedKill(InjectedFault):
    """Raised at an engine fault point: the process dies there (the writer restarts)."""


def features_from(text: str) -> frozenset[str]:
    if text in ("", "default"):
        return FEATURES
    if text == "all":
        return ALL_FEATURES
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = {n.lstrip("+-") for n in names} - ALL_FEATURES
    if unknown:
        raise ValueError(f"unknown generator features: {sorted(unknown)}")
    if all(n[0] in "+-" for n in names):
        chosen = set(FEATURES)
        for n in names:
            (chosen.add if n[0] == "+" else chosen.discard)(n[1:])
        return frozenset(chosen)
    return frozenset(names)


def seeds_from_environment() -> list[int]:
    text = os.environ.get("ACODE_GEN_SEEDS", "")
    return [int(s) for s in text.split(",") if s.strip()] or list(CI_SEEDS)


# -- the world: workspaces, PostgreSQL, the proxy --------------------------------------


@contextmanager
def sqlite(workspace: Path) -> Iterator[sqlite3.Connection]:
    with closing(
        sqlite3.connect(database_path(workspace), isolation_level=None, timeout=10.0)
    ) as conn:
        yield conn


@dataclass
class Writer:
    """One workspace: its origin, its syncer, and what it last wrote of each entity."""

    name: str
    workspace: Path
    origin: str
    dsn: str
    keep_history: bool = False
    syncer: WorkspaceSyncer = field(init=False)
    last: dict[Entity, str] = field(default_factory=dict)
    targets: list[PostgresTarget] = field(default_factory=list)  # closed at the end

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """A new process: a new pool and a syncer with nothing in memory (the old pool is
        left as a dead process leaves its connections)."""
        target = PostgresTarget(
            PostgresSettings(
                dsn=self.dsn,
                connect_timeout=2,
                statement_timeout=1,
                keep_history=self.keep_history,
            )
        )
        self.targets.append(target)
        self.syncer = WorkspaceSyncer(workspace=self.workspace, target=target, settings=SYNC)

    def rows(self) -> list[OutboxRow]:
        with sqlite(self.workspace) as conn:
            errors = dict(
                conn.execute("SELECT outbox_id, count(*) FROM outbox_errors GROUP BY 1").fetchall()
            )
            rows = conn.execute(
                "SELECT outbox_id, idempotency_key, state, attempts, processed_at, last_error"
                " FROM outbox ORDER BY outbox_id"
            ).fetchall()
        return [
            OutboxRow(self.origin, i, key, state, attempts, errors.get(i, 0), done, error)
            for i, key, state, attempts, done, error in rows
        ]

    def top(self) -> int:
        """The largest outbox_id ever given (AUTOINCREMENT's sequence)."""
        with sqlite(self.workspace) as conn:
            row = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'outbox_records'"
            ).fetchone()
        return int(row[0]) if row else 0


def payload(version: Version, created_at: str) -> str:
    stamp = version.updated_at
    if version.stamp_mismatch:  # an hour off the key's timestamp
        moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        stamp = format_timestamp(moment + timedelta(hours=1))
    if version.entity_type == "Session":
        row: dict[str, Any] = {
            "session_id": version.entity_id,
            "state": "BOGUS" if version.poison else "EXECUTING",
            "title": version.text,
            "metadata": {"origin": version.origin},
        }
    else:
        row = {
            "artifact_id": version.entity_id,
            # An entity's session is fixed (docs/sync.md#an-entitys-session): the payload
            # names the artifact's own; the record's session column is the writer's.
            "session_id": "sess_gen" + version.entity_id.removeprefix("art_gen"),
            "type": "text",
            "content": None if version.poison else version.text,  # NOT NULL
            "name": None,
        }
    return json.dumps({**row, "created_at": created_at, "updated_at": stamp})


def insert(writer: Writer, version: Version, outbox_id: int | None, body: str) -> None:
    """The plain INSERT of docs/schema.md, with base_updated_at and optionally outbox_id."""
    created_at = json.loads(body)["created_at"]
    columns = [
        "idempotency_key",
        "entity_type",
        "entity_id",
        "session_id",
        "payload",
        "base_updated_at",
        "created_at",
    ]
    values: list[Any] = [
        version.key,
        version.entity_type,
        version.entity_id,
        version.session_id,
        body,
        version.base,
        created_at,
    ]
    if outbox_id is not None:
        columns.insert(0, "outbox_id")
        values.insert(0, outbox_id)
    marks = ", ".join("?" * len(values))
    with sqlite(writer.workspace) as conn:
        conn.execute("BEGIN IMMEDIATE")
        if outbox_id is None and zlib.crc32(version.key.encode()) % 2:
            # As the store writes it: with the payload's canonical digest.
            conn.execute(SQLITE_QUERIES["insert_outbox"], outbox_row(*values))
        else:
            conn.execute(f"INSERT INTO outbox ({', '.join(columns)}) VALUES ({marks})", values)
        conn.execute("COMMIT")


SQLITE_QUERIES: Final = queries("sqlite")
TYPE_OF_TABLE: Final = {spec.table: entity_type for entity_type, spec in TABLES.items()}


async def observe(conn: asyncpg.Connection, writers: list[Writer]) -> Observed:
    """PostgreSQL (as the administrator sees it) and every workspace's outbox, now."""
    stamp = format_timestamp
    writes = [
        Write((TYPE_OF_TABLE[r[0]], r[1]), r[2], r[3], stamp(r[4]))
        for r in await conn.fetch(
            "SELECT entity_table, entity_id, idempotency_key, origin_id, updated_at"
            f" FROM {AUDIT_TABLE} ORDER BY at"
        )
    ]
    held = {}
    for entity_type, column in (("Session", "title"), ("Artifact", "content")):
        spec = TABLES[entity_type]
        for r in await conn.fetch(
            f"SELECT {spec.id_column}, idempotency_key, origin_id, updated_at, {column}"
            f" FROM acode.{spec.table}"
        ):
            held[(entity_type, r[0])] = Held(r[1], r[2], stamp(r[3]), r[4])
    conflicts = [
        ConflictRow((r[0], r[1]), (r[2], r[3]), stamp(r[4]), (r[5], r[6]), stamp(r[7]), r[8])
        for r in await conn.fetch(
            "SELECT entity_type, entity_id, incoming_key, incoming_origin, incoming_updated_at,"
            " current_key, current_origin, current_updated_at, winner"
            " FROM acode.conflicts ORDER BY conflict_id"
        )
    ]
    rows = [row for writer in writers for row in await anyio.to_thread.run_sync(writer.rows)]
    return Observed(writes, held, conflicts, rows)


# -- the simulation --------------------------------------------------------------------


@dataclass
class Simulation:
    seed: int
    features: frozenset[str]
    writers: list[Writer]
    proxy: TcpProxy
    admin: asyncpg.Connection
    admin_url: str
    role: str
    model: Model = field(default_factory=Model)
    steps: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        # Versions 30 s behind the clock, 1 to 50 microseconds apart.
        self.start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
        self.ticks = 0
        self.texts = 0
        self.planned = 0
        self.payloads: dict[tuple[str, str], str] = {}

    def has(self, feature: str) -> bool:
        return feature in self.features

    def tick(self) -> str:
        self.ticks += self.rng.randint(1, 50)
        return format_timestamp(self.start + timedelta(microseconds=self.ticks))

    @property
    def tally(self) -> Counter[str]:
        """Steps and faults injected, by kind (printed by the soak)."""
        return TALLY

    def log(self, text: str) -> None:
        self.steps.append(text)

    def report(self, problems: list[str]) -> str:
        chosen = sorted(self.features)
        command = (
            f"ACODE_GEN_SEEDS={self.seed} ACODE_GEN_FEATURES={','.join(chosen)} "
            f"ACODE_GEN_STEPS={self.planned} pytest tests/reliability/test_generative.py"
        )
        lines = [f"seed {self.seed}, features {chosen}", "steps:"]
        lines += [f"  {n:3} {s}" for n, s in enumerate(self.steps, 1)]
        lines += ["problems:", *(f"  - {p}" for p in problems[:40]), f"replay: {command}"]
        return "\n".join(lines)

    async def check(self, *, final: bool = False) -> None:
        seen = await observe(self.admin, self.writers)
        problems = (final_problems if final else invariants)(self.model, seen)
        if problems:
            pytest.fail(self.report(problems), pytrace=False)

    # -- writes ----------------------------------------------------------------------

    def entity(self, writer_index: int) -> tuple[Entity, str]:
        """An entity all writers share, and the session id this writer files it under."""
        if self.rng.random() < 0.6:
            sid = f"sess_gen{self.rng.randrange(SESSIONS)}"
            return ("Session", sid), sid
        n = self.rng.randrange(ARTIFACTS)
        sid = f"sess_gen{n}"
        if self.has("entity_across_sessions") and self.rng.random() < 0.5:
            sid = f"sess_gen{writer_index}"
        return ("Artifact", f"art_gen{n}"), sid

    def new_version(
        self,
        writer: Writer,
        *,
        poison: bool = False,
        stamp_mismatch: bool = False,
        filed: tuple[Entity, str] | None = None,
    ) -> Version:
        index = self.writers.index(writer)
        entity, session_id = filed or self.entity(index)
        stamp = self.tick()
        if self.has("ties") and self.rng.random() < 0.25:
            others = [
                w.last[entity]
                for w in self.writers
                if w is not writer
                and entity in w.last
                and w.last[entity] > writer.last.get(entity, "")
            ]
            stamp = max(others, default=stamp)
        base = writer.last.get(entity) if self.has("base") and self.rng.random() < 0.6 else None
        self.texts += 1
        entity_type, entity_id = entity
        return Version(
            entity_type,
            entity_id,
            session_id,
            writer.origin,
            stamp,
            base,
            f"{writer.name}-{self.texts}",
            poison=poison,
            stamp_mismatch=stamp_mismatch,
        )

    def write(self, writer: Writer, version: Version, outbox_id: int | None = None) -> None:
        self.payloads[version.ident] = payload(version, self.tick())
        insert(writer, version, outbox_id, self.payloads[version.ident])
        writer.last[version.entity] = version.updated_at
        self.model.accept(version)
        where = "" if outbox_id is None else f" at outbox_id {outbox_id}"
        self.log(f"{writer.name} writes {version.key} base={version.base} {version.text}{where}")

    def step_write(self, writer: Writer) -> None:
        outbox_id = None
        if self.has("explicit_ids") and self.rng.random() < 0.15:
            outbox_id = writer.top() + self.rng.randint(1, 5)
        poison = self.has("poison") and self.rng.random() < 0.05
        mismatch = self.has("payload_stamp_mismatch") and self.rng.random() < 0.1
        version = self.new_version(writer, poison=poison, stamp_mismatch=mismatch)
        self.write(writer, version, outbox_id)

    def race_on_one_artifact(self, writers: list[Writer]) -> None:
        """Each writer changes the same artifact, filed under a session of its own."""
        for writer in writers:
            filed = (("Artifact", "art_gen0"), f"sess_gen{self.writers.index(writer)}")
            self.write(writer, self.new_version(writer, filed=filed))

    def step_delete_pending(self, writer: Writer) -> None:
        pending = [r for r in writer.rows() if r.state == "pending"]
        if not pending:
            return
        row = self.rng.choice(pending)
        with sqlite(writer.workspace) as conn:
            conn.execute("DELETE FROM outbox WHERE outbox_id = ?", (row.outbox_id,))
        self.model.withdraw(row.ident)
        self.log(f"{writer.name} deletes pending {row.key} (outbox_id {row.outbox_id})")

    def step_reinsert(self, writer: Writer) -> None:
        mine = {r.key for r in writer.rows()}
        gone = [
            self.model.versions[i]
            for i in sorted(self.model.withdrawn)
            if i[1] == writer.origin and i[0] not in mine
        ]
        if gone:
            version = self.rng.choice(gone)
            insert(writer, version, None, self.payloads[version.ident])  # the same change
            self.model.accept(version)
            self.log(f"{writer.name} inserts {version.key} again")

    def step_replace_processed(self, writer: Writer, *, at_top: bool) -> None:
        """Delete a processed record and queue a new version in its outbox_id slot."""
        top = writer.top()
        processed = [r for r in writer.rows() if r.state == "processed"]
        slots = [r for r in processed if (r.outbox_id == top) == at_top]
        if not slots:
            return
        row = self.rng.choice(slots)
        with sqlite(writer.workspace) as conn:
            conn.execute("DELETE FROM outbox WHERE outbox_id = ?", (row.outbox_id,))
        self.log(f"{writer.name} deletes processed {row.key} (outbox_id {row.outbox_id})")
        self.write(writer, self.new_version(writer), row.outbox_id)

    def step_requeue(self, writer: Writer) -> None:
        processed = [r for r in writer.rows() if r.state == "processed"]
        if not processed:
            return
        row = self.rng.choice(processed)
        if self.has("requeue_processed_at_only") and self.rng.random() < 0.5:
            sql = "UPDATE outbox SET processed_at = NULL WHERE outbox_id = ?"
        else:
            sql = (
                "UPDATE outbox SET state = 'pending', processed_at = NULL, attempts = 0,"
                " next_attempt_at = NULL WHERE outbox_id = ?"
            )
        with sqlite(writer.workspace) as conn:
            conn.execute(sql, (row.outbox_id,))
        self.log(f"{writer.name} re-queues {row.key}: {sql.split(' WHERE')[0]}")

    async def step_prune(self) -> None:
        cutoff = datetime.now(UTC) + timedelta(days=1)
        owner = PostgresTarget(PostgresSettings(dsn=self.admin_url))  # partitions are DDL
        try:
            pruned = await owner.prune_applied_keys(cutoff)
        finally:
            await owner.close()
        self.log(f"prune_applied_keys(now + 1 day): {pruned} keys")
        self.model.forgotten |= {w.ident for w in (await observe(self.admin, self.writers)).writes}
        for writer in self.writers:
            self.step_requeue(writer)  # the late resends

    # -- drains and faults -----------------------------------------------------------

    async def drain(self, writer: Writer, hook: Callable[[str], None] | None = None) -> str:
        writer.syncer.fault_hook = hook
        try:
            summary = await writer.syncer.drain()
        except (AcodeError, InjectedFault) as error:
            if isinstance(error, InjectedKill):
                writer.restart()
            return type(error).__name__
        finally:
            writer.syncer.fault_hook = None
        return summary.line()

    def hook(self, kind: str) -> tuple[Callable[[str], None], str]:
        nth = self.rng.randint(1, 3)
        restart = self.rng.random() < 0.5

        def fail(fault: type[InjectedFault]) -> Callable[[], None]:
            def action() -> None:
                raise fault(kind)

            return action

        point, action = {
            "cut": ("before_commit", self.proxy.cut),
            "down": ("before_commit", self.proxy.down),
            "raise_before_commit": ("before_commit", fail(InjectedFault)),
            "raise_after_commit": (
                "after_commit",
                fail(InjectedKill if restart else InjectedFault),
            ),
            "kill_after_mark": ("after_mark", fail(InjectedKill)),
        }[kind]
        return AtNth(point, nth, action), f"{kind} at {point} #{nth}" + (
            " + restart" if kind == "raise_after_commit" and restart else ""
        )

    async def step_drain(self, writers: list[Writer], fault: str | None) -> None:
        hooks = [self.hook(fault) if fault else (None, "") for _ in writers]
        results: list[str] = [""] * len(writers)

        async def one(i: int) -> None:
            results[i] = await self.drain(writers[i], hooks[i][0])

        async with anyio.create_task_group() as tg:
            for i in range(len(writers)):
                tg.start_soon(one, i)
        self.proxy.restore()
        names = " + ".join(w.name for w in writers)
        faults = ", ".join(h[1] for h in hooks if h[1])
        self.log(f"drain {names}{' under ' + faults if faults else ''}: {'; '.join(results)}")

    @asynccontextmanager
    async def refusal(self, kind: str) -> AsyncIterator[None]:
        """The server refuses for its own state while the block runs."""
        role = f'"{self.role}"'
        locker = None
        if kind == "read_only":
            await self.admin.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
            await self._reconnect_role()
        elif kind == "revoke":
            await self.admin.execute(f"REVOKE INSERT ON {REVOKED} FROM {role}")
        else:
            locker = await asyncpg.connect(self.admin_url)
            await locker.execute("BEGIN; LOCK TABLE acode.sessions, acode.artifacts")
        try:
            yield
        finally:
            if kind == "read_only":
                await self.admin.execute(f"ALTER ROLE {role} RESET default_transaction_read_only")
                await self._reconnect_role()
            elif kind == "revoke":
                await self.admin.execute(f"GRANT INSERT ON {REVOKED} TO {role}")
            elif locker is not None:
                await locker.close()

    async def _reconnect_role(self) -> None:
        await self.admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            self.role,
        )

    async def step_refusal(self, writer: Writer, kind: str) -> None:
        results = []
        async with self.refusal(kind):
            for _ in range(4):  # past the strikes that make a batch suspect
                results.append(await self.drain(writer))
        self.log(f"drain {writer.name} x4 while the server refuses ({kind}): {'; '.join(results)}")

    # -- the run ---------------------------------------------------------------------

    async def run(self, steps: int) -> None:
        self.planned = steps
        faults = sorted(
            self.features
            & {"cut", "down", "raise_before_commit", "raise_after_commit", "kill_after_mark"}
        )
        refusals = sorted(self.features & {"read_only", "revoke", "lock"})
        choices: list[tuple[float, str]] = [
            (10, "write"),
            (4, "drain"),
            (3 if self.has("concurrent") else 0, "concurrent"),
            (4 if faults else 0, "fault"),
            (2 if refusals else 0, "refusal"),
            (1 if self.has("delete_reinsert") else 0, "delete"),
            (1 if self.has("delete_reinsert") else 0, "reinsert"),
            (1 if self.has("explicit_ids") else 0, "replace"),
            (1 if self.has("explicit_id_at_top") else 0, "replace_top"),
            (1 if self.has("requeue") else 0, "requeue"),
            (0.5 if self.has("prune_resend") else 0, "prune"),
        ]
        weights = [w for w, _ in choices]
        for _ in range(steps):
            (kind,) = self.rng.choices([k for _, k in choices], weights)
            self.tally[kind] += 1
            writer = self.rng.choice(self.writers)
            if kind == "write":
                self.step_write(writer)
            elif kind == "drain":
                await self.step_drain([writer], None)
            elif kind == "concurrent":
                racers = self.rng.sample(self.writers, 2)
                if self.has("entity_across_sessions"):
                    self.race_on_one_artifact(racers)
                await self.step_drain(racers, None)
            elif kind == "fault":
                fault = self.rng.choice(faults)
                self.tally[f"fault {fault}"] += 1
                pair = self.has("concurrent") and self.rng.random() < 0.4
                chosen = self.rng.sample(self.writers, 2) if pair else [writer]
                await self.step_drain(chosen, fault)
            elif kind == "refusal":
                refusal = self.rng.choice(refusals)
                self.tally[f"refusal {refusal}"] += 1
                await self.step_refusal(writer, refusal)
            elif kind == "delete":
                self.step_delete_pending(writer)
            elif kind == "reinsert":
                self.step_reinsert(writer)
            elif kind in ("replace", "replace_top"):
                self.step_replace_processed(writer, at_top=kind == "replace_top")
            elif kind == "requeue":
                self.step_requeue(writer)
            else:
                await self.step_prune()
            await self.check()
        await self.quiesce()
        await self.check(final=True)

    async def quiesce(self) -> None:
        """No fault: drain every workspace until nothing is left to claim (dead letters
        past their backoff included)."""
        self.proxy.restore()
        for _ in range(100):
            busy = False
            for writer in self.writers:
                await self.drain(writer)
                pending, _, _ = await writer.syncer.backlog()
                await writer.syncer.release()
                busy = busy or pending > 0
            if not busy:
                break
            await anyio.sleep(0.03)
        self.log("quiesce: drained every workspace")


# -- the test --------------------------------------------------------------------------


async def grant_role(admin: asyncpg.Connection, role: str) -> None:
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    await admin.execute(
        f'GRANT USAGE ON SCHEMA acode TO "{role}";'
        f' GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA acode TO "{role}";'
        f' GRANT USAGE ON ALL SEQUENCES IN SCHEMA acode TO "{role}";'
        f' GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA acode TO "{role}"'
    )


def role_url(url: str, role: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))


async def check_every_row_proves_its_digest(pg_url: str, directory: Path) -> None:
    """Every row PostgreSQL holds, restored into an empty workspace, rebuilds the canonical
    digest recorded with it (the store's, the syncer's or PostgreSQL's)."""

    def create() -> None:
        directory.mkdir()
        WorkspaceDatabase(directory).close()

    await anyio.to_thread.run_sync(create)
    report = await restore(PostgresSettings(dsn=pg_url), RestoreRequest(directory, Selection()))
    unproved = {t: c.not_reproducible for t, c in report.tables.items() if c.not_reproducible}
    assert not unproved, f"rows that do not rebuild their canonical digest: {unproved}"
    # (An artifact filed under a session PostgreSQL does not hold is skipped as an orphan.)
    assert report.total("restored") + report.total("skipped_orphan") == report.total("read")
    assert report.total("restored") > 0


async def simulate(
    seed: int,
    features: frozenset[str],
    steps: int,
    root: Path,
    pg_url: str,
    *,
    keep_history: bool = False,
) -> int:
    """One seeded history, checked after every step; the number of records written. With
    `keep_history`, the version history must hold exactly the writes PostgreSQL made."""
    admin_target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        await admin_target.ensure_schema()
    finally:
        await admin_target.close()
    await install_audit(pg_url)
    role = f"acode_gen_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(pg_url)
    parts = urlsplit(pg_url)
    proxy = TcpProxy(upstream=(parts.hostname or "127.0.0.1", parts.port or 5432)).start()
    writers: list[Writer] = []
    try:
        await grant_role(admin, role)
        for n in range(ORIGINS):
            workspace = root / f"w{n}"
            workspace.mkdir()
            WorkspaceDatabase(workspace).close()
            with sqlite(workspace) as conn:
                (origin,) = conn.execute(
                    "SELECT value FROM workspace_meta WHERE key = 'origin_id'"
                ).fetchone()
            dsn = proxy.dsn(role_url(pg_url, role))
            writers.append(Writer(f"w{n}", workspace, origin, dsn, keep_history))
        sim = Simulation(seed, features, writers, proxy, admin, pg_url, role)
        await sim.run(steps)
        if keep_history:
            await check_history(admin)
        await check_every_row_proves_its_digest(pg_url, root / "restored")
        return len(sim.model.versions)
    finally:
        for target in (t for writer in writers for t in writer.targets):
            await target.close()
        proxy.stop()
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.close()
        conn = await asyncpg.connect(ADMIN_URL)
        try:
            await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
        finally:
            await conn.close()


async def check_history(admin: asyncpg.Connection) -> None:
    """Every version PostgreSQL wrote to an entity table (the audit trigger saw it) is in
    the history once, and nothing else is."""
    writes = {
        (TYPE_OF_TABLE[r[0]], r[1], r[2], r[3])
        for r in await admin.fetch(
            f"SELECT entity_table, entity_id, idempotency_key, origin_id FROM {AUDIT_TABLE}"
        )
    }
    kept = [
        tuple(r)
        for r in await admin.fetch(
            "SELECT entity_type, entity_id, idempotency_key, origin_id FROM acode.entity_history"
        )
    ]
    assert len(kept) == len(set(kept))
    assert set(kept) == writes, (sorted(writes - set(kept))[:5], sorted(set(kept) - writes)[:5])
    assert writes


# A seed that passed found each of these to be zero (the checker fails on any other).
PASSED: Final = {"lost": 0, "dup": 0, "wrong": 0, "stuck": 0}


def _steps() -> int:
    default = int(plugin.scaled(CI_STEPS))
    return int(os.environ.get("ACODE_GEN_STEPS", default))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", seeds_from_environment())
async def test_generated_histories_match_the_model(seed: int, tmp_path: Path, pg_url: str) -> None:
    features = features_from(os.environ.get("ACODE_GEN_FEATURES", ""))
    started = time.monotonic()
    records = await simulate(seed, features, _steps(), tmp_path, pg_url)
    plugin.add_row(
        fault=f"generative checker, seed {seed}",
        runs=1,
        records=records,
        **PASSED,
        recovery_s=time.monotonic() - started,
    )


@pytest.mark.parametrize("seed", seeds_from_environment()[:3])
async def test_generated_histories_keep_every_written_version_once(
    seed: int, tmp_path: Path, pg_url: str
) -> None:
    """The same histories with postgres.keep_history on (every feature the environment
    asks for): the checker's invariants hold, and the version history is the writes."""
    features = features_from(os.environ.get("ACODE_GEN_FEATURES", ""))
    await simulate(seed, features, _steps(), tmp_path, pg_url, keep_history=True)


# Steps and faults injected in this process, by kind.
TALLY: Counter[str] = Counter()


def soak_minutes() -> float:
    return float(os.environ.get("ACODE_GEN_MINUTES", 10 if plugin.soak() else 0))


@pytest.mark.timeout(0)
@pytest.mark.skipif(not soak_minutes(), reason="soak only (--soak, or ACODE_GEN_MINUTES)")
async def test_generated_histories_for_minutes(tmp_path: Path) -> None:
    """Fresh seeds, each in a database of its own, until ACODE_GEN_MINUTES have passed."""
    features = features_from(os.environ.get("ACODE_GEN_FEATURES", ""))
    deadline = time.monotonic() + soak_minutes() * 60
    seed = int(os.environ.get("ACODE_GEN_FIRST_SEED", 1000))
    runs = records = 0
    while time.monotonic() < deadline:
        name = await create_database_async()
        try:
            root = tmp_path / str(seed)
            root.mkdir()
            records += await simulate(seed, features, _steps(), root, database_url(name))
        finally:
            await drop_database_async(name)
        seed, runs = seed + 1, runs + 1
    print(
        f"generative soak: seeds {seed - runs}-{seed - 1}, {_steps()} steps each, {records} records"
    )
    for kind, count in sorted(TALLY.items()):
        print(f"  {kind}: {count}")
    plugin.add_row(
        fault=f"generative checker, seeds {seed - runs}-{seed - 1}",
        runs=runs,
        records=records,
        **PASSED,
    )
