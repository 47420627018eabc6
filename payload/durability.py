"""Runs that survive: checkpoints copied to storage as they are written, a relaunch that
resumes from the newest complete one, and a clean stop on SIGTERM.

The run's storage is FERRY_STORAGE_URI (set by every backend), else the config's
`storage:`. Inside it:

    metrics.jsonl                      refreshed with every checkpoint
    checkpoints/checkpoint-<step>/     each HF checkpoint, complete once its manifest is in
    final/                             the final adapter or model, metrics, summary, config

On a job of several nodes each node's disk holds only its share of a checkpoint (its
ranks' RNG states and shards): the first process of every node uploads its node's
files, and rank 0 writes the manifest once every node's are in
(payload.storage.parts). One node uploads its folder whole, as a one-node job always
did.

SIGTERM is what clouds send before they take a machine back, SIGINT what Modal sends.
On either the payload finishes the current step, saves a checkpoint, and the first
process of each node uploads its part while every other rank waits
(`distributed.on_each_node`); then all exit with EXIT_PREEMPTED (75), and a relaunch of
the same run continues from that checkpoint.
torchrun, the local supervisor and the remote wrapper give the ranks `launch.stop_grace`
seconds for this before they kill them.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from payload import distributed
from payload.config.schema import TrainConfig
from payload.config.trackers import TRACKERS_DIR
from payload.errors import EXIT_PREEMPTED, FerryError, TransferError
from payload.runtime.deadline import Meter
from payload.runtime.procs import STOP_SIGNALS
from payload.storage import (
    FINAL,
    Store,
    download_folder,
    latest_complete_checkpoint,
    open_store,
    upload_checkpoint,
    upload_folder,
)
from payload.storage.layout import METRICS_FILE
from payload.storage.parts import complete_from_parts, upload_part
from payload.storage.sync import CHECKPOINT_DIR, CHECKPOINTS, apply_retention, read_manifest

log = logging.getLogger("ferry.storage")

STAGING = ".ferry-staging"  # hard-linked snapshots of checkpoints waiting to upload


class Preempted(Exception):  # noqa: N818 - it is a way of stopping, not a fault
    """Training stopped on a stop signal after saving a checkpoint at `step`."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, signame: str, step: int | None, where: str | None):
        self.step, self.where = step, where
        at = f"at step {step}" if step is not None else "before training started"
        saved = f"; checkpoint saved to {where}" if where and step is not None else ""
        super().__init__(f"stopped by {signame} {at}{saved}. Relaunch the run to resume.")


def storage_uri(cfg: TrainConfig) -> str | None:
    return os.environ.get("FERRY_STORAGE_URI") or cfg.storage


def open_run_store(cfg: TrainConfig) -> Store | None:
    uri = storage_uri(cfg)
    return open_store(uri) if uri else None


def _step_of(folder_name: str) -> int:
    match = CHECKPOINT_DIR.match(folder_name)
    if not match:
        raise FerryError(f"resume_from_checkpoint: {folder_name!r} is not a checkpoint-<step>.")
    return int(match.group(1))


def _fetch(cfg: TrainConfig, output_dir: Path, store: Store | None, progress: Meter) -> str | None:
    """Resolve the checkpoint to resume from into a local folder (first process per node)."""
    wanted = cfg.resume_from_checkpoint
    auto = cfg.auto_resume_from_checkpoints
    if auto is None:
        auto = store is not None
    if wanted and "://" in wanted:  # a checkpoint in some store: .../checkpoints/checkpoint-40
        parent, name = wanted.rstrip("/").rsplit("/", 1)
        step = _step_of(name)
        local = output_dir / name
        download_folder(open_store(parent), name, local, progress)
        return _keep_up_to(output_dir, step, str(local))
    if wanted:
        return wanted
    if not auto:
        return None
    if store is not None:
        latest = latest_complete_checkpoint(store)
        if latest is None:
            return None
        local = output_dir / f"checkpoint-{latest.step}"
        download_folder(store, latest.prefix, local, progress)
        metrics = store.read_bytes(METRICS_FILE)
        if metrics is not None:  # the history so far, for metrics.jsonl to carry on from
            (output_dir / METRICS_FILE).write_bytes(metrics)
        _fetch_trackers(store, output_dir, progress)
        return _keep_up_to(output_dir, latest.step, str(local))
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def _fetch_trackers(store: Store, output_dir: Path, progress: Meter) -> None:
    """The earlier attempts' tracker files (offline runs, event files, a file store), so
    that this attempt adds to them and the run's final artifacts hold them all."""
    if read_manifest(store, TRACKERS_DIR) is None:
        return
    try:
        download_folder(store, TRACKERS_DIR, output_dir / TRACKERS_DIR, progress)
    except Exception as e:  # noqa: BLE001 - the trackers' files are a record, not the training state
        log.warning("the earlier attempts' tracker files were not restored: %s", e)


