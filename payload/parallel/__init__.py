"""Parallelism beyond plain data parallel: the device mesh (`mesh`), FSDP2 (`fsdp`) and
DeepSpeed (`deepspeed`).

`apply` turns the loaded model (LoRA already on it) into the model a sharded run trains,
with plain functions in a fixed order:

1. activation checkpointing,
2. compile (a slot: not under FSDP2 yet; `torch_compile: true` is refused with it),
3. tensor parallel (a slot: `tensor_parallel_size` above 1 is refused for now),
4. `fully_shard` on each transformer block, then on the root.

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

from payload.config.rules import fsdp_reading
from payload.config.schema import TrainConfig
from payload.distributed import DistInfo

log = logging.getLogger("ferry.train")


def apply(model: Any, cfg: TrainConfig, dist: DistInfo) -> Any:
    """The model as the run trains it: sharded with FSDP2 when the config asks for it,
    else `model` itself."""
    settings = fsdp_reading(cfg).settings
    if settings is None:
        return model
    if dist.mesh is None:
        # `python -m payload train` by hand: one process, no process group, nothing to
        # shard across. A launched run always has one (torchrun, even for 1 process).
        log.warning("FSDP2 is not applied: this process was not started by torchrun.")
        return model
    from payload.parallel import fsdp

    fsdp.checkpoint_activations(model, cfg, settings)
    # (compile, then tensor parallel: their slots, see the module docstring)
    return fsdp.shard(model, cfg, dist, settings)
