"""The Modal backend: `launch train cfg.yml --cloud modal --gpus H100:8 [--nodes 2]`.

One Modal function per job, built from the image spec with the job's accelerator,
timeout, retries and named secrets, and two volumes: the runs volume (its storage,
`volume://ferry-runs/<run id>` by default, committed after each checkpoint upload) and a
Hugging Face cache. The resolved config and the local files it names travel with the
job (mounted, not baked into the image). A multi-node job is `modal.clustered`; each
container finds its rank and the first container's address from the cluster context
(payload.remote). The Modal SDK is imported only here, and only when needed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from executors.base import Executor, Handle, JobSpec, Plan, RunState, Status
from payload.errors import EXIT_PREEMPTED, FerryError

RUNS_VOLUME = "ferry-runs"
HF_CACHE_VOLUME = "ferry-hf-cache"
VOLUME_ROOT = "/vol"
HF_CACHE = "/cache/hf"
INPUTS = "/ferry/inputs"
DEFAULT_TIMEOUT_S = 24 * 3600  # Modal's longest
REMOTE_TIMEOUT_S = 60.0  # any single call to Modal's API
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


def with_timeout(fn, seconds: float = REMOTE_TIMEOUT_S, what: str = "Modal"):  # type: ignore[no-untyped-def]
    """Run a call to Modal's API with a deadline (a bad token retries for a minute)."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise FerryError(
            f"{what} did not answer within {seconds:.0f} s.",
            hint="Check your network and `modal token info`.",
        )
    if "error" in box:
        raise box["error"]
    return box.get("value")


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

    for key in INPUT_KEYS:
        if key in config:
            config[key] = ship(config[key])
    for key in DATASET_LISTS:
        for dataset in config.get(key) or []:
            dataset["path"] = ship(dataset.get("path"))
            if "chat_template_jinja" in dataset:
                dataset["chat_template_jinja"] = ship(dataset["chat_template_jinja"])
    if config.get("dataset_prepared_path"):
        # A laptop folder means nothing in the container; the volume keeps the cache.
        config["dataset_prepared_path"] = PREPARED
    return config, inputs


def job_payload(job: JobSpec) -> dict[str, Any]:
    """What the Modal function receives: everything but secrets (which Modal injects)."""
    config, _ = shipped_inputs(job.config)
    config["output_dir"] = f"/tmp/ferry/{job.run_id}/output"  # the durable copy is storage
    mounts = {RUNS_VOLUME: f"{VOLUME_ROOT}/{RUNS_VOLUME}"}
    storage = job.storage_uri or ""
    if storage.startswith("volume://"):
        name = storage.removeprefix("volume://").split("/", 1)[0]
        mounts[name] = f"{VOLUME_ROOT}/{name}"
    for volume in job.volumes:
        mounts[volume["name"]] = volume["mount"]
    return {
        "run_id": job.run_id,
        "config": config,
        "storage_uri": job.storage_uri,
        "env": {**job.env, "HF_HOME": HF_CACHE},
        "nodes": job.resources.nodes,
        "gpus_per_node": job.resources.gpus_per_node,
        "volume_mounts": mounts,
    }


def ferry_train(job: dict[str, Any]) -> int:
    """The Modal function body: train, and fail loudly so Modal's retries apply."""
    from payload.remote import run_job

    code = run_job(job)
    if code != 0:
        raise RuntimeError(f"training exited with code {code}")
    return code


