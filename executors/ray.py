"""The Ray backend: `launch train cfg.yml --cloud ray --ray-address http://HEAD:8265`.

A run is one Ray job, submitted through the cluster's Jobs API with the run id as its
submission id (a repeated submit finds the job instead of starting a second one; a
relaunch of the same run gets `<run id>-2`, `-3`, ...). The job's entrypoint is Ferry's
Ray driver (`python -m payload.entry.ray job.json`), which runs a Ray Train
`TorchTrainer` whose workers call the payload's training function (payload.entry.ray).

The job's runtime env carries the job contract and the files the config names (its
working_dir), the payload package (py_modules), the run's environment (FERRY_RUN_ID,
FERRY_STORAGE_URI, the config's `env`) and the secrets named in the launch settings: their
values are read from this machine's environment at submit time and sent only as runtime
env variables, never written to a file, the config or the registry. `launch.ray.runtime`
says what the workers run: the cluster's own Python with the payload shipped (`ship`,
the default: the cluster has the training stack, as Ferry's image does), or the pinned
requirements installed for the job too (`pip`).

Every call to the cluster has a deadline; an address that does not answer fails in
seconds with the address and the fix, and a cluster that refuses our token says which
variable to set. The Ray SDK is imported only here, and only when needed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from executors.base import (
    Executor,
    Handle,
    JobSpec,
    NotStarted,
    Plan,
    RunState,
    Status,
    remote_job,
    stage_job,
)
from payload.errors import FerryError
from payload.runtime.deadline import DeadlineExceeded, call_within
from payload.runtime.job import RemoteJob, default_workdir

API_TIMEOUT_S = 10.0  # any one call to the Jobs API
CONNECT_TIMEOUT_S = 2.5  # the first answer from an address
SUBMIT_TIMEOUT_S = 300.0  # the submit, which uploads the job's files (each request: above)
STOP_WAIT_S = 60.0  # how long a cancel waits for the job to end
INPUTS_DIR = "inputs"  # in the job's working_dir: the files the config names
JOB_FILE = "ferry-job.json"  # in the job's working_dir: the job contract
MAX_WORKING_DIR = 90 * 2**20  # the Jobs API refuses an upload over 100 MiB (HTTP 413)
INSTALL_HINT = "pip install 'ferry[ray]'"
ENTRY_MODULE = "payload.entry.ray"
STAGING = "ray-job"  # in the run folder: what the working_dir uploads

# Ray's job states, and what they mean for a run (the exit code decides SUCCEEDED/FAILED).
_LIVE = {"PENDING", "RUNNING"}
LOG_SILENCE_S = 30.0  # `logs -f`: after this long without a line, ask whether the job ended
# Ferry's accelerator names -> Ray's (ray.util.accelerators); others are refused by name.
RAY_ACCELERATORS = {
    "A100": "A100",
    "A100-40GB": "A100-40G",
    "A100-80GB": "A100-80G",
    "A10G": "A10G",
    "B200": "B200",
    "H100": "H100",
    "H200": "H200",
    "L4": "L4",
    "L40S": "L40S",
    "T4": "T4",
    "V100": "V100",
}


def ray_settings(job: JobSpec) -> dict[str, Any]:
    return dict(job.options.get("ray") or {})


def address_of(job: JobSpec, environ: dict[str, str] | None = None) -> str | None:
    """--ray-address, else `launch.ray.address`, else RAY_ADDRESS (flags and the config
    are already merged in the job's options)."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    return ray_settings(job).get("address") or environ.get("RAY_ADDRESS") or None


def _http(address: str) -> str:
    """The Jobs API's URL: `ray://` and bare host:port addresses get http:// and the
    dashboard port is left as given."""
    if address.startswith("ray://"):
        raise FerryError(
            f"Ray address {address}: that is a Ray Client address; Ferry submits through "
            "the Jobs API on the dashboard port.",
            hint="Use http://HEAD:8265 (the dashboard's address).",
        )
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def auth_headers(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Ray's token authentication, as the cluster expects it from a client: the token from
    RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token. The
    value is read at each call and never stored."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    token = environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        try:
            token = path.read_text().strip()
        except OSError:
            token = None
    return {"Authorization": f"Bearer {token}"} if token else {}


def _refused(address: str, e: Exception) -> FerryError | None:
    """The cluster's answer when it will not take our token, said with the fix. Ray's SDK
    raises AuthenticationError for every 401 and 403; nothing else is one."""
    if type(e).__name__ != "AuthenticationError":
        return None
    said = "a token it does not accept" if auth_headers() else "no token"
    return FerryError(
        f"The Ray cluster at {address} refused the request: it requires token "
        f"authentication and we sent {said}.",
        hint="Set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the "
        "head prints it), or RAY_AUTH_TOKEN_PATH to a file holding it.",
    )


_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_environ_lock = threading.Lock()


def client(address: str) -> Any:
    """A JobSubmissionClient for `address` whose every request has a deadline (the SDK
    sets none: a head that accepts connections and never answers would hang us). The
    SDK prefers RAY_ADDRESS to the address it is given; the address resolved here wins."""
    import requests
    from ray.job_submission import JobSubmissionClient

    class Bounded(JobSubmissionClient):
        def _do_request(self, method, endpoint, **kwargs):  # type: ignore[no-untyped-def]
            # Reads answer at once; a submit (the head sets up the job's environment
            # before it answers) and a package upload may take minutes.
            slow = method in ("POST", "PUT") and endpoint.startswith(
                ("/api/jobs/", "/api/packages")
            )
            read = SUBMIT_TIMEOUT_S if slow and "/stop" not in endpoint else API_TIMEOUT_S
            if endpoint.startswith("/api/version"):  # the first answer: an address that
                read = CONNECT_TIMEOUT_S  # takes connections but never answers fails fast
            kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, read))
            return super()._do_request(method, endpoint, **kwargs)

    url = _http(address)
    with _environ_lock:
        hidden = {k: os.environ.pop(k) for k in _ADDRESS_VARIABLES if k in os.environ}
        try:
            return Bounded(url, headers=auth_headers())
        except (ConnectionError, requests.RequestException) as e:
            raise unreachable(url, _first_line(e)) from e
        except Exception as e:  # noqa: BLE001 - a refusal, or a cluster without the Jobs API
            refused = _refused(url, e)
            if refused:
                raise refused from e
            raise unreachable(url, _first_line(e)) from e
        finally:
            os.environ.update(hidden)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def unreachable(url: str, why: str) -> NotStarted:
    return NotStarted(
        f"Cannot reach the Ray cluster at {url}: {why}.",
        hint="Check the address (the head's dashboard, http://HEAD:8265: --ray-address, "
        "`launch.ray.address` or RAY_ADDRESS) and that the head is up (`ray status` on it).",
    )


