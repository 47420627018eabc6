"""The Modal backend with the real Modal SDK (offline): the app, image, volumes and
function it builds; the multi-node wiring; the plan; a launch with no token; and the
function body trained in-process.

Only the network edge is missing here: nothing is sent to Modal. `.local()` runs the
function body in this process, but it mounts no volume and injects no secret, which is
why the in-process test hands the body a temp folder as the runs volume and no secrets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, launch, quickstart_config
from payload.remote import torchrun_args

from executors import get_executor
from executors.modal import ModalExecutor, job_payload, shipped_inputs
from launcher import api
from payload.storage import MANIFEST, latest_complete_checkpoint, open_store

SECRET_VALUE = "hf_live_tOkEn_9f8e7d"  # what must never appear in anything we build


@pytest.fixture
def no_modal_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    monkeypatch.delenv("MODAL_CONFIG_PATH", raising=False)


def modal_job(tmp_path, extra: str = "", **launch):
    cfg = quickstart_config(tmp_path, extra)
    job, cloud = api.prepare(cfg, cloud="modal", **launch)
    assert cloud == "modal"
    return job


class Spy:
    """Records the keyword arguments of the real `modal.App.function` and calls it."""

    def __init__(self, monkeypatch):
        import modal

        self.calls: list[dict] = []
        original = modal.App.function

        def function(app, **kwargs):  # type: ignore[no-untyped-def]
            self.calls.append(kwargs)
            return original(app, **kwargs)

        monkeypatch.setattr(modal.App, "function", function)


def test_the_app_image_volumes_and_function_built_with_the_real_sdk(tmp_path, monkeypatch):
    import modal

    monkeypatch.setenv("HF_TOKEN", SECRET_VALUE)  # a secret on the laptop must stay there
    spy = Spy(monkeypatch)
    job = modal_job(
        tmp_path,
        gpus="H100:4",
        timeout="6h",
        retries=2,
        memory="64GB",
        secrets=["hf-token", "wandb"],
        env={"WANDB_MODE": "offline"},
    )
    app, function, payload = ModalExecutor().build(job)

    assert isinstance(app, modal.App) and isinstance(function, modal.Function)
    spec = function._spec_
    assert spec.gpus == "H100:4"
    assert {path: repr(v) for path, v in spec.volumes.items()} == {
        "/vol/ferry-runs": "modal.Volume.from_name('ferry-runs')",
        "/cache/hf": "modal.Volume.from_name('ferry-hf-cache')",
    }
    options = spy.calls[0]
    assert options["timeout"] == 6 * 3600 and options["memory"] == 64 * 1024
    assert options["retries"].max_retries == 2
    assert [repr(s) for s in options["secrets"]] == [
        "modal.Secret.from_name('hf-token')",
        "modal.Secret.from_name('wandb')",
    ]
    assert payload["storage_uri"] == f"volume://ferry-runs/{job.run_id}"
    assert payload["volume_mounts"]["ferry-runs"] == "/vol/ferry-runs"
    assert payload["env"]["WANDB_MODE"] == "offline"

    # No secret value anywhere: config shipped, function arguments, image, plan.
    from images.render import dockerfile

    shipped = yaml.safe_dump(payload["config"]) + json.dumps(payload)
    everything = [
        shipped,
        dockerfile(job.image),
        repr(job.image),
        json.dumps(options, default=repr),
        get_executor("modal").plan(job).text(),
        (job.run_dir / "job.json").read_text() if (job.run_dir / "job.json").exists() else "",
    ]
    for text in everything:
        assert SECRET_VALUE not in text


def test_local_files_travel_with_the_job_and_the_config_points_at_them(tmp_path):
    job = modal_job(tmp_path)
    config, inputs = shipped_inputs(job.config)
    assert [str(local) for local, _ in inputs] == [
        str(ROOT / "examples/assets/tiny-llama"),
        str(ROOT / "examples/data/alpaca_tiny.jsonl"),
    ]
    assert config["base_model"] == "/ferry/inputs/0-tiny-llama"
    assert config["datasets"][0]["path"] == "/ferry/inputs/1-alpaca_tiny.jsonl"
    assert job.config["datasets"][0]["path"].startswith(str(ROOT))  # the job itself untouched


def test_every_dataset_list_and_the_prepared_cache_travel(tmp_path):
    job = modal_job(tmp_path)
    chats = str(ROOT / "examples/data/chat_tiny.jsonl")
    config = {
        **job.config,
        "test_datasets": [{"path": chats, "type": "chat_template"}],
        "pretraining_dataset": [{"path": str(ROOT / "examples/assets/corpus.txt")}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
    }
    shipped, inputs = shipped_inputs(config)
    assert shipped["test_datasets"][0]["path"] == "/ferry/inputs/2-chat_tiny.jsonl"
    assert shipped["pretraining_dataset"][0]["path"] == "/ferry/inputs/3-corpus.txt"
    assert shipped["dataset_prepared_path"] == "/vol/ferry-runs/prepared"
    assert len(inputs) == 4 and config["test_datasets"][0]["path"] == chats


class FakeCluster:
    """Stands in for modal.Cluster.from_context(), which exists only inside a cluster."""

    def __init__(self, rank: int, ips: list[str]):
        self.rank, self.ips = rank, ips

    def container_rank(self) -> int:
        return self.rank

    def container_ips(self) -> list[str]:
        return self.ips


def test_multi_node_torchrun_arguments_come_from_the_cluster():
    args = torchrun_args(2, 8, FakeCluster(1, ["fd00::a", "fd00::b"]))
    assert args == [
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "fd00::a",
        "--master-port",
        "29500",
        "--nproc-per-node",
        "8",
    ]


def test_without_a_cluster_context_it_falls_back_to_one_node():
    assert torchrun_args(2, 8, None) == ["--standalone", "--nproc-per-node", "8"]
    assert torchrun_args(1, 4, FakeCluster(0, ["fd00::a"])) == [
        "--standalone",
        "--nproc-per-node",
        "4",
    ]
    with pytest.raises(RuntimeError, match="expected a cluster of 3"):
        torchrun_args(3, 8, FakeCluster(0, ["a", "b"]))


def test_clustered_function_for_multi_node(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    job = modal_job(tmp_path, gpus="H100:8", nodes=2)
    _, function, payload = ModalExecutor().build(job)
    assert payload["nodes"] == 2 and payload["gpus_per_node"] == 8
    assert spy.calls[0]["gpu"] == "H100:8"
    assert function is not None


@pytest.mark.parametrize(
    ("launch_args", "words"),
    [
        ({"gpus": "H100:4", "nodes": 2}, "takes all 8 GPUs"),
        ({"gpus": "T4:8", "nodes": 2}, "multi-node runs need"),
        ({"gpus": "V100:1"}, "Modal has no V100"),
        ({"gpus": "A10G:8"}, "at most 4 A10G"),
        ({"gpus": "H100:1", "timeout": "30h"}, "at most 24h"),
        ({"storage": "file:///tmp/x"}, "out of a Modal job's reach"),
        ({"storage": "s3://b/p"}, "needs AWS credentials"),
    ],
)
def test_impossible_requests_are_refused_before_launch(tmp_path, launch_args, words):
    from payload.errors import FerryError

    job = modal_job(tmp_path, **launch_args)
    with pytest.raises(FerryError, match=words):
        get_executor("modal").check(job)


def test_dry_run_prints_the_whole_plan_without_a_token(no_modal_token):
    result = launch(
        "train",
        "examples/quickstart.yml",
        "--cloud",
        "modal",
        "--gpus",
        "H100:8",
        "--nodes",
        "2",
        "--secret",
        "hf-token",
        "--dry-run",
        check=True,
    )
    out = result.stdout
    for expected in (
        "image     ferry:",
        "gpu       H100:8",
        "nodes     2 (modal.clustered",
        "secrets   hf-token",
        "/vol/ferry-runs <- ferry-runs",
        "/cache/hf <- ferry-hf-cache",
        "--nnodes 2",
        "-m payload train",
    ):
        assert expected in out, expected


def test_a_real_launch_without_a_token_fails_fast_with_the_fix(no_modal_token):
    started = time.monotonic()
    result = launch("train", "examples/quickstart.yml", "--cloud", "modal", "--gpus", "H100:1")
    took = time.monotonic() - started
    assert result.returncode == 1
    assert "No Modal token found" in result.stderr and "modal token new" in result.stderr
    assert "Traceback" not in result.stderr
    assert took < 3, f"took {took:.1f}s"  # about 0.6 s here, start-up included
    assert json.loads(launch("runs", "--json", check=True).stdout) == []  # nothing recorded


@pytest.mark.slow
def test_the_function_body_trains_in_process_into_the_runs_volume(tmp_path, monkeypatch):
    """`.local()` runs the real Modal function body here: it trains the quickstart on CPU
    and syncs to a temp folder standing in for the mounted runs volume."""
    job = modal_job(tmp_path, "max_steps: 4\nnum_epochs: null\nsave_steps: 2\n")
    _, function, payload = ModalExecutor().build(job)
    volume = tmp_path / "volume"
    payload["config"] = {**job.config, "output_dir": str(tmp_path / "out")}  # paths as here
    payload["volume_mounts"] = {"ferry-runs": str(volume)}  # .local() mounts nothing
    payload["workdir"] = str(tmp_path / "work")
    payload["env"] = {**payload["env"], "HF_HOME": str(tmp_path / "hf")}
    monkeypatch.setenv("OMP_NUM_THREADS", "2")

    assert function.local(payload) == 0

    run = volume / job.run_id
    store = open_store(f"file://{run}")
    assert latest_complete_checkpoint(store).step == 4
    assert (run / "checkpoints" / "checkpoint-2" / MANIFEST).is_file()
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "final" / MANIFEST).is_file() and (run / "metrics.jsonl").is_file()
    assert Path(tmp_path / "work" / "config.yml").is_file()


def test_every_example_plans_for_modal():
    for example in sorted((ROOT / "examples").glob("*.yml")):
        job, _ = api.prepare(example, cloud="modal", gpus="H100:1")
        assert "gpu       H100:1" in get_executor("modal").plan(job).text()


def test_payload_gets_no_output_dir_from_the_laptop(tmp_path):
    job = modal_job(tmp_path)
    assert job_payload(job)["config"]["output_dir"] == f"/tmp/ferry/{job.run_id}/output"
