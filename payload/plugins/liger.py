"""Liger (Axolotl's `axolotl.integrations.liger.LigerPlugin`): liger-kernel's Triton
kernels in place of a model family's own modules, through liger-kernel's own API
(`MODEL_TYPE_TO_APPLY_LIGER_FN`: one function per model type, which patches the family's
modeling module before the model is built).

The keys, Axolotl's: liger_rope, liger_rms_norm, liger_layer_norm, liger_glu_activation
(SwiGLU or GeGLU, whichever the family has; liger_swiglu is its old name),
liger_cross_entropy, liger_fused_linear_cross_entropy (the loss without the logits in
memory). A key the family's patch has no switch for is refused by name, before the run,
where the model's config.json is on this machine (else when the run starts).

On a machine without CUDA the kernels run through Triton's interpreter
(payload.kernels.interpret): slow, for tests and CPU checks; the log says so.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from payload.plugins import Plugin, PluginConfig

# liger-kernel 0.8.5's MODEL_TYPE_TO_APPLY_LIGER_FN: each model type and the switches its
# function takes (a test in step with the installed liger-kernel keeps this list true:
# `launch validate` must not import it).
_SWIGLU = frozenset({"cross_entropy", "fused_linear_cross_entropy", "rms_norm", "rope", "swiglu"})
_SWIGLU_LN = _SWIGLU | {"layer_norm"}
_GEGLU = frozenset({"cross_entropy", "fused_linear_cross_entropy", "geglu", "rms_norm", "rope"})
_GEGLU_LN = _GEGLU | {"layer_norm"}
_LOSS = frozenset({"cross_entropy", "fused_linear_cross_entropy"})
_NORMS = _LOSS | {"layer_norm", "rms_norm"}
_RELU2 = _LOSS | {"relu_squared"}
_NO_LOSS = frozenset({"rms_norm", "rope", "swiglu"})
FAMILIES = {
    "deepseek_v2": _SWIGLU,
    "deepseek_v3": _SWIGLU,
    "deepseek_v4": _SWIGLU,
    "exaone4": _SWIGLU,
    "falcon_h1": _SWIGLU,
    "gemma": _GEGLU,
    "gemma2": _GEGLU,
    "gemma3": _GEGLU_LN,
    "gemma3_text": _GEGLU,
    "gemma4": _GEGLU_LN,
    "gemma4_text": _GEGLU,
    "glm4": _SWIGLU,
    "glm4v": _SWIGLU,
    "glm4v_moe": _SWIGLU,
    "gpt_oss": _SWIGLU,
    "granite": _SWIGLU,
    "hunyuan_v1_dense": _SWIGLU,
    "hunyuan_v1_moe": _SWIGLU,
    "internvl": _NORMS,
    "llama": _SWIGLU,
    "llama4": _SWIGLU_LN,
    "llama4_text": _SWIGLU_LN,
    "llava": _LOSS,
    "ministral": _SWIGLU,
    "mistral": _SWIGLU,
    "mixtral": _SWIGLU,
    "mllama": _SWIGLU_LN,
    "mllama_text_model": _SWIGLU_LN,
    "muse_glimmer": _SWIGLU_LN,
    "nemotron": _RELU2,
    "olmo2": _SWIGLU,
    "olmo3": _SWIGLU,
    "paligemma": _GEGLU_LN,
    "phi3": _SWIGLU,
    "pixtral": _NO_LOSS,
    "qwen2": _SWIGLU,
    "qwen2_5_vl": _SWIGLU,
    "qwen2_5_vl_text": _SWIGLU,
    "qwen2_vl": _SWIGLU_LN,
    "qwen2_vl_text": _SWIGLU_LN,
    "qwen3": _SWIGLU,
    "qwen3_5": _SWIGLU,
    "qwen3_5_moe": _SWIGLU,
    "qwen3_5_moe_text": _SWIGLU,
    "qwen3_5_text": _SWIGLU,
    "qwen3_moe": _SWIGLU,
    "qwen3_next": _SWIGLU,
    "qwen3_vl": _SWIGLU,
    "qwen3_vl_moe": _SWIGLU,
    "qwen3_vl_moe_text": _SWIGLU,
    "qwen3_vl_text": _SWIGLU,
    "smollm3": _SWIGLU,
    "smolvlm": _NORMS,
}

# Axolotl's key -> liger-kernel's switch (the GLU key: the family's swiglu or geglu).
SWITCHES = {
    "liger_rope": "rope",
    "liger_rms_norm": "rms_norm",
    "liger_layer_norm": "layer_norm",
    "liger_glu_activation": "glu",
    "liger_cross_entropy": "cross_entropy",
    "liger_fused_linear_cross_entropy": "fused_linear_cross_entropy",
}


class LigerConfig(PluginConfig):
    liger_rope: bool | None = Field(default=None, description="Liger's rotary embedding.")
    liger_rms_norm: bool | None = Field(default=None, description="Liger's RMSNorm.")
    liger_layer_norm: bool | None = Field(default=None, description="Liger's LayerNorm.")
    liger_glu_activation: bool | None = Field(
        default=None, description="Liger's SwiGLU or GeGLU MLP, as the family has."
    )
    liger_swiglu: bool | None = Field(
        default=None, description="The old name of liger_glu_activation."
    )
    liger_cross_entropy: bool | None = Field(
        default=None, description="Liger's cross-entropy over the logits."
    )
    liger_fused_linear_cross_entropy: bool | None = Field(
        default=None, description="Liger's fused LM head and loss: no logits in memory."
    )
    liger_rms_norm_gated: bool | None = Field(
        default=None,
        description="Not in liger-kernel 0.8.5: liger_rms_norm patches the family's norms.",
    )

    @model_validator(mode="after")
    def _old_swiglu(self) -> LigerConfig:
        if self.liger_swiglu is not None and self.liger_glu_activation is None:
            self.liger_glu_activation = self.liger_swiglu
        return self


def switches(cfg: Any, family: frozenset[str]) -> dict[str, bool]:
    """liger-kernel's keyword arguments for the family: every switch it takes, on where
    the config turns it on (its functions default most to on, so each is given)."""
    wanted = {SWITCHES[key] for key in SWITCHES if getattr(cfg, key, None)}
    glu = "swiglu" if "swiglu" in family else "geglu" if "geglu" in family else None
    out = {name: False for name in family}
    for name in wanted:
        out[glu if name == "glu" and glu else name] = True
    return out


def refused(cfg: Any, model_type: str | None) -> list[tuple[str, str]]:
    """(key, why) for each Liger key this config or model family cannot have."""
    found = []
    on = [key for key in SWITCHES if getattr(cfg, key, None)]
    if getattr(cfg, "liger_rms_norm_gated", None):
        found.append(
            (
                "liger_rms_norm_gated",
                "liger-kernel 0.8.5 has no separate gated RMSNorm switch; liger_rms_norm "
                "patches the family's norms",
            )
        )
    if cfg.liger_swiglu is not None and cfg.liger_glu_activation != cfg.liger_swiglu:
        found.append(("liger_swiglu", "is the old name of liger_glu_activation: set one"))
    if cfg.liger_cross_entropy and cfg.liger_fused_linear_cross_entropy:
        found.append(
            ("liger_cross_entropy", "and liger_fused_linear_cross_entropy both compute the loss")
        )
    for key in ("liger_fused_linear_cross_entropy", "liger_cross_entropy"):
        if getattr(cfg, key, None) and getattr(cfg, "cut_cross_entropy", None):
            found.append((key, "and cut_cross_entropy both compute the loss: set one"))
    if on and (cfg.tensor_parallel_size or 1) > 1:
        found.append((on[0], "is not combined with tensor parallel (its tensors are sharded)"))
    if cfg.liger_fused_linear_cross_entropy and cfg.deepspeed:
        found.append(
            (
                "liger_fused_linear_cross_entropy",
                "is not combined with DeepSpeed yet (ZeRO-3 keeps the head's weight "
                "partitioned outside its forward)",
            )
        )
    for key in ("liger_cross_entropy", "liger_fused_linear_cross_entropy"):
        if getattr(cfg, key, None) and (cfg.rl or cfg.reward_model or cfg.process_reward_model):
            found.append((key, "patches the causal-LM loss, which this objective does not use"))
    if model_type is None or not on:
        return found
    family = FAMILIES.get(model_type)
    if family is None:
        found.append(
            (
                on[0],
                f"liger-kernel has no kernels for the model type `{model_type}`; it has "
                f"{', '.join(sorted(FAMILIES))}",
            )
        )
        return found
    for key in on:
        name = SWITCHES[key]
        if name == "glu" and not family & {"swiglu", "geglu"}:
            found.append((key, f"`{model_type}` has no gated MLP for Liger to replace"))
        elif name != "glu" and name not in family:
            found.append((key, f"liger-kernel's patch for `{model_type}` has no `{name}`"))
    return found


def model_type(cfg: Any) -> str | None:
    from payload.config.paths import model_config_json

    found = model_config_json(cfg)
    return found.get("model_type") if found else None


class LigerPlugin(Plugin):
    name = "liger"
    config = LigerConfig

    def problems(self, cfg: Any) -> list[tuple[str, str]]:
        return refused(cfg, model_type(cfg))

    def before_import(self, cfg: Any) -> None:
        from payload.kernels import interpret

        if any(getattr(cfg, key, None) for key in SWITCHES) and interpret.on_cpu():
            interpret.enable()  # before Triton is imported (see payload.kernels.interpret)

    def before_model(self, cfg: Any) -> None:
        from payload.errors import FerryError
        from payload.kernels import interpret

        if not any(getattr(cfg, key, None) for key in SWITCHES):
            return
        kind = model_type(cfg)
        if kind is None:
            from transformers import AutoConfig

            from payload.model import _hub_kwargs

            source = cfg.base_model_config or cfg.base_model
            kind = AutoConfig.from_pretrained(source, **_hub_kwargs(cfg)).model_type
        problems = refused(cfg, kind)
        if problems:
            raise FerryError("; ".join(f"{k}: {m}" for k, m in problems))
        interpreted = interpret.on_cpu()
        if interpreted:  # before liger-kernel's modules are imported (see interpret)
            interpret.enable()
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        chosen = switches(cfg, FAMILIES[kind])
        MODEL_TYPE_TO_APPLY_LIGER_FN[kind](**chosen)
        on = ", ".join(sorted(k for k, v in chosen.items() if v))
        how = " through Triton's interpreter (no CUDA here)" if interpreted else ""
        print(f"plugins: liger: {on} for {kind}{how}", flush=True)

    def after_model(self, cfg: Any, model: Any) -> Any:
        """The patch reached the model: a model built by remote code uses its own modules,
        which transformers' patched ones are not."""
        from payload.errors import FerryError

        modules = [m for m in ("liger_rms_norm", "liger_layer_norm", "liger_glu_activation")
                   if getattr(cfg, m, None)]  # fmt: skip
        if modules and not any("Liger" in type(m).__name__ for m in model.modules()):
            raise FerryError(
                f"{modules[0]}: the model has no Liger module after the patch (built by "
                "remote code?), so Liger would change nothing."
            )
        return model