def api(address: str, what: str, fn: Any, seconds: float = API_TIMEOUT_S) -> Any:
    """One Jobs API call, bounded by `seconds`, with a refusal said plainly."""
    try:
        return call_within(fn, seconds, f"Ray: {what}")
    except DeadlineExceeded as e:
        raise FerryError(f"Ray at {address} did not answer {what} within {seconds:.0f} s.") from e
    except Exception as e:  # noqa: BLE001 - the SDK raises RuntimeError for HTTP errors
        refused = _refused(address, e)
        if refused:
            raise refused from e
        if _not_found(e):
            raise
        raise FerryError(f"Ray at {address}: {what} failed: {_first_line(e)}") from e


def _not_found(e: BaseException) -> bool:
    """The Jobs API's 404: the job id is unknown to the cluster (the SDK says so only in
    its message: `Request failed with status code 404: ...`)."""
    return isinstance(e, RuntimeError) and str(e).startswith("Request failed with status code 404")


def ray_job(job: JobSpec) -> tuple[RemoteJob, list[tuple[Path, str]]]:
    """The job contract the driver reads (local files at their place in the working_dir,
    under `inputs/`), and the (local, relative) files to put there."""
    from executors.modal import INPUTS, shipped_inputs

    config, inputs = shipped_inputs(job.config)
    config.pop("dataset_prepared_path", None)  # a laptop folder means nothing there
    config["output_dir"] = f"{default_workdir(job.run_id)}/output"
    # Where shipped files are: `/ferry/inputs/...`, which the workers turn into their
    # own working_dir's inputs/ folder (payload.entry.ray.localise).
    shipped = [(local, remote.replace(INPUTS, INPUTS_DIR, 1)) for local, remote in inputs]
    return remote_job(job, config, "ray"), shipped


