"""`python -m payload.entry.ray JOB.json`: Ferry's Ray driver, the entrypoint of a Ray job.

It runs a Ray Train `TorchTrainer` (Train V2) whose workers each call the payload's
training function, `payload.train.run`, as torchrun's ranks do; Ray's `TorchConfig`
makes the process group and the payload's one distributed set-up finds it.

    ScalingConfig  workers = nodes x processes per node (FERRY_RAY_SCALING, from the
                   launcher), GPUs if the cluster has any unless the launch said
    RunConfig      name = the run id, storage_path = <the run's storage>/ray: a relaunch
                   with the same run id finds the run's reported checkpoints
    FailureConfig  max_failures = launch.retries (FERRY_RAY_MAX_FAILURES)

Checkpoints stay Ferry's: each is uploaded to the run's storage with its manifest, as on
every backend, and only then reported to Ray with `ray.train.report` as a pointer (a tiny
folder naming the step), so there is one copy of each checkpoint. A restarted worker
group (a worker or node was lost) gets the last pointer from `ray.train.get_checkpoint()`
and resumes from that checkpoint in storage, manifest-verified.

Preemption on Ray arrives as a lost worker, not as a signal: the training function runs
in a thread of Ray's worker, where no signal handler can be set, so the payload does not
rely on one there (payload.durability.StopRequest).

Exit codes as everywhere: 0 done, 1 a user error, 70 a crash, 75 stopped after a
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from payload.errors import EXIT_FAILED, FerryError
from payload.runtime.job import RemoteJob

POINTER = "ferry-checkpoint.json"  # the one file of a checkpoint reported to Ray
INPUTS_PREFIX = "/ferry/inputs"  # where the launcher says shipped files are (executors.modal)
INPUTS_DIR = "inputs"  # where they are in the job's working_dir
JOB_FILE = "ferry-job.json"
EXIT_MARK = "ferry exit code "  # in a worker's exception: the payload's exit code


ENDED = "ray/ferry-ended.json"  # in the run's storage: a user error ended the run


class WorkerExit(Exception):  # noqa: N818 - how a worker's run ended, when not by success
    """A worker's run ended with the payload's exit code (1, 70, 75) and its message.
    Ray pickles it from the worker to the driver (`__reduce__`: both fields)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{EXIT_MARK}{code}: {message}")
        self.code, self.message = code, message

    def __reduce__(self) -> tuple[Any, tuple[int, str]]:
        return (WorkerExit, (self.code, self.message))


def localise(value: Any, root: Path) -> Any:
    """The job's config with the shipped files' paths (`/ferry/inputs/...`) pointing into
    this worker's copy of the working_dir."""
    if isinstance(value, str) and value.startswith(INPUTS_PREFIX + "/"):
        return str(root / INPUTS_DIR / value[len(INPUTS_PREFIX) + 1 :])
    if isinstance(value, str) and ":" in value and value.startswith(INPUTS_PREFIX):
        return str(root / INPUTS_DIR) + value[len(INPUTS_PREFIX) :]
    if isinstance(value, dict):
        return {k: localise(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [localise(v, root) for v in value]
    return value


def storage_for_ray(uri: str) -> tuple[str, Any]:
    """Ray's (storage_path, storage_filesystem) for the run's storage URI: its `ray/`
    folder. S3 goes through pyarrow with the same endpoint and credentials as Ferry's own
    store (AWS_ENDPOINT_URL for an S3-compatible service)."""
    base = uri.rstrip("/") + "/ray"
    if base.startswith("file://"):
        return base.removeprefix("file://"), None
    if base.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not endpoint:
            return base, None
        from urllib.parse import urlparse

        import pyarrow.fs

        parsed = urlparse(endpoint)
        fs = pyarrow.fs.S3FileSystem(
            endpoint_override=parsed.netloc or parsed.path,
            scheme=parsed.scheme or "https",
            region=os.environ.get("AWS_DEFAULT_REGION")
            or os.environ.get("AWS_REGION")
            or "us-east-1",
        )
        return base.removeprefix("s3://"), fs
    raise FerryError(f"storage {uri}: a Ray run needs s3:// or a shared file:// folder.")


def _exits(error: BaseException | None, seen: set[int]) -> Any:
    """Every WorkerExit inside a failed fit: Ray's WorkerGroupError keeps each rank's
    exception in `worker_failures` (rank order), itself or wrapped (`_base_exc`)."""
    if error is None or id(error) in seen:
        return
    seen.add(id(error))
    if isinstance(error, WorkerExit):
        yield error
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict):
        for rank in sorted(failures):
            yield from _exits(failures[rank], seen)
    for inner in (getattr(error, "_base_exc", None), error.__cause__, error.__context__):
        if isinstance(inner, BaseException):
            yield from _exits(inner, seen)


def exit_code_of(error: BaseException) -> tuple[int, str]:
    """The payload's exit code and message from a failed fit: the first rank's WorkerExit
    (a user error's 1 before a crash's 70), else a crash (70) with the error's last line."""
    exits = sorted(_exits(error, set()), key=lambda e: e.code != 1)
    if exits:
        return exits[0].code, exits[0].message
    last = [line for line in str(error).splitlines() if line.strip()]
    return EXIT_FAILED, (last[-1] if last else type(error).__name__)[:500]


def _rank_env(context: Any) -> None:
    """The torchrun variables the payload reads, from Ray Train's context (Ray sets most
    of them already; these are the ones it may not)."""
    os.environ.setdefault("RANK", str(context.get_world_rank()))
    os.environ.setdefault("LOCAL_RANK", str(context.get_local_rank()))
    os.environ.setdefault("WORLD_SIZE", str(context.get_world_size()))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(context.get_local_world_size()))
    os.environ.setdefault("GROUP_RANK", str(context.get_node_rank()))


