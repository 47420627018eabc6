"""The SkyPilot backend: `launch train cfg.yml --cloud sky [--managed]`.

A run becomes one SkyPilot task, written by Ferry (executors.sky_task). The payload entry
reads SkyPilot's variables (SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, ...) through
payload.runtime.cluster and starts torchrun with a static rendezvous at the first node's
address, as every multi-node backend does.

Two modes: a cluster job (`sky.launch`, the cluster torn down when the job ends unless
`launch.sky.down: false`) and a managed job (`--managed`, `sky.jobs.launch`), which
SkyPilot recovers after a preemption or a failure (`job_recovery`: Ferry's own
preemption exit, 75, is always recovered; `launch.retries` restarts after errors). A
recovered job starts on a fresh machine with the same run id and storage URI; Ferry's
auto-resume continues from the newest checkpoint whose manifest is complete.

Secret values are read from this machine's environment only at launch and handed to
SkyPilot in memory (`secrets_overrides`); the task YAML that `--dry-run` prints and the
run folder keeps (`sky-task.yml`) names them with no value.

The SDK (`sky`) takes seconds to import and talks to a SkyPilot API server; it is
imported only to launch, to ask for a status or logs, and for the optimizer's price in a
dry run. What can be known without it is checked first: that it is installed, that a
cloud is enabled (`sky check`'s record) or the API server answers, the secrets' values.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from executors.base import Executor, Handle, JobSpec, Plan, RunState, Status
from executors.sky_task import (
    CONTEXT_INFRA,
    STAGING,
    TASK_FILE,
    VENV,
    accelerators,
    cluster_name,
    infra,
    job_dir,
    managed,
    resources_config,
    run_script,
    secret_values,
    setup_mode,
    sky_job,
    sky_settings,
    stage,
    task_config,
    yaml_text,
)
from payload.errors import EXIT_PREEMPTED, FerryError
from payload.runtime.deadline import DeadlineExceeded, call_within

INSTALL_HINT = "pip install 'ferry[sky]'"
API_TIMEOUT_S = 30.0  # one status, queue or cancel request to the API server
STREAM_TIMEOUT_S = 60.0 * 60  # `logs -f` waits this long for provisioning and setup
POLL_S = 10.0  # ... asking this often whether the job has started
POLL_WAIT_S = 2.0  # a cancel asks the storage this often for the ranks' last checkpoint
CLOUD_ALIASES = {"k8s": "kubernetes", "digitalocean": "do"}
ENDPOINT_VARIABLE = "SKYPILOT_API_SERVER_ENDPOINT"


# ---- what can be known without the SDK


def sky_home(environ: dict[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    return Path(environ.get("SKY_RUNTIME_DIR") or Path.home()) / ".sky"


def api_endpoint(environ: dict[str, str] | None = None) -> str | None:
    """The remote API server the SDK talks to, if one is configured (the variable, else
    `api_server.endpoint` in ~/.sky/config.yaml); None: SkyPilot's local server."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    if environ.get(ENDPOINT_VARIABLE):
        return environ[ENDPOINT_VARIABLE]
    path = Path(environ.get("SKYPILOT_GLOBAL_CONFIG") or Path.home() / ".sky" / "config.yaml")
    try:
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, ValueError):
        return None
    server = data.get("api_server") if isinstance(data, dict) else None
    return server.get("endpoint") if isinstance(server, dict) else None


def enabled_clouds(environ: dict[str, str] | None = None) -> list[str] | None:
    """The clouds `sky check` last found usable here, from SkyPilot's own state database
    (read-only, no import of the SDK, no network). None: it has no record."""
    db = sky_home(environ) / "state.db"
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as conn:
            rows = conn.execute(
                "SELECT key, value FROM config WHERE key LIKE 'enabled_clouds_%_compute'"
            ).fetchall()
    except sqlite3.Error:
        return None
    clouds: list[str] = []
    for _, value in rows:
        try:
            clouds += [str(c) for c in json.loads(value) if str(c) not in clouds]
        except (TypeError, ValueError):
            continue
    return clouds


