"""Running a job in a container that a backend started: the body of Modal's function, of
SkyPilot's `run` script and of Ray's driver task.

`run_job(job)` writes the resolved config, sets the environment contract
(FERRY_RUN_ID, FERRY_STORAGE_URI, FERRY_VOLUME_MOUNTS), finds this node's place in the
job's cluster, and runs the command every backend runs:

    python -m payload.entry.torchrun <torchrun_args> -m payload train <config>

torchrun runs in a session of its own. A SIGTERM or SIGINT this process gets (a
preemption notice) is passed to it, and it lets the ranks save and upload before they
stop. On every way out of `run_job` (an exception, Modal's input cancellation) the
torchrun tree is stopped, with the job's grace period, before it returns: no GPU is
left training for nobody.

Standard library only at import: this runs where nothing else is imported yet.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from payload.errors import FerryError
from payload.runtime.cluster import Node, discover, job_torchrun_args
from payload.runtime.job import RemoteJob
from payload.runtime.procs import stop_tree

ERROR_FILE = "error.json"  # the payload's user-facing error, for the backend to report
CONFIG_FILE = "config.yml"


@dataclass(frozen=True)
class JobResult:
    """How a job ended on this node: torchrun's exit code (0 done, 1 a user error, 75
    stopped after a checkpoint) and, for an error, the payload's own message."""

    exit_code: int
    detail: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def training_command(python: str, torchrun: list[str], config_path: str | Path) -> list[str]:
    """The command every backend runs on every node: torchrun (with `torchrun`, from
    payload.runtime.cluster.torchrun_args) around `python -m payload train CONFIG`."""
    return [
        python,
        "-m",
        "payload.entry.torchrun",
        *torchrun,
        "-m",
        "payload",
        "train",
        str(config_path),
    ]


def command(job: RemoteJob, node: Node, config_path: Path) -> list[str]:
    """The command this node runs."""
    return training_command(sys.executable, job_torchrun_args(job, node), config_path)


def process_env(job: RemoteJob, environ: Mapping[str, str]) -> dict[str, str]:
    """The training processes' environment: this container's, the job's extra env, and
    the contract's variables (which nothing else may override)."""
    env = {**environ, **job.env, "FERRY_RUN_ID": job.run_id}
    env["FERRY_ERROR_FILE"] = str(Path(job.workdir) / ERROR_FILE)
    if job.storage_uri:
        env["FERRY_STORAGE_URI"] = job.storage_uri
    if job.volume_mounts:
        env["FERRY_VOLUME_MOUNTS"] = ",".join(f"{k}={v}" for k, v in job.volume_mounts.items())
    return env


@contextlib.contextmanager
def _forwarding(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """Pass SIGTERM and SIGINT on to `process` while it runs. Handlers can be set only
    from the main thread; elsewhere (a worker thread) the signals are not ours to take."""
    previous: dict[int, object] = {}

    def forward(signum: int, _frame: object) -> None:
        print(f"ferry: {signal.Signals(signum).name}: passing it to torchrun", flush=True)
        if process.poll() is None:
            process.send_signal(signum)

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, forward)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def run_job(
    job: RemoteJob, environ: Mapping[str, str] | None = None, node: Node | None = None
) -> JobResult:
    """Train `job` on this node and return how it ended. A job that cannot start here
    (its cluster is missing or the wrong size) ends with exit code 1 and the reason."""
    import yaml

    environ = dict(os.environ if environ is None else environ)
    workdir = Path(job.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ERROR_FILE).unlink(missing_ok=True)
    config_path = workdir / CONFIG_FILE
    config_path.write_text(yaml.safe_dump(job.config, sort_keys=False))
    try:
        node = node or discover(job, environ)
    except FerryError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return JobResult(1, e.message)
    argv = command(job, node, config_path)
    print(f"ferry: node {node.rank} of {node.nodes}: {' '.join(argv)}", flush=True)
    process = subprocess.Popen(argv, env=process_env(job, environ), start_new_session=True)
    try:
        with _forwarding(process):
            code = process.wait()
    finally:
        if process.poll() is None:  # we are leaving early: no training left behind
            print("ferry: stopping torchrun before leaving", flush=True)
            stop_tree(process.pid, job.stop_grace_s)
            process.wait()
    return JobResult(code, _error_detail(workdir) if code else None)


def _error_detail(workdir: Path) -> str | None:
    try:
        return json.loads((workdir / ERROR_FILE).read_text()).get("error")
    except (OSError, ValueError, AttributeError):
        return None
