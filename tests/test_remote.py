"""The remote path in the form the platforms run it.

Modal: the function the Modal executor builds is serialized exactly as the SDK does when
it creates the function (`FunctionSourceInfo.serialized_function`, i.e.
`modal._serialization.serialize`), written to a file, and loaded with
`modal._serialization.deserialize` in a fresh interpreter whose only Ferry code is a copy
of `payload/` (the image's files), with `launcher`, `executors` and `images` blocked.
There it is called with the job's JSON, as a Modal container calls it, and trains.

What cannot exist here is replaced, and only that: Modal's file mounts (the job's
config is pointed at the local copies of the files Modal would mount at /ferry/inputs),
the runs volume (a temp folder, FERRY_VOLUME_MOUNTS pointing at it), Modal's secret
injection (AWS variables set in the container's environment, as a Modal secret would),
and the preemption notice (SIGINT sent to the container's process, as Modal sends it).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import ASSETS, DATA, ROOT, TWO_RANK_RUN, quickstart_config

from executors import RunState
from executors.modal import ModalExecutor, status_from_outcome
from launcher import api
from payload.storage import MANIFEST, latest_complete_checkpoint, open_store
from payload.storage.layout import read_metrics

pytestmark = pytest.mark.slow

BLOCKER = textwrap.dedent(
    '''
    """sitecustomize: the image has no launcher, executors or images packages."""
    import importlib.abc, sys

    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("launcher", "executors", "images"):
                raise ImportError(f"not in the image: {name}")
            return None

    sys.meta_path.insert(0, _Blocked())
    '''
)

CONTAINER = textwrap.dedent(
    """
    # What a Modal container does with a serialized function: load it, call it with the
    # input, hand back the value or the exception (pickled, as Modal returns them).
    import pickle, sys
    from pathlib import Path

    import payload
    assert Path(payload.__file__).resolve().is_relative_to(Path.cwd().resolve()), payload.__file__
    for name in ("launcher", "executors", "images"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} is importable in the image")

    from modal._serialization import deserialize

    if sys.argv[4:] == ["--cancel-on-usr1"]:
        # Modal's container cancels a sync function's input so: SIGUSR1, whose handler
        # raises InputCancellation in the main thread, where the function runs.
        import signal

        from modal.exception import InputCancellation

        def cancel(signum, frame):
            raise InputCancellation("Input was cancelled by user")

        signal.signal(signal.SIGUSR1, cancel)
    function = deserialize(Path(sys.argv[1]).read_bytes(), None)
    job_json = Path(sys.argv[2]).read_text()
    try:
        outcome = ("value", function(job_json))
    except BaseException as e:
        outcome = ("error", e)
    Path(sys.argv[3]).write_bytes(pickle.dumps(outcome))
    """
)


class Image:
    """A folder holding what the image holds of Ferry (payload/), the import blocker, and
    the Modal function as the SDK serialized it."""

    def __init__(self, root: Path, function_bytes: bytes):
        self.root = root
        shutil.copytree(
            ROOT / "payload", root / "payload", ignore=shutil.ignore_patterns("__pycache__")
        )
        (root / "site").mkdir()
        (root / "site" / "sitecustomize.py").write_text(BLOCKER)
        (root / "container.py").write_text(CONTAINER)
        (root / "function.bin").write_bytes(function_bytes)

    def start(
        self, job_json: str, name: str, env: dict[str, str], *flags: str
    ) -> tuple[subprocess.Popen, Path, Path]:
        """Run the function in a fresh interpreter here; (process, log, outcome file)."""
        job = self.root / f"{name}.json"
        job.write_text(job_json)
        outcome, log = self.root / f"{name}.outcome", self.root / f"{name}.log"
        full_env = {
            **os.environ,
            **env,
            "PYTHONPATH": f"{self.root}{os.pathsep}{self.root / 'site'}",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
        with log.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, "container.py", "function.bin", str(job), str(outcome), *flags],
                cwd=self.root,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return process, log, outcome


def built(tmp_path: Path, extra: str, **launch) -> tuple[bytes, dict]:
    """The Modal function as the SDK serializes it, and the job it receives, rewritten
    where Modal's mounts cannot exist here (see the module docstring)."""
    cfg = quickstart_config(tmp_path, extra)
    job, _ = api.prepare(cfg, cloud="modal", **launch)
    _, function, job_json = ModalExecutor().build(job)
    function_bytes = function._source_info_.serialized_function()  # what Modal uploads
    assert b"payload.entry.modal" in function_bytes and b"executors" not in function_bytes
    contract = json.loads(job_json)
    assert contract["config"]["base_model"].startswith("/ferry/inputs/")
    contract["config"]["base_model"] = str(ASSETS / "tiny-llama")
    contract["config"]["datasets"][0]["path"] = str(DATA)
    contract["workdir"] = str(tmp_path / "container")
    contract["config"]["output_dir"] = str(tmp_path / "container" / "output")
    contract["env"]["HF_HOME"] = str(tmp_path / "hf")
    return function_bytes, contract


