"""A load generator for the reliability suite, run as a child process.

    python -m tests.reliability.loadgen --ledger FILE [options] WORKSPACE...

It writes into the workspaces in two ways, at random:

- through the store API (`WorkspaceDatabase.save`): new sessions, tasks and events, and
  updates of sessions and tasks it saved earlier;
- through the plain-INSERT contract of docs/schema.md: stdlib sqlite3, `BEGIN
  IMMEDIATE`, the artifact row and `INSERT INTO outbox` naming only the six columns,
  `COMMIT` (new artifacts and updates of earlier ones).

After each commit returned, and only then, it appends the record to the ledger (one
JSON line, flushed): key, entity, version, origin, the payload's SHA-256 and one column's
value. A writer killed between a commit and its ledger line leaves that record
unledgered; the checker reports those apart.

It stops after `--seconds`, after `--records`, or when `--stop-file` exists;
`--die-after-commit N` makes it SIGKILL itself after its Nth commit, before the ledger
line (a record that is certainly unledgered).
With `--shared-sessions N` it instead saves the same N session ids (sess_shared_0...)
over and over, titled with `--tag` (the clock-skew scenario: two writers, two
workspaces, the same entities); `--clock-offset` shifts its clock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from acode_sync.domain import (
    ALLOWED_TRANSITIONS,
    Entity,
    Session,
    SessionEvent,
    SessionState,
    SessionTask,
    format_timestamp,
    idempotency_key,
    new_id,
    next_version,
)
from acode_sync.store import WorkspaceDatabase, encode_json
from acode_sync.workspace import OpenOptions, database_path

INSERT_OUTBOX = (
    "INSERT INTO outbox (idempotency_key, entity_type, entity_id, session_id, payload, "
    "created_at) VALUES (?, ?, ?, ?, ?, ?)"
)
STATES = (SessionState.PLANNING, SessionState.EXECUTING, SessionState.PAUSED)


class Ledger:
    def __init__(self, path: Path, *, fsync: bool, die_at: int = 0) -> None:
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self._fsync = fsync
        self._die_at = die_at
        self.count = 0

    def append(self, entry: dict[str, Any]) -> None:
        if self.count + 1 == self._die_at:  # committed, not ledgered: die right here
            os.kill(os.getpid(), signal.SIGKILL)
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self.count += 1

    def close(self) -> None:
        self._file.close()


@dataclass
class Workspace:
    path: Path
    db: WorkspaceDatabase
    plain: sqlite3.Connection
    origin: str
    sessions: list[Session] = field(default_factory=list)
    tasks: list[SessionTask] = field(default_factory=list)
    artifacts: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # id: s, c, v


def entry(entity: Entity, origin: str, column: str, value: Any) -> dict[str, Any]:
    assert entity.updated_at is not None
    payload = encode_json(entity.row())
    return {
        "key": idempotency_key(entity.entity_type, entity.entity_id, entity.updated_at),
        "entity_type": entity.entity_type,
        "entity_id": entity.entity_id,
        "updated_at": entity.updated_at,
        "origin": origin,
        "digest": hashlib.sha256(payload.encode()).hexdigest(),
        "check_column": column,
        "check_value": value,
    }


class Writer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.offset = timedelta(seconds=args.clock_offset)
        self.ledger = Ledger(args.ledger, fsync=args.fsync, die_at=args.die_after_commit)
        self.n = 0
        self.workspaces = [self._open(Path(p)) for p in args.workspaces]

    def clock(self) -> datetime:
        """This writer's clock: the real one shifted by --clock-offset."""
        return datetime.now(UTC) + self.offset

    def _open(self, path: Path) -> Workspace:
        path.mkdir(parents=True, exist_ok=True)
        db = WorkspaceDatabase(path, OpenOptions(busy_timeout=60.0, clock=self.clock))
        plain = sqlite3.connect(database_path(path), isolation_level=None, timeout=60)
        plain.execute("PRAGMA busy_timeout = 60000")
        plain.execute("PRAGMA foreign_keys = ON")
        plain.execute("PRAGMA synchronous = FULL")
        return Workspace(path, db, plain, db.origin_id)

    def title(self) -> str:
        self.n += 1
        return f"{self.args.tag} {self.n} {self.rng.randrange(10**9)}"

    # -- the store API -----------------------------------------------------------------

    def new_session(self, ws: Workspace) -> None:
        title = self.title()
        saved = ws.db.save(Session(title=title, metadata={"n": self.n, "tag": self.args.tag}))
        self.ledger.append(entry(saved, ws.origin, "title", title))
        ws.sessions.append(saved)

    def update_session(self, ws: Workspace) -> None:
        index = self.rng.randrange(len(ws.sessions))
        title = self.title()
        session = ws.sessions[index]
        moves = [s for s in STATES if s in ALLOWED_TRANSITIONS[session.state]]
        state = self.rng.choice(moves) if moves and self.rng.random() < 0.5 else session.state
        saved = ws.db.save(replace(session, title=title, state=state))
        self.ledger.append(entry(saved, ws.origin, "title", title))
        ws.sessions[index] = saved

    def new_task(self, ws: Workspace) -> None:
        title = self.title()
        session = self.rng.choice(ws.sessions)
        saved = ws.db.save(SessionTask(session_id=session.session_id, title=title))
        self.ledger.append(entry(saved, ws.origin, "title", title))
        ws.tasks.append(saved)

    def update_task(self, ws: Workspace) -> None:
        index = self.rng.randrange(len(ws.tasks))
        title = self.title()
        status = self.rng.choice(("running", "done", "failed"))
        saved = ws.db.save(replace(ws.tasks[index], title=title, status=status))
        self.ledger.append(entry(saved, ws.origin, "title", title))
        ws.tasks[index] = saved

    def new_event(self, ws: Workspace) -> None:
        session = self.rng.choice(ws.sessions)
        kind = f"message {self.title()}"
        saved = ws.db.save(
            SessionEvent(session_id=session.session_id, event_type=kind, payload={"n": self.n})
        )
        self.ledger.append(entry(saved, ws.origin, "event_type", kind))

    # -- the plain-INSERT contract (docs/schema.md) ---------------------------------------

    def plain_artifact(self, ws: Workspace) -> None:
        content = self.title()
        now = self.clock()
        if ws.artifacts and self.rng.random() < 0.5:
            artifact_id = self.rng.choice(list(ws.artifacts))
            session_id, created_at, previous = ws.artifacts[artifact_id]
            updated_at = next_version(now, previous)
            statement = "UPDATE artifacts SET content = ?, updated_at = ? WHERE artifact_id = ?"
            params: tuple[Any, ...] = (content, updated_at, artifact_id)
        else:
            artifact_id = new_id("art")
            session_id = self.rng.choice(ws.sessions).session_id
            created_at = updated_at = format_timestamp(now)
            statement = (
                "INSERT INTO artifacts (artifact_id, session_id, type, content, name, "
                "created_at, updated_at) VALUES (?, ?, 'text', ?, 'notes', ?, ?)"
            )
            params = (artifact_id, session_id, content, created_at, updated_at)
        row = {
            "artifact_id": artifact_id,
            "session_id": session_id,
            "type": "text",
            "content": content,
            "name": "notes",
            "created_at": created_at,
            "updated_at": updated_at,
        }
        payload = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
        key = f"Artifact:{artifact_id}:{updated_at}"
        conn = ws.plain
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(statement, params)
            conn.execute(
                INSERT_OUTBOX, (key, "Artifact", artifact_id, session_id, payload, updated_at)
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        ws.artifacts[artifact_id] = (session_id, created_at, updated_at)
        self.ledger.append(
            {
                "key": key,
                "entity_type": "Artifact",
                "entity_id": artifact_id,
                "updated_at": updated_at,
                "origin": ws.origin,
                "digest": hashlib.sha256(payload.encode()).hexdigest(),
                "check_column": "content",
                "check_value": content,
            }
        )

    # -- the loop ------------------------------------------------------------------------

    def step(self) -> None:
        ws = self.rng.choice(self.workspaces)
        if not ws.sessions:
            self.new_session(ws)
            return
        roll = self.rng.random()
        if roll < 0.15:
            self.new_session(ws)
        elif roll < 0.35:
            self.update_session(ws)
        elif roll < 0.45 or not ws.tasks:
            self.new_task(ws)
        elif roll < 0.6:
            self.update_task(ws)
        elif roll < 0.75:
            self.new_event(ws)
        else:
            self.plain_artifact(ws)

    def shared_step(self, number: int) -> None:
        """The same session ids in every writer: sess_shared_<n>, titled by the tag."""
        ws = self.workspaces[0]
        session_id = f"sess_shared_{number % self.args.shared_sessions}"
        title = self.title()
        saved = ws.db.save(Session(session_id=session_id, title=title))
        self.ledger.append(entry(saved, ws.origin, "title", title))

    def run(self) -> None:
        deadline = time.monotonic() + self.args.seconds
        stop = Path(self.args.stop_file) if self.args.stop_file else None
        number = 0
        while self.ledger.count < self.args.records and time.monotonic() < deadline:
            if stop is not None and stop.exists():
                break
            if self.args.shared_sessions:
                self.shared_step(number)
            else:
                self.step()
            number += 1
            if self.args.pause:
                time.sleep(self.rng.uniform(0, 2 * self.args.pause))

    def close(self) -> None:
        for ws in self.workspaces:
            ws.plain.close()
            ws.db.close()
        self.ledger.close()


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadgen")
    parser.add_argument("workspaces", nargs="+")
    parser.add_argument("--ledger", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--records", type=int, default=10**9)
    parser.add_argument("--stop-file")
    parser.add_argument("--pause", type=float, default=0.0, help="mean sleep between writes")
    parser.add_argument("--clock-offset", type=float, default=0.0, help="seconds")
    parser.add_argument("--shared-sessions", type=int, default=0)
    parser.add_argument("--tag", default="load")
    parser.add_argument("--fsync", action="store_true")
    parser.add_argument(
        "--die-after-commit",
        type=int,
        default=0,
        metavar="N",
        help="SIGKILL itself after the Nth commit, before its ledger line",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    writer = Writer(parse(argv))
    try:
        writer.run()
    finally:
        writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
