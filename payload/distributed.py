"""The one place that sets up torch.distributed.

torchrun (or Ray Train's worker group) describes the job in the environment: RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT. A process started without them is a plain
single-process run and gets no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    backend: str | None  # None: no process group (a plain single-process run)
    device: str  # "cuda:N" or "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    """Initialise the process group from the environment: nccl with CUDA, gloo without.

    Must run before the trainer is built: accelerate (under the HF Trainer) sees the
    group already exists and uses it instead of creating its own.
    """
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if "RANK" not in os.environ:
        return DistInfo(0, 0, 1, None, device)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            device_id=torch.device(device) if cuda else None,
        )
    return DistInfo(rank, local_rank, world_size, backend, device)


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