def outcome_of(path: Path):  # type: ignore[no-untyped-def]
    kind, value = pickle.loads(path.read_bytes())
    return status_from_outcome(value=value) if kind == "value" else status_from_outcome(error=value)


def test_the_serialized_modal_function_trains_where_only_the_image_exists(tmp_path):
    """The function Modal ships resolves and trains in an interpreter that has only the
    image's payload/ and cannot import launcher, executors or images."""
    function_bytes, job = built(
        tmp_path, "max_steps: 4\nnum_epochs: null\nsave_steps: 2\nlogging_steps: 1\n", gpus="1"
    )
    volume = tmp_path / "volume"
    job["volume_mounts"] = {"ferry-runs": str(volume)}  # the runs volume, as mounted
    image = Image(tmp_path / "image", function_bytes)
    process, log, outcome = image.start(json.dumps(job), "run", {})
    assert process.wait(timeout=300) == 0, log.read_text()

    status = outcome_of(outcome)
    assert status.state == RunState.SUCCEEDED and status.exit_code == 0, log.read_text()
    run = volume / job["run_id"]
    store = open_store(f"file://{run}")
    assert latest_complete_checkpoint(store).step == 4
    assert (run / "checkpoints" / "checkpoint-2" / MANIFEST).is_file()
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "final" / MANIFEST).is_file()
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert (tmp_path / "container" / "config.yml").is_file()


def test_a_user_error_returns_exit_1_with_the_reason_and_is_not_retried(tmp_path):
    """A config that cannot work ends the call with a value (Modal does not retry a
    value), exit code 1 and the payload's own message."""
    function_bytes, job = built(tmp_path, "", gpus="1")
    job["config"]["datasets"][0]["path"] = str(tmp_path / "missing.jsonl")
    job["volume_mounts"] = {"ferry-runs": str(tmp_path / "volume")}
    process, log, outcome = Image(tmp_path / "image", function_bytes).start(
        json.dumps(job), "run", {}
    )
    assert process.wait(timeout=300) == 0, log.read_text()
    kind, value = pickle.loads(outcome.read_bytes())
    assert kind == "value" and value["exit_code"] == 1, log.read_text()
    assert "missing.jsonl" in value["detail"]
    assert status_from_outcome(value).state == RunState.FAILED


def test_sigint_as_modal_preempts_saves_uploads_and_the_restart_resumes_exactly(
    tmp_path, s3_bucket, two_rank_reference
):
    """Modal's preemption notice, SIGINT, to the container's process while 2 ranks train:
    it reaches torchrun, the ranks save at one agreed step, rank 0 uploads to S3 (moto)
    with its manifest while rank 1 waits, and the call ends with exit code 75, which the
    launcher reads as preempted. Modal then restarts the call on the same input: it
    resumes there and ends at the planned step with the losses of an uninterrupted run."""
    storage = f"s3://{s3_bucket}/runs"
    function_bytes, job = built(tmp_path, TWO_RANK_RUN, gpus="2", storage=storage, secrets=["aws"])
    assert job["procs_per_node"] == 2 and job["storage_uri"].startswith(storage)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert name not in job["env"]  # the secret's values arrive in the container's env
    aws = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}  # "the secret"
    image = Image(tmp_path / "image", function_bytes)

    process, log, outcome = image.start(json.dumps(job), "first", aws)
    deadline = time.monotonic() + 240
    while "[step 9/" not in log.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "training did not reach step 9"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)  # to the container's process only, as Modal does
    assert process.wait(timeout=240) == 0, log.read_text()
    text = log.read_text()
    status = outcome_of(outcome)
    assert (status.state, status.exit_code) == (RunState.PREEMPTED, 75), text
    step = int(re.search(r"stopped by SIGINT at step (\d+)", text).group(1))
    assert 9 <= step < 24
    store = open_store(job["storage_uri"])
    assert latest_complete_checkpoint(store).step == step
    assert f"checkpoints/checkpoint-{step}/{MANIFEST}" in store.list("checkpoints")

    # Modal restarts the input in a new container: nothing of the first one is left.
    fresh = tmp_path / "second-container"
    job = {
        **job,
        "workdir": str(fresh),
        "config": {**job["config"], "output_dir": str(fresh / "out")},
    }
    process, log, outcome = image.start(json.dumps(job), "restart", aws)
    assert process.wait(timeout=300) == 0, log.read_text()
    assert outcome_of(outcome).state == RunState.SUCCEEDED, log.read_text()
    assert f"resuming from step {step}" in log.read_text()
    losses = {r["step"]: r["loss"] for r in read_metrics(fresh / "out") if "loss" in r}
    assert sorted(losses) == list(range(1, 25))
    assert losses == pytest.approx(two_rank_reference, rel=1e-5)


