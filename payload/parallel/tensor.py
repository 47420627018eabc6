"""Tensor parallel: each transformer block's weights split over the mesh's `tp` ranks, with
torch's tensor-parallel styles (the Megatron layout).

The plan, for Llama-family blocks (Llama, Mistral, Qwen2 and the like name their linears
the same): q_proj, k_proj, v_proj, gate_proj and up_proj are column-wise (each rank holds
its share of the output features: its attention heads, its part of the MLP), o_proj and
down_proj row-wise (each rank multiplies its share of the input features, then one
all-reduce sums the parts). So a block costs two all-reduces forward and two backward, and
its output is whole on every rank. transformers reshapes q/k/v with -1 heads, so a rank's
attention just runs on its own heads; that is why the heads and the MLP's width must divide
by tp (`check`, at load).

Everything else (embeddings, norms, the head) is replicated: every rank holds it whole and
computes it on the same whole activations, so its gradient is the same on every rank with
no communication. It is still made a DTensor (Replicate on the tp mesh): torch's gradient
clipping needs every parameter on one mesh (`fully_shard` then puts all of them on
dp x tp), and a Replicate gradient's norm is counted once, a Shard one's summed over the
ranks. Hooks turn such a module's inputs into Replicate DTensors and its outputs back into
plain tensors, so the model's code around it sees plain tensors as before.

The tp ranks share their batch (payload.parallel.mesh.data_shard), and `fully_shard` over
the data-parallel mesh follows (payload.parallel.apply), also without fsdp_config: the
Trainer must not wrap a TP model in DDP, whose all-reduce over the world would add up
different ranks' shards.

Measured on CPU with gloo, 2 ranks, the tiny Llama (4 heads, 2 KV heads), fp32: the loss
equals one process's exactly, each gradient within 1e-7.
"""

from __future__ import annotations

import logging
from typing import Any

from payload.distributed import DistInfo
from payload.errors import FerryError

log = logging.getLogger("ferry.train")

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")
KEY = "tensor_parallel_size"


def _hf_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check(config: Any, tp: int) -> None:
    """Refuse a model whose heads or MLP width do not divide by `tp` (a rank would hold a
    part of a head), naming the numbers."""
    sizes = {
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
        "intermediate_size": getattr(config, "intermediate_size", None),
    }
    bad = [f"{name} ({n})" for name, n in sizes.items() if isinstance(n, int) and n % tp]
    if bad:
        raise FerryError(
            f"{KEY}: ({tp}) splits each block's attention heads and MLP over {tp} ranks, and "
            f"the model's {' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} not divisible "
            f"by {tp}. Pick a tensor_parallel_size that divides "
            f"{', '.join(f'{k} ({v})' for k, v in sizes.items() if v is not None)}."
        )


def _blocks(model: Any) -> list[Any]:
    """The transformer blocks (the model's `_no_split_modules`), each holding every module
    the plan names; else a FerryError naming what the model has."""
    hf = _hf_model(model)
    kinds = set(getattr(hf, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    wanted = set(COLWISE + ROWWISE)
    for block in blocks:
        have = {name.rsplit(".", 1)[-1] for name, _ in block.named_modules()}
        if not wanted <= have:
            break
    else:
        if blocks:
            return blocks
    linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _linear(m)})
    raise FerryError(
        f"{KEY}: Ferry's tensor-parallel plan is for Llama-family blocks, whose linears are "
        f"{', '.join(COLWISE + ROWWISE)}; {type(hf).__name__} "
        f"({', '.join(sorted(kinds)) or 'no _no_split_modules'}) has linears named "
        f"{', '.join(linears) or 'nothing'}. Train it without tensor_parallel_size."
    )


def _linear(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear)


def parallelize(model: Any, dist: DistInfo) -> None:
    """Apply the plan to every block of `model` over the mesh's tp dimension, replicate
    the rest on it, and say so (rank 0)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = dist.mesh["tp"]
    check(_hf_model(model).config, mesh.size())
    blocks = _blocks(model)
    for block in blocks:
        plan: dict[str, Any] = {}
        for name, _ in block.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in COLWISE:
                plan[name] = ColwiseParallel()
            elif leaf in ROWWISE:
                plan[name] = RowwiseParallel()
        parallelize_module(block, mesh, plan)
    replicated = _replicate_rest(model, mesh)
    if dist.is_main:
        print(
            f"tensor parallel: {len(blocks)} {type(blocks[0]).__name__} blocks split over "
            f"{mesh.size()} ranks: column-wise {', '.join(COLWISE)}; row-wise "
            f"{', '.join(ROWWISE)}; replicated on every rank: {', '.join(replicated)}",
            flush=True,
        )


def _replicate_rest(model: Any, mesh: Any) -> list[str]:
    """Make every parameter the plan left plain a Replicate DTensor on `mesh` (a weight
    shared by two modules stays one parameter), with hooks converting its module's inputs
    and outputs; return the modules' names."""
    import torch
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    done: dict[int, Any] = {}
    names = []
    for name, module in model.named_modules():
        own = [(k, p) for k, p in module.named_parameters(recurse=False)]
        plain = [(k, p) for k, p in own if not isinstance(p, DTensor)]
        if not plain:
            continue
        for key, param in plain:
            if id(param) not in done:
                whole = distribute_tensor(param.data, mesh, [Replicate()])
                done[id(param)] = torch.nn.Parameter(whole, requires_grad=param.requires_grad)
            module.register_parameter(key, done[id(param)])
        module.register_forward_pre_hook(_inputs_hook(mesh), with_kwargs=True)
        module.register_forward_hook(_outputs_hook)
        names.append(name.rsplit(".", 1)[-1] if "layers." in name else name)
    return sorted(set(names))


def _inputs_hook(mesh: Any) -> Any:
    from torch.distributed.tensor import DTensor, Replicate
    from torch.utils._pytree import tree_map

    def whole(x: Any) -> Any:
        import torch

        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
            return DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return x

    def hook(module: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
        return tree_map(whole, args), tree_map(whole, kwargs)

    return hook


def _outputs_hook(module: Any, args: Any, output: Any) -> Any:
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.to_local() if isinstance(x, DTensor) else x, output)
