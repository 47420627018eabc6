"""The SkyPilot task Ferry writes for a run (executors.skypilot launches it).

One task per run (`task_config`): the resources from the launch settings (accelerators,
spot, infra, disk, instance type, or a list of acceptable accelerators), `num_nodes`,
the image (Ferry's image from a registry, `image_id: docker:...`, or a `setup` that
installs the image's pinned requirements on the VM's own image), one file mount
(`~/ferry-jobs/RUN_ID`: the job contract, the files the config names, and in setup mode
the payload source; one folder per run, as runs may share a cluster), the run's
environment, the secrets by name, and a `run` script that starts the payload entry in
the node's copy of the file mount:

    cd ~/ferry-jobs/RUN_ID && python -m payload.entry run job.json --root "$PWD"

Plain data, no SkyPilot import: the dry run prints it and the run folder keeps it
(`sky-task.yml`, secrets named with no value).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from executors.base import JobSpec, remote_job, stage_job
from payload.errors import EXIT_PREEMPTED
from payload.runtime.job import RemoteJob

JOBS_DIR = "~/ferry-jobs"  # on every node: a file mount per run with the job's files
JOB_FILE = "job.json"  # in the run's folder: the job contract
REMOTE_ROOT = "/ferry"  # the contract's paths; the run script puts them under its folder
WORK = f"{REMOTE_ROOT}/work"  # the node's working folder (config, local output)
STAGING = "sky-job"  # in the run folder: what the file mount uploads
TASK_FILE = "sky-task.yml"  # in the run folder: the task, secrets by name only
VENV = "~/ferry-venv"  # setup mode: the image's pinned requirements on the VM
RECOVERY = ("EAGER_NEXT_REGION", "FAILOVER")
CONTEXT_INFRA = ("k8s", "kubernetes", "ssh")  # their second part is a context, not a region


def sky_settings(job: JobSpec) -> dict[str, Any]:
    return dict(job.options.get("sky") or {})


def managed(job: JobSpec) -> bool:
    return bool(sky_settings(job).get("managed"))


def cluster_name(job: JobSpec) -> str:
    """The cluster a cluster job runs on: `launch.sky.cluster`, else the run id (which
    SkyPilot takes as it is when it starts with a letter)."""
    name = sky_settings(job).get("cluster")
    if name:
        return str(name)
    return job.run_id if job.run_id[0].isalpha() else f"ferry-{job.run_id}"


# ---- the task


def accelerators(job: JobSpec) -> list[str]:
    """The acceptable accelerators, in the order preferred: `launch.sky.accelerators`,
    else --gpus NAME:COUNT. Empty: a CPU machine."""
    listed = sky_settings(job).get("accelerators") or []
    if listed:
        return [str(a) for a in listed]
    r = job.resources
    return [f"{r.accelerator}:{r.gpus_per_node}"] if r.accelerator else []


def infra(job: JobSpec) -> str | None:
    """`launch.sky.infra` (cloud[/region[/zone]]), with --region filled in when the infra
    names only a cloud."""
    text, region = sky_settings(job).get("infra"), job.resources.region
    if not text:
        return None
    parts = str(text).split("/")
    if region and len(parts) == 1 and parts[0].lower() not in CONTEXT_INFRA:
        parts.append(region)
    return "/".join(parts)


def resources_config(job: JobSpec) -> dict[str, Any]:
    r, s = job.resources, sky_settings(job)
    res: dict[str, Any] = {}
    accs = accelerators(job)
    if len(accs) == 1:
        res["accelerators"] = accs[0]
    elif accs:
        res["accelerators"] = accs  # a list: SkyPilot tries them in this order
    if r.cpu:
        res["cpus"] = f"{r.cpu:g}+"
    if r.memory_mb:
        res["memory"] = f"{r.memory_mb / 1024:g}+"
    if infra(job):
        res["infra"] = infra(job)
    if r.spot is not None:
        res["use_spot"] = bool(r.spot)
    if s.get("instance_type"):
        res["instance_type"] = s["instance_type"]
    if s.get("disk_size"):
        res["disk_size"] = int(s["disk_size"])
    if s.get("registry") and job.image is not None:
        res["image_id"] = f"docker:{str(s['registry']).rstrip('/')}/{job.image.tag}"
    if managed(job):
        res["job_recovery"] = {
            "strategy": s.get("recovery") or RECOVERY[0],
            "max_restarts_on_errors": int(r.retries or 0),
            "recover_on_exit_codes": [EXIT_PREEMPTED],
        }
    return res


def sky_job(job: JobSpec) -> tuple[RemoteJob, list[tuple[Path, str]]]:
    """The job contract every node reads (paths under /ferry, which the run script
    roots in its copy of the job's files) and the (local, relative) files to ship."""
    from executors.modal import INPUTS, shipped_inputs

    config, inputs = shipped_inputs(job.config)
    config.pop("dataset_prepared_path", None)  # a folder of this machine means nothing there
    config["output_dir"] = f"{WORK}/output"
    contract = replace(remote_job(job, config, "skypilot"), workdir=WORK)
    shipped = [(local, "inputs/" + remote.removeprefix(INPUTS + "/")) for local, remote in inputs]
    return contract, shipped


def setup_mode(job: JobSpec) -> bool:
    """Setup mode: the VM's own image, with the image's pinned requirements installed by
    the task's `setup` and the payload shipped as source. Else Ferry's image."""
    return not sky_settings(job).get("registry")


def job_dir(job: JobSpec) -> str:
    """The run's folder on every node: the file mount. One per run: SkyPilot syncs the
    file mounts of every launch onto a shared cluster (`launch.sky.cluster`) without
    deleting, so a run queued there must not share its folder with another."""
    return f"{JOBS_DIR}/{job.run_id}"


def entry_command(job: JobSpec) -> str:
    """The payload entry as the run script starts it, in `job_dir`: the contract's paths
    rooted there, under `timeout` when the run has one (SIGTERM at the timeout: the ranks
    save and upload, then exit 124)."""
    entry = f'python -m payload.entry run {JOB_FILE} --root "$PWD"'
    r = job.resources
    if r.timeout_s:
        entry = f"timeout --signal=TERM --kill-after={r.stop_grace_s}s {r.timeout_s}s {entry}"
    return entry


def run_script(job: JobSpec) -> str:
    """The task's `run`: SkyPilot runs it with bash on every node, in ~/sky_workdir."""
    lines = []
    if setup_mode(job):
        lines.append(f"source {VENV}/bin/activate")
    lines += ["set -euo pipefail", f"cd {job_dir(job)}"]
    if setup_mode(job):  # the shipped payload source, ahead of anything installed
        lines.append('export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"')
    lines.append(f"exec {entry_command(job)}")
    return "\n".join(lines) + "\n"


def task_config(job: JobSpec, staged: Path | str | None = None) -> dict[str, Any]:
    """The SkyPilot task as YAML data. Secrets are named with no value (SkyPilot takes
    the values at launch); `staged` is the local folder the file mount uploads."""
    from images.render import sky_task_image

    image = sky_task_image(job.image) if job.image is not None else {"envs": {}, "setup": ""}
    envs = dict(image["envs"])
    if setup_mode(job):  # the image's cache folder is not there: HF's own default is
        envs.pop("HF_HOME", None)
    envs.update({**job.payload_env(), "PYTHONUNBUFFERED": "1"})
    task: dict[str, Any] = {
        "name": job.run_id,
        "num_nodes": job.resources.nodes,
        "resources": resources_config(job),
        "envs": {k: str(v) for k, v in envs.items()},
    }
    if job.secrets:
        task["secrets"] = {name: None for name in job.secrets}
    task["file_mounts"] = {job_dir(job): str(staged or job.run_dir / STAGING)}
    if setup_mode(job) and image["setup"]:
        task["setup"] = image["setup"] + "\n"
    task["run"] = run_script(job)
    return task


def stage(job: JobSpec) -> Path:
    """The folder the file mount uploads: the contract, the config's files, and in setup
    mode the payload source."""
    from images.spec import PAYLOAD

    contract, inputs = sky_job(job)
    folder = stage_job(job.run_dir / STAGING, contract, JOB_FILE, inputs)
    if setup_mode(job):
        shutil.copytree(PAYLOAD, folder / "payload", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def secret_values(job: JobSpec, environ: dict[str, str] | None = None) -> list[tuple[str, str]]:
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    return [(name, environ[name]) for name in job.secrets if name in environ]


class _Block(str):
    """A string the task's YAML shows as a literal block (`run: |`)."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(
    _Block, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|")
)


def yaml_text(task: dict[str, Any]) -> str:
    """The task as SkyPilot reads it, its scripts as literal blocks."""
    shown = {k: _Block(v) if k in ("run", "setup") else v for k, v in task.items()}
    return yaml.dump(shown, Dumper=_TaskDumper, sort_keys=False, width=100)