def _keep_up_to(output_dir: Path, step: int, chosen: str) -> str:
    """Drop local checkpoints newer than the one resumed from: they are the dead
    attempt's, possibly half-written, and would confuse rotation."""
    for folder in output_dir.glob("checkpoint-*"):
        match = CHECKPOINT_DIR.match(folder.name)
        if match and int(match.group(1)) > step:
            shutil.rmtree(folder, ignore_errors=True)
    return chosen


def resume_point(
    cfg: TrainConfig, output_dir: str, dist: distributed.DistInfo, store: Store | None
) -> str | None:
    """The local checkpoint folder to resume from, or None for a fresh start. The first
    process on each node downloads while the others wait (`distributed.on_each_node`);
    every process gets rank 0's answer, or a node's error."""
    meter = Meter()
    found = distributed.on_each_node(
        dist, "the resume download", lambda: _fetch(cfg, Path(output_dir), store, meter), meter
    )
    return _with_training_state(found[0], explicit=bool(cfg.resume_from_checkpoint))


def _with_training_state(checkpoint: str | None, explicit: bool) -> str | None:
    """`checkpoint`, unless it holds weights without the optimizer and schedule that a
    resume continues from (a `scheduler.pt`, or DeepSpeed's `global_step*` folder), as a
    `save_only_model` checkpoint does: resuming from it would restart Adam's moments and
    the warmup at a later step. Asked for by name, that is refused; found by auto-resume,
    the run starts again from step 0, as the save_only_model warning said it would."""
    if checkpoint is None or not Path(checkpoint).is_dir():
        return checkpoint  # a missing folder: the Trainer names it
    folder = Path(checkpoint)
    state = (folder / "scheduler.pt").is_file() or any(folder.glob("global_step*"))
    if state or not any(folder.glob("*.safetensors")):
        return checkpoint
    if explicit:
        raise FerryError(
            f"resume_from_checkpoint: {folder.name} holds the model weights only (it was "
            "saved with save_only_model), not the optimizer and learning-rate schedule a "
            "resume continues from. To start a new run from these weights, set base_model "
            "to the folder instead."
        )
    log.warning(
        "%s holds the model weights only (save_only_model): starting again from step 0.",
        folder.name,
    )
    return None


