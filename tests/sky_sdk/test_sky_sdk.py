"""Ferry's SkyPilot tasks against SkyPilot's own SDK (0.14): its schema, its optimizer, its
types. No API server runs, and nothing is launched.

- Every task Ferry writes goes through `sky.Task.from_yaml_config` (SkyPilot's JSON-schema
  validation and its Task/Resources constructors) and survives a `to_yaml_config` round
  trip.
- The optimizer runs in-process and offline: AWS is enabled by SkyPilot's own `sky check`
  code answered by the moto server (fake keys), and the prices come from the stub
  catalogs in tests/sky_sdk/catalogs. An audit hook shows no connection leaves this machine.
- The API server is the network edge that cannot exist here: for submit, status, logs
  and cancel, the SDK's request functions (`sky.launch`, `sky.get`, `sky.api_status`,
  `sky.job_status`, `sky.jobs.queue`, ...) are replaced by a fake server that keeps the
  real `sky.Task` it is given and answers with SkyPilot's own types (RequestId,
  JobStatus, ManagedJobStatus).
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT, launch, quickstart_config

from executors import RunState, get_executor
from executors.sky_task import stage, task_config
from launcher import api


def job_of(tmp_path: Path, extra: str = "", **launch_settings):  # type: ignore[no-untyped-def]
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = quickstart_config(tmp_path, extra)
    launch_settings.setdefault("storage", "s3://bucket/runs")
    job, cloud = api.prepare(cfg, cloud="sky", **launch_settings)
    assert cloud == "sky"
    get_executor("sky").check(job)
    return job


def validated(job):  # type: ignore[no-untyped-def]
    """SkyPilot's Task for Ferry's task YAML (with values for the named secrets, as the
    launch gives them), checked by SkyPilot's schema; Ferry's dict is left as it was."""
    import sky

    config = task_config(job, stage(job))
    before = copy.deepcopy(config)
    secrets = [(name, "value-at-launch") for name in job.secrets]
    task = sky.Task.from_yaml_config(copy.deepcopy(config), secrets_overrides=secrets or None)
    assert config == before
    # Round trip: SkyPilot's own YAML of the task builds the same task again.
    again = sky.Task.from_yaml_config(task.to_yaml_config())
    assert again.num_nodes == task.num_nodes
    assert again.run == task.run and again.setup == task.setup
    assert again.file_mounts == task.file_mounts
    assert again.envs == task.envs
    assert [r.to_yaml_config() for r in again.resources] == [
        r.to_yaml_config() for r in task.resources
    ]
    return config, task


def test_every_kind_of_task_passes_skypilots_schema_and_round_trips(tmp_path):
    single, task = validated(job_of(tmp_path / "1", gpus="A10G:1"))
    (res,) = task.resources
    assert res.accelerators == {"A10G": 1} and not res.use_spot and task.num_nodes == 1
    assert task.run.endswith('exec python -m payload.entry run job.json --root "$PWD"\n')
    assert "torch==2.13.0" in task.setup

    two, task = validated(job_of(tmp_path / "2", gpus="H100:8", nodes=2))
    assert task.num_nodes == 2 and list(task.resources)[0].accelerators == {"H100": 8}

    extra = "launch:\n  sky:\n    infra: aws\n    disk_size: 512\n"
    _, task = validated(job_of(tmp_path / "3", extra, gpus="A10G:1", spot=True, region="us-east-1"))
    (res,) = task.resources
    assert res.use_spot and str(res.cloud) == "AWS" and res.region == "us-east-1"
    assert res.disk_size == 512

    extra = "launch:\n  sky:\n    recovery: FAILOVER\n"
    config, task = validated(
        job_of(tmp_path / "4", extra, gpus="A10G:1", managed=True, retries=2, secrets=["HF_TOKEN"])
    )
    (res,) = task.resources
    assert res.job_recovery == {
        "strategy": "FAILOVER",
        "max_restarts_on_errors": 2,
        "recover_on_exit_codes": [75],
    }
    assert config["secrets"] == {"HF_TOKEN": None}
    assert task.secrets["HF_TOKEN"].get_secret_value() == "value-at-launch"

    extra = "launch:\n  sky:\n    registry: ghcr.io/acme\n    accelerators: [H100:8, A100-80GB:8]\n"
    job = job_of(tmp_path / "5", extra)
    config, task = validated(job)
    assert [r.accelerators for r in task.resources] == [{"H100": 8}, {"A100-80GB": 8}]
    assert job.procs_per_node == 8  # the list's count: 8 processes per node
    assert json.loads((job.run_dir / "sky-job" / "job.json").read_text())["procs_per_node"] == 8
    assert config["resources"]["image_id"] == f"docker:ghcr.io/acme/{job.image.tag}"
    assert "setup" not in config and "source" not in config["run"]

    for example in sorted((ROOT / "examples").glob("*.yml")):
        job, _ = api.prepare(example, cloud="sky", storage="s3://bucket/runs")
        get_executor("sky").check(job)
        validated(job)


@pytest.fixture
def aws_on_moto(s3_server, monkeypatch):
    """AWS credentials that moto takes (AWS_ENDPOINT_URL: every boto3 client asks moto),
    and SkyPilot's own `sky check` run for AWS against them: the record the optimizer
    reads of which clouds are enabled."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import sky.check

    sky.check.check(quiet=True, clouds=["aws"])
    from executors.skypilot import enabled_clouds

    assert enabled_clouds() == ["AWS"]


