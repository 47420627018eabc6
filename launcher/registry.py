"""The run registry: one SQLite file under $FERRY_HOME, safe for concurrent writers.

WAL journaling lets readers proceed while one process writes, and a busy timeout makes a
second writer wait its turn instead of failing (several sweep trials finish at once).
Each write is a single short transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from payload.errors import FerryError

SCHEMA_VERSION = 1
SCHEMA = """
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
    trial: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Everything but the backend handle (its internals are not for users)."""
        out = asdict(self)
        del out["handle"]
        return out


_JSON_COLUMNS = ("resources", "summary", "trial")


class Registry:
    def __init__(self, path: Path | None = None):
        self.path = path or ferry_home() / "ferry.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FerryError(
                    f"{self.path} was written by a newer Ferry (schema {version}); upgrade Ferry."
                )
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    def add(self, record: RunRecord) -> None:
        row = self._to_row(record)
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._connect() as db:
            db.execute(f"INSERT INTO runs ({columns}) VALUES ({marks})", list(row.values()))

    def update(self, run_id: str, **changes: Any) -> RunRecord:
        changes["updated_at"] = time.time()
        for key in _JSON_COLUMNS:
            if key in changes and changes[key] is not None:
                changes[key] = json.dumps(changes[key])
        sets = ", ".join(f"{k} = ?" for k in changes)
        with self._connect() as db:
            db.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", [*changes.values(), run_id])
        return self.get(run_id)

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

    @staticmethod
    def _to_row(record: RunRecord) -> dict[str, Any]:
        row = record.to_dict()
        row["handle"] = record.handle
        for key in _JSON_COLUMNS:
            row[key] = json.dumps(row[key]) if row[key] is not None else None
        return row

    @staticmethod
    def _from_row(row: sqlite3.Row) -> RunRecord:
        data = dict(row)
        for key in _JSON_COLUMNS:
            data[key] = json.loads(data[key]) if data[key] else None
        data["resources"] = data["resources"] or {}
        return RunRecord(**data)