def _snapshot(source: Path, staging: Path) -> Path:
    """Hard-link a checkpoint into the staging folder, so that rotation can delete the
    original while it uploads (HF writes new files; it never rewrites old ones). A node
    with no folder for it (its ranks wrote nothing) gets an empty one: its part says so."""
    target = staging / source.name
    shutil.rmtree(target, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    if not source.is_dir():
        target.mkdir()
        return target
    try:
        shutil.copytree(source, target, copy_function=os.link)
    except OSError:  # no hard links here (another filesystem): copy
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    return target


class OneSavePerStep(TrainerCallback):
    """Keeps the Trainer from saving the checkpoint of a step it has just saved. A run
    stopped early (a stop signal, the loss watchdog) saves at its step and leaves the
    epoch; with `save_strategy: epoch` transformers then saves the same step again at the
    epoch's end, rewriting files in place while the first save of them may be uploading."""

    def __init__(self) -> None:
        self.saved: int | None = None

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.saved = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if control.should_save and state.global_step == self.saved:
            control.should_save = False
        return control


class AlreadyTrained(Exception):  # noqa: N818 - a way of ending, not a fault
    """Raised before the first step of a run resumed from its own last step."""

    def __init__(self, step: int):
        super().__init__(f"checkpoint-{step} is the run's last step")
        self.step = step


class NoStepPastTheEnd(TrainerCallback):
    """Ends a run resumed from the checkpoint of its last step before any step runs.
    transformers (5.25) restarts the last, partly trained epoch of such a run and trains
    one step past `max_steps` whenever the steps do not fill whole epochs (a run killed
    after its final checkpoint and before its end, then resumed, got a step 25 of 24).
    The checkpoint is already loaded when the first step begins: the caller saves it as
    the final model."""

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise AlreadyTrained(state.global_step)
        return control


class StorageSync(TrainerCallback):
    """Uploads each checkpoint right after it is saved, on the first process of every
    node, one at a time in a background thread so that training does not wait. Rank 0
    alone writes the manifests, the metrics, the trackers' files and the final
    artifacts, and applies retention."""

    def __init__(
        self,
        store: Store,
        output_dir: str,
        run_id: str | None,
        keep: int | None,
        is_main: bool,
        distributed_run: bool,
        *,
        first_on_node: bool | None = None,
        rank: int = 0,
        group: Any = None,
        part_timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
    ):
        self.store, self.output_dir, self.run_id, self.keep = store, Path(output_dir), run_id, keep
        self.is_main, self.distributed_run = is_main, distributed_run
        self.first_on_node = is_main if first_on_node is None else first_on_node
        self.rank, self.group, self.part_timeout_s = rank, group, part_timeout_s
        # This process's place among the nodes, learnt at the first save (`_place`):
        # one node until then, and for good in a run without a process group.
        self.node, self.nodes = 0, 1
        self.placed = not distributed_run
        self.attempt = uuid.uuid4().hex  # rank 0's is every node's: see payload.storage.parts
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ferry-upload")
        self.meter = Meter()  # bytes moved by every upload, for the waits on them
        self.pending: list[Future[None]] = []
        self.errors: list[str] = []

    @classmethod
    def for_run(
        cls,
        store: Store,
        output_dir: str,
        run_id: str | None,
        keep: int | None,
        dist: distributed.DistInfo,
    ) -> StorageSync:
        return cls(
            store,
            output_dir,
            run_id,
            keep,
            dist.is_main,
            dist.backend is not None,
            first_on_node=dist.local_rank == 0,
            rank=dist.rank,
            group=dist.io_group,
            part_timeout_s=dist.timeout_s,
        )

    def _place(self) -> None:
        """Once, at the first save (every rank is here): how many nodes there are (the
        processes with local rank 0), which of them this one leads, and rank 0's attempt
        id. Nodes are numbered in rank order, as torchrun numbers them."""
        if self.placed:
            return
        import torch.distributed as torch_dist

        notes: list[Any] = [None] * torch_dist.get_world_size()
        mine = (self.first_on_node, self.attempt if self.is_main else None)
        torch_dist.all_gather_object(notes, mine, group=self.group)
        leaders = [rank for rank, (first, _) in enumerate(notes) if first]
        self.nodes, self.attempt = len(leaders), notes[0][1]
        self.node = leaders.index(self.rank) if self.first_on_node else 0
        self.placed = True

    @property
    def staging(self) -> Path:
        """Where this node's snapshots wait; one folder per node, in case the nodes share
        a disk."""
        staging = self.output_dir / STAGING
        return staging if self.nodes == 1 else staging / f"node-{self.node}"

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.distributed_run:
            import torch.distributed as torch_dist

            torch_dist.barrier()  # every rank has written its part (its RNG state) first
            self._place()
        if not self.first_on_node:
            return
        step = state.global_step
        source = self.output_dir / f"checkpoint-{step}"
        if not source.is_dir() and self.nodes == 1:
            return
        snapshot = _snapshot(source, self.staging)
        trackers = self._copy_trackers(step) if self.is_main else None
        self.pending.append(self.pool.submit(self._upload, snapshot, step, trackers))

    def _copy_trackers(self, step: int) -> Path | None:
        """A copy of the trackers' files as they are now (they keep growing while the
        upload runs, and a file that changes between its hash and its upload would fail
        verification when fetched back)."""
        folder = self.output_dir / TRACKERS_DIR
        if not folder.is_dir():
            return None
        import sys

        mlflow = sys.modules.get("mlflow")
        if mlflow is not None and mlflow.active_run() is not None:
            mlflow.flush_async_logging()  # the metrics logged so far, on disk
        target = self.output_dir / STAGING / f"{TRACKERS_DIR}-{step}"
        shutil.rmtree(target, ignore_errors=True)
        try:
            shutil.copytree(folder, target, symlinks=True)
        except (OSError, shutil.Error) as e:  # a tracker's temporary file came and went
            log.warning("tracker files not copied for checkpoint-%s: %s", step, e)
            shutil.rmtree(target, ignore_errors=True)
            return None
        return target

    def _upload(self, snapshot: Path, step: int, trackers: Path | None = None) -> None:
        try:
            # The history first: once the checkpoint is complete (its manifest, written
            # last), the metrics up to its step are in storage too, whenever the run dies.
            # A resumed run keeps the records up to its step and drops the rest.
            if self.is_main:
                self._put_metrics()
            if self.nodes == 1:
                result = upload_checkpoint(
                    snapshot, self.store, step, self.run_id, self.keep, progress=self.meter
                )
            else:
                result = self._upload_part(snapshot, step)
            if trackers is not None:
                self.put_trackers(trackers)
            what = f"checkpoint-{step}" if self.is_main else f"node {self.node}'s checkpoint-{step}"
            self._publish(what, self.store.uri, result)
        except OSError as e:
            # A full disk is named plainly, with the file that did not fit.
            said = str(e)
            if e.errno == errno.ENOSPC:
                said = f"no space left on device writing {e.filename2 or e.filename}"
            self.errors.append(f"checkpoint-{step}: {said}")
            log.error("upload of checkpoint-%s to %s failed: %s", step, self.store.uri, said)
        except Exception as e:  # noqa: BLE001 - reported by wait(); training goes on meanwhile
            self.errors.append(f"checkpoint-{step}: {e}")
            log.error("upload of checkpoint-%s to %s failed: %s", step, self.store.uri, e)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)
            if trackers is not None:
                shutil.rmtree(trackers, ignore_errors=True)

    def _upload_part(self, snapshot: Path, step: int) -> Any:
        """A multi-node job's checkpoint: this node's files and part record, then, on rank
        0, the wait for every node's and the manifest (payload.storage.parts)."""
        prefix = f"{CHECKPOINTS}/checkpoint-{step}"
        result = upload_part(snapshot, self.store, prefix, self.node, self.attempt, self.meter)
        if self.is_main:
            complete_from_parts(
                self.store,
                prefix,
                self.nodes,
                self.attempt,
                run_id=self.run_id,
                step=step,
                timeout_s=self.part_timeout_s,
                progress=self.meter,
            )
            if self.keep:
                apply_retention(self.store, self.keep)
        return result

    def wait(self) -> None:
        """Block until every queued upload is done; raise if any failed."""
        for future in self.pending:
            future.result()
        self.pending.clear()
        if self.errors:
            # In the message, not a hint: the ranks pass on only the message.
            raise TransferError(
                f"{len(self.errors)} checkpoint upload(s) to {self.store.uri} failed: "
                + "; ".join(self.errors)
                + self._newest_note()
            )

    def _newest_note(self) -> str:
        """Which checkpoint a relaunch would resume from, now that some did not arrive."""
        try:
            newest = latest_complete_checkpoint(self.store)
        except Exception:  # noqa: BLE001 - the store may be failing too; the error says enough
            return ""
        if newest is None:
            return ". No complete checkpoint is in storage yet."
        return (
            f". The newest complete checkpoint in storage is still checkpoint-{newest.step}; "
            "`launch resume` continues from it."
        )

    def finish(self) -> None:
        """The end of a run: every checkpoint upload done, then, on rank 0, the final
        artifacts (the trackers' files among them, and beside the checkpoints too)."""
        self.wait()
        if not self.is_main:
            return
        self.put_trackers()
        self.upload_final()

    def upload_final(self) -> None:
        """The final artifacts: everything in output_dir but checkpoints and staging."""
        skip = tuple(p.name for p in self.output_dir.iterdir() if CHECKPOINT_DIR.match(p.name))
        result = upload_folder(
            self.output_dir,
            self.store,
            FINAL,
            run_id=self.run_id,
            exclude=(*skip, STAGING),
            progress=self.meter,
        )
        self._publish("final artifacts", self.store.child(FINAL), result)

    def put_trackers(self, folder: Path | None = None) -> None:
        """The trackers' files (`folder`: a copy of them; default: the folder itself,
        once the trackers have ended), beside the checkpoints: a preempted attempt's
        offline runs and event files survive it, and the next attempt fetches them back.
        Best effort: a failure is logged and never fails the checkpoint's upload. Rank 0
        only."""
        folder = folder or self.output_dir / TRACKERS_DIR
        if not self.is_main or not folder.is_dir():
            return
        try:
            upload_folder(folder, self.store, TRACKERS_DIR, run_id=self.run_id)
        except Exception as e:  # noqa: BLE001 - any store's error: the trackers are a record
            log.warning("tracker files not uploaded: %s", e)

    def _put_metrics(self) -> None:
        metrics = self.output_dir / METRICS_FILE
        if metrics.exists():
            self.store.write_bytes(METRICS_FILE, metrics.read_bytes())

    def _publish(self, what: str, where: object, result: Any) -> None:
        """After an upload: the metrics so far beside it (rank 0's), a commit (a volume
        shows nothing to other readers before one), and one line in the log."""
        if self.is_main:
            self._put_metrics()
        self.store.commit()
        print(
            f"storage: {what} synced to {where} "
            f"({result.files_sent} files, {result.bytes_sent:,} bytes)",
            flush=True,
        )