OUTSIDE: list[tuple] = []
_WATCH = {"on": False}


def _audit(event: str, args: tuple) -> None:
    if _WATCH["on"] and event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            OUTSIDE.append(address)


sys.addaudithook(_audit)


def test_the_plan_prices_the_run_with_skypilots_optimizer_offline(tmp_path, aws_on_moto):
    """`launch train --cloud sky --dry-run`'s plan, made in-process: the optimizer's
    choice from the stub catalog and its hourly price, and the run's cost bounded by the
    timeout. g5.xlarge is $1.006/h on demand: 3 h cost at most $3.02. p5.48xlarge's spot
    price is $40/h: 2 nodes for 10 h cost at most $800."""
    _WATCH["on"] = True
    try:
        started = time.monotonic()
        cfg = quickstart_config(tmp_path)
        plan = api.plan(cfg, cloud="sky", gpus="A10G:1", timeout="3h", storage="s3://b/r")
        rows = dict(plan.rows)
        assert rows["price"] == (
            "$1.01/h per node (SkyPilot's optimizer: g5.xlarge in AWS/us-east-1)"
        ), rows["price"]
        assert rows["cost"] == "at most $3.02 (1 node(s) x the 3 h timeout)"
        spot = api.plan(
            cfg, cloud="sky", gpus="H100:8", nodes=2, spot=True, timeout="10h", storage="s3://b/r"
        )
        rows = dict(spot.rows)
        assert "p5.48xlarge (spot)" in rows["price"] and rows["price"].startswith("$40.00/h")
        assert rows["cost"] == "at most $800.00 (2 node(s) x the 10 h timeout)"
        assert time.monotonic() - started < 60
    finally:
        _WATCH["on"] = False
    assert OUTSIDE == []


def test_a_launch_above_max_cost_is_refused_with_the_optimizers_figure(tmp_path, aws_on_moto):
    """The real CLI, without a terminal: 2 spot p5.48xlarge for 10 h ($800 at most) under
    `launch.max_cost: 500` is refused with the figure before anything is recorded; at
    `max_cost: 1000` it goes on (to the preflight, which finds the secret unset)."""
    import os

    cfg = quickstart_config(tmp_path, "launch:\n  max_cost: 500\n")
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")}
    env["AWS_SECRET_ACCESS_KEY"] = os.environ["AWS_SECRET_ACCESS_KEY"]
    args = [
        "train", str(cfg), "--cloud", "sky", "--gpus", "H100:8", "--nodes", "2", "--spot",
        "--timeout", "10h", "--storage", "s3://b/runs", "--secret", "UNSET_SECRET_FOR_TEST",
    ]  # fmt: skip
    refused = launch(*args, env=env, timeout=120)
    assert refused.returncode != 0
    assert "$800.00 at most (to its timeout), is above launch.max_cost $500.00" in (
        refused.stderr
    ), refused.stderr
    assert json.loads(launch("runs", "--json", env=env, check=True).stdout) == []
    cfg.write_text(cfg.read_text().replace("max_cost: 500", "max_cost: 1000"))
    passed = launch(*args, env=env, timeout=120)
    assert passed.returncode != 0 and "max_cost" not in passed.stderr
    assert "UNSET_SECRET_FOR_TEST are not set in this environment" in passed.stderr, passed.stderr


