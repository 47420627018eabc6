"""Parallelism beyond plain data parallel: the device mesh (`mesh`), tensor parallel
(`tensor`), context parallel (`context`), FSDP2 (`fsdp`) and DeepSpeed (`deepspeed`).

`apply` turns the loaded model (LoRA already on it) into the model a sharded run trains,
with plain functions in a fixed order:

1. activation checkpointing,
2. compile (a slot: not under FSDP2 or context parallel yet; `torch_compile: true` is
   refused with them),
3. tensor parallel: each block's linears split over the mesh's tp ranks, the rest
   replicated on them (payload.parallel.tensor),
4. context parallel: the model's attention becomes `ferry_cp` (the batch is split by the
   trainer's collator, payload.parallel.context),
5. `fully_shard` on each transformer block, then on the root. With tensor parallel this
   runs also without fsdp_config (over a data-parallel mesh of 1, it shards nothing): the
   Trainer then does not wrap the model in DDP, which would all-reduce the tp ranks'
   different shards together, and saves and resumes it whole (payload.parallel.fsdp).

Why this order: checkpointing decides what each block recomputes in backward, so it comes
first, and whatever wraps the block later (compile, sharding) wraps the block as it will
run. Compile then sees the block whole, recompute included, before any communication is
hooked onto it. Tensor parallel turns weights into DTensors on the `tp` dimension before
FSDP2 adds its own dimension to them: `fully_shard` must see the final parameters, since
it replaces each with its shard. And the root goes last, so that it takes only what no
block took (embeddings, final norm, head).

Torch is imported by the functions that need it: `payload.config.rules` and the launcher
read this package's light parts.
"""

from __future__ import annotations

import logging
from typing import Any

from payload.config.rules import FsdpSettings, context_parallel_size, fsdp_reading
from payload.config.schema import TrainConfig
from payload.distributed import DistInfo

log = logging.getLogger("ferry.train")


def apply(model: Any, cfg: TrainConfig, dist: DistInfo) -> Any:
    """The model as the run trains it: split over a tensor-parallel group, sharded with
    FSDP2 and/or attending across a context-parallel group when the config asks for it,
    else `model` itself."""
    settings = fsdp_reading(cfg).settings
    split = context_parallel_size(cfg) > 1
    tensor = (cfg.tensor_parallel_size or 1) > 1
    if settings is None and not split and not tensor:
        return model
    if dist.mesh is None:
        # `python -m payload train` by hand: one process, no process group, nothing to
        # shard across. A launched run always has one (torchrun, even for 1 process).
        what = "FSDP2" if settings else "tensor parallel" if tensor else "context parallel"
        log.warning("%s is not applied: this process was not started by torchrun.", what)
        return model
    from payload.parallel import context, fsdp

    if settings is not None:
        fsdp.checkpoint_activations(model, cfg, settings)
    # (compile: its slot, see the module docstring)
    if tensor:
        from payload.parallel import tensor as tp

        tp.parallelize(model, dist)
        settings = settings or FsdpSettings()
    if split:
        context.enable(model, dist)
    if settings is None:
        return model
    return fsdp.shard(model, cfg, dist, settings)