# torch.save reports a full disk as a RuntimeError with no errno ("basic_ios::clear:
# iostream error", "unexpected pos ..."), so the disk itself is asked: less than this
# left free after a failed save means the save ran out of room.
FULL_DISK_BYTES = 1 << 20


def full_disk_error(
    error: BaseException, output_dir: str, store: Store | None, is_main: bool = True
) -> FerryError | None:
    """A checkpoint save that failed because `output_dir`'s disk is full, as a
    TransferError naming the checkpoint (EXIT_FAILED: once there is room, a relaunch
    resumes); None for any other failure. The half-written checkpoint folder is deleted
    by the main process: it would otherwise look like the newest one to a relaunch
    without storage, and it holds the space the next attempt needs. A folder with its
    trainer_state.json (the HF Trainer writes it last) is complete and never deleted."""
    if not isinstance(error, (OSError, RuntimeError)):
        return None
    folder = Path(output_dir)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if getattr(error, "errno", None) != errno.ENOSPC and free >= FULL_DISK_BYTES:
        return None
    steps = sorted(
        int(m.group(1)) for p in folder.glob("checkpoint-*") if (m := CHECKPOINT_DIR.match(p.name))
    )
    partial = [s for s in steps if not (folder / f"checkpoint-{s}" / "trainer_state.json").exists()]
    what = f"checkpoint-{partial[-1]}" if partial else "a checkpoint"
    if partial and is_main:
        shutil.rmtree(folder / what, ignore_errors=True)
    note = ""
    if store is not None:
        try:
            newest = latest_complete_checkpoint(store)
        except Exception:  # noqa: BLE001 - the store may be failing too; the error says enough
            newest = None
        if newest is not None:
            note = (
                f" The newest complete checkpoint in storage is still checkpoint-{newest.step}; "
                "`launch resume` continues from it once there is room."
            )
    return TransferError(
        f"Saving {what} in {output_dir} failed: no space left on device "
        f"({free:,} bytes free there; {type(error).__name__}: {error}).{note}"
    )