def test_with_a_remote_api_server_the_plan_does_not_price_from_local_credentials(
    tmp_path, aws_on_moto, monkeypatch
):
    """This machine has AWS enabled (moto), but the runs go to a team's API server, whose
    clouds are its own: the plan says where the price is, rather than pricing the task
    with this machine's view. The password in the address is not shown."""
    monkeypatch.setenv("SKYPILOT_API_SERVER_ENDPOINT", "http://me:s3cret@sky.example:46580")
    cfg = quickstart_config(tmp_path)
    rows = dict(api.plan(cfg, cloud="sky", gpus="A10G:1", timeout="3h", storage="s3://b/r").rows)
    assert rows["price"].startswith("unknown: SkyPilot's API server at ")
    assert "me:***@sky.example:46580" in rows["price"] and "s3cret" not in rows["price"]
    assert "sky launch --dryrun" in rows["price"]


def test_with_no_cloud_enabled_a_launch_fails_in_seconds_saying_sky_check(tmp_path):
    """SkyPilot installed, but `sky check` never found credentials here (a fresh HOME and
    runtime folder): the launch stops in under 5 s, before anything is recorded, and says
    to run `sky check`."""
    cfg = quickstart_config(tmp_path)
    fresh = tmp_path / "fresh-home"
    fresh.mkdir()
    env = {"HOME": str(fresh), "SKY_RUNTIME_DIR": str(fresh), "AWS_ACCESS_KEY_ID": None}
    started = time.monotonic()
    refused = launch(
        "train", str(cfg), "--cloud", "sky", "--gpus", "A10G:1", "--storage", "s3://b/runs",
        env=env, timeout=60,
    )  # fmt: skip
    took = time.monotonic() - started
    assert refused.returncode != 0
    assert "SkyPilot has no cloud enabled on this machine" in refused.stderr, refused.stderr
    assert "`sky check`" in refused.stderr
    assert took < 5, took
    assert json.loads(launch("runs", "--json", env=env, check=True).stdout) == []


