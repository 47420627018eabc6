"""Sweeps end to end through the real CLI on the local backend: trials side by side, each
in its own folders, at most K at once, a ranked report with a plot; a failing trial that
does not stop the others, and a retry that reruns only it."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from helpers import DATA, launch, quickstart_config

pytestmark = pytest.mark.slow

SHORT = ["--set", "max_steps=8", "--set", "num_epochs=null", "--set", "logging_steps=2"]


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, step in edges:  # at equal times the -1 sorts first: touching is not overlapping
        current += step
        most = max(most, current)
    return most


def test_four_trial_sweep_two_at_a_time_with_report_and_plot(tmp_path, ferry_home):
    grid = tmp_path / "grid.yml"
    grid.write_text("learning_rate: [1.0e-3, 3.0e-3]\nlora_r: [4, 16]\n")
    result = launch(
        "sweep",
        "examples/quickstart.yml",
        "--sweep",
        str(grid),
        "--max-parallel",
        "2",
        *SHORT,
        timeout=600,
        check=True,
    )
    sweep_id = re.search(r"^sweep (\S+): 4 trials", result.stdout, re.M).group(1)
    assert "4 trials, 4 succeeded" in result.stdout

    status = json.loads(launch("sweep", "status", sweep_id, "--json", check=True).stdout)
    trials = status["trials"]
    assert status["state"] == "finished" and len(trials) == 4
    assert [t["trial"]["index"] for t in trials] == [0, 1, 2, 3]
    assert [t["run_id"] for t in trials] == [f"{sweep_id}-t{i}" for i in range(4)]

    # 4 distinct output folders, each with its own training results
    outputs = [Path(t["output_dir"]) for t in trials]
    assert len(set(outputs)) == 4
    for out in outputs:
        assert (out / "metrics.jsonl").is_file() and (out / "adapter_model.safetensors").is_file()

    # registry rows linked to the sweep
    runs = json.loads(launch("runs", "--json", check=True).stdout)
    assert sorted(r["run_id"] for r in runs if r["sweep_id"] == sweep_id) == sorted(
        t["run_id"] for t in trials
    )
    assert all(r["trial"]["values"] for r in runs)

    # at most 2 running at any time: as the dispatcher recorded it, and as the processes
    # really ran (started no earlier than recorded, ended when their exit was written)
    recorded = [(t["started_at"], t["finished_at"]) for t in trials]
    assert _max_overlap(recorded) == 2
    actual = []
    for t in trials:
        exit_record = json.loads((Path(t["run_dir"]) / "exit.json").read_text())
        actual.append((t["started_at"], exit_record["finished_at"]))
    assert _max_overlap(actual) <= 2

    # the report: 4 rows sorted by the metric, the best marked, a valid PNG
    report = json.loads(launch("sweep", "report", sweep_id, "--json", check=True).stdout)
    finals = [row["final_loss"] for row in report["trials"]]
    assert report["metric"] == "loss" and len(finals) == 4 and finals == sorted(finals)
    assert report["varied"] == ["learning_rate", "lora_r"]
    table = launch("sweep", "report", sweep_id, "--out", str(tmp_path / "rep"), check=True).stdout
    rows = [line for line in table.splitlines() if re.match(r"^\s*\*?\s+t\d\s", line)]
    assert len(rows) == 4 and rows[0].lstrip().startswith("*")
    assert f"t{report['trials'][0]['trial']}" in rows[0]
    png = tmp_path / "rep" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 800 and height > 300
    assert (ferry_home / "sweeps" / sweep_id / "report.png").is_file()  # written at the end


def _wait_for_sweep(sweep_id: str, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(launch("sweep", "status", sweep_id, "--json", check=True).stdout)
        if status["state"] != "running":
            return status
        time.sleep(2)
    raise AssertionError(f"sweep {sweep_id} still running after {timeout}s")


def test_a_failing_trial_does_not_stop_the_others_and_retry_reruns_only_it(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "not an alpaca row"}\n' * 5)
    grid = tmp_path / "grid.yml"
    grid.write_text(f"datasets.0.path: [{DATA}, {bad}]\n")
    result = launch(
        "sweep",
        str(quickstart_config(tmp_path)),
        "--sweep",
        str(grid),
        "--max-parallel",
        "2",
        "--detach",
        *SHORT,
        check=True,
    )
    sweep_id = re.search(r"^sweep (\S+): 2 trials", result.stdout, re.M).group(1)
    assert f"launch sweep status {sweep_id} --watch" in result.stdout

    status = _wait_for_sweep(sweep_id)
    first, second = status["trials"]
    assert status["state"] == "finished"
    assert first["state"] == "succeeded", first["detail"]  # the reason, should it ever fail
    assert second["state"] == "failed" and "No usable rows" in second["detail"]

    bad.write_text(DATA.read_text())  # fix the data, then rerun the failed trial only
    retry = launch("sweep", "retry", sweep_id, "--failed", timeout=400, check=True)
    assert "retrying 1 trial(s): t1" in retry.stdout and "2 succeeded" in retry.stdout
    after = json.loads(launch("sweep", "status", sweep_id, "--json", check=True).stdout)["trials"]
    assert [t["state"] for t in after] == ["succeeded", "succeeded"]
    assert [t["attempts"] for t in after] == [1, 2]
    assert after[0]["started_at"] == first["started_at"]  # the good trial did not run again
    nothing = launch("sweep", "retry", sweep_id, "--failed")
    assert nothing.returncode == 1 and "has nothing to run" in nothing.stderr
