"""The device mesh: how a run's processes are laid out, built once, right after the process
group (payload.train), and kept on `DistInfo.mesh`.

Four dimensions, outermost first: dp_replicate (copies of the sharded model, HSDP),
dp_shard (FSDP2 shards each parameter over these), cp (context parallel: a sequence split
over these) and tp (tensor parallel). Their product is the world size; `dp_shard_size`, when
unset, takes the processes the others leave. The arithmetic (and its error messages, with
the numbers) is `payload.config.rules.mesh_layout`, shared with `launch validate` and the
executors' checks before launch. Only the data-parallel dimensions train for now: context
and tensor parallel above 1 are refused by the rules.

Torch is imported inside `build`: the launcher reaches this package's rules without it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from payload.config.rules import mesh_layout, uses_mesh
from payload.config.schema import TrainConfig
from payload.distributed import DistInfo
from payload.errors import FerryError


def build(cfg: TrainConfig, dist: DistInfo) -> Any:
    """The run's DeviceMesh, or None: a run that lays out nothing, or a single process
    started without torchrun (there is no process group to lay out)."""
    if not uses_mesh(cfg) or dist.backend is None:
        return None
    sizes, problems = mesh_layout(cfg, dist.world_size)
    if problems:
        raise FerryError(" ".join(problems))
    from torch.distributed.device_mesh import init_device_mesh

    device_type = dist.device.split(":")[0]
    return init_device_mesh(device_type, tuple(sizes.values()), mesh_dim_names=tuple(sizes))


def with_mesh(cfg: TrainConfig, dist: DistInfo) -> DistInfo:
    """`dist` with the run's mesh on it (see `build`)."""
    return dataclasses.replace(dist, mesh=build(cfg, dist))


def data_parallel(mesh: Any) -> Any:
    """The mesh FSDP2 shards over: dp_shard alone, or (dp_replicate, dp_shard) for HSDP,
    which shards within each copy and all-reduces across the copies."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def describe(mesh: Any) -> str:
    """The mesh's dimensions above 1 (`dp_shard=2`), or `1 process`."""
    sizes = [f"{name}={mesh[name].size()}" for name in mesh.mesh_dim_names]
    wide = [s for s in sizes if not s.endswith("=1")]
    return " x ".join(wide) if wide else "1 process"
