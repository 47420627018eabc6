"""The SQLite run registry: round trips, lookups, and many writers at once."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from launcher.registry import Registry, RunRecord
from payload.errors import FerryError


def _record(run_id: str, **extra) -> RunRecord:
    now = time.time()
    return RunRecord(
        run_id=run_id,
        name="cfg",
        source="/x/cfg.yml",
        backend="local",
        state="pending",
        created_at=now,
        updated_at=now,
        run_dir="/tmp/r",
        resources={"gpus_per_node": 1},
        **extra,
    )


def test_round_trip_with_json_columns(ferry_home):
    registry = Registry()
    registry.add(_record("a-1", trial={"lr": 0.1}))
    registry.transition("a-1", "succeeded", expect=["pending"], summary={"final_loss": 1.5})
    got = registry.get("a-1")
    assert got.state == "succeeded" and got.summary == {"final_loss": 1.5}
    assert got.trial == {"lr": 0.1} and got.resources == {"gpus_per_node": 1}
    assert (ferry_home / "ferry.db").exists()


def test_unknown_run_suggests_close_ids(ferry_home):
    registry = Registry()
    registry.add(_record("quickstart-20260101-000000-abcd"))
    with pytest.raises(FerryError, match="Did you mean: quickstart-20260101-000000-abcd"):
        registry.get("20260101")


def _writer(home: str, worker: int, n: int) -> None:
    import os

    os.environ["FERRY_HOME"] = home
    registry = Registry()
    for i in range(n):
        run_id = f"w{worker}-{i}"
        registry.add(_record(run_id))
        registry.transition(run_id, "running", expect=["pending"])
        registry.transition(run_id, "succeeded", expect=["running"], summary={"i": i})


def test_concurrent_writers_lose_nothing(ferry_home):
    """Several processes (sweep trials finishing together) write at once; none may fail
    with 'database is locked' and every row must end up complete."""
    Registry()  # create the schema once, as the launcher does before spawning
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_writer, args=(str(ferry_home), w, 40)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    records = Registry().list()
    assert len(records) == 160
    assert all(r.state == "succeeded" and r.summary is not None for r in records)


def _dispatcher(home: str, runs: list[str], out) -> None:  # type: ignore[no-untyped-def]
    """Starts each run and records it succeeded, as a dispatcher and a status refresh do."""
    import os

    os.environ["FERRY_HOME"] = home
    registry = Registry()
    applied = []
    for run_id in runs:
        if registry.transition(run_id, "running", expect=["pending"]):
            applied.append((run_id, "running"))
        if registry.transition(run_id, "succeeded", expect=["running"]):
            applied.append((run_id, "succeeded"))
    out.put(applied)


def _canceller(home: str, runs: list[str], out) -> None:  # type: ignore[no-untyped-def]
    """Cancels each run that has not finished, as `launch sweep cancel` does."""
    import os

    os.environ["FERRY_HOME"] = home
    registry = Registry()
    applied = []
    for run_id in runs:
        if registry.transition(run_id, "cancelled", expect=["pending", "running"]):
            applied.append((run_id, "cancelled"))
    out.put(applied)


def test_concurrent_transitions_never_leave_a_terminal_state(ferry_home):
    """Two processes race over the same runs: one starts and finishes them, the other
    cancels them (in the opposite order, so they meet in the middle). Every run must end
    with exactly one terminal transition applied, and that state must be the one stored:
    a cancelled run is never written back to running or succeeded."""
    registry = Registry()
    runs = [f"race-{i:03d}" for i in range(300)]
    registry.add_many([_record(r) for r in runs])
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [
        ctx.Process(target=_dispatcher, args=(str(ferry_home), runs, out)),
        ctx.Process(target=_canceller, args=(str(ferry_home), runs[::-1], out)),
    ]
    for p in workers:
        p.start()
    applied = out.get(timeout=120) + out.get(timeout=120)
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    terminal: dict[str, list[str]] = {}
    for run_id, state in applied:
        if state in ("succeeded", "cancelled"):
            terminal.setdefault(run_id, []).append(state)
    assert sorted(terminal) == runs
    assert all(len(states) == 1 for states in terminal.values()), {
        r: s for r, s in terminal.items() if len(s) > 1
    }
    final = {r.run_id: r.state for r in registry.list()}
    assert final == {r: states[0] for r, states in terminal.items()}
    assert {"succeeded", "cancelled"} <= set(final.values())  # they really did race


def test_a_version_1_registry_is_migrated_in_place(ferry_home):
    """A registry written before sweeps existed opens, keeps its runs, and gains the new
    columns and table."""
    import sqlite3

    from launcher.registry import SCHEMA_V1, SCHEMA_VERSION

    ferry_home.mkdir(parents=True)
    db = sqlite3.connect(ferry_home / "ferry.db")
    db.executescript(SCHEMA_V1)
    db.execute(
        "INSERT INTO runs (run_id, name, source, backend, state, created_at, updated_at, "
        "run_dir, resources) VALUES ('old-1', 'cfg', '/x', 'local', 'succeeded', 1, 2, '/r', '{}')"
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()

    registry = Registry()
    old = registry.get("old-1")
    assert old.state == "succeeded" and old.attempts == 1 and old.started_at is None
    registry.update("old-1", started_at=5.0)
    assert registry.transition("old-1", "running", expect=["pending"]) is None  # it succeeded
    assert registry.get("old-1").started_at == 5.0
    with sqlite3.connect(ferry_home / "ferry.db") as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert check.execute("SELECT count(*) FROM sweeps").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("state", "backend", "words"),
    [("succeeded", "local", "already succeeded"), ("cancelled", "", "never started")],
)
def test_resume_refuses_runs_it_cannot_continue(ferry_home, state, backend, words):
    from helpers import launch

    Registry().add(_replace(_record("r-1"), state=state, backend=backend))
    result = launch("resume", "r-1")
    assert result.returncode == 1 and words in result.stderr


def _replace(record: RunRecord, **changes) -> RunRecord:
    import dataclasses

    return dataclasses.replace(record, **changes)