class FakeServer:
    """SkyPilot's API server, as the SDK's request functions see it: each request gets
    a RequestId; `sky.get` returns its result, or raises for a request that failed. It
    keeps every Task it was given, and answers with SkyPilot's own types (JobStatus,
    ManagedJobStatus, ManagedJobRecord, ClusterJobRecord-like records)."""

    def __init__(self) -> None:
        from sky.server.common import RequestId

        self.RequestId = RequestId
        self.results: dict[str, object] = {}
        self.request_state: dict[str, str] = {}
        self.forgotten: set[str] = set()  # requests the server no longer keeps (24 h)
        self.tasks: list = []
        self.calls: list[tuple] = []
        self.job_states: dict[int, object] = {}
        self.managed: list = []
        self.queue: list[dict] = []
        self.log = ["line one\n", None, "line two\n"]  # None: a status message
        self.cluster_gone = False
        self.controller_down = False  # the managed jobs' controller, stopped when idle
        self.on_cancel = None  # what the job's ranks do when they get SIGTERM
        self.down_at = 0.0

    def request(self, name: str, result: object, state: str = "SUCCEEDED") -> str:
        rid = self.RequestId(f"req-{len(self.results)}-{name}")
        self.results[rid] = result
        self.request_state[rid] = state
        self.calls.append((name,))
        return rid

    def install(self, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        import sky
        import sky.jobs

        def launch_(task, cluster_name=None, down=False, idle_minutes_to_autostop=None, **kw):
            self.tasks.append(task)
            self.calls.append(("launch", cluster_name, down, idle_minutes_to_autostop))
            return self.request("launch", (7, object()), state="RUNNING")

        def jobs_launch(task, name=None, **kw):
            self.tasks.append(task)
            self.calls.append(("jobs.launch", name))
            return self.request("jobs.launch", ([11], object()), state="RUNNING")

        def api_status(request_ids=None, **kw):
            return [
                type("Payload", (), {"status": self.request_state[r]})()
                for r in request_ids
                if r not in self.forgotten
            ]

        def get(rid):
            if self.request_state[rid] == "FAILED":
                raise sky.exceptions.ResourcesUnavailableError("no A10G in any region")
            return self.results[rid]

        def tail(*args, preload_content=True, **kw):
            assert preload_content is False
            self.calls.append(("tail", args, kw))
            return iter(self.log)

        def job_status(cluster, ids):
            if self.cluster_gone:  # as the server answers for a torn-down cluster
                raise sky.exceptions.ClusterDoesNotExist(f"Cluster {cluster!r} does not exist.")
            return self.request("job_status", {i: self.job_states.get(i) for i in ids})

        def cancel(cluster, job_ids=None, **kw):
            if self.cluster_gone:
                raise sky.exceptions.ClusterDoesNotExist(f"Cluster {cluster!r} does not exist.")
            for i in job_ids:  # SkyPilot marks it cancelled at once, the ranks still saving
                self.job_states[i] = sky.JobStatus.CANCELLED
            if self.on_cancel:
                self.on_cancel()
            return self.request("cancel", None)

        def queue(cluster, **kw):
            if self.cluster_gone:
                raise sky.exceptions.ClusterDoesNotExist(f"Cluster {cluster!r} does not exist.")
            return self.request("queue", self.queue)

        def queue_v2(refresh, fields=None, job_ids=None, name_match=None, **kw):
            assert "failure_reason" in fields
            if self.controller_down and not refresh:
                raise sky.exceptions.ClusterNotUpError("The jobs controller is not up.")
            records = [
                r
                for r in self.managed
                if (job_ids is None or r.job_id in job_ids)
                and (name_match is None or r.job_name == name_match)
            ]
            return self.request("jobs.queue_v2", (records, len(records), {}, len(records)))

        monkeypatch.setattr(sky, "launch", launch_)
        monkeypatch.setattr(sky.jobs, "launch", jobs_launch)
        monkeypatch.setattr(sky, "get", get)
        monkeypatch.setattr(sky, "api_status", api_status)
        monkeypatch.setattr(sky, "job_status", job_status)
        monkeypatch.setattr(sky.jobs, "queue_v2", queue_v2)
        monkeypatch.setattr(sky, "queue", queue)
        monkeypatch.setattr(sky, "tail_logs", tail)
        monkeypatch.setattr(sky.jobs, "tail_logs", tail)
        monkeypatch.setattr(sky, "cancel", cancel)

        def down(cluster, **kw):
            self.down_at = time.monotonic()
            return self.request("down", None)

        monkeypatch.setattr(sky, "down", down)
        monkeypatch.setattr(
            sky, "api_cancel", lambda request_ids, **kw: self.request("api_cancel", None)
        )
        monkeypatch.setattr(
            sky.jobs, "cancel", lambda job_ids=None, **kw: self.request("jobs.cancel", None)
        )


def test_a_cluster_job_is_launched_followed_and_cancelled_through_the_sdk(
    tmp_path, monkeypatch, s3_bucket
):
    """Launch, state, log and cancel of a cluster job; once its cluster is torn down (as
    it is when the job ends), the run's storage in S3 (moto) says how it ended. A launch
    request the server no longer keeps is found by the job's name."""
    import sky

    from payload.storage import open_store

    server = FakeServer()
    server.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_value_read_at_launch_only")
    job = job_of(tmp_path, gpus="A10G:1", secrets=["HF_TOKEN"], storage=f"s3://{s3_bucket}/runs")
    executor = get_executor("sky")
    handle = executor.submit(job)
    (task,) = server.tasks
    assert isinstance(task, sky.Task)
    assert task.secrets["HF_TOKEN"].get_secret_value() == "hf_value_read_at_launch_only"
    assert ("launch", job.run_id, True, None) in server.calls
    saved = (job.run_dir / "sky-task.yml").read_text()
    assert "HF_TOKEN: null" in saved and "hf_value_read_at_launch_only" not in saved
    assert "hf_value_read_at_launch_only" not in json.dumps(handle.data)

    status = executor.status(handle)
    assert status.state == RunState.PENDING and "provisioning" in status.detail
    server.request_state[handle.data["request_id"]] = "WAITING"  # a retry's backoff
    assert executor.status(handle).state == RunState.PENDING
    server.request_state[handle.data["request_id"]] = "SUCCEEDED"
    server.job_states[7] = sky.JobStatus.RUNNING
    assert executor.status(handle).state == RunState.RUNNING
    assert handle.data["job_id"] == 7
    assert list(executor.logs(handle, follow=True)) == ["line one\n", "line two\n"]
    server.job_states[7] = sky.JobStatus.FAILED_SETUP
    assert executor.status(handle).state == RunState.FAILED
    server.job_states[7] = sky.JobStatus.SUCCEEDED
    assert executor.status(handle).state == RunState.SUCCEEDED

    # The request is gone from the server: the job is found on its cluster by name.
    fresh = type(handle)(handle.backend, handle.run_id, {**handle.data, "job_id": None})
    server.forgotten.add(handle.data["request_id"])
    server.queue[:] = [{"job_id": 3, "job_name": "other"}, {"job_id": 7, "job_name": job.run_id}]
    assert executor.status(fresh).state == RunState.SUCCEEDED and fresh.data["job_id"] == 7

    # Cancel: SkyPilot calls the job cancelled at once, while its ranks save checkpoint-3
    # (1.5 s here); the teardown waits for that checkpoint's manifest in storage.
    store = open_store(job.storage_uri)
    store.write_bytes("checkpoints/checkpoint-2/ferry-manifest.json", b"{}")  # before
    saved_at: list[float] = []

    def ranks_save() -> None:
        def save() -> None:
            store.write_bytes("checkpoints/checkpoint-3/model.bin", b"w")
            store.write_bytes("checkpoints/checkpoint-3/ferry-manifest.json", b"{}")
            saved_at.append(time.monotonic())

        threading.Timer(1.5, save).start()

    server.on_cancel = ranks_save
    server.job_states[7] = sky.JobStatus.RUNNING
    started = time.monotonic()
    cancelled = executor.cancel(handle)
    assert cancelled.state == RunState.CANCELLED and "teardown" in cancelled.detail
    assert "checkpoint-3 saved first" in cancelled.detail, cancelled.detail
    names = [c[0] for c in server.calls]
    assert names.index("cancel") < names.index("down")
    assert saved_at and saved_at[0] < server.down_at  # the machines went after the save ...
    assert time.monotonic() - started < 30  # ... not after the whole 120 s stop grace

    server.job_states.pop(7)
    server.cluster_gone = True
    gone = executor.status(handle)
    assert gone.state == RunState.FAILED and "no final artifacts" in gone.detail, gone
    handle.data["spot"] = True  # the same on a spot cluster: a preemption, resumable
    gone = executor.status(handle)
    assert gone.state == RunState.PREEMPTED and "most likely preempted" in gone.detail, gone
    # A cancel finds the machines gone: nothing to stop.
    assert "already gone" in executor.cancel(handle).detail
    # The launch request forgotten too (first asked after 24 h): found by storage still.
    forgotten = type(handle)(handle.backend, handle.run_id, {**handle.data, "job_id": None})
    assert executor.status(forgotten).state == RunState.PREEMPTED
    open_store(job.storage_uri).write_bytes("final/ferry-manifest.json", b"{}")
    assert executor.status(handle).state == RunState.SUCCEEDED
    assert executor.status(forgotten).state == RunState.SUCCEEDED


def test_a_failed_launch_and_a_kept_cluster(tmp_path, monkeypatch):
    """A launch request that failed (no machines anywhere) fails the run with SkyPilot's
    reason; with `launch.sky.down: false` a cancel leaves the cluster up."""
    server = FakeServer()
    server.install(monkeypatch)
    job = job_of(tmp_path, "launch:\n  sky:\n    down: false\n", gpus="A10G:1")
    executor = get_executor("sky")
    handle = executor.submit(job)
    assert ("launch", job.run_id, False, None) in server.calls
    server.request_state[handle.data["request_id"]] = "FAILED"
    failed = executor.status(handle)
    assert failed.state == RunState.FAILED and "no A10G in any region" in failed.detail
    assert f"`sky down {job.run_id}` removes them" in failed.detail  # machines may be up
    server.request_state[handle.data["request_id"]] = "SUCCEEDED"
    import sky

    server.job_states[7] = sky.JobStatus.RUNNING
    assert executor.cancel(handle).state == RunState.CANCELLED
    assert "down" not in [c[0] for c in server.calls]


def test_a_managed_job_reports_its_recoveries_and_its_failure(tmp_path, monkeypatch, s3_bucket):
    import sky.jobs
    from sky.schemas.api.responses import ManagedJobRecord

    from payload.storage import open_store

    server = FakeServer()
    server.install(monkeypatch)
    job = job_of(tmp_path, gpus="A10G:1", managed=True, retries=1, storage=f"s3://{s3_bucket}/runs")
    executor = get_executor("sky")
    handle = executor.submit(job)
    assert ("jobs.launch", job.run_id) in server.calls
    (task,) = server.tasks
    assert list(task.resources)[0].job_recovery["recover_on_exit_codes"] == [75]
    server.request_state[handle.data["request_id"]] = "SUCCEEDED"
    status = sky.jobs.ManagedJobStatus

    def record(**fields):  # type: ignore[no-untyped-def]
        return ManagedJobRecord(job_id=11, job_name=job.run_id, **fields)

    server.managed[:] = [record(status=status.RECOVERING, recovery_count=1)]
    now = executor.status(handle)
    assert now.state == RunState.RUNNING and now.detail == "recovered 1 time(s)"
    server.managed[:] = [record(status=status.FAILED_NO_RESOURCE, failure_reason="no capacity")]
    now = executor.status(handle)
    assert now.state == RunState.FAILED and now.detail == "no capacity"
    server.managed[:] = [record(status=status.SUCCEEDED)]
    assert executor.status(handle).state == RunState.SUCCEEDED
    assert executor.cancel(handle).state == RunState.CANCELLED
    assert server.calls[-1] == ("jobs.cancel",)

    # The jobs controller stopped (idle): the state is unknown until storage has the
    # final artifacts, and Ferry does not start the controller (a VM) just to ask.
    server.controller_down = True
    now = executor.status(handle)
    assert now.unknown and "sky jobs queue --refresh" in now.detail, now
    open_store(job.storage_uri).write_bytes("final/ferry-manifest.json", b"{}")
    assert executor.status(handle).state == RunState.SUCCEEDED


def test_cluster_settings_reach_the_launch_and_the_resources(tmp_path, monkeypatch):
    """`launch.sky.cluster`, `idle_minutes_to_autostop` and `instance_type` take effect:
    the cluster's name and autostop in `sky.launch`, the instance type in the Task."""
    server = FakeServer()
    server.install(monkeypatch)
    extra = (
        "launch:\n  sky:\n    cluster: dev-box\n    idle_minutes_to_autostop: 30\n"
        "    instance_type: g5.xlarge\n"
    )
    job = job_of(tmp_path, extra, gpus="A10G:1")
    handle = get_executor("sky").submit(job)
    assert ("launch", "dev-box", True, 30) in server.calls
    assert handle.data["cluster"] == "dev-box"
    (task,) = server.tasks
    assert list(task.resources)[0].instance_type == "g5.xlarge"


def test_the_clouds_ferry_validates_are_skypilots():
    """`launch.sky.infra` is checked without SkyPilot (payload.config.schema.SKY_CLOUDS):
    the list is SkyPilot's own registry, aliases included."""
    from sky.utils import registry

    from payload.config.schema import SKY_CLOUDS

    known = set(registry.CLOUD_REGISTRY) | set(registry.CLOUD_REGISTRY._aliases)
    assert set(SKY_CLOUDS) == known
