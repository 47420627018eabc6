"""The Ray backend without a cluster: where its settings come from, what its plan says,
what it refuses before launch, and the driver's pure parts (paths, exit codes, storage).
The runs themselves are in tests/test_ray.py, against a real head."""

from __future__ import annotations

import pytest
from helpers import PLANTED, launch, quickstart_config

from executors.ray import RayExecutor, address_of, ray_job
from launcher.runs import prepare
from payload.entry.ray import WorkerExit, exit_code_of, localise, storage_for_ray
from payload.errors import FerryError


def ray_job_for(tmp_path, extra: str = "", **flags):
    config = quickstart_config(tmp_path, extra)
    job, backend = prepare(config, **{"cloud": "ray", **flags})
    assert backend == "ray"
    return job


def test_the_address_comes_from_the_flag_then_the_config_then_ray_address(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    settings = (
        "launch:\n  ray:\n    address: http://from-config:8265\n    placement_strategy: SPREAD\n"
    )
    job = ray_job_for(tmp_path, settings, ray={"address": "http://from-flag:8265"})
    assert address_of(job) == "http://from-flag:8265"
    # The flag replaces the address only: the config's other Ray settings stay.
    assert RayExecutor().scaling(job)["placement_strategy"] == "SPREAD"
    assert address_of(ray_job_for(tmp_path, settings)) == "http://from-config:8265"
    assert address_of(ray_job_for(tmp_path)) == "http://from-env:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    assert address_of(ray_job_for(tmp_path)) is None


def test_the_settings_survive_the_run_folder_for_a_relaunch(tmp_path):
    from executors.base import JobSpec

    job = ray_job_for(tmp_path, ray={"address": "http://head:8265"}, storage="s3://b/p")
    job.write()
    again = JobSpec.read(
        job.run_dir, run_id=job.run_id, name=job.name, resources=job.resources, storage_uri=None
    )
    assert address_of(again) == "http://head:8265"


def test_what_is_refused_before_launch(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    job = ray_job_for(tmp_path, secrets=["NOT_SET_HERE"])
    problems = " | ".join(RayExecutor().problems(job))
    assert "no Ray cluster address: pass --ray-address" in problems
    assert "secret(s) NOT_SET_HERE are not set in this environment" in problems
    job = ray_job_for(tmp_path, ray={"address": "ray://head:10001"}, storage="s3://b/p")
    problems = " | ".join(RayExecutor().problems(job))
    assert "is a Ray Client address; give the Jobs API's" in problems
    # The local backend's default storage is on this machine: Ray needs its own.
    job = ray_job_for(tmp_path, ray={"address": "http://head:8265"})
    assert job.storage_uri is None
    assert "keeps its checkpoints in storage that every node reaches" in " ".join(
        RayExecutor().problems(job)
    )
    job = ray_job_for(tmp_path, ray={"address": "http://head:8265"}, storage="file:///shared/x")
    assert RayExecutor().problems(job) == []
    assert any("every Ray node mounts" in w for w in RayExecutor().warnings(job))


def test_a_misspelt_ray_setting_is_refused_by_validate(tmp_path):
    config = quickstart_config(tmp_path, "launch:\n  ray:\n    adress: http://head:8265\n")
    result = launch("validate", str(config))
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1, said
    assert "launch.ray.adress" in said and "address" in said


def test_the_dry_run_plan_names_everything_but_secret_values(tmp_path, monkeypatch):
    """The plan: address, entrypoint, scaling, failure policy, storage, runtime env (env
    var and secret names, never values)."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED["AWS_SECRET_ACCESS_KEY"])
    config = quickstart_config(tmp_path)
    result = launch(
        "train", str(config), "--cloud", "ray", "--ray-address", "http://head:8265",
        "--gpus", "2", "--nodes", "2", "--retries", "3", "--storage", "s3://bucket/runs",
        "--secret", "AWS_SECRET_ACCESS_KEY", "--env", "MY_SETTING=1", "--dry-run",
    )  # fmt: skip
    said = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert "address        http://head:8265" in said
    assert "entrypoint     python -m payload.entry.ray ferry-job.json" in said
    assert "4 workers (2 node(s) x 2)" in said and "placement PACK" in said
    assert "max_failures 3" in said
    assert "s3://bucket/runs/" in said and "/ray (run " in said
    assert "FERRY_RUN_ID, FERRY_STORAGE_URI, MY_SETTING" in said
    assert "AWS_SECRET_ACCESS_KEY (values read from this machine's environment" in said
    assert "py_modules" in said and "examples/data/alpaca_tiny.jsonl -> inputs/" in said
    assert PLANTED["AWS_SECRET_ACCESS_KEY"] not in said


def test_shipped_files_point_into_each_workers_working_dir(tmp_path):
    job = ray_job_for(tmp_path, ray={"address": "http://head:8265"}, storage="s3://b/p")
    contract, inputs = ray_job(job)
    data = contract.config["datasets"][0]["path"]
    assert data.startswith("/ferry/inputs/")
    assert [relative for _, relative in inputs] == [
        "inputs/0-tiny-llama",
        "inputs/1-alpaca_tiny.jsonl",
    ]
    here = localise(contract.config, tmp_path / "wd")
    assert here["datasets"][0]["path"] == str(tmp_path / "wd" / "inputs" / "1-alpaca_tiny.jsonl")
    assert here["base_model"] == str(tmp_path / "wd" / "inputs" / "0-tiny-llama")
    assert here["output_dir"] == contract.config["output_dir"]  # not a shipped file


def test_a_workers_exit_code_crosses_rays_pickling_and_is_read_from_the_structure():
    """Ray pickles a worker's exception to the controller and wraps it in its
    WorkerGroupError (worker_failures: rank -> exception): the code and message survive,
    and a user error (1) on one rank wins over another rank's crash."""
    import pickle

    from ray.train.v2.api.exceptions import WorkerGroupError

    again = pickle.loads(pickle.dumps(WorkerExit(1, "datasets.0.path: no such file")))
    assert (again.code, again.message) == (1, "datasets.0.path: no such file")
    failed = WorkerGroupError(
        "2 workers failed", {0: RuntimeError("peer gone"), 1: WorkerExit(1, "bad row 7")}
    )
    assert exit_code_of(pickle.loads(pickle.dumps(failed))) == (1, "bad row 7")
    chained = RuntimeError("fit failed")
    chained.__cause__ = WorkerExit(75, "stopped at step 9")
    assert exit_code_of(chained) == (75, "stopped at step 9")
    assert exit_code_of(RuntimeError("worker died\nActorDiedError: node lost")) == (
        70,
        "ActorDiedError: node lost",
    )


def test_a_user_error_is_recorded_so_that_rays_restart_stops_at_once(tmp_path):
    from payload.entry.ray import _ended, _record_ended

    storage = f"file://{tmp_path}/run"
    assert _ended(storage) is None
    _record_ended(storage, "loss_watchdog_threshold: the loss stayed above 5")
    assert _ended(storage) == "loss_watchdog_threshold: the loss stayed above 5"
    assert (tmp_path / "run" / "ray" / "ferry-ended.json").is_file()


def test_rays_storage_is_the_runs_own_ray_folder(monkeypatch):
    assert storage_for_ray("file:///shared/runs/r1") == ("/shared/runs/r1/ray", None)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert storage_for_ray("s3://bucket/runs/r1") == ("s3://bucket/runs/r1/ray", None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    path, fs = storage_for_ray("s3://bucket/runs/r1")
    assert path == "bucket/runs/r1/ray" and type(fs).__name__ == "S3FileSystem"
    with pytest.raises(FerryError, match="needs s3:// or a shared file://"):
        storage_for_ray("volume://ferry-runs/r1")


def test_retries_are_rays_max_failures_and_preemptions_restart_without_limit():
    import dataclasses

    from ray.train import FailureConfig

    from payload.entry.ray import failure_config

    config = failure_config(FailureConfig, 2)
    assert (config.max_failures, config.max_preemption_failures) == (2, -1)

    @dataclasses.dataclass
    class OlderRay:  # a FailureConfig without a preemption budget
        max_failures: int = 0

    assert failure_config(OlderRay, 1) == OlderRay(max_failures=1)


def test_a_sweep_spreads_its_trials_over_ray_and_local(tmp_path):
    """`--cloud ray --cloud local`: the trials alternate between the two backends, every
    trial is checked against both before launch, and each gets its plan."""
    grid = tmp_path / "grid.yml"
    grid.write_text("learning_rate: [1.0e-3, 2.0e-3, 4.0e-3]\n")
    result = launch(
        "sweep", str(quickstart_config(tmp_path)), "--sweep", str(grid), "--cloud", "ray",
        "--cloud", "local", "--ray-address", "http://127.0.0.1:8265",
        "--storage", f"file://{tmp_path}/store", "--dry-run",
    )  # fmt: skip
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    assert "3 trials, at most 1 at a time on each of: ray, local" in said
    backends = [
        line.split()[-1] for line in said.splitlines() if line.startswith("t") and "-t" in line
    ]
    assert backends == ["ray", "local", "ray"]
    assert said.count("entrypoint     python -m payload.entry.ray ferry-job.json") == 2
    assert said.count("backend     local (torchrun on this machine)") == 1
    # Without storage every node reaches, Ray refuses each trial before anything starts.
    refused = launch(
        "sweep", str(quickstart_config(tmp_path)), "--sweep", str(grid), "--cloud", "ray",
        "--cloud", "local", "--ray-address", "http://127.0.0.1:8265", "--dry-run",
    )  # fmt: skip
    said = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode == 1
    assert "3 of 3 trials are invalid; nothing was launched" in said
    assert "ray: a Ray run keeps its checkpoints in storage that every node reaches" in said


def test_the_ray_settings_reach_the_objects_ray_is_given(tmp_path):
    """launch.ray's placement_strategy, resources_per_worker and use_gpu become the
    driver's ScalingConfig (through the job's FERRY_RAY_SCALING, as the driver reads it);
    `runtime: pip` puts the image's pinned requirements in the runtime env."""
    import json

    from ray.train import ScalingConfig

    from executors.ray import runtime_env
    from images.spec import default_spec

    settings = (
        "launch:\n  ray:\n    placement_strategy: SPREAD\n    use_gpu: false\n"
        "    runtime: pip\n    resources_per_worker: {CPU: 3}\n"
    )
    job = ray_job_for(tmp_path, settings, ray={"address": "http://h:8265"}, gpus="2", retries=2)
    env = runtime_env(job, None)["env_vars"]
    scaling = ScalingConfig(**json.loads(env["FERRY_RAY_SCALING"]))
    assert (scaling.num_workers, scaling.placement_strategy) == (2, "SPREAD")
    assert scaling.use_gpu is False and scaling.resources_per_worker == {"CPU": 3}
    assert env["FERRY_RAY_MAX_FAILURES"] == "2"
    pip = runtime_env(job, None)["pip"]["packages"]
    assert default_spec().torch in pip and set(default_spec().locked) <= set(pip)
    plain = ray_job_for(tmp_path, ray={"address": "http://h:8265"})
    assert "pip" not in runtime_env(plain, None)
