"""Ferry's fused LoRA layers (`lora_mlp_kernel`, `lora_qkv_kernel`, `lora_o_kernel`).

A LoRA linear layer computes  y = x W^T + s (x A^T) B^T  (W frozen, A [r, in] and B
[out, r] trained, s the scaling). PEFT runs it as separate modules, each keeping its own
intermediates for the backward pass. Here one autograd function covers a whole block,
written from that formula and its derivatives:

- MLP (SwiGLU or GeGLU):  g = lora_gate(x), u = lora_up(x), h = act(g) * u,
  out = lora_down(h). It keeps x, g and u only; h and the activation's derivatives are
  recomputed in the backward pass by one Triton kernel that writes, in place, h over the
  incoming gradient and dg, du over g, u. With  dh = d_out W_d + s_d (d_out B_d) A_d:
      du = dh * act(g),   dg = dh * u * act'(g)
  and each LoRA pair's gradients  dA = s (dy B)^T x,  dB = s dy^T (x A^T),  with
  dx = sum over the layers x feeds of  dy W + s (dy B) A.
- QKV: q, k and v from one x, kept once.
- O: one LoRA linear.

Each function has a plain torch reference beside it (`reference_*`), which the tests hold
it to. The activation kernels run compiled on a GPU and through Triton's interpreter on
a CPU (payload.kernels.interpret).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

BLOCK = 1024
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass
class LoRA:
    """One LoRA linear layer's tensors: y = x W^T + s (x A^T) B^T."""

    weight: torch.Tensor  # W [out, in], frozen
    a: torch.Tensor  # A [r, in]
    b: torch.Tensor  # B [out, r]
    scale: float


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a block computes in: autocast's where it is on (fp16 or bf16 over an
    fp32 base), else the input's. The functions turn autocast off inside and cast
    everything to this one dtype, forward and backward alike."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def lora_forward(x: torch.Tensor, layer: LoRA) -> torch.Tensor:
    """y for x [tokens, in] (no autograd graph of its own: the functions below own it)."""
    low = x @ layer.a.to(x.dtype).t()
    base = x @ layer.weight.to(x.dtype).t()
    return torch.addmm(base, low, layer.b.to(x.dtype).t(), alpha=layer.scale)


