"""The Modal backend with the real Modal SDK (offline): the app, image, volumes and
function it builds; the plan; how a finished call's value or exception becomes a state;
a launch with no token, and one with a token but no route to Modal's API.

Only the network edge is missing here: nothing is sent to Modal. The function body,
serialized as Modal ships it and run where only the image's files exist, is trained in
tests/test_remote.py.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml
from helpers import PLANTED, ROOT, launch, plan_row, quickstart_config

from executors import RunState, get_executor
from executors.modal import ModalExecutor, modal_job, shipped_inputs, status_from_outcome
from launcher import api
from payload.runtime.job import RemoteJob

SECRET_VALUE = "hf_live_tOkEn_9f8e7d"  # what must never appear in anything we build


@pytest.fixture
def no_modal_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    monkeypatch.delenv("MODAL_CONFIG_PATH", raising=False)


def prepared(tmp_path, extra: str = "", **launch):
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
    job = prepared(
        tmp_path,
        gpus="H100:4",
        timeout="6h",
        retries=2,
        memory="64GB",
        secrets=["hf-token", "wandb"],
        env={"WANDB_MODE": "offline"},
    )
    app, function, job_json = ModalExecutor().build(job)
    payload = json.loads(job_json)

    assert isinstance(app, modal.App) and isinstance(function, modal.Function)
    assert RemoteJob.from_json(job_json).run_id == job.run_id  # the contract, typed
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
    assert payload["volume_mounts"] == {"ferry-runs": "/vol/ferry-runs"}
    assert payload["env"] == {"WANDB_MODE": "offline", "HF_HOME": "/cache/hf"}
    assert payload["cluster"] == "single" and payload["procs_per_node"] == 4
    assert payload["stop_grace_s"] == 120

    # No secret value anywhere: config shipped, function arguments, image, plan, and the
    # run folder's records, written as `launch.launch` writes them before a submit.
    from executors.modal import job_spec_fields
    from images.render import dockerfile

    job.write()
    recorded = (job.run_dir / "job.json").read_text()
    assert json.loads(recorded)["secrets"] == ["hf-token", "wandb"]  # names travel
    shipped = yaml.safe_dump(payload["config"]) + json.dumps(payload)
    everything = [
        shipped,
        dockerfile(job.image),
        repr(job.image),
        json.dumps(options, default=repr),
        get_executor("modal").plan(job).text(),
        recorded,
        (job.run_dir / "config.yml").read_text(),
        json.dumps(job_spec_fields(job)),  # what the submit child is handed
    ]
    for text in everything:
        assert text and SECRET_VALUE not in text


def test_local_files_travel_with_the_job_and_the_config_points_at_them(tmp_path):
    job = prepared(tmp_path)
    config, inputs = shipped_inputs(job.config)
    assert [str(local) for local, _ in inputs] == [
        str(ROOT / "examples/assets/tiny-llama"),
        str(ROOT / "examples/data/alpaca_tiny.jsonl"),
    ]
    assert config["base_model"] == "/ferry/inputs/0-tiny-llama"
    assert config["datasets"][0]["path"] == "/ferry/inputs/1-alpaca_tiny.jsonl"
    assert job.config["datasets"][0]["path"].startswith(str(ROOT))  # the job itself untouched


def test_every_dataset_list_and_the_prepared_cache_travel(tmp_path):
    job = prepared(tmp_path)
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


def test_clustered_function_for_multi_node(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    job = prepared(tmp_path, gpus="H100:8", nodes=2)
    _, function, job_json = ModalExecutor().build(job)
    contract = RemoteJob.from_json(job_json)
    assert (contract.nodes, contract.procs_per_node, contract.cluster) == (2, 8, "modal")
    assert spy.calls[0]["gpu"] == "H100:8"
    # What Modal will schedule: one cluster of 2 containers, each with all 8 GPUs of its
    # host, on RDMA networking (the function's own description, as the SDK builds it).
    cluster = function.info().cluster_info
    assert (cluster.size, cluster.rdma) == (2, True)
    (tmp_path / "one").mkdir()
    _, single, _ = ModalExecutor().build(prepared(tmp_path / "one", gpus="H100:8"))
    assert single.info().cluster_info is None


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
        ({"gpus": "H100:1", "spot": False}, "preemptible capacity only"),
    ],
)
def test_impossible_requests_are_refused_before_launch(tmp_path, launch_args, words):
    from payload.errors import FerryError

    job = prepared(tmp_path, **launch_args)
    with pytest.raises(FerryError, match=words):
        get_executor("modal").check(job)


def test_a_device_mesh_that_does_not_fit_the_job_is_refused_before_launch(tmp_path):
    """The layout check runs for every backend: 2 nodes x 8 H100 are 16 processes, and
    dp_shard_size 3 x dp_replicate_size 2 lays out 6."""
    from payload.errors import FerryError

    extra = (
        "fsdp_version: 2\nfsdp_config: {reshard_after_forward: true}\n"
        "dp_shard_size: 3\ndp_replicate_size: 2\n"
    )
    job = prepared(tmp_path, extra, gpus="H100:8", nodes=2)
    with pytest.raises(FerryError) as caught:
        get_executor("modal").check(job)
    said = " ".join(str(caught.value).split())
    assert "dp_shard_size (3) x dp_replicate_size (2) = 6, but the job runs 16 processes" in said


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
    assert plan_row(out, "image").startswith("ferry:")
    assert plan_row(out, "gpu") == "H100:8"
    assert plan_row(out, "nodes") == "2 (modal.clustered, rdma)"
    assert plan_row(out, "secrets") == "hf-token"
    assert plan_row(out, "stop grace") == "120 s to save and upload after a stop signal"
    assert plan_row(out, "function").startswith("payload.entry.modal.ferry_train")
    for expected in (
        "/vol/ferry-runs <- ferry-runs",
        "/cache/hf <- ferry-hf-cache",
        "--nnodes 2 --node-rank '<container rank>' --master-addr '<rank 0 container ip>'",
        "--shutdown-timeout 120 -m payload train",
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


def test_every_example_plans_for_modal():
    for example in sorted((ROOT / "examples").glob("*.yml")):
        # The nodes of a Modal cluster take whole 8-GPU hosts.
        gpus = "H100:8" if "\n  nodes: 2\n" in example.read_text() else "H100:1"
        if "\ncontext_parallel_size: 2\n" in example.read_text():
            gpus = "H100:2"  # the sequence is split over 2 processes
        job, _ = api.prepare(example, cloud="modal", gpus=gpus)
        assert plan_row(get_executor("modal").plan(job).text(), "gpu") == gpus


def test_the_job_gets_no_output_dir_from_the_laptop(tmp_path):
    job = prepared(tmp_path)
    contract = modal_job(job)
    assert contract.config["output_dir"] == f"/tmp/ferry/{job.run_id}/output"
    assert contract.workdir == f"/tmp/ferry/{job.run_id}"


class Stopped(Exception):
    """Stands in for payload.entry.modal.RunStopped as Modal hands it back: any exception
    carrying `exit_code`."""

    def __init__(self, exit_code: int):
        super().__init__(f"training failed (exit code {exit_code})")
        self.exit_code = exit_code


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers: what a proxy or firewall
    that swallows traffic looks like to the SDK."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.mark.parametrize("server", ["silent", "refused"])
@pytest.mark.parametrize("storage", ["volume", "s3"])
def test_an_unreachable_modal_api_fails_within_10s_in_one_paragraph(
    request, server, storage, tmp_path
):
    """Credentials present, no route to Modal's API (the network edge, replaced by a
    local port that never answers, or one that refuses). With the default volume
    storage the storage check meets it first; with S3 storage, the launch does. Either
    way: under 10 s, one paragraph naming the service, the timeout and what to check, no
    traceback, and the run recorded as failed with the reason."""
    url = request.getfixturevalue("silent_server") if server == "silent" else "http://127.0.0.1:1"
    env = {
        "MODAL_TOKEN_ID": "ak-test",
        "MODAL_TOKEN_SECRET": PLANTED["MODAL_TOKEN_SECRET"],
        "MODAL_SERVER_URL": url,
    }
    extra = ["--storage", "s3://some-bucket/runs", "--secret", "aws"] if storage == "s3" else []
    started = time.monotonic()
    result = launch(
        "train", "examples/quickstart.yml", "--cloud", "modal", "--gpus", "H100:1", *extra, env=env
    )
    took = time.monotonic() - started
    assert took < 10, f"took {took:.1f}s"
    assert result.returncode == 1
    error = result.stderr[result.stderr.index("error: ") :]
    assert "Traceback" not in result.stderr and "unhandled exception" not in result.stderr
    assert f"Modal's API at {url} did not answer" in error and "within 6 s" in error
    assert "Check your network or proxy" in error
    assert len(error.strip().splitlines()) == 2  # the message and its hint
    (run,) = json.loads(launch("runs", "--json", check=True).stdout)
    assert run["state"] == "failed" and f"Modal's API at {url} did not answer" in run["detail"]


@pytest.mark.parametrize(
    ("value", "error", "state", "code"),
    [
        ({"exit_code": 0, "detail": None}, None, RunState.SUCCEEDED, 0),
        ({"exit_code": 1, "detail": "datasets.0.path: missing"}, None, RunState.FAILED, 1),
        (None, Stopped(75), RunState.PREEMPTED, 75),
        (None, Stopped(137), RunState.FAILED, 137),
        # The text says 75, the code does not: the code decides.
        (None, RuntimeError("exit code 75"), RunState.FAILED, None),
    ],
)
def test_a_finished_call_is_read_by_its_exit_code(value, error, state, code):
    status = status_from_outcome(value, error)
    assert (status.state, status.exit_code) == (state, code)
    if value and value.get("detail"):
        assert status.detail == value["detail"]


def test_the_real_run_stopped_exception_survives_pickling_with_its_code():
    """Modal pickles the function's exception back to the launcher."""
    import pickle

    from payload.entry.modal import RunStopped

    back = pickle.loads(pickle.dumps(RunStopped(75)))
    assert back.exit_code == 75 and status_from_outcome(error=back).state == RunState.PREEMPTED