def redact(url: str) -> str:
    """The URL with any password in it replaced."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _server_answers(endpoint: str) -> str | None:
    """None if the API server answers its health check within 3 s, else why not."""
    import base64
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(endpoint)
    bare = urlunsplit(
        parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    )
    ask = urllib.request.Request(bare.rstrip("/") + "/api/health")
    if parts.username:
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        ask.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(ask, timeout=3) as reply:
            reply.read(1024)
        return None
    except Exception as e:  # noqa: BLE001 - said to the user with the address
        return str(getattr(e, "reason", e)) or type(e).__name__


# ---- the SDK, bounded


def sdk() -> Any:
    if importlib.util.find_spec("sky") is None:
        raise FerryError(
            "SkyPilot is not installed here.", hint=f"{INSTALL_HINT}, then `sky check`."
        )
    import sky

    return sky


def call(what: str, fn: Any, seconds: float = API_TIMEOUT_S) -> Any:
    """One SDK call (a request to the API server, or waiting for its result), bounded."""
    try:
        return call_within(fn, seconds, f"SkyPilot: {what}")
    except DeadlineExceeded as e:
        raise FerryError(
            f"SkyPilot's API server did not answer {what} within {seconds:.0f} s.",
            hint="`sky api info` says which server the SDK talks to and whether it is up.",
        ) from e
    except FerryError:
        raise
    except Exception as e:  # noqa: BLE001 - the SDK's own errors, said plainly
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise FerryError(f"SkyPilot: {what} failed: {text}") from e


def request(sky: Any, what: str, fn: Any, seconds: float = API_TIMEOUT_S) -> Any:
    """Send a request (its id comes back) and wait for its result, each bounded."""
    request_id = call(what, fn, seconds)
    return call(what, lambda: sky.get(request_id), seconds)


def build_task(job: JobSpec, config: dict[str, Any], secrets: list[tuple[str, str]]) -> Any:
    """The `sky.Task` for the YAML data (a copy: SkyPilot empties what it is given),
    with the secrets' values added in memory."""
    sky = sdk()
    return sky.Task.from_yaml_config(copy.deepcopy(config), secrets_overrides=secrets or None)


class LaunchFailed(FerryError):
    """SkyPilot's launch request ended without starting the job (no machines, a setup
    that failed, a cancelled request)."""


MANAGED_FIELDS = ["job_id", "job_name", "status", "recovery_count", "failure_reason"]
CLUSTER_STATES = {
    "INIT": RunState.PENDING,
    "PENDING": RunState.PENDING,
    "SETTING_UP": RunState.PENDING,
    "RUNNING": RunState.RUNNING,
    "SUCCEEDED": RunState.SUCCEEDED,
    "FAILED": RunState.FAILED,
    "FAILED_SETUP": RunState.FAILED,
    "FAILED_DRIVER": RunState.FAILED,
    "CANCELLED": RunState.CANCELLED,
}
MANAGED_STATES = {
    "PENDING": RunState.PENDING,
    "SUBMITTED": RunState.PENDING,
    "STARTING": RunState.PENDING,
    "RUNNING": RunState.RUNNING,
    "RECOVERING": RunState.RUNNING,
    "WINDING_DOWN": RunState.RUNNING,
    "CANCELLING": RunState.RUNNING,
    "SUCCEEDED": RunState.SUCCEEDED,
    "CANCELLED": RunState.CANCELLED,
    "FAILED": RunState.FAILED,
    "FAILED_SETUP": RunState.FAILED,
    "FAILED_PRECHECKS": RunState.FAILED,
    "FAILED_NO_RESOURCE": RunState.FAILED,
    "FAILED_CONTROLLER": RunState.FAILED,
}