def lora_backward(
    dy: torch.Tensor, x: torch.Tensor, layer: LoRA, need_a: bool, need_b: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dx, dA, dB for y = lora(x) and its incoming gradient dy [tokens, out]."""
    b = layer.b.to(dy.dtype)
    a = layer.a.to(dy.dtype)
    dy_b = dy @ b  # [tokens, r]
    dx = torch.addmm(dy @ layer.weight.to(dy.dtype), dy_b, a, alpha=layer.scale)
    da = (layer.scale * (dy_b.t() @ x)).to(layer.a.dtype) if need_a else None
    db = (layer.scale * (dy.t() @ (x @ a.t()))).to(layer.b.dtype) if need_b else None
    return dx, da, db


# ---- the activations' kernels


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _glu_forward(g_ptr, u_ptr, h_ptr, n, KIND: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """h = act(g) * u, element-wise; KIND 0: SiLU, 1: GELU (erf), 2: GELU (tanh)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    g = tl.load(g_ptr + offsets, mask=mask, other=0).to(tl.float32)
    u = tl.load(u_ptr + offsets, mask=mask, other=0).to(tl.float32)
    if KIND == 0:
        act = g * tl.sigmoid(g)
    elif KIND == 1:
        act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = 0.5 * g * (1.0 + _tanh(inner))
    tl.store(h_ptr + offsets, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_backward(dh_ptr, g_ptr, u_ptr, n, KIND: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """In place: dh <- h = act(g) * u (recomputed), g <- dg = dh * u * act'(g),
    u <- du = dh * act(g)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    dh = tl.load(dh_ptr + offsets, mask=mask, other=0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0).to(tl.float32)
    u = tl.load(u_ptr + offsets, mask=mask, other=0).to(tl.float32)
    if KIND == 0:
        sig = tl.sigmoid(g)
        act = g * sig
        slope = sig * (1.0 + g * (1.0 - sig))
    elif KIND == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        act = g * cdf
        slope = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = _tanh(inner)
        act = 0.5 * g * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * g * g
        )
    tl.store(dh_ptr + offsets, (act * u).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptr + offsets, (dh * u * slope).to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(u_ptr + offsets, (dh * act).to(u_ptr.dtype.element_ty), mask=mask)


ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def glu_forward(g: torch.Tensor, u: torch.Tensor, kind: str) -> torch.Tensor:
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    n = g.numel()
    _glu_forward[(triton.cdiv(n, BLOCK),)](g, u, h, n, ACTIVATIONS[kind], BLOCK_SIZE=BLOCK)
    return h


def glu_backward(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, dg, du), written over (dh, g, u): each must be contiguous and not needed
    after."""
    n = g.numel()
    _glu_backward[(triton.cdiv(n, BLOCK),)](dh, g, u, n, ACTIVATIONS[kind], BLOCK_SIZE=BLOCK)
    return dh, g, u


# ---- the blocks


def _needs(ctx: Any, *indices: int) -> list[bool]:
    return [ctx.needs_input_grad[i] for i in indices]


class LoRAMLP(torch.autograd.Function):
    """out = lora_down(act(lora_gate(x)) * lora_up(x)), keeping x, g, u only."""

    @staticmethod
    def forward(ctx, x, gw, ga, gb, uw, ua, ub, dw, da, db, scales, kind):  # type: ignore[no-untyped-def]
        shape, dtype = x.shape, compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            gate, up, down = (
                LoRA(gw, ga, gb, scales[0]),
                LoRA(uw, ua, ub, scales[1]),
                LoRA(dw, da, db, scales[2]),
            )
            g = lora_forward(x2, gate)
            u = lora_forward(x2, up)
            h = glu_forward(g, u, kind)
            out = lora_forward(h, down)
        ctx.save_for_backward(x2, g, u, gw, ga, gb, uw, ua, ub, dw, da, db)
        ctx.scales, ctx.kind, ctx.shape, ctx.x_dtype, ctx.used = scales, kind, shape, x.dtype, False
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[no-untyped-def]
        if ctx.used:  # g and u were overwritten in place by the first backward
            raise RuntimeError("the fused LoRA MLP runs its backward once (no retain_graph)")
        ctx.used = True
        x2, g, u, gw, ga, gb, uw, ua, ub, dw, da, db = ctx.saved_tensors
        sg, su, sd = ctx.scales
        with torch.autocast(x2.device.type, enabled=False):
            dout2 = dout.reshape(-1, dout.shape[-1]).to(x2.dtype)
            down = LoRA(dw, da, db, sd)
            # h is needed for the down layer's LoRA gradients: recomputed with dg, du.
            dh = torch.addmm(
                dout2 @ dw.to(x2.dtype), dout2 @ db.to(x2.dtype), da.to(x2.dtype), alpha=sd
            )
            h, dg, du = glu_backward(dh.contiguous(), g.contiguous(), u.contiguous(), ctx.kind)
            _, d_da, d_db = lora_backward(dout2, h, down, *_needs(ctx, 8, 9))
            dx_g, d_ga, d_gb = lora_backward(dg, x2, LoRA(gw, ga, gb, sg), *_needs(ctx, 2, 3))
            dx_u, d_ua, d_ub = lora_backward(du, x2, LoRA(uw, ua, ub, su), *_needs(ctx, 5, 6))
        dx = (dx_g + dx_u).reshape(ctx.shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return dx, None, d_ga, d_gb, None, d_ua, d_ub, None, d_da, d_db, None, None


class LoRAQKV(torch.autograd.Function):
    """q, k, v = lora_q(x), lora_k(x), lora_v(x), keeping x once."""

    @staticmethod
    def forward(ctx, x, qw, qa, qb, kw, ka, kb, vw, va, vb, scales):  # type: ignore[no-untyped-def]
        shape, dtype = x.shape, compute_dtype(x)
        layers = [
            LoRA(qw, qa, qb, scales[0]),
            LoRA(kw, ka, kb, scales[1]),
            LoRA(vw, va, vb, scales[2]),
        ]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            outs = [lora_forward(x2, layer) for layer in layers]
        ctx.x_dtype = x.dtype
        # An output nothing used gets None, not zeros: its adapter then has no gradient
        # (as without the fusion), and the optimizer leaves it alone.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x2, qw, qa, qb, kw, ka, kb, vw, va, vb)
        ctx.scales, ctx.shape = scales, shape
        return tuple(o.reshape(*shape[:-1], o.shape[-1]) for o in outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):  # type: ignore[no-untyped-def]
        x2, *tensors = ctx.saved_tensors
        grads: list[Any] = [None] * 11
        dx = None
        for i, dy in enumerate((dq, dk, dv)):
            if dy is None:
                continue
            w, a, b = tensors[3 * i : 3 * i + 3]
            with torch.autocast(x2.device.type, enabled=False):
                dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
                layer = LoRA(w, a, b, ctx.scales[i])
                part, grads[2 + 3 * i], grads[3 + 3 * i] = lora_backward(
                    dy2, x2, layer, *_needs(ctx, 2 + 3 * i, 3 + 3 * i)
                )
            dx = part if dx is None else dx + part
        if ctx.needs_input_grad[0] and dx is not None:
            grads[0] = dx.reshape(ctx.shape).to(ctx.x_dtype)
        return tuple(grads)


class LoRAO(torch.autograd.Function):
    """out = lora_o(x)."""

    @staticmethod
    def forward(ctx, x, w, a, b, scale):  # type: ignore[no-untyped-def]
        shape, dtype = x.shape, compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            out = lora_forward(x2, LoRA(w, a, b, scale))
        ctx.save_for_backward(x2, w, a, b)
        ctx.scale, ctx.shape, ctx.x_dtype = scale, shape, x.dtype
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[no-untyped-def]
        x2, w, a, b = ctx.saved_tensors
        with torch.autocast(x2.device.type, enabled=False):
            dout2 = dout.reshape(-1, dout.shape[-1]).to(x2.dtype)
            dx, da, db = lora_backward(dout2, x2, LoRA(w, a, b, ctx.scale), *_needs(ctx, 2, 3))
        dx = dx.reshape(ctx.shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return dx, None, da, db, None


# ---- plain torch, for the tests to hold the functions to


def reference_lora(x: torch.Tensor, layer: LoRA) -> torch.Tensor:
    return x @ layer.weight.t() + layer.scale * (x @ layer.a.t()) @ layer.b.t()


def reference_act(g: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "silu":
        return torch.nn.functional.silu(g)
    approximate = "tanh" if kind == "gelu_tanh" else "none"
    return torch.nn.functional.gelu(g, approximate=approximate)


def reference_mlp(x: torch.Tensor, gate: LoRA, up: LoRA, down: LoRA, kind: str) -> torch.Tensor:
    return reference_lora(
        reference_act(reference_lora(x, gate), kind) * reference_lora(x, up), down
    )
