"""The seam every backend plugs into: what a job is, and the five things a backend does.

A backend subclasses `Executor` and implements the private hooks; the public methods do
the checks every backend shares first (torchtitan's checkpoint manager splits `save()`
and `_save()` the same way). Backends register by name under the entry-point group
`ferry.executors`, so a package outside Ferry can add one.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from payload.config import vllm
from payload.config.rules import grpo_rank_problems, mesh_problems
from payload.config.schema import TrainConfig
from payload.config.trackers import active as active_trackers
from payload.config.trackers import credential_problems
from payload.errors import EXIT_PREEMPTED, FerryError
from payload.runtime.job import DEFAULT_STOP_GRACE_S, RemoteJob
from payload.storage.layout import CONFIG_FILE  # the run folder holds its resolved config too

JOB_FILE = "job.json"


def _tuple(value: Any) -> Any:
    """JSON gives lists where the image spec holds tuples (its env holds pairs)."""
    return tuple(value) if isinstance(value, list) else value


RUN_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
ACCELERATOR = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")


class RunState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"  # stopped after a checkpoint (exit 75): `launch resume` goes on

    @property
    def finished(self) -> bool:
        """Nothing of the run is running (it may still be resumed)."""
        return self not in (RunState.PENDING, RunState.RUNNING)

    @classmethod
    def after_exit(cls, code: int) -> RunState:
        """The state a run's exit code means, for every backend: 0 done, 75 stopped
        after a checkpoint (resumable), anything else failed."""
        if code == 0:
            return cls.SUCCEEDED
        return cls.PREEMPTED if code == EXIT_PREEMPTED else cls.FAILED


class NotStarted(FerryError):  # noqa: N818 - a fact the backend reports
    """A submit failed and the backend is sure it started nothing: safe to try again
    (a sweep does, with backoff; `launch train` reports it at once)."""


@dataclass(frozen=True)
class Resources:
    """What a run asks for. `gpus_per_node` is the GPUs each node gets (on a machine
    without GPUs, that many CPU processes); all of them train, but for those a GRPO job
    keeps for its own vLLM server (`JobSpec.procs_per_node`)."""

    accelerator: str | None = None  # e.g. "H100", "A100-80GB"; None: whatever is there
    gpus_per_node: int = 1
    nodes: int = 1
    spot: bool | None = None  # None: the backend's default
    region: str | None = None
    timeout_s: int | None = None
    cpu: float | None = None  # cores per node
    memory_mb: int | None = None  # per node
    retries: int | None = None  # restarts after a failure
    stop_grace_s: int = DEFAULT_STOP_GRACE_S  # to save and upload after a stop signal
    max_cost: float | None = None  # USD: above this estimate, a launch asks first

    @classmethod
    def from_gpus(cls, gpus: str | int | None, **kwargs: Any) -> Resources:
        """`--gpus 2` or `--gpus H100:8` (a bare name means one of it)."""
        if gpus is None or gpus == "":
            return cls(**kwargs)
        text = str(gpus).strip()
        if ":" in text:
            name, count = text.rsplit(":", 1)
        elif text.isdigit():
            name, count = "", text
        else:
            name, count = text, "1"
        if not count.isdigit() or int(count) < 1 or (name and not ACCELERATOR.match(name)):
            raise FerryError(
                f"--gpus {text!r}: expected a count (2) or ACCELERATOR:COUNT (H100:8)."
            )
        return cls(accelerator=name or None, gpus_per_node=int(count), **kwargs)

    def describe(self) -> str:
        per_node = f"{self.accelerator or 'device'} x {self.gpus_per_node}"
        return per_node if self.nodes == 1 else f"{self.nodes} nodes x {per_node}"


@dataclass
class JobSpec:
    """One run, fully resolved: everything a backend needs to start it."""

    run_id: str
    name: str  # the config's name, for humans
    config: dict[str, Any]  # resolved: overrides applied, local paths absolute
    resources: Resources
    run_dir: Path  # the launcher's folder for this run (resolved config, logs, state)
    image: Any = None  # images.ImageSpec: what the job runs in (container backends)
    storage_uri: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)  # names only; values never travel here
    volumes: list[dict[str, str]] = field(default_factory=list)  # extra {name, mount}
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"ray": {...}}

    @property
    def config_path(self) -> Path:
        return self.run_dir / CONFIG_FILE

    def write(self) -> None:
        """Write the run folder's record of this job: the resolved config.yml, and
        job.json (image, env, secret names, volumes) for a relaunch to rebuild it."""
        import yaml

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        launch = {
            "image": asdict(self.image) if self.image is not None else None,
            "env": self.env,
            "secrets": self.secrets,
            "volumes": self.volumes,
            "options": self.options,
        }
        (self.run_dir / JOB_FILE).write_text(json.dumps(launch, indent=1) + "\n")

    @classmethod
    def read(cls, run_dir: Path, **fields: Any) -> JobSpec:
        """The job a run folder records (see `write`); `fields` gives the rest."""
        import yaml

        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
        launch_file = run_dir / JOB_FILE
        launch = json.loads(launch_file.read_text()) if launch_file.exists() else {}
        image = None
        if launch.get("image"):
            from images.spec import ImageSpec

            image = ImageSpec(
                **{
                    k: tuple(map(_tuple, v)) if isinstance(v, list) else v
                    for k, v in launch["image"].items()
                }
            )
        return cls(
            config=config,
            run_dir=run_dir,
            image=image,
            env=launch.get("env", {}),
            secrets=launch.get("secrets", []),
            volumes=launch.get("volumes", []),
            options=launch.get("options", {}),
            **fields,
        )

    def train_config(self) -> TrainConfig:
        """The config the run trains (validated when the job was made)."""
        from payload.plugins import config_class_for

        return config_class_for(self.config).model_validate(self.config)

    @property
    def procs_per_node(self) -> int:
        """Training processes per node (torchrun's --nproc-per-node): the node's GPUs less
        those the config keeps for its own vLLM server (payload.config.vllm)."""
        return vllm.training_procs(self.train_config(), self.resources.gpus_per_node)

    def payload_env(self) -> dict[str, str]:
        env = dict(self.env)
        env["FERRY_RUN_ID"] = self.run_id
        if self.storage_uri:
            env["FERRY_STORAGE_URI"] = self.storage_uri
        return env


@dataclass
class Handle:
    """How to find a submitted run again; stored in the registry as JSON."""

    backend: str
    run_id: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Handle:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Status:
    state: RunState
    detail: str | None = None  # why it failed, or what it is waiting for
    exit_code: int | None = None
    finished_at: float | None = None  # when it ended (epoch seconds), if the backend knows
    unknown: bool = False  # the backend did not answer: `state` is only the last guess


@dataclass
class Plan:
    """A dry-run description: what would start, where, running what."""

    backend: str
    run_id: str
    rows: list[tuple[str, str]]
    command: list[str]
    appendix: str = ""  # printed after the rows (SkyPilot's task YAML)

    def text(self) -> str:
        width = max(len(k) for k, _ in self.rows) if self.rows else 0
        lines = [f"{k.ljust(width)}  {v}" for k, v in self.rows]
        lines.append(f"{'command'.ljust(width)}  {shlex.join(self.command)}")
        if self.appendix:
            lines += ["", self.appendix.rstrip("\n")]
        return "\n".join(lines)


class Executor:
    """Base class of every backend. Subclasses set `name` and implement the `_hooks`."""

    name: str = ""
    remote = True  # runs elsewhere: credentials travel as named secrets
    secrets_are_variables = False  # each secret is one environment variable, by its name
    priced = False  # bills by the hour: `hourly_price` says how much (executors.cost)

    # ---- public API: shared checks, then the backend's hook
    def problems(self, job: JobSpec) -> list[str]:
        """Everything that would stop this job from running here, checked before launch."""
        problems: list[str] = []
        if not RUN_ID.match(job.run_id):
            problems.append(f"run id {job.run_id!r} must be lowercase letters, digits and dashes")
        r = job.resources
        if r.nodes < 1 or r.gpus_per_node < 1:
            problems.append("a run needs at least one node and one process per node")
        else:
            # GPUs a self-started vLLM server keeps do not train: the batch shapes are
            # checked on the ranks that remain.
            cfg = job.train_config()
            split = vllm.split_problems(cfg, r.gpus_per_node, r.nodes)
            problems.extend(split)
            if not split:
                ranks = r.nodes * vllm.training_procs(cfg, r.gpus_per_node)
                problems.extend(grpo_rank_problems(cfg, ranks))
                # The device mesh (FSDP2's shards, context and tensor parallel groups) must
                # fit the processes, which only the launch knows.
                problems.extend(mesh_problems(cfg, r.nodes * job.procs_per_node))
        problems.extend(self._check(job))
        problems.extend(
            credential_problems(
                job.train_config(), job.secrets, self.remote, self.secrets_are_variables
            )
        )
        return problems

    def warnings(self, job: JobSpec) -> list[str]:
        """Settings this backend would ignore: said, never silently dropped."""
        said = [
            f"`launch.{section}` settings are for --cloud {section}; ignored here"
            for section in job.options
            if section != self.name and job.options[section]
        ]
        if job.resources.max_cost and not self.priced:
            said.append(f"launch.max_cost: {self.name} has no price to hold it against; ignored")
        if self.remote:
            from payload.plugins import foreign

            said.extend(
                f"plugin `{name}` is not Ferry's own: the machines the run trains on must "
                "have it installed (Ferry's image: add its package under `image: pip:`)"
                for name in foreign(job.config.get("plugins"))
            )
        return said + self._warnings(job)

    def check(self, job: JobSpec) -> None:
        """Raise FerryError listing `problems(job)`, if there are any; log warnings."""
        import logging

        for warning in self.warnings(job):
            logging.getLogger("ferry.executors").warning("%s: %s", self.name, warning)
        problems = self.problems(job)
        if problems:
            raise FerryError(
                f"The {self.name} backend cannot run {job.run_id}:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )

    def preflight(self, job: JobSpec) -> None:
        """What only a real launch needs (credentials, quotas), checked before anything
        is recorded; a dry run skips it. Raise FerryError with the fix."""
        self._preflight(job)

    def hourly_price(self, job: JobSpec) -> tuple[float, str] | str | None:
        """One node-hour's price in USD and where it comes from; a string says why the
        price is unknown; None: the backend does not bill by the hour (executors.cost)."""
        return None

    def timeout_s(self, job: JobSpec) -> int | None:
        """How long the backend lets the run go: `launch.timeout`, or its own limit."""
        return job.resources.timeout_s

    def default_storage(self, home: Path) -> str | None:
        """Where runs sync to when neither --storage nor the config says (None: nowhere)."""
        return None

    def find(self, job: JobSpec) -> Handle | None:
        """The live submission of this run id, if the backend has one (an earlier submit
        that started it but was not recorded). The run id is the idempotency key: a
        submit is repeated only when this says nothing is there."""
        return self._find(job)

    def plan(self, job: JobSpec) -> Plan:
        self.check(job)
        plan = self._plan(job)
        for tracker in active_trackers(job.train_config()):
            plan.rows.append(("tracker", tracker.describe()))
        return plan

    def submit(self, job: JobSpec) -> Handle:
        self.check(job)
        return self._submit(job)

    def status(self, handle: Handle) -> Status:
        self._own(handle)
        return self._status(handle)

    def logs(self, handle: Handle, follow: bool = False) -> Iterator[str]:
        self._own(handle)
        return self._logs(handle, follow)

    def cancel(self, handle: Handle) -> Status:
        self._own(handle)
        return self._cancel(handle)

    def _own(self, handle: Handle) -> None:
        assert handle.backend == self.name, f"{self.name} given a {handle.backend} handle"

    # ---- hooks
    def _check(self, job: JobSpec) -> list[str]:
        return []

    def _preflight(self, job: JobSpec) -> None:
        return None

    def _find(self, job: JobSpec) -> Handle | None:
        return None

    def _warnings(self, job: JobSpec) -> list[str]:
        return []

    def _plan(self, job: JobSpec) -> Plan:
        raise NotImplementedError

    def _submit(self, job: JobSpec) -> Handle:
        raise NotImplementedError

    def _status(self, handle: Handle) -> Status:
        raise NotImplementedError

    def _logs(self, handle: Handle, follow: bool) -> Iterator[str]:
        raise NotImplementedError

    def _cancel(self, handle: Handle) -> Status:
        raise NotImplementedError


def vllm_rows(cfg: TrainConfig, gpus_per_node: int, python: str) -> list[tuple[str, str]]:
    """A plan's rows for a job that starts its own vLLM server: which GPUs train, which
    serve, where the trainer finds it, and the server's command (none without one)."""
    from payload.runtime.vllm_server import server_command

    rows = vllm.split_rows(cfg, gpus_per_node)
    if rows:
        rows.append(("vllm command", shlex.join(server_command(cfg, python))))
    return rows


def stage_job(
    folder: Path, contract: RemoteJob, job_file: str, inputs: list[tuple[Path, str]]
) -> Path:
    """A fresh folder holding the job contract (as `job_file`) and the config's files at
    their relative places: what a backend uploads for a job (Ray's working_dir,
    SkyPilot's file mount)."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / job_file).write_text(contract.to_json())
    for local, relative in inputs:
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if local.is_dir():
            shutil.copytree(local, target)
        else:
            shutil.copy2(local, target)
    return folder


def remote_job(
    job: JobSpec,
    config: dict[str, Any],
    cluster: str,
    volume_mounts: dict[str, str] | None = None,
    environ: dict[str, str] | None = None,
) -> RemoteJob:
    """The job contract a remote backend sends for `job` (`config` as the container
    sees it). Refused if any secret of this machine's environment (`environ`, default
    os.environ) would travel in it."""
    import os

    remote = RemoteJob(
        run_id=job.run_id,
        config=config,
        storage_uri=job.storage_uri,
        env=dict(job.env),
        nodes=job.resources.nodes,
        procs_per_node=job.procs_per_node,
        cluster=cluster,
        volume_mounts=dict(volume_mounts or {}),
        stop_grace_s=job.resources.stop_grace_s,
    )
    remote.check_no_secret_values(dict(os.environ if environ is None else environ))
    return remote