def test_a_secret_value_bound_for_the_job_is_refused_before_launch(tmp_path, monkeypatch):
    """A token pasted as a plain env value (any name) is caught when the job is checked,
    dry run included, and the error names the variable, not the value."""
    from payload.errors import FerryError

    monkeypatch.setenv("HF_TOKEN", SECRET_VALUE)
    job = prepared(tmp_path, gpus="H100:1", env={"NOTE": SECRET_VALUE})
    with pytest.raises(FerryError, match="The value of HF_TOKEN appears") as info:
        get_executor("modal").plan(job)
    assert SECRET_VALUE not in str(info.value)


def test_status_and_cancel_have_deadlines_and_cancel_stops_the_containers(
    silent_server, monkeypatch
):
    """Against an API that never answers (the network edge, as above), a status request
    gives up within its deadline and says the state is unknown (not an ending: the run
    stays unfinished), and a cancel gives up with the one paragraph. Then, with the call
    object replaced (nothing else can stand in for Modal here), a cancel asks Modal to
    terminate the containers, not just to drop the input."""
    import modal

    from executors import Handle
    from executors import modal as modal_backend
    from payload.errors import FerryError

    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", PLANTED["MODAL_TOKEN_SECRET"])
    monkeypatch.setenv("MODAL_SERVER_URL", silent_server)
    monkeypatch.setattr(modal_backend, "API_TIMEOUT_S", 2.0)
    handle = Handle("modal", "r-1", {"app_id": "ap-1", "call_id": "fc-1"})
    started = time.monotonic()
    status = ModalExecutor().status(handle)
    assert time.monotonic() - started < 5
    assert status.state == RunState.RUNNING and status.detail.startswith("state unknown")
    with pytest.raises(FerryError, match="did not answer a cancel within 2 s"):
        ModalExecutor().cancel(handle)

    asked = {}

    class Call:
        def cancel(self, **kwargs):  # type: ignore[no-untyped-def]
            asked.update(kwargs)

    monkeypatch.setattr(modal.FunctionCall, "from_id", staticmethod(lambda call_id: Call()))
    assert ModalExecutor().cancel(handle).state == RunState.CANCELLED
    assert asked == {"terminate_containers": True}
