"""Runs that survive: killed between saves, during a checkpoint's save or during its
upload, and relaunched; stopped by SIGTERM on 2 ranks while the upload crawls and
relaunched; a final upload that fails or hangs on rank 0, an upload killed mid-way, and
a pull that refuses to write outside its destination. All through the real CLI,
torchrun and storage (a folder, or moto's S3 server behind a throttling proxy that
stands in for a slow link)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from helpers import TWO_RANK_RUN, assert_no_planted_leaks, launch, make_folder, quickstart_config

from launcher import api
from payload.runtime.procs import process_tree
from payload.storage import (
    download_folder,
    latest_complete_checkpoint,
    list_checkpoints,
    open_store,
)
from payload.storage.layout import read_metrics, read_summary

STEPS = 24
RUN = f"max_steps: {STEPS}\nnum_epochs: null\nsave_steps: 4\nlogging_steps: 1\n"


def _losses(output_dir: str | Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


def _start(cfg: Path, *extra: str) -> str:
    result = launch("train", str(cfg), "--detach", *extra, check=True)
    return result.stdout.split()[1]  # "run <id> (local) submitted"


def _wait_for_step(run_id: str, step: int, timeout: float = 180) -> None:
    log = Path(api.status(run_id).run_dir) / "train.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and f"[step {step}/" in log.read_text():
            return
        if api.status(run_id).state != "running":
            raise AssertionError(f"{run_id} ended before step {step}:\n{log.read_text()}")
        time.sleep(0.2)
    raise AssertionError(f"{run_id} did not reach step {step} in {timeout}s")


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _signal_tree(run_id: str, sig: signal.Signals) -> None:
    _signal(process_tree(json.loads(api.status(run_id).handle)["data"]["pid"]), sig)


def _wait_finished(run_id: str, timeout: float = 120):
    record = api.wait(run_id, timeout_s=timeout)
    assert record.state != "running", f"{run_id} still running after {timeout}s"
    return record


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, never interrupted: what every resumed run must reproduce."""
    home = tmp_path_factory.mktemp("reference")
    cfg = quickstart_config(home, RUN)
    trained = launch(
        "train", str(cfg), env={"FERRY_HOME": str(home / "ferry")}, check=True, timeout=300
    )
    runs = json.loads(launch("runs", "--json", env={"FERRY_HOME": str(home / "ferry")}).stdout)
    assert_no_planted_leaks([home], [trained.stdout + trained.stderr], {})
    return _losses(runs[0]["output_dir"])


def _wait_for_line(run_id: str, text: str, timeout: float = 180) -> None:
    log = Path(api.status(run_id).run_dir) / "train.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        if api.status(run_id).state != "running":
            raise AssertionError(f"{run_id} ended before {text!r}:\n{log.read_text()}")
        time.sleep(0.02)
    raise AssertionError(f"{run_id} did not log {text!r} in {timeout}s")


def _freeze_mid_save(run_id: str, output_dir: Path, complete: set[str]) -> tuple[int, list[int]]:
    """Freeze the run (SIGSTOP to every process) the moment a new checkpoint folder
    appears; return its step and the frozen processes if the freeze caught the save
    half-written. A freeze that came after the save ended is thawed, and the next save
    tried."""
    tree = process_tree(json.loads(api.status(run_id).handle)["data"]["pid"])
    for step in range(8, STEPS + 1, 4):
        folder = output_dir / f"checkpoint-{step}"
        deadline = time.monotonic() + 120
        while not folder.is_dir():  # spin, no sleep: a save takes milliseconds
            if time.monotonic() > deadline:
                raise AssertionError(f"{folder} never appeared")
        _signal(reversed(tree), signal.SIGSTOP)  # children before parents: the rank first
        written = {p.name for p in folder.iterdir()}
        if written < complete:
            return step, tree
        _signal(tree, signal.SIGCONT)
    raise AssertionError("no freeze landed during a checkpoint save")


def _checkpoints_on_server(client, bucket: str, prefix: str) -> dict[int, bool]:
    """Straight from the S3 server, not through the crawling proxy: each checkpoint that
    has objects or a multipart upload under `prefix`, and whether its manifest is in."""
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    seen: dict[int, bool] = {}
    for key in [*keys, *(u["Key"] for u in uploads)]:
        folder, name = key.removeprefix(prefix).split("/", 1)
        step = int(folder.removeprefix("checkpoint-"))
        seen[step] = seen.get(step, False) or (name == "ferry-manifest.json" and key in keys)
    return seen


