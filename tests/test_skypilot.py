"""The SkyPilot backend, in the Python that trains (SkyPilot's SDK is not installed here:
its own tests, tests/sky_sdk/, run in .venv-sky).

The task's `run` script is run the way SkyPilot runs it on a node: `/bin/bash -i` on the
script, with the task's envs, SkyPilot's variables and the file mount in place. What
cannot exist here is replaced, and only that:
  - the VMs: each "node" is a HOME folder of its own on this machine, both on loopback;
  - the file mount: the staged folder is copied to each HOME's ~/ferry-jobs/RUN_ID, as SkyPilot
    copies it;
  - the task's `setup`: its venv (~/ferry-venv) is one whose activate script puts this
    test's Python, which has the pinned training stack, first on PATH;
  - the cloud's bucket: the moto S3 server;
  - the rendezvous port: the contract's master_port is set to a free port, so that
    two tests never share 29500.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, launch, quickstart_config

from executors import get_executor
from executors.sky_task import stage, task_config
from launcher import api
from payload.storage import open_store

VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def staged(cfg: Path, **launch_settings) -> tuple:  # type: ignore[no-untyped-def]
    """The job as `launch train --cloud sky` makes it, its staged folder and its task."""
    job, cloud = api.prepare(cfg, cloud="sky", **launch_settings)
    assert cloud == "sky"
    get_executor("sky").check(job)
    folder = stage(job)
    contract = json.loads((folder / "job.json").read_text())
    contract["master_port"] = _free_port()
    (folder / "job.json").write_text(json.dumps(contract))
    return job, folder, task_config(job, folder)


def node(tmp_path: Path, name: str, folder: Path, task: dict) -> Path:
    """A machine's HOME: the file mount's copy of the job, the `setup` venv, the task's
    run script where SkyPilot writes it, and ~/sky_workdir, the run's working folder."""
    home = tmp_path / name
    ((mount, source),) = task["file_mounts"].items()
    assert mount == f"~/ferry-jobs/{task['name']}" and source == str(folder)
    shutil.copytree(folder, home / "ferry-jobs" / task["name"])
    activate = home / "ferry-venv" / "bin" / "activate"
    activate.parent.mkdir(parents=True)
    activate.write_text(f'export PATH="{VENV_BIN}:$PATH"\n')
    (home / "sky_workdir").mkdir()
    (home / "run.sh").write_text(task["run"])
    return home