class RayReport:
    """Reports each checkpoint to Ray once it is complete in storage (every rank calls
    `ray.train.report`; rank 0 with the pointer). Training waits for each upload here,
    where on torchrun it overlaps the next steps: the pointer must not name a checkpoint
    that a lost node would leave half uploaded."""

    def __new__(cls, dist: Any, uploaded: Any) -> Any:
        from transformers import TrainerCallback

        class _Report(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                import ray.train

                step = state.global_step
                where = uploaded(step)
                with tempfile.TemporaryDirectory(prefix="ferry-ray-") as folder:
                    checkpoint = None
                    if dist.is_main:
                        pointer = {"step": step, "storage": where}
                        Path(folder, POINTER).write_text(json.dumps(pointer))
                        checkpoint = ray.train.Checkpoint.from_directory(folder)
                    ray.train.report({"step": step}, checkpoint=checkpoint)

        return _Report()


def resume_from(storage_uri: str | None) -> str | None:
    """The checkpoint in storage Ray's last reported pointer names, if Ray has one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None or not storage_uri:
        return None
    with checkpoint.as_directory() as folder:
        pointer = json.loads(Path(folder, POINTER).read_text())
    return f"{storage_uri.rstrip('/')}/checkpoints/checkpoint-{int(pointer['step'])}"


def _ended(storage_uri: str | None) -> str | None:
    """The user error an earlier attempt of this job ended with, if one did."""
    if not storage_uri:
        return None
    from payload.storage import open_store

    raw = open_store(storage_uri).read_bytes(ENDED)
    return json.loads(raw)["error"] if raw else None


def _record_ended(storage_uri: str | None, message: str) -> None:
    """A user error (a bad row, the loss watchdog) is not retried: Ray restarts the
    workers after any failure, and the restarted ones read this and stop at once."""
    if not storage_uri:
        return
    from payload.storage import open_store

    try:
        open_store(storage_uri).write_bytes(ENDED, json.dumps({"error": message}).encode())
    except Exception:  # noqa: BLE001 - then Ray tries again; the error is in the log anyway
        logging.getLogger("ferry.ray").warning("could not record the error in storage")


def worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the payload's training, as one rank of the job."""
    import ray.train

    _rank_env(ray.train.get_context())
    rank = int(os.environ["RANK"])
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if rank == 0 else f"[rank {rank}] %(message)s",
    )
    logging.getLogger("ferry.config").setLevel(logging.ERROR)  # `launch` warned already
    job = RemoteJob.from_json(loop_config["job"])
    root = Path.cwd() if (Path.cwd() / JOB_FILE).exists() else Path(loop_config["root"])
    raw = localise(job.config, root)
    workdir = Path(job.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"config-rank{rank}.yml"
    import yaml

    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        from payload.config import load_config

        cfg = load_config(str(config_path), [])
        from payload.runtime.unused import keep_out

        keep_out(cfg)  # as torchrun's ranks do: seconds off each worker's start
        from payload.plugins import Plugins

        Plugins(cfg).before_import()  # before the training stack (and Triton) is imported
        from payload import kernels

        kernels.before_import(cfg)  # the fused LoRA layers, on a CPU: Triton's interpreter
        ended = _ended(job.storage_uri)
        if ended is not None:  # a restart after a user error: the same error, at once
            raise WorkerExit(1, ended)
        pointer = resume_from(job.storage_uri)
        if pointer and not cfg.resume_from_checkpoint:
            if cfg.auto_resume_from_checkpoints is False:
                cfg = cfg.model_copy(update={"resume_from_checkpoint": pointer})
            # Otherwise Ferry's auto-resume takes it (the newest complete checkpoint in
            # storage: this one or a newer), with the run's metrics and tracker files.
            if rank == 0:
                print(f"ray: resuming from the reported checkpoint {pointer}", flush=True)
        from payload.durability import Preempted
        from payload.train import run

        try:
            run(cfg, reporter=RayReport)
        except Preempted as e:
            if rank == 0:
                print(f"preempted: {e}", file=sys.stderr, flush=True)
            raise WorkerExit(e.exit_code, str(e)) from None
    except FerryError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if e.exit_code == 1:
            _record_ended(job.storage_uri, e.message)
        raise WorkerExit(e.exit_code, e.message) from None


def failure_config(cls: Any, retries: int) -> Any:
    """`max_failures` = launch.retries; a node's preemption, where this Ray tells it apart
    (Train V2's `max_preemption_failures`), restarts without limit: a spot node taken
    back is not the run's fault, and each restart resumes from the last checkpoint."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    if "max_preemption_failures" in names:
        return cls(max_failures=retries, max_preemption_failures=-1)
    return cls(max_failures=retries)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python -m payload.entry.ray {JOB_FILE}", file=sys.stderr)
        return 2
    try:
        job = RemoteJob.from_json(Path(argv[0]).read_text())
    except (OSError, FerryError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(log_to_driver=True)
    scaling = json.loads(os.environ.get("FERRY_RAY_SCALING") or "{}")
    scaling.setdefault("num_workers", job.nodes * job.procs_per_node)
    if "use_gpu" not in scaling:
        scaling["use_gpu"] = ray.cluster_resources().get("GPU", 0) > 0
    if not scaling["use_gpu"]:
        scaling.pop("accelerator_type", None)
    retries = int(os.environ.get("FERRY_RAY_MAX_FAILURES") or 0)
    try:
        storage_path, filesystem = storage_for_ray(job.storage_uri or "")
    except FerryError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    from payload.storage import open_store

    open_store(job.storage_uri or "").delete(ENDED)  # a new job: the user asked again
    print(
        f"ray: {scaling['num_workers']} workers (use_gpu {scaling['use_gpu']}), "
        f"max_failures {retries}, storage {storage_path}",
        flush=True,
    )
    trainer = TorchTrainer(
        worker,
        train_loop_config={"job": job.to_json(), "root": str(Path.cwd())},
        scaling_config=ScalingConfig(**scaling),
        torch_config=TorchConfig(backend="nccl" if scaling["use_gpu"] else "gloo"),
        run_config=RunConfig(
            name=job.run_id,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=failure_config(FailureConfig, retries),
            # Ray keeps as many pointers as Ferry keeps checkpoints.
            checkpoint_config=CheckpointConfig(num_to_keep=job.config.get("save_total_limit")),
        ),
    )
    try:
        result = trainer.fit()
        error = getattr(result, "error", None)
    except Exception as e:  # noqa: BLE001 - the run's ending, said as one line below
        error = e
    if error is None:
        print("ray: training finished", flush=True)
        return 0
    code, message = exit_code_of(error)
    print(f"{'preempted' if code == 75 else 'error'}: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    # Run as `python -m`, this file is `__main__`; Ray must pickle the worker function and
    # WorkerExit by reference to the importable module, which the workers import too.
    from payload.entry import ray as entry

    sys.exit(entry.main(sys.argv[1:]))