def secret_values(job: JobSpec, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The named secrets' values, from this machine's environment, for the runtime env."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    return {name: environ[name] for name in job.secrets if name in environ}


def runtime_env(job: JobSpec, working_dir: str | None) -> dict[str, Any]:
    """The job's runtime env; secret values are added only at submit (`_submit`)."""
    import payload

    settings = ray_settings(job)
    # Train V2 (the default since Ray 2.5x, asked for by name for older ones); prints
    # straight to the log, not also through the root logger (each line said once); the
    # driver's orders: the workers and the failure budget (payload.entry.ray).
    env = {
        **job.payload_env(),
        "PYTHONUNBUFFERED": "1",
        "RAY_TRAIN_V2_ENABLED": "1",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "FERRY_RAY_SCALING": json.dumps(RayExecutor.scaling(job)),
        "FERRY_RAY_MAX_FAILURES": str(job.resources.retries or 0),
    }
    runtime: dict[str, Any] = {"env_vars": env}
    if working_dir:
        runtime["working_dir"] = working_dir
    runtime["py_modules"] = [str(Path(payload.__file__).parent)]
    if settings.get("runtime", "ship") == "pip":
        from images.render import ray_runtime_env

        runtime["pip"] = ray_runtime_env(job.image)["pip"]
    return runtime


def entrypoint() -> str:
    return f"python -m {ENTRY_MODULE} {JOB_FILE}"


class RayExecutor(Executor):
    name = "ray"
    secrets_are_variables = True  # a secret is read from the environment by its name

    def _preflight(self, job: JobSpec) -> None:
        """The cluster answers and takes our token, before anything is recorded."""
        client(address_of(job) or "")

    def _check(self, job: JobSpec) -> list[str]:
        problems = []
        if importlib.util.find_spec("ray") is None:
            problems.append(f"the Ray SDK is not installed: {INSTALL_HINT}")
        address = address_of(job)
        if not address:
            problems.append(
                "no Ray cluster address: pass --ray-address http://HEAD:8265, set "
                "`launch.ray.address`, or RAY_ADDRESS"
            )
        elif address.startswith("ray://"):
            problems.append(
                f"Ray address {address} is a Ray Client address; give the Jobs API's "
                "(the dashboard's, http://HEAD:8265)"
            )
        if not job.storage_uri:
            problems.append(
                "a Ray run keeps its checkpoints in storage that every node reaches: "
                "pass --storage s3://BUCKET/PREFIX (or a file:// folder every node mounts)"
            )
        elif job.storage_uri.startswith("volume://"):
            problems.append("volume:// storage is Modal's; on Ray use s3:// or a shared file://")
        accelerator = job.resources.accelerator
        if accelerator and accelerator.upper() not in RAY_ACCELERATORS:
            problems.append(
                f"Ray has no accelerator type {accelerator}; give one of "
                f"{', '.join(RAY_ACCELERATORS)}, or a count alone (--gpus 8) for any GPU"
            )
        missing = [name for name in job.secrets if name not in os.environ]
        if missing:
            problems.append(
                f"secret(s) {', '.join(missing)} are not set in this environment: on Ray, a "
                "secret's value is read from the launching machine's environment"
            )
        try:
            _, inputs = ray_job(job)
        except FerryError as e:
            problems.append(e.message)
        else:
            size = sum(_size(local) for local, _ in inputs)
            if size > MAX_WORKING_DIR:
                problems.append(
                    f"the files the config names add up to {size / 2**20:.0f} MiB, more than a "
                    "Ray job carries (90 MiB: the Jobs API takes 100); put the data in s3:// "
                    "or on a path every node mounts, and name that"
                )
        return problems

    def _warnings(self, job: JobSpec) -> list[str]:
        r, said = job.resources, []
        if r.spot is not None:
            said.append("--spot is the cluster's business on Ray (its node types); ignored")
        if r.region:
            said.append("--region is the cluster's business on Ray; ignored")
        if r.timeout_s:
            said.append("--timeout is not enforced on Ray; `launch cancel` stops the job")
        if job.config.get("dataset_prepared_path"):
            said.append(
                "dataset_prepared_path is a folder on this machine; the Ray workers tokenize "
                "into their own cache instead"
            )
        storage = job.storage_uri or ""
        address = address_of(job) or ""
        if storage.startswith("file://") and not _loopback(address):
            said.append(
                f"file:// storage ({storage}) must be a folder every Ray node mounts at that "
                "same path"
            )
        return said

    @staticmethod
    def scaling(job: JobSpec) -> dict[str, Any]:
        r, settings = job.resources, ray_settings(job)
        scaling: dict[str, Any] = {
            "num_workers": r.nodes * job.procs_per_node,
            "placement_strategy": settings.get("placement_strategy", "PACK"),
        }
        if settings.get("use_gpu") is not None:
            scaling["use_gpu"] = settings["use_gpu"]
        elif r.accelerator:
            scaling["use_gpu"] = True
        if settings.get("resources_per_worker"):
            scaling["resources_per_worker"] = settings["resources_per_worker"]
        if r.accelerator and r.accelerator.upper() in RAY_ACCELERATORS:
            scaling["accelerator_type"] = RAY_ACCELERATORS[r.accelerator.upper()]
        return scaling

    def _plan(self, job: JobSpec) -> Plan:
        r = job.resources
        contract, inputs = ray_job(job)
        runtime = runtime_env(job, f"<{STAGING} folder: {JOB_FILE} and {INPUTS_DIR}/>")
        env_names = sorted(runtime["env_vars"])
        scaling = self.scaling(job)
        use_gpu = scaling.get("use_gpu", "auto (GPUs if the cluster has any)")
        rows = [
            ("backend", "ray"),
            ("run id", job.run_id),
            ("address", _http(address_of(job) or "-")),
            ("submission id", f"{job.run_id} (a relaunch: {job.run_id}-2, -3, ...)"),
            ("entrypoint", entrypoint()),
            ("trainer", "ray.train.torch.TorchTrainer (Train V2), workers run payload.train"),
            (
                "scaling",
                f"{scaling['num_workers']} workers ({r.nodes} node(s) x {job.procs_per_node}), "
                f"use_gpu {use_gpu}, placement {scaling['placement_strategy']}"
                + (
                    f", resources {scaling['resources_per_worker']}"
                    if "resources_per_worker" in scaling
                    else ""
                )
                + (
                    f", accelerator {scaling['accelerator_type']}"
                    if "accelerator_type" in scaling
                    else ""
                ),
            ),
            (
                "failures",
                (
                    f"max_failures {r.retries}: a lost worker or node restarts the workers "
                    "from the last reported checkpoint"
                    if r.retries
                    else "max_failures 0: a lost worker or node ends the run (`launch resume` "
                    "continues it)"
                )
                + "; a preempted node restarts them without limit",
            ),
            ("ray storage", f"{job.storage_uri}/ray (run {job.run_id}: pointers to checkpoints)"),
            ("storage", f"{job.storage_uri} (checkpoints with manifests, final artifacts)"),
            ("runtime", _runtime_row(job, runtime)),
            ("env", ", ".join(env_names)),
            (
                "secrets",
                (
                    ", ".join(job.secrets) + " (values read from this machine's environment at "
                    "submit, sent only as runtime-env variables)"
                )
                if job.secrets
                else "none",
            ),
            (
                "cancel",
                "ends the job at once (Ray stops its driver, then its workers); the run keeps "
                "its last stored checkpoint",
            ),
        ]
        rows.extend(("input", f"{local} -> {remote}") for local, remote in inputs)
        command = ["python", "-m", ENTRY_MODULE, JOB_FILE]
        del contract
        return Plan(self.name, job.run_id, rows, command)

    def stage(self, job: JobSpec) -> Path:
        """The working_dir the job uploads: the contract and the config's files."""
        contract, inputs = ray_job(job)
        return stage_job(job.run_dir / STAGING, contract, JOB_FILE, inputs)

    def _submit(self, job: JobSpec) -> Handle:
        address = _http(address_of(job) or "")
        if ray_settings(job).get("address") != address:
            # Kept with the run (job.json): `launch resume` finds the cluster without
            # RAY_ADDRESS in its shell.
            job.options["ray"] = {**ray_settings(job), "address": address}
            job.write()
        jobs = client(address)
        folder = self.stage(job)
        runtime = runtime_env(job, str(folder))
        runtime["env_vars"].update(secret_values(job))  # values: only here, only in memory
        submission = self._free_submission_id(jobs, address, job.run_id)
        try:
            api(
                address,
                "the submit",
                lambda: jobs.submit_job(
                    entrypoint=entrypoint(),
                    submission_id=submission,
                    runtime_env=runtime,
                    metadata={"ferry_run_id": job.run_id},
                ),
                SUBMIT_TIMEOUT_S,  # it uploads the working_dir and the payload first
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # uploaded: the cluster has it now
        return Handle(self.name, job.run_id, {"address": address, "submission_id": submission})

    def _submissions(self, jobs: Any, address: str, run_id: str) -> Iterator[Any]:
        """This run's jobs on the cluster, oldest first: `<run id>`, `<run id>-2`, ...
        asked for one by one (a 404 ends them), never by listing everyone's jobs."""
        n = 1
        while True:
            submission = run_id if n == 1 else f"{run_id}-{n}"
            try:
                yield api(address, "a job's state", lambda s=submission: jobs.get_job_info(s))
            except RuntimeError as e:
                if _not_found(e):
                    return
                raise
            n += 1

    def _free_submission_id(self, jobs: Any, address: str, run_id: str) -> str:
        """The run id, or for a relaunch the first `<run id>-N` the cluster has not seen."""
        taken = sum(1 for _ in self._submissions(jobs, address, run_id))
        return run_id if taken == 0 else f"{run_id}-{taken + 1}"

    def _find(self, job: JobSpec) -> Handle | None:
        """A live job of this run (submitted, but not recorded)."""
        address = address_of(job)
        if not address:
            return None
        address = _http(address)
        jobs = client(address)
        for info in self._submissions(jobs, address, job.run_id):
            if str(info.status).split(".")[-1] in _LIVE:
                data = {"address": address, "submission_id": info.submission_id}
                return Handle(self.name, job.run_id, data)
        return None

    def _status(self, handle: Handle) -> Status:
        address, submission = handle.data["address"], handle.data["submission_id"]
        try:
            jobs = client(address)
            info = api(address, "the status", lambda: jobs.get_job_info(submission))
        except RuntimeError as e:
            if not _not_found(e):
                raise
            return Status(
                RunState.FAILED,
                f"the Ray cluster at {address} no longer knows job {submission} (was its head "
                "restarted?); `launch resume` submits the run again",
            )
        except Exception as e:  # noqa: BLE001 - not an ending: asked again next time
            said = e.message if isinstance(e, FerryError) else _first_line(e)
            return Status(RunState.RUNNING, f"state unknown: {said}", unknown=True)
        state = str(info.status).split(".")[-1]
        ended = info.end_time / 1000 if info.end_time else None
        if state in _LIVE:
            return Status(RunState.RUNNING if state == "RUNNING" else RunState.PENDING)
        if state == "STOPPED":
            return Status(RunState.CANCELLED, "cancelled (the Ray job was stopped)", None, ended)
        if state == "SUCCEEDED":
            return Status(RunState.SUCCEEDED, None, 0, ended)
        code = info.driver_exit_code
        if not isinstance(code, int):
            return Status(
                RunState.FAILED, (info.message or "the Ray job failed")[:500], None, ended
            )
        run_state = RunState.after_exit(code)
        detail = self._failure_detail(jobs, address, submission) or (info.message or "")[:500]
        if run_state == RunState.PREEMPTED:
            detail = f"{detail} (`launch resume {handle.run_id}` continues it)"
        return Status(run_state, detail or f"exit code {code}", code, ended)

    def _failure_detail(self, jobs: Any, address: str, submission: str) -> str | None:
        """The payload's last `error:` line in the job's log, as on every backend."""
        try:
            text = api(address, "the logs", lambda: jobs.get_job_logs(submission))
        except Exception:  # noqa: BLE001 - the status says enough without it
            return None
        for line in reversed(text.splitlines()[-400:]):
            for marker in ("error:", "preempted:"):
                at = line.find(marker)
                if at != -1:
                    return line[at:].removeprefix("error:").strip()[:500]
        return None

    def _logs(self, handle: Handle, follow: bool) -> Iterator[str]:
        address, submission = handle.data["address"], handle.data["submission_id"]
        jobs = client(address)
        if not follow:
            text = api(address, "the logs", lambda: jobs.get_job_logs(submission))
            yield from text.splitlines(keepends=True)
            return
        yield from _tail(jobs, submission, lambda: self._status(handle).state.finished)

    def _cancel(self, handle: Handle) -> Status:
        address, submission = handle.data["address"], handle.data["submission_id"]
        jobs = client(address)
        api(address, "the stop", lambda: jobs.stop_job(submission))
        # Ray stops the driver with SIGTERM, then SIGKILL after its grace period; wait for
        # it to say so, within a bound.
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            status = self._status(handle)
            if status.state.finished:
                return status
            time.sleep(1.0)
        status = self._status(handle)
        detail = f"stop requested {STOP_WAIT_S:.0f} s ago; Ray has not ended the job yet"
        return Status(status.state, detail, unknown=status.unknown)


def _tail(jobs: Any, submission: str, finished: Any) -> Iterator[str]:
    """`tail_job_logs` (an async generator) as lines, from a thread of its own: the
    caller's thread may be in an event loop already, or not. After LOG_SILENCE_S without
    a line it asks whether the job ended (`finished()`), so a head that vanishes without
    closing the stream ends the follow; a stream that fails says why."""
    import queue

    lines: queue.Queue[str | BaseException | None] = queue.Queue()

    async def pump() -> None:
        partial = ""
        try:
            async for chunk in jobs.tail_job_logs(submission):
                partial += chunk
                *whole, partial = partial.split("\n")
                for line in whole:
                    lines.put(line + "\n")
        except Exception as e:  # noqa: BLE001 - said by the reader below
            lines.put(e)
        finally:
            if partial:
                lines.put(partial)
            lines.put(None)

    thread = threading.Thread(target=lambda: asyncio.run(pump()), daemon=True, name="ray-logs")
    thread.start()
    while True:
        try:
            item = lines.get(timeout=LOG_SILENCE_S)
        except queue.Empty:
            if finished():
                return
            continue
        if item is None:
            return
        if isinstance(item, BaseException):
            refused = _refused(jobs.get_address(), item) if isinstance(item, Exception) else None
            raise refused or FerryError(
                f"The log stream of Ray job {submission} broke: {_first_line(item)}",
                hint="`launch logs RUN` shows the log so far; `launch status RUN` the state.",
            )
        yield item


def _runtime_row(job: JobSpec, runtime: dict[str, Any]) -> str:
    mode = ray_settings(job).get("runtime", "ship")
    parts = [f"working_dir {runtime.get('working_dir')}"]
    parts.append(f"py_modules {', '.join(runtime['py_modules'])}")
    if mode == "pip":
        parts.append(f"pip {len(runtime['pip']['packages'])} pinned requirements (the image's)")
    return "; ".join(parts)


def _loopback(address: str) -> bool:
    host = urlparse(_http(address)).hostname if address else None
    return host in ("127.0.0.1", "localhost", "::1")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0
