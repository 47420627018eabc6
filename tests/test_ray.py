"""The Ray backend against a real Ray head on 127.0.0.1 (tests/conftest.py `ray_head`:
`ray start --head` with token authentication), through the real `launch` CLI: the Jobs
API, Ray Train V2's TorchTrainer with 2 CPU workers on gloo, a moto S3 server as the
run's storage. Nothing is replaced; the cluster is one machine, which is the only edge
that differs from a real one.

Each Ray fit costs tens of seconds here, so one run serves several assertions.
Select these tests with `-k ray`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import TWO_RANK_RUN, launch, quickstart_config

from payload.runtime.job import default_workdir
from payload.storage import open_store
from payload.storage.layout import read_metrics
from payload.storage.sync import MANIFEST, latest_complete_checkpoint

pytestmark = pytest.mark.slow

SAVE_EVERY_8 = TWO_RANK_RUN + "save_steps: 8\n"


def s3_args(bucket: str) -> list[str]:
    """Storage on the moto server; the credentials travel as secrets, by name."""
    return [
        "--storage",
        f"s3://{bucket}/runs",
        "--secret",
        "AWS_ACCESS_KEY_ID",
        "--secret",
        "AWS_SECRET_ACCESS_KEY",
        "--env",
        f"AWS_ENDPOINT_URL={os.environ['AWS_ENDPOINT_URL']}",
        "--env",
        "AWS_DEFAULT_REGION=us-east-1",
    ]


def the_run() -> dict:
    (run,) = json.loads(launch("runs", "--json", check=True).stdout)
    return run


def losses_of(folder: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(folder) if "loss" in r}


def test_a_run_on_the_ray_head_trains_streams_stores_pulls_and_matches_torchrun(
    tmp_path, s3_bucket, on_ray, two_rank_reference
):
    """`launch train --cloud ray --gpus 2`: two Ray Train workers train the quickstart to
    the end; the command streams the job's log; every checkpoint and the final adapter
    are in S3 with their manifests; `launch pull` fetches them; the losses are those of a
    local 2-process torchrun run (the shared `two_rank_reference`)."""
    config = quickstart_config(tmp_path, SAVE_EVERY_8)
    trained = launch(
        "train", str(config), "--cloud", "ray", "--ray-address", on_ray.address,
        "--gpus", "2", *s3_args(s3_bucket), timeout=600,
    )  # fmt: skip
    said = trained.stdout + trained.stderr
    assert trained.returncode == 0, said
    assert "[step 24/24]" in said  # streamed while it ran
    assert "succeeded" in said
    run = the_run()
    assert (run["backend"], run["state"]) == ("ray", "succeeded")
    assert ray_jobs(on_ray, run["run_id"]) == {run["run_id"]: "SUCCEEDED"}

    status = json.loads(launch("status", run["run_id"], "--json", check=True).stdout)
    assert status["state"] == "succeeded"
    logs = launch("logs", run["run_id"], check=True).stdout
    assert "[step 24/24]" in logs and logs.count("[step 24/24]") == 1  # each line once
    followed = launch("logs", "-f", run["run_id"], check=True, timeout=120).stdout
    assert "[step 24/24]" in followed and "ray: training finished" in followed

    store = open_store(run["storage_uri"])
    assert latest_complete_checkpoint(store).step == 24
    stored = store.list("checkpoints")
    for step in (16, 24):
        assert f"checkpoints/checkpoint-{step}/{MANIFEST}" in stored
    assert not [k for k in stored if k.startswith("checkpoints/checkpoint-8/")]  # limit 2
    assert {"final/adapter_model.safetensors", f"final/{MANIFEST}"} <= set(store.list("final"))
    # Ray's own record holds pointers only: no second copy of a checkpoint's weights.
    ray_files = store.list("ray")
    assert ray_files and not [f for f in ray_files if f.endswith(".safetensors")]

    dest = tmp_path / "pulled"
    launch("pull", run["run_id"], "--dest", str(dest), check=True)
    assert (dest / "adapter_model.safetensors").is_file()
    losses = losses_of(dest)
    assert sorted(losses) == list(range(1, 25))
    assert losses == pytest.approx(two_rank_reference, abs=1e-5)


def ray_jobs(head, run_id: str | None) -> dict[str, str]:
    """The cluster's jobs of this run (None: of every run), as its Jobs API lists them:
    submission id -> state."""
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    return {
        j.submission_id: str(j.status).split(".")[-1]
        for j in jobs.list_jobs()
        if run_id is None or (j.metadata or {}).get("ferry_run_id") == run_id
    }


def pids(pattern: str, run_id: str) -> list[int]:
    """This run's processes whose command line matches `pattern` (not another head's, not
    another run's: the run id is in their environment)."""
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    mine = []
    for pid in map(int, found.split()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if f"FERRY_RUN_ID={run_id}".encode() in environ:
            mine.append(pid)
    return mine


def reported_step(store, run_id: str) -> int:
    """The step of the newest checkpoint Ray's controller has recorded (its snapshot in
    the run's `ray/` folder names it); 0 before any."""
    raw = store.read_bytes(f"ray/{run_id}/checkpoint_manager_snapshot.json")
    latest = (json.loads(raw).get("latest_checkpoint_result") or {}) if raw else {}
    return (latest.get("metrics") or {}).get("step", 0)


def wait_for_report(store, run_id: str, step: int, timeout: float = 300) -> None:
    """Until Ray's controller has recorded the checkpoint of `step`, which Ferry reports
    once it is complete in storage."""
    deadline = time.monotonic() + timeout
    while True:
        if reported_step(store, run_id) >= step:
            newest = latest_complete_checkpoint(store)
            assert newest is not None and newest.step >= step  # reported once stored
            return
        assert time.monotonic() < deadline, f"Ray recorded no checkpoint of step {step}"
        time.sleep(0.5)


def test_a_killed_worker_and_a_killed_driver_each_resume_from_the_reported_checkpoint(
    tmp_path, s3_bucket, on_ray, two_rank_reference
):
    """With `retries: 1`: a training worker SIGKILLed after checkpoint-8 makes Ray restart
    the worker group, which resumes from the checkpoint it reported; then the job's
    driver SIGKILLed after checkpoint-16 ends the job, and `launch resume` submits the
    same run id again, which resumes too. The run finishes at step 24 with the losses of
    an uninterrupted run."""
    config = quickstart_config(tmp_path, SAVE_EVERY_8)
    launch(
        "train", str(config), "--cloud", "ray", "--ray-address", on_ray.address, "--gpus", "2",
        "--retries", "1", "--detach", *s3_args(s3_bucket), check=True, timeout=120,
    )  # fmt: skip
    run = the_run()
    store = open_store(run["storage_uri"])

    wait_for_report(store, run["run_id"], 8)
    workers = pids("RayTrainWorker", run["run_id"])
    assert len(workers) == 2, "the run's two Ray Train workers were not found"
    os.kill(workers[0], signal.SIGKILL)
    # The restarted workers may be on another node: nothing of this one's output is left.
    local_output = Path(default_workdir(run["run_id"])) / "output"
    shutil.rmtree(local_output)

    wait_for_report(store, run["run_id"], 16)
    (driver,) = pids(r"^\S*python\S* -m payload.entry.ray ferry-job.json", run["run_id"])
    os.kill(driver, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while (state := json.loads(launch("status", run["run_id"], "--json").stdout)["state"]) in (
        "running",
        "pending",
    ):
        assert time.monotonic() < deadline, "the job did not end after its driver was killed"
        time.sleep(1)
    assert state == "failed"
    while pids("RayTrainWorker", run["run_id"]):  # the actors may outlive the driver a while
        assert time.monotonic() < deadline, "the run's Ray Train workers outlived its job"
        time.sleep(1)
    # Where the relaunch will resume: the newest complete checkpoint in storage, the one
    # Ray recorded or a newer one. 16, or 24 on a machine slow enough that the workers
    # reached their last checkpoint before the kill landed.
    reported = reported_step(store, run["run_id"])
    newest = latest_complete_checkpoint(store).step
    assert newest in (16, 24) and newest >= reported, (newest, reported)
    first_log = launch("logs", run["run_id"], check=True).stdout
    assert "ray: resuming from the reported checkpoint" in first_log
    assert re.search(r"resuming from step (8|16)\b", first_log), first_log[-3000:]

    shutil.rmtree(local_output)  # the relaunch, too, may land elsewhere
    resumed = launch("resume", run["run_id"], timeout=600)
    said = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, said
    # Ray restores the run by its name from its storage, then Ferry the newest checkpoint.
    assert "ray: resuming from the reported checkpoint" in said, said[-3000:]
    assert re.search(rf"resuming from step {newest}\b", said), said[-3000:]
    run = the_run()
    assert run["state"] == "succeeded"
    # The same run id, submitted again: the cluster's second job of this run.
    assert ray_jobs(on_ray, run["run_id"]) == {
        run["run_id"]: "FAILED",
        f"{run['run_id']}-2": "SUCCEEDED",
    }

    dest = tmp_path / "pulled"
    launch("pull", run["run_id"], "--dest", str(dest), check=True)
    losses = losses_of(dest)
    assert sorted(losses) == list(range(1, 25))
    assert losses == pytest.approx(two_rank_reference, abs=1e-5)


def test_cancel_stops_the_ray_job_and_the_run_says_cancelled(tmp_path, on_ray):
    """`launch cancel` once the workers run: Ray stops the job, the status says cancelled,
    the cluster lists the job as stopped, and no training worker is left."""
    config = quickstart_config(tmp_path, TWO_RANK_RUN)
    launch(
        "train", str(config), "--cloud", "ray", "--ray-address", on_ray.address, "--gpus", "1",
        "--storage", f"file://{tmp_path}/store", "--detach", check=True, timeout=120,
    )  # fmt: skip
    run_id = the_run()["run_id"]
    deadline = time.monotonic() + 240
    while "Started training worker group" not in launch("logs", run_id).stdout:
        assert time.monotonic() < deadline, "the run's workers did not start"
        time.sleep(1)
    assert pids("RayTrainWorker", run_id)
    cancelled = launch("cancel", run_id, "--yes", timeout=120)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    status = json.loads(launch("status", run_id, "--json", check=True).stdout)
    assert status["state"] == "cancelled", status
    assert ray_jobs(on_ray, run_id) == {run_id: "STOPPED"}
    deadline = time.monotonic() + 60
    while pids("RayTrainWorker", run_id):  # the workers go with the job
        assert time.monotonic() < deadline, "Ray Train workers still running after cancel"
        time.sleep(1)


def test_an_unreachable_address_or_a_refused_token_fails_in_seconds_with_the_fix(
    tmp_path, on_ray, monkeypatch
):
    """Nothing is submitted, and each says what to set: a port nobody listens on, a
    server that takes the connection and never answers, the head with a wrong token and
    with none."""
    import socket

    config = quickstart_config(tmp_path, "max_steps: 2\nnum_epochs: null\n")
    storage = ["--storage", f"file://{tmp_path}/store"]
    before = ray_jobs(on_ray, None)

    def train(address: str, *, limit: float) -> str:
        started = time.monotonic()
        result = launch("train", str(config), "--cloud", "ray", "--ray-address", address, *storage)
        took = time.monotonic() - started
        said = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 1 and "Traceback" not in said, said
        assert took < limit, f"took {took:.1f} s: {said}"
        return said

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    said = train(f"http://127.0.0.1:{port}", limit=5)
    assert f"Cannot reach the Ray cluster at http://127.0.0.1:{port}" in said
    assert "--ray-address" in said and "RAY_ADDRESS" in said

    with socket.socket() as silent:  # accepts (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        said = train(f"http://127.0.0.1:{port}", limit=5)
        assert f"Cannot reach the Ray cluster at http://127.0.0.1:{port}" in said

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    said = train(on_ray.address, limit=5)
    assert f"The Ray cluster at {on_ray.address} refused the request" in said
    assert "a token it does not accept" in said and "RAY_AUTH_TOKEN" in said

    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    said = train(on_ray.address, limit=5)
    assert "we sent no token" in said and "ray get-auth-token" in said
    # Nothing was recorded or started.
    assert json.loads(launch("runs", "--json", check=True).stdout) == []
    assert ray_jobs(on_ray, None) == before


def test_a_three_trial_sweep_on_the_head_two_at_a_time_reports_every_trial(tmp_path, on_ray):
    """`launch sweep --cloud ray --max-parallel 2`: the trials are separate Ray jobs, at
    most two at once; every one succeeds and the report lists the three, from storage."""
    grid = tmp_path / "grid.yml"
    grid.write_text("learning_rate: [1.0e-3, 2.0e-3, 4.0e-3]\n")
    config = quickstart_config(tmp_path, "max_steps: 2\nnum_epochs: null\nlogging_steps: 1\n")
    result = launch(
        "sweep", str(config), "--sweep", str(grid), "--cloud", "ray",
        "--ray-address", on_ray.address, "--max-parallel", "2", "--gpus", "1",
        "--storage", f"file://{tmp_path}/store", timeout=900,
    )  # fmt: skip
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    sweep_id = re.search(r"^sweep (\S+): 3 trials", result.stdout, re.M).group(1)
    assert "3 trials, 3 succeeded" in said
    status = json.loads(launch("sweep", "status", sweep_id, "--json", check=True).stdout)
    trials = status["trials"]
    assert [t["backend"] for t in trials] == ["ray"] * 3
    # --storage holds each trial's own folder, where the report reads its metrics.
    assert [t["storage_uri"] for t in trials] == [
        f"file://{tmp_path}/store/{t['run_id']}" for t in trials
    ]
    starts = sorted(t["started_at"] for t in trials)
    ends = sorted(t["finished_at"] for t in trials)
    assert starts[2] >= ends[0]  # the third started once one of the first two had ended
    for t in trials:
        assert ray_jobs(on_ray, t["run_id"]) == {t["run_id"]: "SUCCEEDED"}
    report = json.loads(launch("sweep", "report", sweep_id, "--json", check=True).stdout)
    assert sorted(row["trial"] for row in report["trials"]) == [0, 1, 2]
    assert all(isinstance(row["final_loss"], float) for row in report["trials"])
