"""The device mesh: how a run's processes are laid out, built once, right after the process
group (payload.train), and kept on `DistInfo.mesh`.

Four dimensions, outermost first: dp_replicate (copies of the sharded model, HSDP),
dp_shard (FSDP2 shards each parameter over these), cp (context parallel: a sequence split
over these) and tp (tensor parallel). Their product is the world size; `dp_shard_size`, when
unset, takes the processes the others leave. The arithmetic (and its error messages, with
the numbers) is `payload.config.rules.mesh_layout`, shared with `launch validate` and the
executors' checks before launch.

The data-parallel rank and size (`data_shard`) are what the data loading, the packing
sampler and the step count use: the ranks of one context-parallel group train on the same
batch, each on its part of the sequence (payload.parallel.context), and so do the ranks
of one tensor-parallel group, each with its part of every block (payload.parallel.tensor).
Ranks are laid out row-major over the dimensions, as `init_device_mesh` lays them, so the
rank's position is arithmetic (`coordinates`); `build` checks torch agrees.

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
    mesh = init_device_mesh(device_type, tuple(sizes.values()), mesh_dim_names=tuple(sizes))
    assert list(mesh.get_coordinate()) == list(
        coordinates(cfg, dist.rank, dist.world_size).values()
    )
    return mesh


def with_mesh(cfg: TrainConfig, dist: DistInfo) -> DistInfo:
    """`dist` with the run's mesh on it (see `build`)."""
    return dataclasses.replace(dist, mesh=build(cfg, dist))


def coordinates(cfg: TrainConfig, rank: int, world: int) -> dict[str, int]:
    """Where `rank` sits on each dimension of the run's mesh (MESH_DIMS order)."""
    sizes, problems = mesh_layout(cfg, world)
    if problems:
        raise FerryError(" ".join(problems))
    where: dict[str, int] = {}
    for name in reversed(sizes):  # the last dimension varies fastest
        rank, where[name] = divmod(rank, sizes[name])
    return {name: where[name] for name in sizes}


def data_shard(cfg: TrainConfig, rank: int, world: int) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas: dp_replicate x
    dp_shard. Context and tensor parallel ranks share their group's batch."""
    if world == 1 or not uses_mesh(cfg):
        return rank, world
    sizes = mesh_layout(cfg, world)[0]
    where = coordinates(cfg, rank, world)
    shards = sizes["dp_shard"]
    return where["dp_replicate"] * shards + where["dp_shard"], sizes["dp_replicate"] * shards


def data_parallel(mesh: Any) -> Any:
    """The mesh FSDP2 shards over: dp_shard alone, or (dp_replicate, dp_shard) for HSDP,
    which shards within each copy and all-reduces across the copies. With context
    parallel, the cp ranks join the shard dimension (flattened dp_shard x cp, as torchtitan
    does): they hold the same parameters, and their gradients are each a part of the
    sequence's, which the reduce-scatter adds up."""
    shard = mesh["dp_shard"]
    if mesh["cp"].size() > 1:
        shard = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", shard.mesh_dim_names[0]]
    return shard


def describe(mesh: Any) -> str:
    """The mesh's dimensions above 1 (`dp_shard=2`), or `1 process`."""
    sizes = [f"{name}={mesh[name].size()}" for name in mesh.mesh_dim_names]
    wide = [s for s in sizes if not s.endswith("=1")]
    return " x ".join(wide) if wide else "1 process"
