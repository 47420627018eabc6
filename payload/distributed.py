"""The one place that sets up torch.distributed.

torchrun (or Ray Train's worker group) describes the job in the environment: RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT. A process started without them is a plain
single-process run and gets no process group at all.

Two groups, two timeouts. The default group (nccl with CUDA, gloo without) carries
training's collectives and gives up after `ddp_timeout` seconds. A second, gloo group
carries the small messages of the waits around one rank's long I/O: rank 0's checkpoint
and final uploads, each node's resume download (`on_rank0`, `on_each_node`). While that
I/O runs, the ranks compare notes every few seconds; it may take as long as it keeps
moving bytes, and gives up once it moved none for `ddp_timeout` seconds. Its error (or
its stall) reaches every rank as an error, never as a hang.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from payload.errors import EXIT_FAILED, FerryError, TransferError
from payload.runtime.deadline import Meter

DEFAULT_TIMEOUT_S = 1800  # HF TrainingArguments' ddp_timeout default (and Axolotl's)
IO_MARGIN_S = 60  # the waiting ranks' extra patience over rank 0's own I/O deadline

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    backend: str | None  # None: no process group (a plain single-process run)
    device: str  # "cuda:N" or "cpu"
    timeout_s: int = DEFAULT_TIMEOUT_S
    io_group: Any = None  # the gloo group for waits on one rank's I/O
    mesh: Any = None  # the DeviceMesh of a run that lays its processes out (payload.parallel)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(timeout_s: int | None = None) -> DistInfo:
    """Initialise the process groups from the environment: nccl with CUDA, gloo without.

    Must run before the trainer is built: accelerate (under the HF Trainer) sees the
    group already exists and uses it instead of creating its own.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    timeout_s = timeout_s or DEFAULT_TIMEOUT_S
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if "RANK" not in os.environ:
        return DistInfo(0, 0, 1, None, device, timeout_s)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=torch.device(device) if cuda else None,
        )
    io_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s + IO_MARGIN_S))
    return DistInfo(rank, local_rank, world_size, backend, device, timeout_s, io_group)


def teardown(synchronize: bool = True) -> None:
    """Leave the process group. With `synchronize` (a run that finished), every rank
    arrives before any destroys the group, so no collective is still in flight in gloo's
    worker threads when it goes. A failing rank leaves at once: the others may be inside
    a collective it will never join, and torchrun stops them when it sees the failure."""
    import torch.distributed as dist

    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


HEARTBEAT_S = 5.0  # how often the ranks compare notes while one rank's I/O runs


def run_shared(
    dist: DistInfo, what: str, fn: Callable[[], T] | None, meter: Meter
) -> list[tuple[str, Any] | None]:
    """Run `fn` on this rank (None: this rank only waits) while every rank waits for all
    of them, comparing notes over the gloo group every HEARTBEAT_S: ("working", bytes),
    ("ok", value), ("error", message, exit code), None for a rank with nothing to do. A
    user's error (exit 1) stays one; any other failure or a stall exits 70. A worker that
    moves no byte for `ddp_timeout` seconds gives up with an error; a rank that cannot
    even answer (wedged) makes the others' exchange time out after `ddp_timeout` plus a
    margin. Returns every rank's final note, in rank order."""
    box: dict[str, Any] = {}
    worker = None
    if fn is not None:
        meter.restart()

        def work() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - told to every rank below
                box["error"] = e

        worker = threading.Thread(target=work, name=f"ferry-{what}", daemon=True)
        worker.start()
    final: tuple[str, Any] | None = None
    while True:
        if worker is not None and final is None:
            worker.join(HEARTBEAT_S)
            if "error" in box:
                final = ("error", *_failure(what, box["error"]))
            elif not worker.is_alive():
                final = ("ok", box.get("value"))
            elif meter.idle_s() > dist.timeout_s:  # given up on: it dies with the process
                stalled = f"{what} made no progress for {dist.timeout_s} s (ddp_timeout)"
                final = ("error", stalled, EXIT_FAILED)
        mine = final or (("working", meter.bytes) if worker is not None else None)
        notes: list[Any] = [mine]
        if dist.backend:
            import torch.distributed as torch_dist

            notes = [None] * dist.world_size
            torch_dist.all_gather_object(notes, mine, group=dist.io_group)
        if not any(note and note[0] == "working" for note in notes):
            return notes


def _failure(what: str, error: BaseException) -> tuple[str, int]:
    """(message, exit code) of a worker's exception."""
    if isinstance(error, FerryError):
        said = error.message
        return (said if said.startswith(what) else f"{what} failed: {said}", error.exit_code)
    return f"{what} failed: {type(error).__name__}: {error}", EXIT_FAILED


def _raise_first(dist: DistInfo, notes: list[tuple[Any, ...] | None]) -> None:
    for rank, note in enumerate(notes):
        if note and note[0] == "error":
            _, message, code = note
            where = message if rank == dist.rank else f"on rank {rank}, {message}"
            raise TransferError(where, exit_code=code)


def on_rank0(dist: DistInfo, what: str, fn: Callable[[], T], meter: Meter) -> T | None:
    """Run `fn` on rank 0 while every rank waits (see `run_shared`); every rank returns
    its value or raises its error (on the others: "on rank 0, ..."). The ranks meet
    after the work, so none leaves while rank 0 is still uploading."""
    notes = run_shared(dist, what, fn if dist.is_main else None, meter)
    _raise_first(dist, notes)
    return notes[0][1] if notes[0] else None


def on_each_node(dist: DistInfo, what: str, fn: Callable[[], T], meter: Meter) -> list[T]:
    """Run `fn` on the first process of every node while every rank waits; every rank
    gets each node's value, in rank order, or the first error."""
    notes = run_shared(dist, what, fn if dist.local_rank == 0 else None, meter)
    _raise_first(dist, notes)
    return [note[1] for note in notes if note]
