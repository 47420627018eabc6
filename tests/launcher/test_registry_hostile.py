"""The run registry meets a hostile world: a lock held too long, a file that is not a
registry, one from a newer Ferry, an unwritable FERRY_HOME. Each is one clear error from
the real CLI that names the file, exits 1, and leaves the file as it was.

Everything here is real: a second process holding a real SQLite lock, real files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import launch, quickstart_config

HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[2] == "exclusive-mode":  # readers are shut out too
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(60)
"""


def _hold_lock(db: Path, mode: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(db), mode], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def _clean_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return " ".join(result.stderr.split())  # the paragraph, whatever the terminal wrapped


@pytest.mark.parametrize(
    ("mode", "command"),
    [
        ("write", "train"),  # another writer: a new run cannot be recorded
        ("exclusive-mode", "runs"),  # e.g. the sqlite3 shell: even listing cannot read
    ],
)
def test_locked_registry_fails_after_the_timeout_naming_the_file(
    ferry_home, tmp_path, mode, command
):
    """A failure means a lock held by another process ends in a raw
    sqlite3.OperationalError, or waits much longer than FERRY_REGISTRY_TIMEOUT."""
    db = ferry_home / "ferry.db"
    launch("runs", check=True)  # the registry exists, as after any earlier launch
    args = ["train", str(quickstart_config(tmp_path))] if command == "train" else ["runs"]
    holder = _hold_lock(db, mode)
    try:
        result = launch(*args, env={"FERRY_REGISTRY_TIMEOUT": "1"}, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    message = _clean_error(result)
    assert f"The run registry {db} is locked by another process" in message
    assert "held it longer than 1 s" in message
    assert "FERRY_REGISTRY_TIMEOUT=<seconds> waits longer" in message
    assert launch("runs", check=True).stdout.startswith("No runs yet")  # nothing recorded


@pytest.mark.parametrize("value", ["soon", "inf", "nan", "-1"])
def test_bad_registry_timeout_names_the_variable(value):
    """A failure means a typo in FERRY_REGISTRY_TIMEOUT crashes or is silently ignored."""
    message = _clean_error(launch("runs", env={"FERRY_REGISTRY_TIMEOUT": value}))
    assert f"FERRY_REGISTRY_TIMEOUT='{value}' is not a number of seconds (0 or more)." in message


def test_registry_errors_are_explained_from_the_message_alone_as_on_python_3_10(tmp_path):
    """Python 3.10's sqlite3 errors carry no result code: the message decides."""
    import sqlite3

    from launcher.registry import Registry

    registry = Registry(tmp_path / "ferry.db")
    for text, words in [
        ("database is locked", "is locked by another process"),
        ("file is not a database", "is not a readable Ferry run registry"),
        ("database or disk is full", "no space left on device"),
    ]:
        error = sqlite3.OperationalError(text)
        assert not hasattr(error, "sqlite_errorcode")
        assert words in registry._explain(error).message
    assert registry._explain(sqlite3.OperationalError("near 'x': syntax error")) is None


def test_corrupt_registry_is_named_and_left_as_it_was(ferry_home):
    """A failure means garbage in ferry.db gives a traceback, or Ferry writes over it
    (it may hold the only record of the user's runs)."""
    ferry_home.mkdir(parents=True)
    db = ferry_home / "ferry.db"
    garbage = bytes(range(256)) * 20
    db.write_bytes(garbage)
    message = _clean_error(launch("runs"))
    assert f"{db} is not a readable Ferry run registry (file is not a database)" in message
    assert f"Move it aside (mv {db} {db}.bad)" in message
    assert db.read_bytes() == garbage
    assert sorted(p.name for p in ferry_home.iterdir()) == ["ferry.db"]


def test_registry_from_a_newer_ferry_is_refused_unchanged(ferry_home):
    """A failure means a newer schema is migrated "down", opened as if known, or touched."""
    ferry_home.mkdir(parents=True)
    db = ferry_home / "ferry.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, hologram BLOB)")
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = db.read_bytes()
    message = _clean_error(launch("runs"))
    assert f"{db} was written by a newer Ferry (schema 99; this one knows 3)." in message
    assert "Upgrade Ferry" in message
    assert db.read_bytes() == before


def test_ferry_home_under_a_file_is_named(tmp_path):
    """A failure means a FERRY_HOME that cannot be a folder (a file is in the way, which
    stops root too) ends in a NotADirectoryError traceback."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file\n")
    home = blocker / "home"
    message = _clean_error(launch("runs", env={"FERRY_HOME": str(home)}))
    assert f"Cannot create the Ferry home folder {home} for the run registry" in message
    assert f"a file is in the way (Not a directory: {home})" in message
    assert "Point FERRY_HOME at a folder you can write to" in message
    assert blocker.read_text() == "a file\n"


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root writes into a 0o500 folder anyway; the file-in-the-way test covers root",
)
def test_read_only_ferry_home_is_named(tmp_path):
    """A failure means a FERRY_HOME without write permission ends in a sqlite3
    traceback instead of naming the registry file."""
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o500)
    try:
        message = _clean_error(launch("runs", env={"FERRY_HOME": str(home)}))
    finally:
        home.chmod(0o700)
    assert f"Cannot write the run registry {home / 'ferry.db'}" in message
    assert "Point FERRY_HOME at a folder you can write to" in message