def _kill_during_save(run_id: str) -> int:
    """SIGKILL while checkpoint-N is being written to the run's output folder; N."""
    _wait_for_line(run_id, "storage: checkpoint-4 synced")
    output_dir = Path(api.status(run_id).output_dir)
    # What a complete checkpoint holds, from one whose upload (after its save) is done.
    complete = {p.name for p in (output_dir / "checkpoint-4").iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= complete
    step, frozen = _freeze_mid_save(run_id, output_dir, complete)
    _signal(frozen, signal.SIGKILL)
    return step


def _kill_during_upload(run_id: str, request: pytest.FixtureRequest, bucket: str) -> int:
    """SIGKILL while checkpoint-N crawls to S3: some of its objects are in, its manifest
    is not; N."""
    import boto3

    proxy = request.getfixturevalue("throttle_proxy")
    server = boto3.client("s3", endpoint_url=request.getfixturevalue("s3_server"))
    _wait_for_line(run_id, "storage: checkpoint-4 synced")
    proxy.rate = CRAWL  # ~40 s per checkpoint from now on
    prefix = f"runs/{run_id}/checkpoints/"
    deadline = time.monotonic() + 120
    while True:
        arriving = [
            s for s, whole in _checkpoints_on_server(server, bucket, prefix).items() if not whole
        ]
        if arriving:
            break
        assert time.monotonic() < deadline, "no checkpoint upload started"
        time.sleep(0.05)
    _signal_tree(run_id, signal.SIGKILL)
    _wait_finished(run_id)
    proxy.rate = None  # what the dead run had sent drains; a manifest cannot be among it
    (step,) = arriving
    on_server = _checkpoints_on_server(server, bucket, prefix)
    assert on_server.get(step) is False, f"checkpoint-{step} should be half-uploaded: {on_server}"
    return step


# Bytes per second towards S3 once the stop signal is sent, or while a kill is aimed at an
# upload: a ~2 MB checkpoint then takes about 40 s to upload, longer than torchrun's own
# default grace period (30 s).
CRAWL = 50_000


@pytest.mark.slow
@pytest.mark.parametrize("when", [7, 19, "save", "upload"])  # 7, 19: between saves
def test_sigkill_at_any_step_then_relaunch_resumes_and_finishes_exactly(
    tmp_path, reference, when, request
):
    """The machine is gone (SIGKILL to every process: no handler runs) between two saves,
    while a checkpoint is being written, or while one is being uploaded (to S3 over a
    crawling link). The checkpoint before stays the newest complete one in storage and
    downloads intact; `launch resume` continues from it (never from the half-written
    one) and reproduces, step for step, the run that was never interrupted."""
    extra: list[str] = []
    if when == "upload":
        bucket = request.getfixturevalue("slow_s3_bucket")
        extra = ["--storage", f"s3://{bucket}/runs"]
    run_id = _start(quickstart_config(tmp_path, RUN), *extra)
    if when == "save":
        interrupted = _kill_during_save(run_id)
    elif when == "upload":
        interrupted = _kill_during_upload(run_id, request, bucket)
    else:
        _wait_for_step(run_id, when)
        _signal_tree(run_id, signal.SIGKILL)
        interrupted = None
    dead = _wait_finished(run_id)
    assert dead.state == "failed" and "recorded no exit" in dead.detail

    store = open_store(dead.storage_uri)
    log = (Path(dead.run_dir) / "train.log").read_text()
    last = max(int(m) for m in re.findall(r"\[step (\d+)/", log))
    if interrupted is None:
        found = latest_complete_checkpoint(store)
        assert found is not None, "checkpoint-4 should be in storage before step 7"
        newest = found.step
        assert when <= last < STEPS, "the kill should land mid-run"
        # Training went on between the log line and the kill; nothing can be newer than it.
        assert newest <= last
    else:
        # Saves and uploads go in order, so the one before is whole; nothing after it is.
        newest = interrupted - 4
        manifests = sorted(
            int(k.split("/")[1].removeprefix("checkpoint-"))
            for k in store.list("checkpoints")
            if k.endswith("/ferry-manifest.json")
        )
        assert manifests and manifests[-1] == newest, (interrupted, manifests)
        assert last >= interrupted
        download_folder(store, f"checkpoints/checkpoint-{newest}", tmp_path / "back")  # verifies

    result = launch("resume", run_id, timeout=300, check=True)
    assert f"resuming from step {newest}" in result.stdout
    record = api.status(run_id)
    assert record.state == "succeeded" and record.attempts == 2
    summary = read_summary(record.output_dir)
    assert summary["resumed_from_step"] == newest and summary["steps"] == STEPS
    losses = _losses(record.output_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))  # every step logged once, no gaps
    # Model, optimizer, scheduler, RNG and data position all resumed: the numbers match a
    # run that was never interrupted.
    assert losses == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_sigterm_on_two_ranks_saves_uploads_slowly_exits_75_and_resumes_exactly(
    tmp_path, slow_s3_bucket, throttle_proxy, two_rank_reference
):
    """What a cloud does before taking the machine: SIGTERM to every process. Both ranks
    agree on a step, save one checkpoint, and stay until rank 0 has uploaded it over a
    crawling link: longer than torchrun's default 30 s grace, and longer than the run's
    ddp_timeout (32 s), which bounds a stall, not a transfer that keeps moving. Then the
    run exits 75, is recorded preempted, and `launch resume` ends at the planned step
    with the losses of a run that was never stopped."""
    storage = f"s3://{slow_s3_bucket}/runs"
    started = launch(
        "train",
        str(quickstart_config(tmp_path, TWO_RANK_RUN + "ddp_timeout: 32\n")),
        "--detach",
        "--gpus",
        "2",
        "--storage",
        storage,
        check=True,
    )
    run_id = started.stdout.split()[1]
    assert "write checked with AWS credentials from env" in started.stderr
    _wait_for_step(run_id, 9)
    throttle_proxy.rate = CRAWL
    signalled = time.monotonic()
    _signal_tree(run_id, signal.SIGTERM)
    stopped = _wait_finished(run_id, timeout=240)
    took = time.monotonic() - signalled
    throttle_proxy.rate = None
    log = (Path(stopped.run_dir) / "train.log").read_text()
    exit_code = json.loads((Path(stopped.run_dir) / "exit.json").read_text())["exit_code"]
    assert exit_code == 75, log
    assert stopped.state == "preempted" and f"launch resume {run_id}" in stopped.detail
    step = int(log.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 9 <= step < 24
    assert took > 30, f"the upload took {took:.0f}s: not slow enough to prove the grace period"
    assert "forcefully exiting" not in log and "SIGKILL" not in log, log  # nobody was killed
    store = open_store(f"{storage}/{run_id}")
    assert latest_complete_checkpoint(store).step == step  # saved and uploaded, whole
    assert f"checkpoints/checkpoint-{step}/ferry-manifest.json" in store.list("checkpoints")
    assert log.index(f"storage: checkpoint-{step} synced") < log.index("torchrun: stopped by")

    resumed = launch("resume", run_id, timeout=300, check=True)
    assert f"resuming from step {step}" in resumed.stdout
    record = api.status(run_id)
    assert record.state == "succeeded" and record.attempts == 2
    summary = read_summary(record.output_dir)
    assert summary["resumed_from_step"] == step and summary["steps"] == 24
    losses = _losses(record.output_dir)
    assert sorted(losses) == list(range(1, 25))
    assert losses == pytest.approx(two_rank_reference, rel=1e-5)
    final = store.list("final")
    assert "final/adapter_model.safetensors" in final and "final/ferry-manifest.json" in final


def _block_final(storage_root: Path, deadline_s: float = 120) -> None:
    """Wait for the run's storage folder, then put a file where `final/` must go."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        runs = [p for p in storage_root.glob("*") if p.is_dir()]
        if runs:
            (runs[0] / "final").write_text("in the way")
            return
        time.sleep(0.05)
    raise AssertionError("the run never wrote to its storage")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["fails", "hangs"])
def test_a_final_upload_that_fails_or_hangs_on_rank_0_ends_both_ranks_with_an_error(
    tmp_path, how, request
):
    """Rank 0 uploads the final artifacts while rank 1 waits. When the upload fails (a
    file stands where `final/` must go) or hangs (the link stops moving bytes), both
    ranks must end with an error naming it: at once, or once no byte moved for
    ddp_timeout; not hang until torchrun or a person kills them."""
    timeout_s = 25
    extra = f"ddp_timeout: {timeout_s}\nmax_steps: 8\nnum_epochs: null\nlogging_steps: 1\n"
    cfg = quickstart_config(tmp_path, extra)
    if how == "fails":
        root = tmp_path / "storage"
        run_id = _start(cfg, "--gpus", "2", "--storage", f"file://{root}", "--set", "save_steps=2")
        _block_final(root)
    else:
        bucket = request.getfixturevalue("slow_s3_bucket")
        proxy = request.getfixturevalue("throttle_proxy")
        run_id = _start(cfg, "--gpus", "2", "--storage", f"s3://{bucket}/runs")
        _wait_for_step(run_id, 8)
        proxy.rate = 0  # from now on no byte reaches the server
    started = time.monotonic()
    record = _wait_finished(run_id, timeout=timeout_s + 120)
    took = time.monotonic() - started
    if how == "hangs":
        request.getfixturevalue("throttle_proxy").rate = None
    log = (Path(record.run_dir) / "train.log").read_text()
    assert record.state == "failed", log
    # Not the user's config: an exit code that lets a backend try again.
    assert json.loads((Path(record.run_dir) / "exit.json").read_text())["exit_code"] == 70
    assert took < timeout_s + 60, f"ended {took:.0f}s after training: a hang"
    if how == "fails":
        said = "the final upload failed: FileExistsError"
    else:
        said = f"the final upload made no progress for {timeout_s} s (ddp_timeout)"
    assert re.search(rf"^error: {re.escape(said)}", log, re.M), log  # rank 0
    assert re.search(rf"^error: on rank 0, {re.escape(said)}", log, re.M), log  # rank 1


UPLOADER = """
import sys
from pathlib import Path
from payload.storage import open_store, upload_checkpoint
store = open_store(sys.argv[1])
upload_checkpoint(Path(sys.argv[2]), store, 8, run_id="r")
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_upload_killed_midway_leaves_the_previous_checkpoint_newest(tmp_path, request, kind):
    if kind == "s3":
        uri = f"s3://{request.getfixturevalue('s3_bucket')}/run"
    else:
        uri = f"file://{tmp_path}/store/run"
    store = open_store(uri)
    from payload.storage import upload_checkpoint

    small = make_folder(tmp_path / "c4", {"model.bin": 50_000, "state.json": 500})
    upload_checkpoint(small, store, 4)
    big = make_folder(tmp_path / "c8", {f"shard-{i}.bin": 40 * 1024 * 1024 for i in range(4)})

    uploader = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, uri, str(big)], env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once data for checkpoint-8 is arriving
        if any(k.startswith("checkpoints/checkpoint-8/") for k in store.list("checkpoints")):
            break
        if kind == "s3" and store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads"):
            break
        time.sleep(0.02)
    uploader.kill()
    uploader.wait()
    assert uploader.returncode == -signal.SIGKILL, "the upload finished before it was killed"

    checkpoints = {c.step: c.complete for c in list_checkpoints(store)}
    assert checkpoints.get(4) is True and checkpoints.get(8) is not True
    assert latest_complete_checkpoint(store).step == 4
    download_folder(store, "checkpoints/checkpoint-4", tmp_path / "back")  # verifies
    assert (tmp_path / "back" / "model.bin").read_bytes() == (small / "model.bin").read_bytes()