def _name(status: Any) -> str:
    return str(getattr(status, "value", status)).split(".")[-1].upper()


class SkyPilotExecutor(Executor):
    name = "sky"
    priced = True
    secrets_are_variables = True  # a secret is read from the environment by its name

    # ---- before anything starts
    def _check(self, job: JobSpec) -> list[str]:
        problems, s, r = [], sky_settings(job), job.resources
        text = s.get("infra")
        if r.region and text and str(text).split("/")[0].lower() in CONTEXT_INFRA:
            problems.append(
                f"--region {r.region}: `launch.sky.infra: {text}` names a Kubernetes or SSH "
                "context, not a cloud with regions; drop --region"
            )
        elif r.region and not text:
            problems.append(
                f"--region {r.region}: SkyPilot needs the cloud too; set `launch.sky.infra: "
                f"aws/{r.region}` (or gcp/..., azure/...)"
            )
        elif r.region and text and len(str(text).split("/")) > 1:
            given = str(text).split("/")[1]
            if given != r.region:
                problems.append(
                    f"--region {r.region} and `launch.sky.infra: {text}` name different regions"
                )
        if s.get("accelerators") and r.accelerator:
            problems.append(
                "name the accelerators once: --gpus NAME:COUNT or `launch.sky.accelerators`"
            )
        elif s.get("accelerators"):
            counts = {
                int(a.rpartition(":")[2]) if ":" in a and a.rpartition(":")[2].isdigit() else 1
                for a in map(str, s["accelerators"])
            }
            if counts != {r.gpus_per_node}:
                problems.append(
                    f"`launch.sky.accelerators` ({', '.join(map(str, s['accelerators']))}) must "
                    f"all give one count, the processes per node ({r.gpus_per_node} here)"
                )
        if s.get("recovery") and not managed(job):
            problems.append("`launch.sky.recovery` applies to managed jobs: add --managed")
        if managed(job) and s.get("down") is False:
            problems.append("a managed job's machines always go when it ends: drop `down: false`")
        if not job.storage_uri or not job.storage_uri.startswith("s3://"):
            problems.append(
                "a SkyPilot run keeps its checkpoints where a new machine finds them after a "
                "preemption: pass --storage s3://BUCKET/PREFIX"
            )
        try:
            sky_job(job)
        except FerryError as e:
            problems.append(e.message)
        return problems

    def _warnings(self, job: JobSpec) -> list[str]:
        said, s, r = [], sky_settings(job), job.resources
        if managed(job):
            for key in ("cluster", "idle_minutes_to_autostop"):
                if s.get(key) is not None:
                    said.append(f"`launch.sky.{key}` is for cluster jobs; a managed job ignores it")
        elif r.retries:
            said.append("--retries restarts a managed job (--managed); a cluster job runs once")
            if r.spot:
                said.append("a spot cluster job ends at a preemption: --managed recovers it")
        elif r.spot:
            said.append("a spot cluster job ends at a preemption: --managed recovers it")
        if s.get("cluster") and not managed(job) and s.get("down", True):
            said.append(
                f"`launch.sky.cluster: {s['cluster']}` with `down` (the default): the cluster "
                "is torn down when this job ends, even one that was up before; `launch.sky."
                "down: false` keeps it"
            )
        if not accelerators(job) and not s.get("instance_type"):
            said.append(
                f"no accelerator named: SkyPilot picks the cheapest CPU machine and runs "
                f"{job.procs_per_node} process(es) on it; name GPUs with --gpus "
                f"H100:{job.resources.gpus_per_node} or `launch.sky.accelerators`"
            )
        if job.config.get("dataset_prepared_path"):
            said.append(
                "dataset_prepared_path is a folder on this machine; the nodes tokenize into "
                "their own cache instead"
            )
        return said

    def _preflight(self, job: JobSpec) -> None:
        """Everything a launch needs that this machine can check in seconds, without
        SkyPilot's SDK: it is installed, its server answers or a cloud is enabled, and
        the secrets have values here."""
        try:
            from importlib.metadata import version

            installed = version("skypilot")
        except Exception:  # noqa: BLE001 - not installed (or its metadata is gone)
            installed = None
        if importlib.util.find_spec("sky") is None or installed is None:
            raise FerryError(
                "SkyPilot is not installed, so nothing was launched.",
                hint=f"{INSTALL_HINT} (its own virtualenv is best: SkyPilot pins click<8.2), "
                "then `sky check` to enable a cloud.",
            )
        major_minor = tuple(int(x) for x in installed.split(".")[:2] if x.isdigit())
        if major_minor < (0, 14):
            raise FerryError(
                f"SkyPilot {installed} is installed; Ferry needs 0.14 or newer. Nothing was "
                "launched.",
                hint=f"pip install -U {INSTALL_HINT.removeprefix('pip install ')}",
            )
        endpoint = api_endpoint()
        if endpoint:
            why = _server_answers(endpoint)
            if why:
                raise FerryError(
                    f"SkyPilot's API server at {redact(endpoint)} does not answer: {why}. "
                    "Nothing was launched.",
                    hint=f"Check {ENDPOINT_VARIABLE} (or api_server.endpoint in "
                    "~/.sky/config.yaml) and `sky api info`.",
                )
        else:
            clouds = enabled_clouds()
            if not clouds:
                raise FerryError(
                    "SkyPilot has no cloud enabled on this machine (no credentials found by "
                    "`sky check`), so nothing was launched.",
                    hint="Set up a cloud's credentials (e.g. `aws configure`), then run "
                    "`sky check`; or point SKYPILOT_API_SERVER_ENDPOINT at your team's "
                    "SkyPilot API server.",
                )
            wanted = (infra(job) or "").split("/")[0].lower()
            wanted = CLOUD_ALIASES.get(wanted, wanted)
            if wanted and wanted not in {"*", *(c.lower() for c in clouds)}:
                raise FerryError(
                    f"`launch.sky.infra` asks for {wanted}, but SkyPilot has only "
                    f"{', '.join(clouds)} enabled here. Nothing was launched.",
                    hint=f"`sky check {wanted}` says what {wanted} is missing.",
                )
        missing = [name for name in job.secrets if name not in os.environ]
        if missing:
            raise FerryError(
                f"secret(s) {', '.join(missing)} are not set in this environment: on SkyPilot "
                "a secret's value is read from the launching machine's environment. Nothing "
                "was launched."
            )

    # ---- the plan
    def optimizer_choice(self, job: JobSpec) -> tuple[str, float] | str:
        """SkyPilot's optimizer's pick for the task and its hourly price per node, found
        in-process (no API server, no launch), or why it cannot say."""
        if importlib.util.find_spec("sky") is None:
            return f"SkyPilot is not installed ({INSTALL_HINT})"
        endpoint = api_endpoint()
        if endpoint:  # its clouds and credentials are the server's, not this machine's
            return (
                f"SkyPilot's API server at {redact(endpoint)} chooses the machines, and its "
                "optimizer's price is not read back; `sky launch --dryrun` on the task "
                "below shows it"
            )
        if not enabled_clouds():
            return "no cloud is enabled for SkyPilot here (`sky check`)"
        try:
            sky = sdk()
            config = task_config(job, staged=Path.cwd())
            config.pop("file_mounts", None)  # the optimizer prices machines, not files
            placeholders = [(name, "-") for name in job.secrets]
            task = build_task(job, config, placeholders)
            with sky.Dag() as dag:
                dag.add(task)
            call(
                "the optimizer",
                lambda: sky.Optimizer.optimize(dag, minimize=sky.OptimizeTarget.COST, quiet=True),
                60,
            )
            best = task.best_resources
            where = "/".join(str(x) for x in (best.cloud, best.region, best.zone) if x)
            spot = " (spot)" if best.use_spot else ""
            return f"{best.instance_type}{spot} in {where}", float(best.get_cost(3600))
        except Exception as e:  # noqa: BLE001 - a dry run says why it has no price
            text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            return f"SkyPilot's optimizer could not choose: {text}"

    def hourly_price(self, job: JobSpec) -> tuple[float, str] | str:
        """The price of one node-hour and where it comes from, or why it is unknown."""
        choice = self.optimizer_choice(job)
        if isinstance(choice, str):
            return choice
        what, price = choice
        return price, f"SkyPilot's optimizer: {what}"

    def _plan(self, job: JobSpec) -> Plan:
        r = job.resources
        s = sky_settings(job)
        task = task_config(job)
        _, inputs = sky_job(job)
        recovery = resources_config(job).get("job_recovery")
        rows = [
            ("backend", "sky (SkyPilot)"),
            ("run id", job.run_id),
            (
                "mode",
                "managed job (sky.jobs.launch): recovered after every preemption"
                + (
                    f", and after up to {r.retries} error(s)"
                    if r.retries
                    else "; an error ends it (launch.retries: 0)"
                )
                if managed(job)
                else f"cluster job (sky.launch) on cluster {cluster_name(job)}; "
                + (
                    "torn down when the job ends"
                    if s.get("down", True)
                    else "kept after the job ends"
                )
                + (
                    f", autostop after {s['idle_minutes_to_autostop']} idle minutes"
                    if s.get("idle_minutes_to_autostop") is not None
                    else ""
                ),
            ),
            ("resources", _describe_resources(job)),
            (
                "image",
                task["resources"].get("image_id")
                or f"the VM's own, with `setup` installing the image's pinned requirements "
                f"into {VENV}",
            ),
            (
                "files",
                f"{job.run_dir / STAGING} -> {job_dir(job)} (job.json, inputs/"
                + (", payload/)" if setup_mode(job) else ")"),
            ),
            ("storage", f"{job.storage_uri} (checkpoints with manifests, final artifacts)"),
            ("env", ", ".join(sorted(task["envs"]))),
            (
                "secrets",
                ", ".join(job.secrets) + " (values read from this machine's environment at "
                "launch, never written to the task)"
                if job.secrets
                else "none",
            ),
        ]
        if recovery:
            rows.append(
                (
                    "recovery",
                    f"strategy {recovery['strategy']}, exit {EXIT_PREEMPTED} (Ferry's "
                    f"preemption exit) always recovered, "
                    f"max_restarts_on_errors {recovery['max_restarts_on_errors']}",
                )
            )
        rows.extend(("input", f"{local} -> {job_dir(job)}/{remote}") for local, remote in inputs)
        command = ["bash", "-c", "; ".join(run_script(job).splitlines())]  # on every node
        plan = Plan(self.name, job.run_id, rows, command)
        plan.appendix = "task (sky-task.yml):\n" + yaml_text(task)
        return plan

    # ---- launch and follow
    def _submit(self, job: JobSpec) -> Handle:
        sky = sdk()
        folder = stage(job)
        config = task_config(job, folder)
        (job.run_dir / TASK_FILE).write_text(yaml_text(config))
        task = build_task(job, config, secret_values(job))
        # Not under a thread deadline: an abandoned thread could still send the launch,
        # and start machines nobody follows. The SDK uploads the file mount, then posts.
        s = sky_settings(job)
        try:
            if managed(job):
                request_id = sky.jobs.launch(task, name=job.run_id)
                data: dict[str, Any] = {"mode": "managed"}
            else:
                down = bool(s.get("down", True))
                request_id = sky.launch(
                    task,
                    cluster_name=cluster_name(job),
                    down=down,
                    idle_minutes_to_autostop=s.get("idle_minutes_to_autostop"),
                )
                data = {"mode": "cluster", "cluster": cluster_name(job), "down": down}
        except Exception as e:  # noqa: BLE001 - the SDK's own errors, said plainly
            raise FerryError(f"SkyPilot: the launch failed: {_first_line(e)}") from e
        data["request_id"] = str(request_id)
        data["spot"] = bool(job.resources.spot)
        data["storage_uri"] = job.storage_uri
        data["stop_grace_s"] = job.resources.stop_grace_s
        return Handle(self.name, job.run_id, data)

    def _job_id(self, sky: Any, handle: Handle) -> int | None:
        """The SkyPilot job id of the launch, once its request has finished (None while
        the machines are still being provisioned). A launch that failed raises."""
        if handle.data.get("job_id") is not None:
            return int(handle.data["job_id"])
        request_id = handle.data["request_id"]
        found = call("the launch's state", lambda: sky.api_status([request_id]))
        state = _name(_field(found[0], "status")) if found else ""
        if not state:  # the server no longer has the request (kept 24 h): find the job
            return self._job_by_name(sky, handle)
        if state not in ("SUCCEEDED", "FAILED", "CANCELLED"):  # PENDING, WAITING, RUNNING
            return None
        try:
            result = call("the launch", lambda: sky.get(request_id))
        except FerryError as e:
            if state not in ("FAILED", "CANCELLED"):
                raise
            # The request ended without a job. Machines it already started (a setup or
            # an upload that failed) stay up: `down` only acts once a job has ended.
            left = ""
            if handle.data["mode"] == "cluster":
                cluster = handle.data["cluster"]
                left = (
                    f" Machines it may have started stay up and bill: `sky status {cluster}` "
                    f"shows them, `sky down {cluster}` removes them."
                )
            raise LaunchFailed(e.message + left) from e
        job_id = result[0]
        if isinstance(job_id, list):  # a managed job: the ids of its tasks
            job_id = job_id[0]
        handle.data["job_id"] = int(job_id)
        return int(job_id)

    def _job_by_name(self, sky: Any, handle: Handle) -> int | None:
        """The newest job named after the run (the task's name), on its cluster or among
        the managed jobs; None if there is none (yet)."""
        if handle.data["mode"] == "managed":
            records = self._managed(sky, name_match=handle.run_id)
        else:
            cluster = handle.data["cluster"]
            records = request(sky, "the cluster's queue", lambda: sky.queue(cluster))
        ids = [
            int(_field(r, "job_id"))
            for r in records or []
            if _field(r, "job_name") == handle.run_id and _field(r, "job_id") is not None
        ]
        if not ids:
            return None
        handle.data["job_id"] = max(ids)
        return max(ids)

    def _managed(self, sky: Any, **query: Any) -> list[Any]:
        """Managed-job records (queue_v2, with the fields Ferry reads)."""
        result = request(
            sky,
            "the managed jobs' state",
            lambda: sky.jobs.queue_v2(refresh=False, fields=MANAGED_FIELDS, **query),
        )
        return list(result[0] if isinstance(result, tuple) else result or [])

    def _status(self, handle: Handle) -> Status:
        try:
            sky = sdk()
            job_id = self._job_id(sky, handle)
        except LaunchFailed as e:
            return Status(RunState.FAILED, e.message)
        except FerryError as e:
            if _gone(e):  # the request is forgotten and the cluster it ran on is gone
                return self._after_teardown(handle)
            return Status(RunState.PENDING, f"state unknown: {e.message}", unknown=True)
        if job_id is None:
            return Status(RunState.PENDING, "SkyPilot is provisioning the machines")
        try:
            if handle.data["mode"] == "managed":
                records = self._managed(sky, job_ids=[job_id])
                record = next((r for r in records if _field(r, "job_id") == job_id), None)
                if record is None:
                    return Status(RunState.FAILED, f"SkyPilot has no managed job {job_id}")
                state = MANAGED_STATES.get(_name(_field(record, "status")), RunState.RUNNING)
                detail = _field(record, "failure_reason") or None
                recoveries = _field(record, "recovery_count") or 0
                if state == RunState.RUNNING and recoveries:
                    detail = f"recovered {recoveries} time(s)"
                return Status(state, detail)
            cluster = handle.data["cluster"]
            states = request(sky, "the job's state", lambda: sky.job_status(cluster, [job_id]))
            value = (states or {}).get(job_id) or (states or {}).get(str(job_id))
        except FerryError as e:
            if _gone(e):  # a torn-down cluster, or a stopped jobs controller: storage says
                return self._after_teardown(handle)
            return Status(RunState.RUNNING, f"state unknown: {e.message}", unknown=True)
        if value is None:
            return self._after_teardown(handle)
        return Status(CLUSTER_STATES.get(_name(value), RunState.RUNNING))

    def _after_teardown(self, handle: Handle) -> Status:
        """A job whose machines SkyPilot can no longer ask: a cluster job's cluster torn
        down (when the job ended, by default), or the managed jobs' controller stopped
        (it stops when idle). The run's storage says how it ended: its final artifacts,
        manifest and all, mean it succeeded. Without them a cluster job stopped early (its
        checkpoints are there for `launch resume`); a managed job's state waits for the
        controller."""
        from payload.storage import FINAL, MANIFEST, open_store

        uri = handle.data.get("storage_uri")
        where = (
            "SkyPilot's jobs controller is stopped"
            if handle.data["mode"] == "managed"
            else f"cluster {handle.data['cluster']} is gone"
        )
        try:
            done = bool(uri) and f"{FINAL}/{MANIFEST}" in open_store(uri).list(FINAL)
        except Exception as e:  # noqa: BLE001 - asked again next time
            return Status(
                RunState.RUNNING, f"{where} and the storage did not answer: {e}", unknown=True
            )
        if done:
            return Status(RunState.SUCCEEDED, f"{where}; the run's final artifacts are in {uri}", 0)
        if handle.data["mode"] == "managed":
            return Status(
                RunState.RUNNING,
                f"{where} and the run left no final artifacts in {uri}: `sky jobs queue "
                "--refresh` starts the controller and shows the job",
                unknown=True,
            )
        cluster = handle.data["cluster"]
        if handle.data.get("spot"):  # a cluster job is not recovered: --managed would be
            return Status(
                RunState.PREEMPTED,
                f"spot cluster {cluster} is gone and the run left no final artifacts in "
                f"{uri}: most likely preempted (`launch resume` continues from its last "
                "checkpoint; --managed recovers by itself)",
            )
        return Status(
            RunState.FAILED,
            f"cluster {cluster} is gone and the run left no final artifacts in {uri}: it "
            "stopped early (`launch logs` has what was shown; `launch resume` continues from "
            "its last checkpoint)",
        )

    def _saved(self, handle: Handle) -> tuple[int, bool] | None:
        """The newest complete checkpoint's step in the run's storage (-1: none) and
        whether the final artifacts are there; None if the storage did not answer."""
        from payload.storage import FINAL, MANIFEST, latest_complete_checkpoint, open_store

        try:
            store = open_store(handle.data["storage_uri"])
            newest = latest_complete_checkpoint(store)
            final = f"{FINAL}/{MANIFEST}" in store.list(FINAL)
        except Exception:  # noqa: BLE001 - then the cancel waits the whole grace
            return None
        return (newest.step if newest else -1), final

    def _logs(self, handle: Handle, follow: bool) -> Iterator[str]:
        """The job's log from its nodes (SkyPilot streams it), after the launch's own
        (provisioning, setup) while the machines are being set up."""
        sky = sdk()
        job_id = self._job_id(sky, handle)
        if job_id is None and follow:
            yield (
                "ferry: SkyPilot is provisioning the machines and running the setup "
                f"(`sky api logs {handle.data['request_id']}` shows it)\n"
            )
            deadline = time.monotonic() + STREAM_TIMEOUT_S
            while job_id is None and time.monotonic() < deadline:
                time.sleep(POLL_S)
                job_id = self._job_id(sky, handle)
        if job_id is None:
            return
        if handle.data["mode"] == "managed":
            stream = call(
                "the log",
                lambda: sky.jobs.tail_logs(job_id=job_id, follow=follow, preload_content=False),
            )
        else:
            cluster = handle.data["cluster"]
            stream = call(
                "the log",
                lambda: sky.tail_logs(cluster, job_id, follow, preload_content=False),
            )
        for chunk in stream:
            if chunk is None:  # a status message of the stream, not a line of the log
                continue
            yield from chunk.splitlines(keepends=True)

    def _cancel(self, handle: Handle) -> Status:
        """Cancel the job: its ranks get SIGTERM and save and upload a checkpoint. A
        cluster job's cluster is then torn down if the run said so (`down`, the default),
        but not before that checkpoint is complete in storage: SkyPilot marks a cancelled
        job ended at once, so Ferry watches the storage, for up to the stop grace. A launch
        still provisioning is cancelled as a request."""
        sky = sdk()
        managed_job = handle.data["mode"] == "managed"
        try:
            job_id = self._job_id(sky, handle)
        except FerryError as e:
            if not _gone(e):
                raise
            return Status(RunState.CANCELLED, "cancelled: its machines were already gone")
        before = self._saved(handle) if job_id is not None and not managed_job else None
        try:
            if job_id is None:
                request(
                    sky, "the launch's cancel", lambda: sky.api_cancel(handle.data["request_id"])
                )
            elif managed_job:
                request(sky, "the cancel", lambda: sky.jobs.cancel(job_ids=[job_id]))
            else:
                cluster = handle.data["cluster"]
                request(sky, "the cancel", lambda: sky.cancel(cluster, job_ids=[job_id]))
        except FerryError as e:
            if not _gone(e):
                raise
            return Status(RunState.CANCELLED, "cancelled: its machines were already gone")
        if managed_job or not handle.data.get("down", True):
            return Status(RunState.CANCELLED, "cancelled (SkyPilot stopped the job)")
        waited = ""
        if job_id is not None:  # let the ranks save and upload before the machines go
            grace = float(handle.data.get("stop_grace_s") or 120)
            deadline = time.monotonic() + grace
            waited = f"; no new checkpoint within the {grace:g} s stop grace"
            while time.monotonic() < deadline:
                now = self._saved(handle)
                if now is not None and before is not None and (now[0] > before[0] or now[1]):
                    waited = f"; checkpoint-{now[0]} saved first" if not now[1] else ""
                    break
                time.sleep(POLL_WAIT_S)
        cluster = handle.data["cluster"]
        request_id = call("the teardown", lambda: sky.down(cluster))
        return Status(
            RunState.CANCELLED,
            f"cancelled{waited}; teardown of cluster {cluster} requested (`sky api logs "
            f"{request_id}` follows it)",
        )


def _gone(e: FerryError) -> bool:
    """SkyPilot said the machines to ask are not there (a cluster torn down, the jobs
    controller stopped)."""
    return type(e.__cause__).__name__ in ("ClusterDoesNotExist", "ClusterNotUpError")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)


def _describe_resources(job: JobSpec) -> str:
    r = job.resources
    accs = accelerators(job)
    what = " or ".join(accs) if accs else "CPU only"
    parts = [f"{r.nodes} node(s) x {what}", f"{job.procs_per_node} process(es) per node"]
    if r.spot is not None:
        parts.append("spot" if r.spot else "on-demand")
    if infra(job):
        parts.append(f"infra {infra(job)}")
    s = sky_settings(job)
    if s.get("instance_type"):
        parts.append(f"instance {s['instance_type']}")
    if s.get("disk_size"):
        parts.append(f"disk {s['disk_size']} GB")
    return ", ".join(parts)
