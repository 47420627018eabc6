"""The executor seam and the local backend: parsing, registration, and real runs that are
cancelled or fail."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
from helpers import launch, quickstart_config

from executors import Executor, Resources, available, get_executor
from executors.local import LocalExecutor
from launcher import api
from payload.errors import FerryError
from payload.runtime.procs import process_tree


@pytest.mark.parametrize(
    ("text", "accelerator", "count"),
    [
        ("2", None, 2),
        ("H100:8", "H100", 8),
        ("A100-80GB:4", "A100-80GB", 4),
        ("L4", "L4", 1),
        (None, None, 1),
    ],
)
def test_gpus_flag(text, accelerator, count):
    resources = Resources.from_gpus(text)
    assert (resources.accelerator, resources.gpus_per_node) == (accelerator, count)


@pytest.mark.parametrize("text", ["0", "H100:0", "H100:x", "-1"])
def test_bad_gpus_flag(text):
    with pytest.raises(FerryError, match="ACCELERATOR:COUNT"):
        Resources.from_gpus(text)


def test_local_backend_is_found_by_entry_point():
    assert "local" in available()
    assert isinstance(get_executor("local"), LocalExecutor)


def test_a_backend_outside_ferry_registers_by_entry_point(tmp_path, monkeypatch):
    """A third-party package adds a backend with nothing but an entry point."""
    (tmp_path / "acme_backend.py").write_text(
        textwrap.dedent("""
        from executors import Executor, Plan

        class AcmeExecutor(Executor):
            name = "acme"

            def _plan(self, job):
                return Plan(self.name, job.run_id, [("where", "acme cloud")], ["acme", "run"])
    """)
    )
    dist = tmp_path / "acme_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ferry.executors]\nacme = acme_backend:AcmeExecutor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "acme" in available()
    executor = get_executor("acme")
    assert isinstance(executor, Executor) and executor.name == "acme"
    plan = api.plan(str(quickstart_config(tmp_path)), cloud="acme")
    assert "acme cloud" in plan.text()


def test_plan_names_the_processes_and_the_command(tmp_path):
    job, _ = api.prepare(str(quickstart_config(tmp_path)), gpus="2")
    plan = get_executor("local").plan(job)
    assert plan.command[-4:] == ["-m", "payload", "train", str(job.config_path)]
    assert (
        "--standalone" in plan.command
        and plan.command[plan.command.index("--nproc-per-node") + 1] == "2"
    )
    assert job.payload_env()["FERRY_RUN_ID"] == job.run_id
    assert job.config["output_dir"] == str(job.run_dir / "output")


def test_run_ids_follow_the_documented_shape(tmp_path):
    job, _ = api.prepare(str(quickstart_config(tmp_path, name="My Config.yml")))
    name, date, clock, suffix = job.run_id.rsplit("-", 3)
    assert name == "my-config" and len(date) == 8 and len(clock) == 6 and len(suffix) == 4


def test_multi_node_is_refused_locally(tmp_path):
    job, _ = api.prepare(str(quickstart_config(tmp_path)))
    job.resources = Resources(nodes=2)
    with pytest.raises(FerryError, match="nodes must be 1"):
        get_executor("local").check(job)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has already exited


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow
def test_cancel_stops_every_process_and_records_cancelled(tmp_path, ferry_home):
    cfg = quickstart_config(tmp_path)
    result = launch(
        "train", str(cfg), "--detach", "--gpus", "2", "--set", "num_epochs=50", check=True
    )
    run_id = json.loads(launch("runs", "--json", check=True).stdout)[0]["run_id"]
    assert run_id in result.stdout and f"launch logs {run_id} -f" in result.stdout
    record = api.status(run_id)
    log = Path(record.run_dir) / "train.log"
    _wait_for(lambda: log.exists() and "[step" in log.read_text(), 180, "training to start")
    supervisor = json.loads(record.handle)["data"]["pid"]
    pids = [pid for pid in process_tree(supervisor) if _alive(pid)]
    assert len(pids) >= 4, f"supervisor, torchrun and 2 ranks expected, got {pids}"
    assert api.status(run_id).state == "running"

    cancelled = launch("cancel", run_id, "--yes", check=True)
    assert "cancelled" in cancelled.stdout
    assert api.status(run_id).state == "cancelled"
    _wait_for(lambda: not [p for p in pids if _alive(p)], 10, "every process of the run to exit")


@pytest.mark.slow
def test_a_run_that_fails_is_recorded_with_the_reason(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "not alpaca"}\n' * 4)
    cfg = quickstart_config(tmp_path)
    result = launch("train", str(cfg), "--set", f"datasets.0.path={bad}", timeout=300)
    assert result.returncode == 1
    assert "No usable rows" in result.stdout
    record = json.loads(launch("runs", "--json", check=True).stdout)[0]
    assert record["state"] == "failed"
    assert "missing field `instruction`" in record["detail"]


@pytest.mark.slow
def test_ctrl_c_while_following_cancels_the_run(tmp_path):
    """An attached `launch train` stopped with Ctrl-C must not leave the run behind."""
    import signal
    import subprocess

    from helpers import launch_command

    process = subprocess.Popen(
        [*launch_command(), "train", str(quickstart_config(tmp_path)), "--set", "num_epochs=50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("[step"):
            break
    run_id = json.loads(launch("runs", "--json", check=True).stdout)[0]["run_id"]
    pids = process_tree(json.loads(api.status(run_id).handle)["data"]["pid"])
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "interrupted: cancelling" in rest and f"\ncancelled {run_id}" in rest
    assert api.status(run_id).state == "cancelled"
    _wait_for(lambda: not [p for p in pids if _alive(p)], 10, "the run's processes to exit")
