"""A full disk during a checkpoint write: the run fails naming the checkpoint and "no
space left on device", and the checkpoint before it stays the newest complete one in
storage and still verifies.

The disk is real: the run's storage folder is a 3 MiB tmpfs, room for one ~2 MB
checkpoint of the quickstart but not two. Mounting one needs root (or CAP_SYS_ADMIN);
elsewhere the test skips and says so."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest
from helpers import launch, quickstart_config

from payload.storage import download_folder, latest_complete_checkpoint, open_store


@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A 3 MiB filesystem of its own, unmounted afterwards."""
    where = tmp_path / "tiny-disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            "cannot make a full disk here: mounting a 3 MiB tmpfs needs root or "
            f"CAP_SYS_ADMIN ({mounted.stderr.strip() or 'mount failed'})"
        )
    try:
        yield where
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_full_storage_disk_fails_the_run_and_keeps_the_previous_checkpoint(
    tmp_path, ferry_home, tiny_disk
):
    """A failure means a full disk during a checkpoint upload ends the run without the
    reason (or as a success), or leaves a half-written checkpoint looking newest."""
    cfg = quickstart_config(
        tmp_path, "max_steps: 4\nnum_epochs: null\nsave_steps: 2\nlogging_steps: 1\n"
    )
    result = launch("train", str(cfg), "--storage", f"file://{tiny_disk}/store", timeout=240)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    said = " ".join(result.stdout.split())
    assert "storage: checkpoint-2 synced" in said
    assert "1 checkpoint upload(s) to file://" in said
    assert "failed: checkpoint-4: no space left on device writing " in said
    assert (
        "The newest complete checkpoint in storage is still checkpoint-2; "
        "`launch resume` continues from it." in said
    )

    assert "rank 0 exited with code 70" in said  # a runtime failure: a backend may retry
    (run_folder,) = (tiny_disk / "store").iterdir()
    record = json.loads(launch("status", run_folder.name, "--json", check=True).stdout)
    assert record["state"] == "failed"
    assert "checkpoint-4: no space left on device" in record["detail"]

    store = open_store(f"file://{run_folder}")
    newest = latest_complete_checkpoint(store)
    assert newest is not None and newest.step == 2
    manifest = download_folder(store, newest.prefix, tmp_path / "pulled")  # verifies sha256
    assert manifest.step == 2
    assert (tmp_path / "pulled" / "adapter_model.safetensors").stat().st_size == 629744


@pytest.mark.slow
def test_full_output_disk_during_a_save_fails_the_run_and_keeps_the_previous_checkpoint(
    tmp_path, ferry_home, tiny_disk
):
    """A checkpoint save that runs out of room in output_dir ends the run with the reason
    and the checkpoint named, not a torch traceback, and the half-written checkpoint is
    removed (a relaunch without storage would take it for the newest); the previous one
    in storage stays the newest and verifies."""
    output_dir = tiny_disk / "out"
    cfg = quickstart_config(
        tmp_path,
        "max_steps: 4\nnum_epochs: null\nsave_steps: 2\nlogging_steps: 1\n"
        f"output_dir: {output_dir}\n",
    )
    result = launch("train", str(cfg), "--storage", f"file://{tmp_path}/store", timeout=240)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    said = " ".join(result.stdout.split())
    assert f"Saving checkpoint-4 in {output_dir} failed: no space left on device" in said
    assert (
        "The newest complete checkpoint in storage is still checkpoint-2; "
        "`launch resume` continues from it once there is room." in said
    )
    assert "rank 0 exited with code 70" in said
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]

    (run_folder,) = (tmp_path / "store").iterdir()
    store = open_store(f"file://{run_folder}")
    newest = latest_complete_checkpoint(store)
    assert newest is not None and newest.step == 2
    download_folder(store, newest.prefix, tmp_path / "pulled")  # verifies every sha256
