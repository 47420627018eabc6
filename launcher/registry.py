"""The run registry: one SQLite file under $FERRY_HOME, safe for concurrent writers.

WAL journaling lets readers proceed while one process writes, and a busy timeout makes a
second writer wait its turn instead of failing (several sweep trials finish at once).
Each write is a single short transaction. The wait is FERRY_REGISTRY_TIMEOUT seconds
(default 30); past it, and for a file that is not a registry, one from a newer Ferry or a
FERRY_HOME that cannot be written, the user gets a FerryError naming the file.

A run's or a sweep's state changes only by compare-and-set (`transition`): the write
names the states it expects to find and does nothing if another process moved the run
meanwhile. So a run cancelled from one shell is never written back to running by a
dispatcher or a status refresh in another.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from payload.errors import FerryError

# Version 1 is the first schema; each later version is a list of statements that turns the
# one before it into it. A new database runs them all, an old one the ones it lacks.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS runs (
    run_id       TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    source       TEXT NOT NULL,
    backend      TEXT NOT NULL,
    state        TEXT NOT NULL,
    detail       TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    run_dir      TEXT NOT NULL,
    output_dir   TEXT,
    resources    TEXT NOT NULL,
    handle       TEXT,
    summary      TEXT,
    sweep_id     TEXT,
    trial        TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at);
CREATE INDEX IF NOT EXISTS runs_sweep ON runs (sweep_id);
"""
MIGRATIONS: dict[int, list[str]] = {
    2: [
        "ALTER TABLE runs ADD COLUMN started_at REAL",
        "ALTER TABLE runs ADD COLUMN finished_at REAL",
        "ALTER TABLE runs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1",  # v1 runs ran once
        """CREATE TABLE IF NOT EXISTS sweeps (
            sweep_id      TEXT PRIMARY KEY,
            name          TEXT NOT NULL,
            source        TEXT NOT NULL,
            sweep_file    TEXT NOT NULL,
            spec          TEXT NOT NULL,
            backends      TEXT NOT NULL,
            max_parallel  INTEGER NOT NULL,
            state         TEXT NOT NULL,
            created_at    REAL NOT NULL,
            updated_at    REAL NOT NULL,
            dispatcher    TEXT
        )""",
    ],
}
MIGRATIONS[3] = ["ALTER TABLE runs ADD COLUMN storage_uri TEXT"]
SCHEMA_VERSION = max(MIGRATIONS)
DEFAULT_TIMEOUT_S = 30.0


# SQLite's primary result codes (sqlite3 exposes them from Python 3.11 only), and how
# its messages word them, for Python 3.10.
_PERM, _BUSY, _LOCKED, _READONLY, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 3, 5, 6, 8, 11, 13, 14, 26
_SQLITE_MESSAGES = {
    "database is locked": _BUSY,
    "database table is locked": _LOCKED,
    "file is not a database": _NOTADB,
    "database disk image is malformed": _CORRUPT,
    "unable to open database file": _CANTOPEN,
    "attempt to write a readonly database": _READONLY,
    "database or disk is full": _FULL,
}


