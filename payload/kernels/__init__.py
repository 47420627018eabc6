"""Triton kernels and what runs them: Ferry's fused LoRA layers (`lora`, put into a model
by `apply`), and `interpret`, which lets Triton kernels (Ferry's, Liger's) run on a CPU
through Triton's interpreter, for tests and CPU-only runs."""

from __future__ import annotations

from typing import Any

KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")


def asked(cfg: Any) -> bool:
    return any(getattr(cfg, key, None) for key in KEYS)


def before_import(cfg: Any) -> None:
    """In a training process, before the training stack (and Triton) is imported: the
    fused LoRA layers on a machine without CUDA run through Triton's interpreter."""
    from payload.kernels import interpret

    if asked(cfg) and interpret.on_cpu():
        interpret.enable()