def start(home: Path, task: dict, rank: int, nodes: int, **extra: str) -> subprocess.Popen:
    """The `run` script as SkyPilot starts it on node `rank`: bash -i, the task's envs,
    SkyPilot's variables (a CPU machine: 0 GPUs), in ~/sky_workdir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYPILOT_")}
    env.update(task["envs"])
    env.update(
        HOME=str(home),
        OMP_NUM_THREADS="1",
        SKYPILOT_NODE_RANK=str(rank),
        # Each node's own address differs: rank 1 must still dial the first one.
        SKYPILOT_NODE_IPS="\n".join(f"127.0.0.{n + 1}" for n in range(nodes)),
        SKYPILOT_NUM_NODES=str(nodes),
        SKYPILOT_NUM_GPUS_PER_NODE="0",
        SKYPILOT_TASK_ID="sky-managed-2026-12-03-10-00-00-000000_quickstart_7-0",
        **extra,
    )
    return subprocess.Popen(
        ["/bin/bash", "-i", str(home / "run.sh")],
        cwd=home / "sky_workdir",
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_the_run_script_trains_the_quickstart_as_two_nodes(tmp_path, s3_bucket):
    """Two "nodes" run the task's `run` script at once, as SkyPilot starts it on each:
    each finds its rank and the first node's address in SkyPilot's variables, torchrun
    gets the right arguments, and the two train one job of world size 2 into S3. The
    config lists a plugin in a file beside it: the file mount carries it, and its hook
    runs on the nodes (its file is in the final artifacts)."""
    (tmp_path / "note_plugin.py").write_text(
        "from pathlib import Path\n"
        "from payload.plugins import Plugin\n\n\n"
        "class NotePlugin(Plugin):\n"
        "    def after_training(self, cfg, summary):\n"
        "        if summary:  # rank 0\n"
        "            Path(cfg.output_dir, 'note.txt').write_text(str(summary['steps']))\n"
    )
    cfg = quickstart_config(
        tmp_path,
        "max_steps: 4\nnum_epochs: null\nsave_steps: 2\nlogging_steps: 1\n"
        "plugins: [note_plugin.NotePlugin]\n",
    )
    job, folder, task = staged(cfg, nodes=2, gpus="1", storage=f"s3://{s3_bucket}/runs")
    (tmp_path / "note_plugin.py").unlink()  # the nodes have only the file mount's copy
    assert task["num_nodes"] == 2
    port = json.loads((folder / "job.json").read_text())["master_port"]
    homes = [node(tmp_path, f"node{rank}", folder, task) for rank in (0, 1)]
    processes = [start(home, task, rank, 2) for rank, home in enumerate(homes)]
    outs = [finish(p) for p in processes]
    for rank, out in enumerate(outs):
        line = next(x for x in out.splitlines() if x.startswith(f"ferry: node {rank} of 2: "))
        assert (
            f"--nnodes 2 --node-rank {rank} --master-addr 127.0.0.1 --master-port {port} "
            "--nproc-per-node 1" in line
        ), line
        # The job's files were read from this node's own copy of the file mount.
        assert f"{homes[rank]}/ferry-jobs/{job.run_id}/work/config.yml" in line, line
    assert "| 2 x cpu (gloo)" in outs[0]
    assert "[step 4/4]" in outs[0]
    store = open_store(job.storage_uri)
    final = store.list("final")
    assert "final/adapter_model.safetensors" in final
    summary = json.loads(store.read_bytes("final/summary.json"))
    assert summary["steps"] == 4
    assert store.read_bytes("final/note.txt") == b"4"  # the shipped plugin's hook ran
    # The registry reads a remote run's summary from its storage (the step time a later
    # plan's cost estimate uses).
    from launcher.runs import read_summary, record_for

    record = record_for(job, cfg, "sky", storage_uri=job.storage_uri)
    assert record.output_dir is None or not (Path(record.output_dir) / "summary.json").exists()
    assert read_summary(record) == summary


@pytest.mark.slow
def test_a_recovered_managed_job_resumes_from_the_newest_complete_checkpoint(tmp_path, s3_bucket):
    """A managed job's first machine trained to step 6, saving every 2 steps; the
    storage is then left as a preemption leaves it: checkpoint-2 complete, checkpoint-4
    half-uploaded (no manifest, a file missing), nothing later. The recovered job starts
    on a new machine (an empty HOME) with the same environment: the same run id, storage
    URI and SKYPILOT_TASK_ID. It resumes from checkpoint-2, not 4, and ends at step 6."""
    cfg = quickstart_config(
        tmp_path,
        "max_steps: 6\nnum_epochs: null\nsave_steps: 2\nlogging_steps: 1\nsave_total_limit: 5\n",
    )
    job, folder, task = staged(cfg, managed=True, storage=f"s3://{s3_bucket}/runs")
    assert task["resources"]["job_recovery"]["recover_on_exit_codes"] == [75]
    finish(start(node(tmp_path, "first-machine", folder, task), task, 0, 1))
    store = open_store(job.storage_uri)
    keys = store.list("")
    assert any(k.startswith("checkpoints/checkpoint-4/") for k in keys), sorted(keys)
    store.delete_prefix("final")
    store.delete_prefix("checkpoints/checkpoint-6")
    four = sorted(k for k in store.list("checkpoints/checkpoint-4"))
    store.delete("checkpoints/checkpoint-4/ferry-manifest.json")
    store.delete(next(k for k in four if k.endswith("adapter_model.safetensors")))
    assert "checkpoints/checkpoint-2/ferry-manifest.json" in store.list("checkpoints/checkpoint-2")

    out = finish(start(node(tmp_path, "second-machine", folder, task), task, 0, 1))
    assert "resuming from step 2" in out, out[-3000:]
    assert "[step 3/6]" in out and "[step 6/6]" in out
    assert "[step 1/6]" not in out
    summary = json.loads(store.read_bytes("final/summary.json"))
    assert summary["steps"] == 6
    assert summary["resumed_from_step"] == 2
    assert "checkpoints/checkpoint-6/ferry-manifest.json" in store.list("checkpoints/checkpoint-6")


def test_the_dry_run_prints_the_task_with_secrets_named_never_valued(tmp_path):
    """The plan shows the task YAML SkyPilot will get; a secret is named with no value,
    though its value is set here, and nothing is written or recorded."""
    cfg = quickstart_config(tmp_path, "launch:\n  sky:\n    infra: aws\n")
    env = {"HF_TOKEN": "hf_planted_value_0123456789"}
    shown = launch(
        "train", str(cfg), "--cloud", "sky", "--gpus", "A10G:1", "--nodes", "2", "--spot",
        "--region", "us-east-1", "--storage", "s3://bucket/runs", "--secret", "HF_TOKEN",
        "--managed", "--retries", "3", "--timeout", "2h", "--dry-run", env=env, check=True,
    ).stdout  # fmt: skip
    assert "hf_planted_value" not in shown
    task = yaml.safe_load(shown.split("task (sky-task.yml):\n", 1)[1])
    assert task["secrets"] == {"HF_TOKEN": None}
    assert task["num_nodes"] == 2
    assert task["resources"] == {
        "accelerators": "A10G:1",
        "infra": "aws/us-east-1",
        "use_spot": True,
        "job_recovery": {
            "strategy": "EAGER_NEXT_REGION",
            "max_restarts_on_errors": 3,
            "recover_on_exit_codes": [75],
        },
    }
    # SIGTERM at the timeout (the ranks save and upload), SIGKILL after the stop grace.
    assert (
        task["run"]
        .rstrip()
        .endswith(
            "exec timeout --signal=TERM --kill-after=120s 7200s python -m payload.entry run "
            'job.json --root "$PWD"'
        )
    )
    assert "torch==2.13.0" in task["setup"]
    assert "after up to 3 error(s)" in shown
    # The plan's command is the task's run script, on one line, in the run's own folder.
    command = next(line for line in shown.splitlines() if line.startswith("command "))
    assert shlex.split(command.split(None, 1)[1]) == [
        "bash",
        "-c",
        "; ".join(task["run"].splitlines()),
    ]
    assert f"\ncd ~/ferry-jobs/{task['name']}\n" in task["run"]
    assert task["run"].startswith("source ~/ferry-venv/bin/activate\n")
    assert json.loads(launch("runs", "--json", env=env, check=True).stdout) == []


def test_without_skypilot_a_launch_fails_in_seconds_with_the_next_step(tmp_path):
    """No SkyPilot in this Python (a None in sys.modules, the interpreter's own "cannot
    be imported" mark, so the test holds where it is installed too): the launch stops
    before anything is recorded, in under 5 s, saying what to install; with
    `launch.max_cost` too (no price without SkyPilot), it says the same, not --yes."""
    code = (
        "import sys; sys.modules['sky'] = None; sys.argv[0] = 'launch'; "
        "from launcher.cli import main; main()"
    )
    home = tmp_path / "ferry"
    env = {**os.environ, "FERRY_HOME": str(home)}
    for extra in ("", "launch:\n  max_cost: 100\n"):
        cfg = quickstart_config(tmp_path, extra)
        started = time.monotonic()
        refused = subprocess.run(
            [sys.executable, "-c", code, "train", str(cfg), "--cloud", "sky", "--gpus",
             "A10G:1", "--storage", "s3://bucket/runs"],
            env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        took = time.monotonic() - started
        assert refused.returncode != 0
        assert "SkyPilot is not installed" in refused.stderr, refused.stderr
        assert "pip install 'ferry[sky]'" in refused.stderr
        assert "--yes" not in refused.stderr
        assert took < 5, took
    listed = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "runs", "--json"], env=env, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    assert json.loads(listed.stdout) == []


def test_the_modal_plan_prices_the_run_and_max_cost_refuses_without_a_terminal(tmp_path):
    """Modal's plan: its dated list price, the timeout's bound, and, once an earlier run
    of the same config on the same machines measured its step time, the expected cost. A
    launch above `launch.max_cost` without a terminal is refused with the figure, before
    anything is recorded; --yes goes past it (to Modal's own credential check)."""
    cfg = quickstart_config(
        tmp_path, "max_steps: 1000\nnum_epochs: null\nlaunch:\n  max_cost: 50\n"
    )
    env = {"MODAL_TOKEN_ID": "", "MODAL_TOKEN_SECRET": "", "HOME": str(tmp_path)}
    args = ["train", str(cfg), "--cloud", "modal", "--gpus", "H100:8", "--timeout", "10h"]
    # 8 x $3.95 + Modal's default 0.125 core x $0.0473 + 0.125 GiB x $0.008, per hour.
    hourly = 8 * 3.95 + 0.125 * 0.0473 + 0.125 * 0.008
    shown = launch(*args, "--dry-run", env=env, check=True).stdout
    assert f"${hourly:,.2f}/h per node (Modal's list prices of 2026-05-07)" in shown
    assert f"at most ${hourly * 10:,.2f} (1 node(s) x the 10 h timeout)" in shown

    refused = launch(*args, env=env)
    assert refused.returncode != 0
    assert f"${hourly * 10:,.2f} at most (to its timeout), is above launch.max_cost $50.00" in (
        refused.stderr
    ), refused.stderr
    assert json.loads(launch("runs", "--json", env=env, check=True).stdout) == []
    passed = launch(*args, "--yes", env=env)
    assert passed.returncode != 0 and "max_cost" not in passed.stderr, passed.stderr

    # An earlier Modal run of this config on 8 H100s: 200 steps in 360 s (1.8 s/step),
    # as the registry records it when that run ends.
    from launcher.registry import Registry
    from launcher.runs import record_for

    job, _ = api.prepare(cfg, cloud="modal", gpus="H100:8", timeout="10h")
    record = record_for(job, cfg, "modal")
    record.state = "succeeded"
    record.summary = {"steps": 200, "resumed_from_step": None, "wall_s": 360.0}
    Registry().add(record)
    shown = launch(*args, "--dry-run", env=env, check=True).stdout
    expected_h = 1000 * 1.8 / 3600
    assert f"about ${hourly * expected_h:,.2f} expected (1 node(s) x {expected_h:.2f} h" in shown
    assert f"1.80 s/step measured by run {record.run_id}" in shown


def test_every_example_is_a_task_with_its_files_and_payload(tmp_path):
    """Every shipped example stages: the contract, the files it names, and the payload
    source (setup mode), and its `run` names the contract's folder."""
    for example in sorted((ROOT / "examples").glob("*.yml")):
        job, _ = api.prepare(example, cloud="sky", storage="s3://bucket/runs")
        get_executor("sky").check(job)
        folder = stage(job)
        contract = json.loads((folder / "job.json").read_text())
        assert contract["cluster"] == "skypilot"
        assert contract["workdir"] == "/ferry/work"
        assert (folder / "payload" / "entry" / "__main__.py").exists()
        for value in json.dumps(contract["config"]).split('"'):
            if value.startswith("/ferry/inputs/"):  # a file, or a reward's `file.py:name`
                path = value.removeprefix("/ferry/").split(":")[0]
                assert (folder / path).exists(), (example, value)
        shutil.rmtree(folder)


def test_the_entry_roots_only_the_paths_the_launcher_wrote():
    """`--root DIR` moves the shipped inputs and the working folder under DIR (where the
    file mount put them on this node), and leaves a user's own /ferry/... path alone."""
    from payload.runtime.job import RemoteJob

    job = RemoteJob(
        run_id="r1",
        config={
            "output_dir": "/ferry/work/output",
            "datasets": [{"path": "/ferry/inputs/0-data.jsonl"}, {"path": "/ferry/data"}],
            "reward_funcs": ["/ferry/inputs/code-0/rewards.py:score"],
        },
        workdir="/ferry/work",
    )
    rooted = job.rooted("/home/u/ferry-job")
    assert rooted.workdir == "/home/u/ferry-job/work"
    assert rooted.config == {
        "output_dir": "/home/u/ferry-job/work/output",
        "datasets": [{"path": "/home/u/ferry-job/inputs/0-data.jsonl"}, {"path": "/ferry/data"}],
        "reward_funcs": ["/home/u/ferry-job/inputs/code-0/rewards.py:score"],
    }


def test_launch_sky_typos_are_refused_at_validate_with_the_key(tmp_path):
    """`launch validate` checks `launch.sky` the way SkyPilot would, without importing
    it: the cloud part of infra (with a did-you-mean), each accelerator's form, the
    cluster name's form; `managed` has one spelling, `launch.managed`. All collected in
    one error."""
    cfg = quickstart_config(
        tmp_path,
        "launch:\n  sky:\n    infra: awz/us-east-1\n    accelerators: [H100:8, 'A100 80GB:8']\n"
        "    cluster: -train\n    managed: true\n",
    )
    said = launch("validate", str(cfg))
    assert said.returncode != 0
    text = " ".join(said.stderr.split())
    assert "launch.sky.infra" in text and "Did you mean 'aws'?" in text
    # Only the bad entry is blamed (the error quotes the whole list after "got").
    assert "launch.sky.accelerators: 'A100 80GB:8': each entry is NAME or NAME:COUNT" in text
    assert "launch.sky.cluster" in text and "'-train' is not a name SkyPilot accepts" in text
    assert "launch.sky.managed" in text
    good = quickstart_config(
        tmp_path,
        "launch:\n  managed: true\n  sky:\n    infra: k8s\n    accelerators: [H100:8, L4:8]\n"
        "    cluster: my-team.train_1\n",
    )
    assert launch("validate", str(good)).returncode == 0


def test_a_sweep_and_a_resume_are_held_to_max_cost_too(tmp_path):
    """`launch.max_cost` bounds what one command may spend: a sweep's trials together
    (3 trials on 8 H100s for 1 h, each under the $80 limit, $94.82 in all) are refused
    without a terminal, the sum shown in its dry run; --yes goes on (to Modal's own
    credential check). `launch resume` holds a stopped run to its limit as its first
    launch did."""
    cfg = quickstart_config(tmp_path, "launch:\n  max_cost: 80\n")
    grid = tmp_path / "grid.yml"
    grid.write_text("learning_rate: [0.0001, 0.0002, 0.0003]\n")
    env = {"MODAL_TOKEN_ID": "", "MODAL_TOKEN_SECRET": "", "HOME": str(tmp_path)}
    args = ["sweep", "run", str(cfg), "--sweep", str(grid), "--cloud", "modal"]
    args += ["--gpus", "H100:8", "--timeout", "1h"]
    hourly = 8 * 3.95 + 0.125 * 0.0473 + 0.125 * 0.008  # as in the Modal plan test
    total = f"${3 * hourly:,.2f}"
    shown = launch(*args, "--dry-run", env=env, check=True).stdout
    assert f"cost: {total} at most for 3 priced trial(s)" in " ".join(shown.split())
    refused = launch(*args, env=env)
    assert refused.returncode != 0
    said = " ".join(refused.stderr.split())
    assert f"this sweep's estimated cost, {total} at most for 3 priced trial(s), is above " in said
    assert "launch.max_cost $80.00" in said
    assert json.loads(launch("runs", "--json", env=env, check=True).stdout) == []
    passed = launch(*args, "--yes", env=env)
    assert passed.returncode != 0 and "max_cost" not in passed.stderr, passed.stderr

    from launcher.registry import Registry
    from launcher.runs import record_for

    job, _ = api.prepare(cfg, cloud="modal", gpus="H100:8", timeout="3h")
    job.write()
    record = record_for(job, cfg, "modal")
    record.state = "preempted"
    Registry().add(record)
    refused = launch("resume", record.run_id, env=env)
    assert refused.returncode != 0
    assert f"${3 * hourly:,.2f} at most (to its timeout), is above launch.max_cost $80.00" in (
        " ".join(refused.stderr.split())
    ), refused.stderr
    passed = launch("resume", record.run_id, "--yes", env=env)
    assert passed.returncode != 0 and "max_cost" not in passed.stderr, passed.stderr


def test_settings_that_would_surprise_are_said_before_launch(tmp_path):
    """A named cluster that `down` would tear down is warned about; an instance type
    without accelerators is not called a CPU machine; --region with a Kubernetes
    context is refused (it would be dropped)."""
    executor = get_executor("sky")
    storage = "s3://bucket/runs"
    cfg = quickstart_config(tmp_path, "launch:\n  sky:\n    cluster: team-box\n")
    job, _ = api.prepare(cfg, cloud="sky", gpus="A10G:1", storage=storage)
    said = " ".join(executor.warnings(job))
    assert "`launch.sky.cluster: team-box` with `down` (the default)" in said
    cfg = quickstart_config(
        tmp_path, "launch:\n  sky:\n    cluster: team-box\n    down: false\n"
        "    instance_type: g5.xlarge\n",
    )  # fmt: skip
    job, _ = api.prepare(cfg, cloud="sky", storage=storage)
    said = " ".join(executor.warnings(job))
    assert "torn down" not in said and "CPU machine" not in said
    cfg = quickstart_config(tmp_path, "launch:\n  sky:\n    infra: k8s\n")
    job, _ = api.prepare(cfg, cloud="sky", gpus="A10G:1", region="us-east-1", storage=storage)
    assert any("names a Kubernetes or SSH context" in p for p in executor.problems(job))
