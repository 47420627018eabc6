"""Sweep planning and dispatch: every trial validated first, each with its own folders,
spread over backends, with passing submit failures retried."""

from __future__ import annotations

import json
import re
import textwrap
import time
from pathlib import Path

import pytest
from helpers import ROOT, launch, quickstart_config

from launcher import api, dispatch, runs
from launcher.registry import Registry
from payload.errors import FerryError


def grid(tmp_path, text: str):
    path = tmp_path / "grid.yml"
    path.write_text(textwrap.dedent(text))
    return path


def test_every_invalid_trial_is_reported_and_nothing_is_recorded(tmp_path, ferry_home):
    cfg = quickstart_config(tmp_path)
    sweep = grid(
        tmp_path,
        """
        lora_r: [8, -1, 0]
        learning_rate: [1.0e-4]
    """,
    )
    with pytest.raises(FerryError) as info:
        api.sweep_plan(cfg, sweep)
    message = str(info.value)
    assert "2 of 3 trials are invalid; nothing was launched" in message
    assert "t1 (r=-1): lora_r: should be greater than 0 (got -1)" in message
    assert "t2 (r=0): lora_r" in message
    assert Registry().list() == []


def test_backend_checks_run_for_every_trial_before_launch(tmp_path):
    from executors.local import local_gpu_count

    assert local_gpu_count() == 0  # on any host: conftest hides CUDA devices
    sweep = grid(tmp_path, "fp16: [false, true]\n")
    with pytest.raises(FerryError) as info:
        api.sweep_plan(quickstart_config(tmp_path), sweep)
    assert "1 of 2 trials are invalid" in str(info.value)
    assert "t1 (fp16=true): local: `fp16` needs a CUDA GPU" in str(info.value)


def test_trials_get_their_own_run_ids_and_output_folders(tmp_path):
    plan = api.sweep_plan(quickstart_config(tmp_path), grid(tmp_path, "lora_r: [4, 8]\n"))
    assert [job.run_id for job in plan.jobs] == [f"{plan.sweep_id}-t0", f"{plan.sweep_id}-t1"]
    outputs = [job.config["output_dir"] for job in plan.jobs]
    assert len(set(outputs)) == 2 and all(
        o.endswith(f"-t{i}/output") for i, o in enumerate(outputs)
    )


def test_a_shared_output_dir_is_split_per_trial(tmp_path):
    cfg = quickstart_config(tmp_path, f"output_dir: {tmp_path / 'out'}\n")
    plan = api.sweep_plan(cfg, grid(tmp_path, "lora_r: [4, 8]\n"))
    assert [job.config["output_dir"] for job in plan.jobs] == [
        str(tmp_path / "out" / job.run_id) for job in plan.jobs
    ]


def test_dotted_sweep_keys_reach_the_trial_configs(tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text((ROOT / "examples/data/alpaca_tiny.jsonl").read_text())
    plan = api.sweep_plan(
        quickstart_config(tmp_path),
        grid(tmp_path, f"datasets.0.path: [{ROOT}/examples/data/alpaca_tiny.jsonl, {other}]\n"),
    )
    assert [job.config["datasets"][0]["path"] for job in plan.jobs][1] == str(other)
    assert plan.trials[1].name.startswith("path=")


def test_warnings_shared_by_all_trials_are_said_once(tmp_path):
    plan = api.sweep_plan(quickstart_config(tmp_path), grid(tmp_path, "max_steps: [2, 3, 4]\n"))
    assert sum("num_epochs" in w for w in plan.warnings) == 1


def test_dry_run_prints_trials_and_plans_and_records_nothing(tmp_path):
    cfg = quickstart_config(tmp_path)
    result = launch(
        "sweep",
        str(cfg),
        "--sweep",
        str(grid(tmp_path, "lora_r: [4, 8]\n")),
        "--dry-run",
        "--max-parallel",
        "2",
        check=True,
    )
    assert "would run 2 trials, at most 2 at a time" in result.stdout
    assert "t0     r=4" in result.stdout and "t1     r=8" in result.stdout
    assert result.stdout.count("command ") == 2
    assert json.loads(launch("runs", "--json", check=True).stdout) == []


def test_cancel_before_dispatch_cancels_the_queue(tmp_path):
    plan = api.sweep_plan(quickstart_config(tmp_path), grid(tmp_path, "lora_r: [4, 8]\n"))
    sweep = dispatch.create(plan)
    assert {t.state for t in Registry().trials(sweep.sweep_id)} == {"pending"}
    result = launch("sweep", "cancel", sweep.sweep_id, "--yes", check=True)
    assert "t0 cancelled, t1 cancelled" in result.stdout
    assert Registry().get_sweep(sweep.sweep_id).state == "cancelled"


def test_unknown_sweep_is_a_clear_error():
    result = launch("sweep", "status", "nope")
    assert result.returncode == 1 and "No sweep 'nope'" in result.stderr


FLAKY = '''
"""A remote backend whose API fails the first two submits with a network error. It
stands in for a cloud we cannot reach from the tests; the runs themselves are real local
ones (it is the local executor under another name)."""
from pathlib import Path

from executors.local import LocalExecutor

COUNTER = Path(__file__).with_name("flaky-submits")


class FlakyExecutor(LocalExecutor):
    name = "flaky"

    def _submit(self, job):
        calls = int(COUNTER.read_text()) + 1 if COUNTER.exists() else 1
        COUNTER.write_text(str(calls))
        if calls <= 2:
            raise ConnectionError(f"flaky API: attempt {calls} dropped")
        return super()._submit(job)
'''


@pytest.mark.slow
def test_trials_spread_over_backends_and_passing_submit_errors_are_retried(tmp_path, monkeypatch):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "flaky_backend.py").write_text(FLAKY)
    dist = plugin / "flaky_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flaky-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[ferry.executors]\nflaky = flaky_backend:FlakyExecutor\n"
    )
    monkeypatch.syspath_prepend(str(plugin))
    monkeypatch.setattr(runs, "SUBMIT_BACKOFF_S", 0.05)

    events = []
    sweep = api.sweep(
        quickstart_config(tmp_path, "max_steps: 3\nnum_epochs: null\n"),
        grid(tmp_path, "learning_rate: [1.0e-3, 2.0e-3]\n"),
        clouds=["local", "flaky"],
        max_parallel=1,
        on_event=lambda kind, record: events.append((kind, record.trial["index"])),
    )
    trials = Registry().trials(sweep.sweep_id)
    assert sweep.state == "finished"
    assert [(t.backend, t.state) for t in trials] == [
        ("local", "succeeded"),
        ("flaky", "succeeded"),
    ]
    assert (plugin / "flaky-submits").read_text() == "3"
    assert events.count(("retrying", 1)) == 2
    assert all(t.attempts == 1 for t in trials)


