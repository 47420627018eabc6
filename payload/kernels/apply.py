"""Put Ferry's fused LoRA layers (payload.kernels.lora) into a PEFT model: each decoder
layer's MLP, its attention's q/k/v projections, its o projection, as `lora_mlp_kernel`,
`lora_qkv_kernel` and `lora_o_kernel` ask. Found by structure, not by family: an MLP with
gate_proj, up_proj and down_proj and a SiLU or GELU activation; an attention with
q_proj, k_proj, v_proj and o_proj. Each of those must be a plain LoRA layer: one active
adapter, no dropout, no bias, no DoRA, unquantized base weights. Anything else is
refused naming the module and the reason (`refusals`), before training starts.

The QKV function computes the three projections at once. Attention modules call
q_proj(x), k_proj(x), v_proj(x) in turn on the same tensor: q_proj runs the function and
keeps k and v for that tensor, which k_proj and v_proj hand back (any other input, in any
other order, runs the layer as it was).
"""

from __future__ import annotations

import types
from typing import Any

from payload.errors import FerryError

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}  # fmt: skip
MLP = ("gate_proj", "up_proj", "down_proj")
QKV = ("q_proj", "k_proj", "v_proj")


def _lora_problem(module: Any, name: str) -> str | None:
    """Why `module` is not a plain LoRA linear layer the fused functions can run."""
    import torch

    if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
        return f"{name} has no LoRA adapter (add it to lora_target_modules)"
    active = list(getattr(module, "active_adapters", []))
    if len(active) != 1 or active[0] not in module.lora_A:
        return f"{name} has {len(active)} active adapters"
    adapter = active[0]
    base = module.base_layer
    if type(base) is not torch.nn.Linear:
        return f"{name}'s base layer is {type(base).__name__}, not an unquantized Linear"
    if base.bias is not None:
        return f"{name} has a bias"
    if not isinstance(module.lora_dropout[adapter], torch.nn.Identity):
        return f"{name} has LoRA dropout (set lora_dropout: 0)"
    if getattr(module, "use_dora", {}).get(adapter):
        return f"{name} uses DoRA"
    if getattr(module, "merged", False):
        return f"{name} is merged"
    return None


def _bypassed(*modules: Any) -> bool:
    """PEFT runs these layers without their adapter (`disable_adapter()`, as TRL's
    reference model does for DPO, KTO and GRPO) or with it merged into the weight: the
    layers' own forwards are then the right ones, not the fused LoRA."""
    return any(getattr(m, "disable_adapters", False) or getattr(m, "merged", False)
               for m in modules)  # fmt: skip


def _tensors(module: Any) -> tuple[Any, Any, Any, float]:
    adapter = module.active_adapters[0]
    return (
        module.base_layer.weight,
        module.lora_A[adapter].weight,
        module.lora_B[adapter].weight,
        float(module.scaling[adapter]),
    )


def _layers(model: Any) -> list[tuple[str, Any, Any]]:
    """(prefix, mlp, attention) of each decoder layer that has one or the other."""
    found = []
    for name, module in model.named_modules():
        mlp = getattr(module, "mlp", None)
        attn = getattr(module, "self_attn", None)
        if mlp is not None or attn is not None:
            found.append((name, mlp, attn))
    return found


def _activation(mlp: Any, config: Any) -> str | None:
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    return ACTIVATIONS.get(str(act)) if act else None