def busy_timeout() -> float:
    """Seconds to wait for another process's lock on the registry: $FERRY_REGISTRY_TIMEOUT,
    else 30."""
    raw = os.environ.get("FERRY_REGISTRY_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 10**6:  # also nan and inf
        raise FerryError(
            f"FERRY_REGISTRY_TIMEOUT={raw!r} is not a number of seconds (0 or more).",
            hint="Unset it to wait the default 30 s.",
        )
    return seconds


def ferry_home() -> Path:
    """Where Ferry keeps its registry and run folders: $FERRY_HOME, else ~/.ferry."""
    return Path(os.environ.get("FERRY_HOME") or Path.home() / ".ferry").expanduser()


@dataclass
class RunRecord:
    run_id: str
    name: str
    source: str  # the config as the user gave it (path or URL)
    backend: str
    state: str
    created_at: float
    updated_at: float
    run_dir: str
    resources: dict[str, Any]
    output_dir: str | None = None
    detail: str | None = None
    handle: str | None = None  # executors.base.Handle as JSON
    summary: dict[str, Any] | None = None
    sweep_id: str | None = None
    trial: dict[str, Any] | None = None  # {"index", "name", "values"} for a sweep's trial
    started_at: float | None = None  # last submitted
    finished_at: float | None = None
    attempts: int = 0  # times submitted
    storage_uri: str | None = None  # where its checkpoints and artifacts are synced

    def to_dict(self) -> dict[str, Any]:
        """Everything but the backend handle (its internals are not for users)."""
        out = asdict(self)
        del out["handle"]
        return out


@dataclass
class SweepRecord:
    sweep_id: str
    name: str
    source: str  # the base config as given
    sweep_file: str
    spec: dict[str, Any]  # the sweep mapping as read
    backends: list[str]
    max_parallel: int  # trials at once per backend
    state: str  # running | finished | cancelled
    created_at: float
    updated_at: float
    dispatcher: dict[str, Any] | None = None  # {"pid", "log"} of a detached dispatcher

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_JSON_COLUMNS = ("resources", "summary", "trial", "spec", "backends", "dispatcher")


class Registry:
    def __init__(self, path: Path | None = None, timeout: float | None = None):
        self.path = path or ferry_home() / "ferry.db"
        self.timeout = busy_timeout() if timeout is None else timeout
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = e.strerror or str(e)
            if isinstance(e, (FileExistsError, NotADirectoryError)):
                why = f"a file is in the way ({why}: {e.filename})"
            raise FerryError(
                f"Cannot create the Ferry home folder {self.path.parent} for the run registry: "
                f"{why}.",
                hint="Point FERRY_HOME at a folder you can write to (default ~/.ferry).",
            ) from e
        # The version is read before anything else touches the file (even the journal
        # mode): a registry from a newer Ferry, or a file that is none, is left as it was.
        with self._connect(journal=False) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FerryError(
                    f"{self.path} was written by a newer Ferry (schema {version}; this one "
                    f"knows {SCHEMA_VERSION}). It was left unchanged.",
                    hint="Upgrade Ferry (pip install -U ferry), or point FERRY_HOME elsewhere.",
                )
            db.execute("PRAGMA journal_mode=WAL")
            if version == 0:
                db.executescript(SCHEMA_V1)
                version = 1
            for target in range(version + 1, SCHEMA_VERSION + 1):
                db.execute("BEGIN IMMEDIATE")
                current = db.execute("PRAGMA user_version").fetchone()[0]
                if current < target:  # another process may have migrated meanwhile
                    for statement in MIGRATIONS[target]:
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {target}")
                db.execute("COMMIT")

    @contextmanager
    def _connect(self, journal: bool = True) -> Iterator[sqlite3.Connection]:
        """A connection for one short piece of work; SQLite's errors that the user can act
        on (a lock held too long, a file that is not a registry, an unwritable folder)
        leave it as a FerryError naming the file."""
        db = None
        try:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            if journal:
                db.execute("PRAGMA journal_mode=WAL")
            db.row_factory = sqlite3.Row
            yield db
        except sqlite3.Error as e:
            problem = self._explain(e)
            if problem is None:
                raise
            raise problem from e
        finally:
            if db is not None:
                db.close()

    def _explain(self, error: sqlite3.Error) -> FerryError | None:
        """The user's version of an SQLite error, by its result code; None for the rest
        (a bug in Ferry, which keeps its traceback)."""
        code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
        if code is None:  # Python 3.10: only the message, which SQLite words per code
            code = next((c for text, c in _SQLITE_MESSAGES.items() if text in str(error)), None)
        if code is None:
            return None
        code &= 0xFF  # the primary code; the extended part says which variant
        if code in (_BUSY, _LOCKED):
            return FerryError(
                f"The run registry {self.path} is locked by another process, which held it "
                f"longer than {self.timeout:g} s (another `launch` writing to it, or a tool "
                "such as the sqlite3 shell with a transaction open).",
                hint="Let that process finish or close it, then try again; "
                "FERRY_REGISTRY_TIMEOUT=<seconds> waits longer.",
            )
        if code in (_NOTADB, _CORRUPT):
            return FerryError(
                f"{self.path} is not a readable Ferry run registry ({error}). "
                "Ferry left it unchanged.",
                hint=f"Move it aside (mv {self.path} {self.path}.bad) and Ferry starts a new, "
                "empty registry; the runs' folders under FERRY_HOME are kept.",
            )
        if code in (_CANTOPEN, _READONLY, _PERM):
            return FerryError(
                f"Cannot write the run registry {self.path} ({error}).",
                hint="Point FERRY_HOME at a folder you can write to (default ~/.ferry), "
                "or fix the permissions of that folder and file.",
            )
        if code == _FULL:
            return FerryError(
                f"Cannot write the run registry {self.path}: no space left on device.",
                hint="Free some space there, or point FERRY_HOME at another disk.",
            )
        return None

    def add(self, record: RunRecord) -> None:
        self._insert("runs", self._to_row(record))

    def add_many(self, records: list[RunRecord]) -> None:
        """Insert several runs in one transaction (a sweep's trials)."""
        rows = [self._to_row(r) for r in records]
        if not rows:
            return
        columns = ", ".join(rows[0])
        marks = ", ".join("?" for _ in rows[0])
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                f"INSERT INTO runs ({columns}) VALUES ({marks})", [list(r.values()) for r in rows]
            )
            db.execute("COMMIT")

    def update(self, run_id: str, **changes: Any) -> RunRecord:
        """Change a run's other fields; its state changes only through `transition`."""
        assert "state" not in changes, "state changes go through Registry.transition"
        self._update("runs", "run_id", run_id, changes)
        return self.get(run_id)

    def transition(
        self, run_id: str, state: str, expect: Iterable[str], **changes: Any
    ) -> RunRecord | None:
        """Move the run to `state` (with `changes`) if its state is one of `expect` now;
        the new record, or None if it was in another state (and nothing was written)."""
        if not self._update("runs", "run_id", run_id, {**changes, "state": state}, expect):
            return None
        return self.get(run_id)

    def add_sweep(self, sweep: SweepRecord) -> None:
        self._insert("sweeps", self._to_row(sweep))

    def update_sweep(self, sweep_id: str, **changes: Any) -> SweepRecord:
        """Change a sweep's other fields; its state changes only through
        `transition_sweep`."""
        assert "state" not in changes, "state changes go through Registry.transition_sweep"
        self._update("sweeps", "sweep_id", sweep_id, changes)
        return self.get_sweep(sweep_id)

    def transition_sweep(
        self, sweep_id: str, state: str, expect: Iterable[str], **changes: Any
    ) -> SweepRecord | None:
        """Compare-and-set of a sweep's state, as `transition` for runs."""
        if not self._update("sweeps", "sweep_id", sweep_id, {**changes, "state": state}, expect):
            return None
        return self.get_sweep(sweep_id)

    def get_sweep(self, sweep_id: str) -> SweepRecord:
        with self._connect() as db:
            row = db.execute("SELECT * FROM sweeps WHERE sweep_id = ?", (sweep_id,)).fetchone()
        if row is None:
            raise FerryError(
                f"No sweep {sweep_id!r} in {self.path}.",
                hint="Sweep ids are printed by `launch sweep`; `launch runs` lists their trials.",
            )
        return SweepRecord(**self._decode(row))

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._connect() as db:
            db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(row.values()))

    def _update(
        self,
        table: str,
        key: str,
        value: str,
        changes: dict[str, Any],
        expect: Iterable[str] | None = None,
    ) -> bool:
        """One UPDATE; with `expect`, only where the state is one of those. True if a row
        was written."""
        changes = {**changes, "updated_at": time.time()}
        for column in _JSON_COLUMNS:
            if changes.get(column) is not None:
                changes[column] = json.dumps(changes[column])
        sets = ", ".join(f"{k} = ?" for k in changes)
        where, args = f"{key} = ?", [value]
        if expect is not None:
            states = list(expect)
            where += f" AND state IN ({', '.join('?' for _ in states)})"
            args += states
        with self._connect() as db:
            cursor = db.execute(
                f"UPDATE {table} SET {sets} WHERE {where}", [*changes.values(), *args]
            )
            return cursor.rowcount == 1

    def get(self, run_id: str) -> RunRecord:
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                close = db.execute(
                    "SELECT run_id FROM runs WHERE run_id LIKE ? ORDER BY created_at DESC LIMIT 5",
                    (f"%{run_id}%",),
                ).fetchall()
        if row is None:
            hint = f" Did you mean: {', '.join(r[0] for r in close)}?" if close else ""
            raise FerryError(
                f"No run {run_id!r} in {self.path}.{hint}", hint="List runs with `launch runs`."
            )
        return self._from_row(row)

    def list(self, limit: int | None = None, sweep_id: str | None = None) -> list[RunRecord]:
        query = "SELECT * FROM runs"
        args: list[Any] = []
        if sweep_id:
            query += " WHERE sweep_id = ?"
            args.append(sweep_id)
        query += " ORDER BY created_at DESC"
        if limit:
            query += f" LIMIT {int(limit)}"
        with self._connect() as db:
            return [self._from_row(r) for r in db.execute(query, args).fetchall()]

    def trials(self, sweep_id: str) -> list[RunRecord]:
        """A sweep's trials in trial order."""
        return sorted(self.list(sweep_id=sweep_id), key=lambda r: (r.trial or {}).get("index", 0))

    @staticmethod
    def _to_row(record: RunRecord | SweepRecord) -> dict[str, Any]:
        row = asdict(record)
        for key in _JSON_COLUMNS:
            if key in row and row[key] is not None:
                row[key] = json.dumps(row[key])
        return row

    @staticmethod
    def _decode(row: sqlite3.Row) -> dict[str, Any]:
        data = dict(row)
        for key in _JSON_COLUMNS:
            if key in data:
                data[key] = json.loads(data[key]) if data[key] else None
        return data

    def _from_row(self, row: sqlite3.Row) -> RunRecord:
        data = self._decode(row)
        data["resources"] = data["resources"] or {}
        return RunRecord(**data)