@pytest.mark.slow
def test_sweep_cancel_from_another_shell_stops_a_foreground_sweep_before_its_next_submit(
    tmp_path,
):
    """A foreground `launch sweep` runs t0; `launch sweep cancel` in a second process must
    stop it there: t0 cancelled, t1 and t2 never submitted, the foreground sweep ends."""
    import subprocess

    from helpers import launch_command

    sweep_cmd = [
        *launch_command(),
        "sweep",
        str(quickstart_config(tmp_path, "num_epochs: 50\n")),
        "--sweep",
        str(grid(tmp_path, "learning_rate: [1.0e-3, 2.0e-3, 3.0e-3]\n")),
    ]
    foreground = subprocess.Popen(
        sweep_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first = foreground.stdout.readline()
    sweep_id = re.match(r"sweep (\S+): 3 trials", first).group(1)
    deadline = time.monotonic() + 120
    while Registry().trials(sweep_id)[0].state != "running":
        assert time.monotonic() < deadline and foreground.poll() is None, first
        time.sleep(0.2)

    launch("sweep", "cancel", sweep_id, "--yes", check=True, timeout=300)
    rest, _ = foreground.communicate(timeout=120)
    assert foreground.returncode == 1, first + rest
    t0, t1, t2 = Registry().trials(sweep_id)
    assert t0.state == "cancelled" and t0.attempts == 1
    for trial in (t1, t2):
        assert (trial.state, trial.attempts, trial.handle) == ("cancelled", 0, None)
    assert Registry().get_sweep(sweep_id).state == "cancelled"


@pytest.mark.slow
def test_a_submit_whose_registry_write_fails_does_not_start_a_second_run(tmp_path, monkeypatch):
    """The run's supervisor starts, then the registry write that records it fails (a locked
    database: SQLite's failure, injected once). The dispatcher tries again: it must find
    the run that started and record it, never start a second supervisor on its folder."""
    import sqlite3

    real = Registry.transition
    failed = []

    def flaky(self, run_id, state, expect, **changes):  # type: ignore[no-untyped-def]
        if state == "running" and not failed:
            failed.append(run_id)
            raise sqlite3.OperationalError("database is locked")
        return real(self, run_id, state, expect, **changes)

    monkeypatch.setattr(Registry, "transition", flaky)
    monkeypatch.setattr(runs, "SUBMIT_BACKOFF_S", 0.05)
    events = []
    sweep = api.sweep(
        quickstart_config(tmp_path, "max_steps: 3\nnum_epochs: null\n"),
        grid(tmp_path, "learning_rate: [1.0e-3]\n"),
        on_event=lambda kind, record: events.append(kind),
    )
    (trial,) = Registry().trials(sweep.sweep_id)
    assert failed == [trial.run_id] and "retrying" in events
    assert trial.state == "succeeded" and trial.attempts == 1
    log = (Path(trial.run_dir) / "train.log").read_text()
    assert sum(line.startswith("$ ") for line in log.splitlines()) == 1, log  # one start


def test_a_stopped_dispatcher_starts_nothing_and_leaves_the_queue_for_retry(tmp_path):
    """A detached dispatcher told to stop (SIGTERM sets its stop event) leaves between
    submits: nothing started, the trials still queued, the sweep not marked finished."""
    import threading

    plan = api.sweep_plan(quickstart_config(tmp_path), grid(tmp_path, "lora_r: [4, 8]\n"))
    sweep = dispatch.create(plan)
    stop = threading.Event()
    stop.set()
    trials = dispatch.dispatch(sweep.sweep_id, stop=stop)
    assert [(t.state, t.attempts) for t in trials] == [("pending", 0), ("pending", 0)]
    assert Registry().get_sweep(sweep.sweep_id).state == "running"