def test_pull_refuses_a_crafted_path_and_writes_nothing_outside(tmp_path, ferry_home):
    from launcher.registry import Registry, RunRecord
    from payload.storage import Manifest
    from payload.storage.sync import FileEntry

    store = open_store(f"file://{tmp_path}/store/evil-run")
    store.write_bytes("final/evil.txt", b"pwned")
    manifest = Manifest([FileEntry("ok.txt", 2, "x"), FileEntry("../../evil.txt", 5, "y")])
    store.write_bytes("final/ferry-manifest.json", manifest.to_json())
    now = time.time()
    Registry().add(
        RunRecord(
            run_id="evil-run",
            name="evil",
            source="/x.yml",
            backend="local",
            state="succeeded",
            created_at=now,
            updated_at=now,
            run_dir="/tmp/x",
            resources={},
            storage_uri=store.uri,
        )
    )
    dest = tmp_path / "a" / "b" / "dest"
    result = launch("pull", "evil-run", "--dest", str(dest))
    assert result.returncode == 1
    assert "Refusing remote file '../../evil.txt'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "a" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not any(p.is_file() for p in (tmp_path / "a").rglob("*"))


def test_a_complete_checkpoint_always_has_its_metrics_beside_it(tmp_path):
    """A run killed right after a checkpoint's manifest landed resumes from it with the
    metrics history up to that step (a gap once showed in the SIGKILL test): the history
    must reach storage before the manifest does. Recorded on a real folder store."""
    from types import SimpleNamespace

    from payload.durability import StorageSync
    from payload.storage.stores import FileStore

    writes: list[str] = []

    class Recording(FileStore):
        def write_bytes(self, key: str, data: bytes) -> None:
            writes.append(key)
            super().write_bytes(key, data)

    out = tmp_path / "out"
    make_folder(out / "checkpoint-4", {"model.safetensors": 2_000, "trainer_state.json": 100})
    (out / "metrics.jsonl").write_text('{"step": 4, "loss": 1.5}\n')
    store = Recording(tmp_path / "store")
    sync = StorageSync(store, str(out), "r-1", None, is_main=True, distributed_run=False)
    sync.on_save(None, SimpleNamespace(global_step=4), None)
    sync.wait()
    manifest = "checkpoints/checkpoint-4/ferry-manifest.json"
    assert writes.index("metrics.jsonl") < writes.index(manifest), writes
    assert store.read_bytes("metrics.jsonl") == (out / "metrics.jsonl").read_bytes()