def test_a_cancelled_input_stops_torchrun_and_its_ranks_before_the_function_returns(tmp_path):
    """Modal cancels an input by raising InputCancellation in the function's thread,
    interrupting its wait on torchrun. The wrapper must not leave torchrun (and the GPUs)
    running: every process it started is gone when the function returns, and the ranks
    were stopped the graceful way (a checkpoint saved), not killed."""
    from payload.runtime.procs import process_tree, running

    function_bytes, job = built(
        tmp_path, "num_epochs: 50\nlogging_steps: 1\nsave_steps: 1000\n", gpus="2"
    )
    volume = tmp_path / "volume"
    job["volume_mounts"] = {"ferry-runs": str(volume)}
    process, log, outcome = Image(tmp_path / "image", function_bytes).start(
        json.dumps(job), "run", {}, "--cancel-on-usr1"
    )
    deadline = time.monotonic() + 240
    while "[step 3/" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    tree = process_tree(process.pid)
    assert len(tree) >= 4, tree  # the function's process, torchrun, 2 ranks
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=240) == 0, log.read_text()
    kind, error = pickle.loads(outcome.read_bytes())
    assert kind == "error" and type(error).__name__ == "InputCancellation"
    assert not [pid for pid in tree if running(pid)]
    text = log.read_text()
    assert "ferry: stopping torchrun before leaving" in text
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", text).group(1))
    store = open_store(f"file://{volume / job['run_id']}")
    assert latest_complete_checkpoint(store).step == step


RUN_SCRIPT = """\
#!/usr/bin/env bash
# What a SkyPilot task's `run:` does on each node: start the job contract's entry.
set -euo pipefail
python -m payload.entry run "$1"
"""


def test_the_entry_for_skypilot_and_ray_runs_a_job_from_bash(tmp_path):
    """`python -m payload.entry run JOB.json`, started by bash where only the image's
    files exist: one node trains into its storage; a 2-node job outside any cluster stops
    at once with exit 1 and says why (it never trains on one node)."""
    from executors.base import remote_job

    cfg = quickstart_config(tmp_path, "max_steps: 2\nnum_epochs: null\n")
    job, _ = api.prepare(cfg, storage=f"file://{tmp_path / 'storage'}")
    config = {**job.config, "output_dir": str(tmp_path / "work" / "output")}
    contract = remote_job(job, config, "single")
    image = Image(tmp_path / "image", b"")
    (image.root / "run.sh").write_text(RUN_SCRIPT)
    (image.root / "job.json").write_text(contract.to_json())
    env = {
        **os.environ,
        # `python` is the image's: the one with the training stack.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{image.root}{os.pathsep}{image.root / 'site'}",
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(
        ["bash", "run.sh", "job.json"], cwd=image.root, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    store = open_store(job.storage_uri)
    assert "final/adapter_model.safetensors" in store.list("final")

    two = json.loads(contract.to_json()) | {"nodes": 2, "cluster": "skypilot"}
    (image.root / "two.json").write_text(json.dumps(two))
    refused = subprocess.run(
        ["bash", "run.sh", "two.json"], cwd=image.root, env=env, capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert "asks for 2 nodes, but this container found no skypilot cluster" in refused.stderr
    assert "[step" not in refused.stdout
