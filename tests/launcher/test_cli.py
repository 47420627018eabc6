"""The `launch` CLI as a user meets it: real subprocesses, real exit codes, real output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import BLOCKER, QUICKSTART, ROOT, launch, quickstart_config


def test_help_validate_and_dry_run_never_import_torch_or_cloud_sdks(tmp_path):
    """If this fails, something on the CLI path imports a heavy module at module level."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    # The blocker works: importing torch under it fails loudly.
    blocked = subprocess.run(
        [sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env
    )
    assert blocked.returncode != 0 and "BLOCKED-IMPORT torch" in blocked.stderr
    # A config that lists a plugin: resolving it (and its keys) stays light.
    plugged = quickstart_config(
        tmp_path,
        "plugins: [axolotl.integrations.swanlab.SwanLabPlugin, axolotl.integrations."
        "liger.LigerPlugin, axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin]\n"
        "use_swanlab: true\nswanlab_project: p\nswanlab_mode: offline\nliger_rms_norm: "
        "true\nlora_mlp_kernel: true\n",
    )
    for args in (
        ["--help"],
        ["validate", "examples/quickstart.yml"],
        ["validate", str(plugged)],
        ["train", "examples/quickstart.yml", "--dry-run", "--gpus", "2"],
        [
            "train",
            "examples/quickstart.yml",
            "--dry-run",
            "--cloud",
            "modal",
            "--gpus",
            "H100:8",
            "--nodes",
            "2",
        ],
        [
            "train",
            "examples/quickstart.yml",
            "--dry-run",
            "--cloud",
            "ray",
            "--ray-address",
            "http://head:8265",
            "--storage",
            "s3://bucket/runs",
        ],
    ):
        result = launch(*args, env=env)
        assert result.returncode == 0, f"launch {args}: {result.stdout}{result.stderr}"
        assert "BLOCKED-IMPORT" not in result.stderr, f"launch {args}: {result.stderr}"


def test_validate_skips_pydantics_scan_of_installed_packages_for_its_plugins(tmp_path):
    """pydantic reads every installed distribution's entry points for its own plugins
    when the first model is built (25-30 ms of `launch validate`); the CLI turns that
    off. The scan is watched by wrapping importlib.metadata.entry_points."""
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.metadata as m, sys\n"
        "_real = m.entry_points\n"
        "def watched(**kw):\n"
        "    sys.stderr.write(f\"ENTRY-POINTS {kw.get('group')}\\n\")\n"
        "    return _real(**kw)\n"
        "m.entry_points = watched\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    env["PYTHONPATH"] = str(tmp_path)
    # The watch works: a pydantic model built outside the CLI scans.
    scanned = subprocess.run(
        [sys.executable, "-c", "import pydantic\nclass M(pydantic.BaseModel):\n    x: int"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert "ENTRY-POINTS pydantic" in scanned.stderr, scanned.stderr
    result = launch(
        "validate",
        "examples/quickstart.yml",
        env={"PYTHONPATH": str(tmp_path), "PYDANTIC_DISABLE_PLUGINS": None},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ENTRY-POINTS pydantic" not in result.stderr, result.stderr


def test_processes_launch_starts_get_the_users_pydantic_plugin_setting_back(monkeypatch):
    """The scan is off in `launch` itself; a process it starts (a local run, preprocess)
    sees the environment as the user left it, and a value the user set is theirs."""
    from payload.runtime import procs
    from payload.runtime.procs import child_environ, skip_pydantic_plugin_scan

    monkeypatch.delenv("PYDANTIC_DISABLE_PLUGINS", raising=False)
    monkeypatch.setattr(procs, "_set_here", False)
    skip_pydantic_plugin_scan()
    assert os.environ["PYDANTIC_DISABLE_PLUGINS"] == "__all__"
    child = child_environ()
    assert "PYDANTIC_DISABLE_PLUGINS" not in child
    assert child["PATH"] == os.environ["PATH"]

    monkeypatch.setattr(procs, "_set_here", False)  # a new process, where the user set it
    monkeypatch.setenv("PYDANTIC_DISABLE_PLUGINS", "logfire")
    skip_pydantic_plugin_scan()
    assert os.environ["PYDANTIC_DISABLE_PLUGINS"] == "logfire"
    assert child_environ()["PYDANTIC_DISABLE_PLUGINS"] == "logfire"


def test_validate_ok_prints_a_one_line_summary():
    result = launch("validate", "examples/quickstart.yml", check=True)
    assert "examples/quickstart.yml is valid" in result.stdout
    assert "lora r=16" in result.stdout and "2 epochs" in result.stdout


def test_validate_misspelt_key_exits_1_naming_the_right_key(tmp_path):
    cfg = quickstart_config(tmp_path, "lerning_rate: 1.0e-4\n")
    result = launch("validate", str(cfg))
    assert result.returncode == 1
    assert "lerning_rate" in result.stderr and "did you mean `learning_rate`" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_validate_reports_three_independent_errors_at_once(tmp_path):
    cfg = quickstart_config(tmp_path, "lerning_rate: 1\nweight_decay: -1\nwarmup_ratio: 0.1\n")
    result = launch("validate", str(cfg))
    assert result.returncode == 1
    assert "has 3 problems" in result.stderr
    for key in ("lerning_rate", "weight_decay", "warmup_steps"):
        assert key in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    cfg = quickstart_config(tmp_path, "lerning_rate: 1\n")
    result = launch("--debug", "validate", str(cfg))
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_overrides_on_the_command_line_are_validated(tmp_path):
    result = launch("validate", "examples/quickstart.yml", "--set", "lora_r=-1")
    assert result.returncode == 1 and "lora_r: should be greater than 0 (got -1)" in result.stderr


def test_warnings_print_but_do_not_fail():
    result = launch("validate", "examples/quickstart.yml", "--set", "adapter=null")
    assert result.returncode == 0
    assert "warning:" in result.stderr and "lora_alpha, lora_dropout, lora_r" in result.stderr


def test_missing_config_file():
    result = launch("validate", "nope.yml")
    assert result.returncode == 1 and "Config file nope.yml does not exist" in result.stderr


def test_dry_run_prints_the_plan_and_starts_nothing(ferry_home):
    result = launch(
        "train",
        "examples/quickstart.yml",
        "--dry-run",
        "--gpus",
        "2",
        "--set",
        "num_epochs=1",
        check=True,
    )
    assert "nothing was started" in result.stdout
    assert "--nproc-per-node 2 --shutdown-timeout 120 -m payload train" in result.stdout
    assert "2 x CPU process (gloo)" in result.stdout  # conftest hides any GPU
    assert json.loads(launch("runs", "--json", check=True).stdout) == []
    assert not (ferry_home / "runs").exists()


def test_unknown_backend_lists_the_available_ones():
    result = launch("train", "examples/quickstart.yml", "--cloud", "nimbus")
    assert result.returncode == 1 and "No backend named 'nimbus'" in result.stderr
    assert "local" in result.stderr


def test_bad_gpus_flag():
    result = launch("train", "examples/quickstart.yml", "--gpus", "H100:zero", "--dry-run")
    assert result.returncode == 1 and "ACCELERATOR:COUNT" in result.stderr


def test_gpu_only_settings_are_refused_before_launch_on_a_cpu_machine():
    """A machine without a GPU, on any host: conftest hides CUDA devices from the CLI."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    result = launch("train", "examples/quickstart.yml", "--set", "fp16=true", "--dry-run")
    assert result.returncode == 1 and "`fp16` needs a CUDA GPU" in result.stderr


def test_status_of_unknown_run_suggests_launch_runs():
    result = launch("status", "no-such-run")
    assert result.returncode == 1
    assert "No run 'no-such-run'" in result.stderr and "launch runs" in result.stderr


def test_cancel_refuses_to_prompt_without_a_terminal():
    result = launch("cancel", "whatever")
    assert result.returncode == 1 and "pass --yes" in result.stderr


def test_runs_on_an_empty_registry():
    assert json.loads(launch("runs", "--json", check=True).stdout) == []
    assert "No runs yet" in launch("runs", check=True).stdout


def test_every_example_validates_and_plans_on_every_backend():
    """STYLE 7: a shipped example that does not validate is a bug."""
    from executors import available

    examples = sorted((ROOT / "examples").glob("*.yml"))
    assert QUICKSTART in examples
    for example in examples:
        rel = str(Path(example).relative_to(ROOT))
        launch("validate", rel, check=True)
        for backend in available():
            if backend == "local" and "\n  nodes: 2\n" in example.read_text():
                continue  # one machine only: tests/test_multinode.py checks its refusal
            # Ray needs its cluster's address and storage every node reaches; SkyPilot
            # storage a new machine reaches after a preemption.
            ray = ["--ray-address", "http://head:8265", "--storage", "s3://bucket/runs"]
            sky = ["--storage", "s3://bucket/runs"]
            extra = {"ray": ray, "sky": sky}.get(backend, [])
            launch("train", rel, "--cloud", backend, "--dry-run", *extra, check=True)
    grids = sorted((ROOT / "examples" / "sweeps").glob("*.yml"))
    assert grids
    for grid in grids:  # each sweep example names the config it is for in its header
        config = re.search(r"launch sweep (\S+)", grid.read_text()).group(1)
        launch("sweep", config, "--sweep", str(grid.relative_to(ROOT)), "--dry-run", check=True)