class StopRequest:
    """From `install()` on, SIGTERM and SIGINT mean "save a checkpoint and stop": the
    first one is remembered (and said once); later ones change nothing, since torchrun
    passes on the signal it got too and a cloud may send it to every process."""

    def __init__(self, rank: int):
        self.rank = rank
        self.signame: str | None = None

    @property
    def requested(self) -> bool:
        return self.signame is not None

    def install(self) -> StopRequest:
        import threading

        if threading.current_thread() is not threading.main_thread():
            # Ray Train runs the training function in a thread of its worker, where no
            # handler can be set; there a preemption is a lost worker, which Ray restarts
            # from the last reported checkpoint (payload.entry.ray).
            return self
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signame is None:
            self.signame = signal.Signals(signum).name
            print(
                f"[rank {self.rank}] {self.signame}: saving a checkpoint at the end of this step",
                flush=True,
            )


class StopOnSignal(TrainerCallback):
    """A stop request ends training at the end of the current step with a checkpoint.
    All ranks agree on the step (the flag is all-reduced), so their checkpoint is one
    checkpoint."""

    def __init__(self, request: StopRequest, dist: distributed.DistInfo):
        self.request, self.dist = request, dist
        self.stopped_at: int | None = None

    def agreed(self) -> bool:
        """Has any rank been asked to stop? (A collective: every rank must ask.)"""
        if not self.dist.backend:
            return self.request.requested
        import torch
        import torch.distributed as torch_dist

        flag = torch.tensor([1.0 if self.request.requested else 0.0], device=self.dist.device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.stopped_at is None and self.agreed():
            self.request.signame = self.request.signame or "a stop signal on another rank"
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control