class ModalExecutor(Executor):
    name = "modal"

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

    def _plan(self, job: JobSpec) -> Plan:
        from images.render import build_steps

        r = job.resources
        payload = job_payload(job)
        _, inputs = shipped_inputs(job.config)
        rows = [
            ("backend", "modal"),
            ("run id", job.run_id),
            ("app", f"ferry-{job.run_id}"),
            ("image", job.image.tag),
            *((f"  {kind}", what) for kind, what in build_steps(job.image)),
            ("gpu", gpu_string(job) or "none (CPU)"),
            ("nodes", f"{r.nodes} (modal.clustered, rdma)" if r.nodes > 1 else "1"),
            ("timeout", f"{r.timeout_s or DEFAULT_TIMEOUT_S} s"),
            ("retries", str(r.retries or 0)),
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
            (
                "volumes",
                ", ".join(f"{path} <- {name}" for name, path in self._volumes(payload).items()),
            )
        )
        rows.append(("secrets", ", ".join(job.secrets) or "none"))
        if job.env:
            rows.append(("env", ", ".join(sorted(job.env))))
        rows.append(("storage", job.storage_uri or "-"))
        rows.extend(("input", f"{local} -> {remote}") for local, remote in inputs)
        from payload.remote import torchrun_args

        command = [
            "python",
            "-m",
            "payload.torchrun",
            *self._rendezvous(r.nodes, r.gpus_per_node, torchrun_args),
            "-m",
            "payload",
            "train",
            f"/tmp/ferry/{job.run_id}/config.yml",
        ]
        return Plan(self.name, job.run_id, rows, command)

    @staticmethod
    def _rendezvous(nodes: int, gpus: int, torchrun_args) -> list[str]:  # type: ignore[no-untyped-def]
        if nodes <= 1:
            return torchrun_args(1, gpus, None)
        return [
            "--nnodes",
            str(nodes),
            "--node-rank",
            "<container rank>",
            "--master-addr",
            "<rank 0 container ip>",
            "--master-port",
            "29500",
            "--nproc-per-node",
            str(gpus),
        ]

    @staticmethod
    def _volumes(payload: dict[str, Any]) -> dict[str, str]:
        """{name: mount path} of every volume the function mounts."""
        return {**payload["volume_mounts"], HF_CACHE_VOLUME: HF_CACHE}

    def build(self, job: JobSpec) -> tuple[Any, Any, dict[str, Any]]:
        """The real Modal objects for this job: (app, function, payload). Nothing is sent
        anywhere: building is lazy in the SDK."""
        import modal

        from images.render import modal_image

        payload = job_payload(job)
        _, inputs = shipped_inputs(job.config)
        image = modal_image(job.image)
        for local, remote in inputs:
            image = (
                image.add_local_dir(local, remote)
                if local.is_dir()
                else image.add_local_file(local, remote)
            )
        volumes = {
            path: modal.Volume.from_name(name, create_if_missing=True)
            for name, path in self._volumes(payload).items()
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
        if r.spot is False:
            options["nonpreemptible"] = True
        app = modal.App(f"ferry-{job.run_id}")
        body = ferry_train
        if r.nodes > 1:
            body = modal.clustered(size=r.nodes, rdma=True)(body)
        function = app.function(**options)(body)
        return app, function, payload

    def _submit(self, job: JobSpec) -> Handle:
        import modal

        app, function, payload = self.build(job)

        def launch() -> tuple[str, str]:
            with modal.enable_output(), app.run(detach=True):
                call = function.spawn(payload)
                return app.app_id, call.object_id

        # The first launch builds the image, which may take many minutes; later ones,
        # seconds. Building is Modal's work in progress, not a hung call.
        app_id, call_id = with_timeout(launch, 3600, "Modal (image build and launch)")
        return Handle(self.name, job.run_id, {"app_id": app_id, "call_id": call_id})

    def _status(self, handle: Handle) -> Status:
        import modal

        call = modal.FunctionCall.from_id(handle.data["call_id"])
        try:
            with_timeout(lambda: call.get(timeout=0))
        except TimeoutError:
            return Status(RunState.RUNNING)
        except modal.exception.InputCancellation:
            return Status(RunState.CANCELLED, "cancelled")
        except FerryError:
            raise
        except Exception as e:  # noqa: BLE001 - the function's own failure
            text = str(e)
            if f"code {EXIT_PREEMPTED}" in text:
                return Status(RunState.FAILED, f"preempted: {text}", EXIT_PREEMPTED)
            return Status(RunState.FAILED, text[:500])
        return Status(RunState.SUCCEEDED, None, 0)

    def _logs(self, handle: Handle, follow: bool) -> Iterator[str]:
        # The SDK has no stable log-streaming call; its CLI does.
        command = [sys.executable, "-m", "modal", "app", "logs", handle.data["app_id"]]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        timer = None if follow else threading.Timer(15, process.terminate)
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
        with_timeout(lambda: call.cancel(terminate_containers=False))
        return Status(RunState.CANCELLED, "cancelled by the user")
