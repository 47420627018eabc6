"""The Modal backend: `launch train cfg.yml --cloud modal --gpus H100:8 [--nodes 2]`.

One Modal function per job, built from the image spec with the job's accelerator,
timeout, retries and named secrets, and two volumes: the runs volume (its storage,
`volume://ferry-runs/<run id>` by default, committed after each checkpoint upload) and a
Hugging Face cache. The function is `payload.entry.modal.ferry_train`, which Modal
serializes by reference and finds in the image; it receives the job contract
(`RemoteJob`, JSON) and nothing secret. The local files the config names travel with the
job (mounted, not baked into the image). A multi-node job is `modal.clustered`; each
container finds its rank and the first container's address from the cluster context
(payload.runtime.cluster).

Every call to Modal's API has a deadline. The submit, which creates what costs money,
runs in a child process (`executors.modal_submit`) that is killed, not abandoned, when
it overruns; a half-started app is then found by its name and stopped. The Modal SDK is
imported only here, and only when needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from executors.base import (
    Executor,
    Handle,
    JobSpec,
    NotStarted,
    Plan,
    Resources,
    RunState,
    Status,
    remote_job,
    vllm_rows,
)
from payload.config.rewards import file_reference, local_modules
from payload.data.pictures import local_pictures
from payload.errors import FerryError
from payload.plugins import config_class_for
from payload.runtime.cluster import SINGLE, Node, torchrun_args
from payload.runtime.deadline import DeadlineExceeded, call_within
from payload.runtime.job import MASTER_PORT, RemoteJob, default_workdir
from payload.storage.stores import modal_call, modal_silent

RUNS_VOLUME = "ferry-runs"
HF_CACHE_VOLUME = "ferry-hf-cache"
VOLUME_ROOT = "/vol"
HF_CACHE = "/cache/hf"
INPUTS = "/ferry/inputs"
DEFAULT_TIMEOUT_S = 24 * 3600  # Modal's longest
API_TIMEOUT_S = 20.0  # any single call to Modal's API that reads or stops something
CONNECT_TIMEOUT_S = 6.0  # the submit's first answer from Modal (the SDK retries ~60 s)
SUBMIT_TIMEOUT_S = 3600.0  # the whole submit: the first one builds the image
LOGS_TIMEOUT_S = 15.0  # `launch logs` without -f
HANDLE_FILE = "modal-handle.json"  # {app_id, call_id}, written the moment the call exists
# GPUs Modal offers, and the most one container may ask for.
GPUS = {
    "T4": 8,
    "L4": 8,
    "A10G": 4,
    "A10": 4,
    "L40S": 8,
    "A100": 8,
    "A100-40GB": 8,
    "A100-80GB": 8,
    "H100": 8,
    "H200": 8,
    "B200": 8,
}
CLUSTER_GPUS = ("H100", "H200", "B200", "A100-80GB")
INPUT_KEYS = (
    "base_model",
    "base_model_config",
    "tokenizer_config",
    "deepspeed",
    "chat_template_jinja",
)
DATASET_LISTS = ("datasets", "test_datasets", "pretraining_dataset")
# The prepared-dataset cache lives on the runs volume, so every run shares it.
PREPARED = f"{VOLUME_ROOT}/{RUNS_VOLUME}/prepared"
INSTALL_HINT = "pip install 'ferry[modal]'"


def credentials_present() -> bool:
    """Is there a Modal token (environment or ~/.modal.toml)? Read without the SDK."""
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return True
    path = Path(os.environ.get("MODAL_CONFIG_PATH") or Path.home() / ".modal.toml")
    try:
        text = path.read_text()
    except OSError:
        return False
    try:
        import tomllib

        profiles = tomllib.loads(text)
    except Exception:  # noqa: BLE001 - unreadable config: no usable token
        return False
    return any(isinstance(p, dict) and p.get("token_id") for p in profiles.values())


def unreachable(what: str, seconds: float) -> NotStarted:
    """Modal did not answer a launch: nothing was started, so it may be tried again."""
    return modal_silent(what, seconds, NotStarted, ", so nothing was started on Modal")


def gpu_string(job: JobSpec) -> str | None:
    r = job.resources
    if not r.accelerator:
        return None
    return f"{r.accelerator.upper()}:{r.gpus_per_node}"


def shipped_inputs(config: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """The config with local files rewritten to where they appear in the container, and
    the (local, remote) pairs to mount there."""
    config = {
        **config,
        **{key: [dict(d) for d in config[key]] for key in DATASET_LISTS if config.get(key)},
    }
    inputs: list[tuple[Path, str]] = []
    seen: dict[str, str] = {}

    def ship(value: Any) -> Any:
        if not isinstance(value, str) or not value.startswith("/") or not Path(value).exists():
            return value  # a hub id, a storage URI, or nothing local
        if value not in seen:
            seen[value] = f"{INPUTS}/{len(seen)}-{Path(value).name}"
            inputs.append((Path(value), seen[value]))
        return seen[value]

    code_dirs: dict[Path, str] = {}

    def ship_code(value: Any) -> Any:
        """GRPO's reward functions and prompt transforms in local files (`path.py:name`,
        payload.config.rewards) travel like data, each folder's into a folder of its own
        with the modules of that folder they import, under their own names: the payload
        loads the file by path with its folder on sys.path, so `import helper` works
        there as it did here."""
        ref = file_reference(value) if isinstance(value, str) else None
        if not ref or not Path(ref[0]).is_file():
            return value
        path = Path(ref[0])
        folder = path.parent
        if folder not in code_dirs:
            code_dirs[folder] = f"{INPUTS}/code-{len(code_dirs)}"
        remote = code_dirs[folder]
        for relative in local_modules(path):
            target = f"{remote}/{relative.as_posix()}"
            if target not in seen.values():
                seen[str(folder / relative)] = target
                inputs.append((folder / relative, target))
        return f"{remote}/{path.name}:{ref[1]}"

    for key in INPUT_KEYS:
        if key in config:
            config[key] = ship(config[key])
    if config.get("plugins"):  # plugins in local files travel like reward functions
        config["plugins"] = [ship_code(p) for p in config["plugins"]]
    if isinstance(config.get("trl"), dict) and config["trl"].get("reward_funcs"):
        funcs = [ship_code(f) for f in config["trl"]["reward_funcs"]]
        config["trl"] = {**config["trl"], "reward_funcs": funcs}
    media = 0

    def ship_with_pictures(value: Any, where: str, field: str | None) -> Any:
        """An image-chat data file goes into a folder of its own, with the pictures its
        rows name by relative paths at those paths (payload.data.pictures)."""
        nonlocal media
        path = Path(value) if isinstance(value, str) and value.startswith("/") else None
        pictures = local_pictures(path, where, field) if path is not None else []
        if not pictures or value in seen:
            return ship(value)
        remote = f"{INPUTS}/media-{media}"
        media += 1
        seen[value] = f"{remote}/{path.name}"
        inputs.append((path, seen[value]))
        for relative in pictures:
            inputs.append((path.parent / relative, f"{remote}/{relative}"))
        return seen[value]

    for key in DATASET_LISTS:
        for i, dataset in enumerate(config.get(key) or []):
            if config.get("processor_type"):
                where, field = f"{key}[{i}]", dataset.get("field_messages")
                dataset["path"] = ship_with_pictures(dataset.get("path"), where, field)
            else:
                dataset["path"] = ship(dataset.get("path"))
            if "chat_template_jinja" in dataset:
                dataset["chat_template_jinja"] = ship(dataset["chat_template_jinja"])
            if "type" in dataset:
                dataset["type"] = ship_code(dataset["type"])
    if config.get("dataset_prepared_path"):
        # A laptop folder means nothing in the container; the volume keeps the cache.
        config["dataset_prepared_path"] = PREPARED
    return config, inputs


def remote_config(job: JobSpec) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """The config as the containers see it (local files at their mount points, output in
    the container's work folder: the durable copy is storage), and the files to mount."""
    config, inputs = shipped_inputs(job.config)
    config["output_dir"] = f"{default_workdir(job.run_id)}/output"
    return config, inputs


def volume_mounts(job: JobSpec) -> dict[str, str]:
    """{volume name: mount path} the function mounts: the runs volume, the storage's
    volume, the user's volumes, and the Hugging Face cache."""
    mounts = {RUNS_VOLUME: f"{VOLUME_ROOT}/{RUNS_VOLUME}"}
    storage = job.storage_uri or ""
    if storage.startswith("volume://"):
        name = storage.removeprefix("volume://").split("/", 1)[0]
        mounts[name] = f"{VOLUME_ROOT}/{name}"
    for volume in job.volumes:
        mounts[volume["name"]] = volume["mount"]
    mounts[HF_CACHE_VOLUME] = HF_CACHE
    return mounts


def modal_job(job: JobSpec) -> RemoteJob:
    """The job contract the function receives: everything but secrets (Modal injects
    those by name)."""
    config, _ = remote_config(job)
    ferry_volumes = {k: v for k, v in volume_mounts(job).items() if k != HF_CACHE_VOLUME}
    job = _with_env(job, HF_HOME=HF_CACHE)
    return remote_job(job, config, "modal" if job.resources.nodes > 1 else "single", ferry_volumes)


def _with_env(job: JobSpec, **extra: str) -> JobSpec:
    import dataclasses

    return dataclasses.replace(job, env={**job.env, **extra})


def status_from_outcome(value: Any = None, error: BaseException | None = None) -> Status:
    """What a finished call means: the function's returned `{"exit_code", "detail"}`,
    or the exception it raised (`RunStopped` carries `exit_code`). Read from the code,
    never from the text."""
    if error is not None:
        code = getattr(error, "exit_code", None)
        if isinstance(code, int):
            return Status(RunState.after_exit(code), str(error)[:500], code)
        return Status(RunState.FAILED, f"{type(error).__name__}: {error}"[:500])
    code = value.get("exit_code") if isinstance(value, dict) else None
    if not isinstance(code, int):
        return Status(RunState.FAILED, f"the function returned {value!r}, not an exit code")
    detail = value.get("detail") or (None if code == 0 else f"exit code {code}")
    return Status(RunState.after_exit(code), detail, code)


class ModalExecutor(Executor):
    name = "modal"
    priced = True

    def default_storage(self, home: Path) -> str | None:
        return f"volume://{RUNS_VOLUME}"

    def _check(self, job: JobSpec) -> list[str]:
        problems = []
        if importlib.util.find_spec("modal") is None:
            problems.append(f"the Modal SDK is not installed: {INSTALL_HINT}")
        r = job.resources
        accelerator = (r.accelerator or "").upper()
        if accelerator and accelerator not in GPUS:
            problems.append(f"Modal has no {r.accelerator} GPU; it offers {', '.join(GPUS)}")
        elif accelerator and r.gpus_per_node > GPUS[accelerator]:
            problems.append(f"a Modal container holds at most {GPUS[accelerator]} {accelerator}")
        if r.nodes > 1:
            if accelerator not in CLUSTER_GPUS:
                problems.append(
                    f"multi-node runs need {', '.join(CLUSTER_GPUS)} GPUs (e.g. --gpus H100:8)"
                )
            elif r.gpus_per_node != 8:
                problems.append(
                    "each node of a Modal cluster takes all 8 GPUs of its host "
                    f"(--gpus {accelerator}:8)"
                )
        if (job.config.get("trl") or {}).get("use_vllm") and not accelerator:
            problems.append(
                "`trl.use_vllm` needs vLLM on a GPU; ask for one (--gpus H100:2), or leave it "
                "out to generate with transformers"
            )
        if accelerator and r.spot is False:
            problems.append(
                "Modal runs GPU functions on preemptible capacity only (`nonpreemptible` is "
                "for CPU functions); drop --no-spot / `spot: false`: a preempted run saves a "
                "checkpoint, Modal restarts it, and it resumes from there"
            )
        if r.timeout_s and r.timeout_s > DEFAULT_TIMEOUT_S:
            problems.append(
                "Modal functions run at most 24h; set timeout <= 24h and rely on "
                "resume (storage keeps every checkpoint)"
            )
        if (job.storage_uri or "").startswith("file://"):
            problems.append(
                "file:// storage is on this machine, out of a Modal job's reach; "
                "use volume:// (the default) or s3://"
            )
        try:  # the contract itself: valid, and no secret of this machine in it
            modal_job(job)
        except FerryError as e:
            problems.append(e.message)
        if (job.storage_uri or "").startswith("s3://") and not job.secrets:
            problems.append(
                "s3:// storage needs AWS credentials in the job: add a Modal "
                "secret holding them (--secret NAME)"
            )
        return problems

    def _preflight(self, job: JobSpec) -> None:
        if not credentials_present():
            raise FerryError(
                "No Modal token found (MODAL_TOKEN_ID/MODAL_TOKEN_SECRET or ~/.modal.toml).",
                hint="Run `modal token new` once, then launch again.",
            )

    def command(self, job: JobSpec) -> list[str]:
        """What each container runs, with the cluster's values as placeholders."""
        from payload.entry.remote import CONFIG_FILE, training_command

        r = job.resources
        node = SINGLE
        if r.nodes > 1:
            node = Node("<container rank>", r.nodes, "<rank 0 container ip>")
        args = torchrun_args(job.procs_per_node, node, MASTER_PORT, r.stop_grace_s)
        return training_command("python", args, f"{default_workdir(job.run_id)}/{CONFIG_FILE}")

    def timeout_s(self, job: JobSpec) -> int:
        return job.resources.timeout_s or DEFAULT_TIMEOUT_S

    def hourly_price(self, job: JobSpec) -> tuple[float, str]:
        """Modal's list price for one container of this job (executors.cost's dated
        table): its GPUs, cores and memory."""
        from executors.cost import MODAL_PRICES_DATE, modal_hourly

        r = job.resources
        price = modal_hourly(r.accelerator, r.gpus_per_node, r.cpu, r.memory_mb)
        return price, f"Modal's list prices of {MODAL_PRICES_DATE}"

    def _plan(self, job: JobSpec) -> Plan:
        from images.render import build_steps

        r = job.resources
        config, inputs = remote_config(job)
        rows = [
            ("backend", "modal"),
            ("run id", job.run_id),
            ("app", f"ferry-{job.run_id}"),
            ("function", "payload.entry.modal.ferry_train (from the image's payload/)"),
            ("image", job.image.tag),
            *((f"  {kind}", what) for kind, what in build_steps(job.image)),
            ("gpu", gpu_string(job) or "none (CPU)"),
            ("nodes", f"{r.nodes} (modal.clustered, rdma)" if r.nodes > 1 else "1"),
            ("timeout", f"{r.timeout_s or DEFAULT_TIMEOUT_S} s"),
            ("retries", f"{r.retries or 0} (after a crash; never after a user error)"),
            ("preemption", "Modal sends SIGINT and restarts the call; it resumes from storage"),
            ("stop grace", f"{r.stop_grace_s} s to save and upload after a stop signal"),
        ]
        for key, value in (
            ("cpu", r.cpu),
            ("memory", r.memory_mb and f"{r.memory_mb} MiB"),
            ("region", r.region),
            ("preemptible", None if r.spot is None else str(r.spot).lower()),
        ):
            if value:
                rows.append((key, str(value)))
        rows.append(
            ("volumes", ", ".join(f"{path} <- {name}" for name, path in volume_mounts(job).items()))
        )
        rows.append(("secrets", ", ".join(job.secrets) or "none"))
        if job.env:
            rows.append(("env", ", ".join(sorted(job.env))))
        rows.append(("storage", job.storage_uri or "-"))
        rows.extend(("input", f"{local} -> {remote}") for local, remote in inputs)
        # The server as the container starts it: the model at its path there.
        cfg = config_class_for(config).model_validate(config)
        rows.extend(vllm_rows(cfg, r.gpus_per_node, "python"))
        return Plan(self.name, job.run_id, rows, self.command(job))

    def build(self, job: JobSpec) -> tuple[Any, Any, str]:
        """The real Modal objects for this job: (app, function, the job's JSON). Nothing
        is sent anywhere: building is lazy in the SDK."""
        import modal

        from images.render import modal_image
        from payload.entry.modal import ferry_train

        contract = modal_job(job)
        _, inputs = remote_config(job)
        image = modal_image(job.image)
        for local, remote in inputs:
            image = (
                image.add_local_dir(local, remote)
                if local.is_dir()
                else image.add_local_file(local, remote)
            )
        volumes = {
            path: modal.Volume.from_name(name, create_if_missing=True)
            for name, path in volume_mounts(job).items()
        }
        r = job.resources
        options: dict[str, Any] = {
            "image": image,
            "gpu": gpu_string(job),
            "timeout": r.timeout_s or DEFAULT_TIMEOUT_S,
            "retries": modal.Retries(max_retries=r.retries, initial_delay=0.0)
            if r.retries
            else None,
            "secrets": [modal.Secret.from_name(name) for name in job.secrets],
            "volumes": volumes,
            "serialized": True,
            "name": "ferry_train",
        }
        if r.cpu:
            options["cpu"] = r.cpu
        if r.memory_mb:
            options["memory"] = r.memory_mb
        if r.region:
            options["region"] = r.region
        if r.spot is False and not r.accelerator:  # _check refuses it for GPU functions
            options["nonpreemptible"] = True
        app = modal.App(f"ferry-{job.run_id}")
        body: Any = ferry_train
        if r.nodes > 1:
            body = modal.clustered(size=r.nodes, rdma=True)(body)
        function = app.function(**options)(body)
        return app, function, contract.to_json()

    def _submit(self, job: JobSpec) -> Handle:
        from executors import modal_submit

        return modal_submit.submit(self, job)

    def _find(self, job: JobSpec) -> Handle | None:
        """The call this run's last submit created, while it is still running."""
        try:
            data = json.loads((job.run_dir / HANDLE_FILE).read_text())
        except (OSError, ValueError):
            return None
        handle = Handle(self.name, job.run_id, data)
        status = self._status(handle)
        if status.unknown:
            raise FerryError(
                f"Cannot tell whether {job.run_id}'s last call on Modal is still running: "
                f"{status.detail}. Nothing new was started.",
                hint="Try again once Modal answers (`launch status` shows it).",
            )
        return handle if not status.state.finished else None

    def _status(self, handle: Handle) -> Status:
        import modal
        from modal.exception import AuthError, ClientClosed
        from modal.exception import ConnectionError as ModalConnectionError

        call = modal.FunctionCall.from_id(handle.data["call_id"])
        try:
            value = call_within(lambda: call.get(timeout=0), API_TIMEOUT_S, "Modal: status")
        except TimeoutError:  # the call has no result yet
            return Status(RunState.RUNNING)
        except modal.exception.InputCancellation:
            return Status(RunState.CANCELLED, "cancelled")
        except (DeadlineExceeded, ModalConnectionError, AuthError, ClientClosed) as e:
            # Modal did not say how the call is: not an ending; ask again next time.
            detail = f"state unknown: Modal did not answer ({e})"
            return Status(RunState.RUNNING, detail, unknown=True)
        except Exception as e:  # noqa: BLE001 - the function's own ending
            return status_from_outcome(error=e)
        return status_from_outcome(value)

    def _logs(self, handle: Handle, follow: bool) -> Iterator[str]:
        # The SDK has no stable log-streaming call; its CLI does. Without -f the listing
        # is cut at LOGS_TIMEOUT_S; with -f it runs until the app stops or Ctrl-C.
        command = [sys.executable, "-m", "modal", "app", "logs", handle.data["app_id"]]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        timer = None if follow else threading.Timer(LOGS_TIMEOUT_S, process.terminate)
        if timer:
            timer.start()
        try:
            assert process.stdout is not None
            yield from process.stdout
        finally:
            if timer:
                timer.cancel()
            process.terminate()

    def _cancel(self, handle: Handle) -> Status:
        import modal

        call = modal.FunctionCall.from_id(handle.data["call_id"])
        # terminate_containers: stop the GPUs now, not after the input finishes.
        modal_call(lambda: call.cancel(terminate_containers=True), "a cancel", API_TIMEOUT_S)
        return Status(RunState.CANCELLED, "cancelled by the user", None, time.time())


def job_spec_fields(job: JobSpec) -> dict[str, Any]:
    """What `JobSpec.read` needs besides the run folder, for the submit child."""
    from dataclasses import asdict

    return {
        "run_id": job.run_id,
        "name": job.name,
        "resources": asdict(job.resources),
        "storage_uri": job.storage_uri,
    }


def job_from_fields(run_dir: Path, data: dict[str, Any]) -> JobSpec:
    return JobSpec.read(
        run_dir,
        run_id=data["run_id"],
        name=data["name"],
        resources=Resources(**data["resources"]),
        storage_uri=data["storage_uri"],
    )
