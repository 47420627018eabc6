"""The attention backends, in one place: which key asks for each, the name transformers
loads it by, and what it means for sample packing and context parallel.

- `flash_attention: true` -> flash_attention_2. Packing: the batch flattened into one row
  (varlen, sequence starts from position_ids). Needs flash-attn and a CUDA GPU.
- `sdp_attention: true` or `attn_implementation: sdpa` -> sdpa. Packing: a
  block-diagonal mask from position_ids.
- `flex_attention: true` -> flex_attention. Packing: a block mask from position_ids.
  Trains on a CUDA GPU only (torch's FlexAttention has no backward on the CPU);
  `flex_attn_compile_kwargs` go to its torch.compile.
- `attn_implementation: eager` -> eager. Packing: a block-diagonal mask from
  position_ids. flash_attention_3/4 and a hub kernel (org/repo) with a varlen function
  pack as flash does.
- Packing reads the segments from position_ids only without an attention_mask and
  without a KV cache: Ferry's packed batches have no mask, and PackedTrainer turns the
  cache off.
- nothing -> the model's default (sdpa for most).
- context parallel: every backend gives way to Ferry's all-gathered sdpa
  (payload/parallel/context.py); one other than sdpa is said.

Rules (payload.config.rules calls `findings`): one key chooses; a name transformers does
not know is refused with the list; `flex_attn_compile_kwargs` without flex attention
does nothing and is refused; flash or flex attention with context parallel is said (the
split sequence attends through Ferry's all-gathered sdpa, payload/parallel/context.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# transformers' own names (its ALL_ATTENTION_FUNCTIONS, and eager); a hub kernel is
# named `org/repo` (transformers' kernels integration).
KNOWN = (
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
)
KEYS = ("flash_attention", "sdp_attention", "flex_attention", "attn_implementation")
# torch.compile's keyword arguments (torch 2.13)
COMPILE_ARGUMENTS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")


def chosen(cfg: Any) -> str | None:
    """The attention implementation the config asks for (None: the model's default)."""
    if cfg.flash_attention:
        return "flash_attention_2"
    if cfg.sdp_attention:
        return "sdpa"
    if cfg.flex_attention:
        return "flex_attention"
    return cfg.attn_implementation


def findings(cfg: Any) -> Iterator[tuple[str, str, bool]]:
    """(key, message, is_error) for the attention keys of `cfg`."""
    asked = [k for k in KEYS if getattr(cfg, k)]
    if len(asked) > 1:
        yield asked[0], f"and `{asked[1]}` both choose attention; set one.", True
    name = cfg.attn_implementation
    if name and name not in KNOWN and "/" not in name:
        import difflib

        close = difflib.get_close_matches(name, KNOWN, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        yield (
            "attn_implementation",
            f"`{name}` is not an attention transformers has ({', '.join(KNOWN)}, or a hub "
            f"kernel as org/repo).{hint}",
            True,
        )
    unknown = sorted(set(cfg.flex_attn_compile_kwargs or {}) - set(COMPILE_ARGUMENTS))
    if unknown:
        yield (
            "flex_attn_compile_kwargs",
            f"{', '.join(unknown)}: not torch.compile arguments ({', '.join(COMPILE_ARGUMENTS)}).",
            True,
        )
    if cfg.flex_attn_compile_kwargs and chosen(cfg) != "flex_attention":
        yield (
            "flex_attn_compile_kwargs",
            "applies to flex attention only: add `flex_attention: true`.",
            True,
        )
    if (cfg.context_parallel_size or 1) > 1 and chosen(cfg) not in (None, "sdpa"):
        yield (
            asked[0] if asked else "attn_implementation",
            f"is not used with context parallel: the split sequences attend through "
            f"Ferry's all-gathered sdpa in place of {chosen(cfg)}.",
            False,
        )


_ORIGINAL_INIT: dict[str, Any] = {}


def configure_flex_compile(kwargs: dict[str, Any] | None) -> None:
    """Compile transformers' flex attention with `kwargs` (flex_attn_compile_kwargs), in
    place of its own choice, for training and eval alike; without kwargs, transformers'
    own choice again (a process may run several configs: a Ray worker, the tests)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as integration

    wrapper = integration.WrappedFlexAttention
    original = _ORIGINAL_INIT.setdefault("init", wrapper.__init__)
    wrapper._instance = None
    wrapper._is_flex_compiled = False
    if not kwargs:
        wrapper.__init__ = original  # type: ignore[method-assign]
        return

    @torch.compiler.disable(recursive=False)
    def init(self: Any, training: bool) -> None:
        if not self._is_flex_compiled:
            self.training = training
            self._compiled_flex_attention = torch.compile(flex_attention, **kwargs)
            self._is_flex_compiled = True

    wrapper.__init__ = init  # type: ignore[method-assign]
