"""The one place that sets up torch.distributed.

torchrun (or Ray Train's worker group) describes the job in the environment: RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT. A process started without them is a plain
single-process run and gets no process group at all.

Two groups, two timeouts. The default group (nccl with CUDA, gloo without) carries
training's collectives and gives up after `ddp_timeout` seconds. A second, gloo group
carries the small messages of the waits that follow one rank's long I/O: rank 0's
checkpoint and final uploads, each node's resume download. That I/O runs under a
deadline of `ddp_timeout` (`on_rank0`), and the gloo group waits a margin longer, so
the other ranks hear rank 0's error rather than time out — and never wait forever.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from payload.errors import FerryError

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


def _within(fn: Callable[[], T], seconds: float, what: str) -> T:
    from payload.runtime.deadline import DeadlineExceeded, call_within

    try:
        return call_within(fn, seconds, what)
    except DeadlineExceeded as e:
        raise FerryError(f"{what} did not finish within {seconds:.0f} s (ddp_timeout).") from e


def _attempt(fn: Callable[[], T], seconds: float, what: str) -> tuple[str, Any]:
    """("ok", value) or ("error", message): what this rank tells the others."""
    try:
        return ("ok", _within(fn, seconds, what))
    except FerryError as e:
        message = e.message if e.message.startswith(what) else f"{what} failed: {e.message}"
        return ("error", message)
    except Exception as e:  # noqa: BLE001 - told to every rank, then raised
        return ("error", f"{what} failed: {type(e).__name__}: {e}")


def on_rank0(dist: DistInfo, what: str, fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 under the `ddp_timeout` deadline; every rank waits for it and
    returns its value, or raises its error (saying on the others that it was rank 0's).
    The ranks meet after the work, so none leaves while rank 0 is still uploading."""
    outcome: list[Any] = [_attempt(fn, dist.timeout_s, what) if dist.is_main else None]
    if dist.backend:
        import torch.distributed as torch_dist

        torch_dist.broadcast_object_list(outcome, src=0, group=dist.io_group)
    kind, value = outcome[0]
    if kind == "error":
        raise FerryError(value if dist.is_main else f"on rank 0, {value}")
    return value


def on_each_node(dist: DistInfo, what: str, fn: Callable[[], T]) -> list[T]:
    """Run `fn` on the first process of every node under the deadline; return every
    node's value (rank order) to every rank, or raise the first error on all of them."""
    mine = _attempt(fn, dist.timeout_s, what) if dist.local_rank == 0 else None
    found = [mine]
    if dist.backend:
        import torch.distributed as torch_dist

        found = [None] * dist.world_size
        torch_dist.all_gather_object(found, mine, group=dist.io_group)
    for rank, outcome in enumerate(found):
        if outcome and outcome[0] == "error":
            raise FerryError(outcome[1] if rank == dist.rank else f"on rank {rank}, {outcome[1]}")
    return [outcome[1] for outcome in found if outcome]