def refusals(model: Any, mlp: bool, qkv: bool, o: bool) -> list[str]:
    """Why the asked-for fused layers cannot go into `model` (empty: they can)."""
    problems: list[str] = []
    layers = _layers(model)
    config = getattr(model, "config", None)
    if not layers:
        return ["the model has no decoder layers with `mlp` or `self_attn` modules"]
    for prefix, block, attn in layers:
        if mlp:
            if block is None or not all(hasattr(block, n) for n in MLP):
                problems.append(f"{prefix}.mlp has no gate_proj, up_proj and down_proj")
            elif _activation(block, config) is None:
                act = getattr(config, "hidden_act", None)
                problems.append(f"{prefix}.mlp's activation {act!r} is not SiLU or GELU")
            else:
                problems += [
                    p
                    for n in MLP
                    if (p := _lora_problem(getattr(block, n), f"{prefix}.mlp.{n}")) is not None
                ]
        wanted = (QKV if qkv else ()) + (("o_proj",) if o else ())
        for n in wanted:
            module = getattr(attn, n, None) if attn is not None else None
            if module is None:
                problems.append(f"{prefix}.self_attn has no {n}")
            elif (p := _lora_problem(module, f"{prefix}.self_attn.{n}")) is not None:
                problems.append(p)
    return problems


def apply(model: Any, mlp: bool, qkv: bool, o: bool) -> str:
    """Put the fused layers in (FerryError listing the refusals if any); what was done."""
    problems = refusals(model, mlp, qkv, o)
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise FerryError(f"The fused LoRA layers cannot run on this model: {shown}.")
    from payload.kernels.lora import LoRAMLP, LoRAO, LoRAQKV

    config = getattr(model, "config", None)
    count = 0
    for _, block, attn in _layers(model):
        if mlp and block is not None:
            kind = _activation(block, config)
            gate, up, down = (getattr(block, n) for n in MLP)

            plain_mlp = block.forward

            def mlp_forward(
                self: Any, x: Any, _g=gate, _u=up, _d=down, _k=kind, _plain=plain_mlp
            ) -> Any:
                if _bypassed(_g, _u, _d):
                    return _plain(x)
                gw, ga, gb, gs = _tensors(_g)
                uw, ua, ub, us = _tensors(_u)
                dw, da, db, ds = _tensors(_d)
                return LoRAMLP.apply(x, gw, ga, gb, uw, ua, ub, dw, da, db, (gs, us, ds), _k)

            block.forward = types.MethodType(mlp_forward, block)
            count += 1
        if qkv and attn is not None:
            _fuse_qkv(attn, LoRAQKV)
        if o and attn is not None:
            proj = attn.o_proj
            plain_o = proj.forward

            def o_forward(self: Any, x: Any, *args: Any, _plain=plain_o, **kwargs: Any) -> Any:
                if _bypassed(self):
                    return _plain(x, *args, **kwargs)
                w, a, b, s = _tensors(self)
                return LoRAO.apply(x, w, a, b, s)

            proj.forward = types.MethodType(o_forward, proj)
    done = [n for n, on in (("mlp", mlp), ("qkv", qkv), ("o", o)) if on]
    return f"fused LoRA {', '.join(done)} in {len(_layers(model))} layer(s)"


def _fuse_qkv(attn: Any, function: Any) -> None:
    q, k, v = (getattr(attn, n) for n in QKV)
    kept: dict[str, Any] = {}
    plain = {n: getattr(attn, n).forward for n in QKV}

    def q_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        if _bypassed(q, k, v):
            kept.clear()  # k_proj and v_proj then run as they were, too
            return plain["q_proj"](x, *args, **kwargs)
        tensors = [t for m in (q, k, v) for t in _tensors(m)]
        scales = tuple(tensors[3::4])
        weights = [t for i, t in enumerate(tensors) if i % 4 != 3]
        out_q, out_k, out_v = function.apply(x, *weights, scales)
        kept.clear()
        kept.update(x=x, k=out_k, v=out_v)
        return out_q

    def handed(name: str) -> Any:
        def forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            if kept.get("x") is x and name in kept:
                out = kept.pop(name)
                if name == "v":
                    kept.clear()  # the layer's inputs are not held past its call
                return out
            return plain[f"{name}_proj"](x, *args, **kwargs)

        return forward

    q.forward = types.MethodType(q_forward, q)
    k.forward = types.MethodType(handed("k"), k)
    v.forward = types.MethodType(handed("v"), v)
