"""Cut Cross-Entropy (Axolotl's `axolotl.integrations.cut_cross_entropy.
CutCrossEntropyPlugin`, key `cut_cross_entropy`): the causal-LM loss computed from the
last hidden states and the output embedding by the `cut-cross-entropy` package, without
materialising the [tokens x vocabulary] logits in memory.

The model's own forward is wrapped (on the instance, after the model and its adapters
load): with labels, the decoder runs, and the loss is `linear_cross_entropy(hidden,
lm_head.weight, labels, shift=1)`, summed and divided by the batch's label count across
gradient accumulation (`num_items_in_batch`) exactly as transformers' own causal-LM loss
is; no logits are returned. Without labels (generation), the model's forward runs as it
was. The implementation is chosen by device: CCE's Triton kernel on a GPU, its
`torch_compile` implementation (the same loss through torch.compile, no kernel) on the
CPU; the run's log says which.
"""

from __future__ import annotations

import types
from typing import Any

from pydantic import Field

from payload.plugins import Plugin, PluginConfig

IGNORE_INDEX = -100


class CutCrossEntropyConfig(PluginConfig):
    cut_cross_entropy: bool = Field(
        default=True,
        description="Compute the causal-LM loss with Cut Cross-Entropy (no logits in "
        "memory). On by default once the plugin is listed, as in Axolotl.",
    )


def implementation(device: Any) -> str:
    """CCE's implementation for tensors on `device`: its Triton kernel needs CUDA."""
    return "cce" if getattr(device, "type", str(device)) == "cuda" else "torch_compile"


def causal_lm_loss(
    hidden: Any,
    weight: Any,
    labels: Any,
    num_items_in_batch: Any = None,
    softcap: float | None = None,
    shifted: bool = False,
) -> Any:
    """The causal-LM loss of `hidden` [batch, tokens, width] against `labels` through
    the output embedding `weight` [vocabulary, width], as transformers computes it from
    logits: the next token's cross-entropy, -100 ignored, averaged over the labelled
    tokens (or summed and divided by `num_items_in_batch`). `shifted`: the labels are
    already the next tokens (context parallel's shift_labels)."""
    import torch
    from cut_cross_entropy import linear_cross_entropy

    impl = implementation(hidden.device)
    total = linear_cross_entropy(
        hidden,
        weight.to(hidden.dtype),
        labels.to(hidden.device),
        ignore_index=IGNORE_INDEX,
        softcap=softcap,
        reduction="sum",
        shift=0 if shifted else 1,
        impl=impl,
    )
    if num_items_in_batch is None:
        kept = labels if shifted else labels[..., 1:]
        count = (kept != IGNORE_INDEX).sum()
    else:
        count = num_items_in_batch
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


def causal_lm(model: Any) -> Any:
    """The *ForCausalLM module inside `model` (under a PEFT wrapper, say)."""
    for module in model.modules():
        if (
            hasattr(module, "get_decoder")
            and hasattr(module, "get_output_embeddings")
            and module.get_output_embeddings() is not None
        ):
            return module
    return None


def wrap(model: Any) -> Any:
    """Make `model`'s causal LM compute its training loss with CCE (see the module)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    lm = causal_lm(model)
    original = lm.forward
    softcap = getattr(lm.config, "final_logit_softcapping", None)

    def forward(self: Any, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        if labels is None:
            return original(*args, **kwargs)
        kwargs.pop("logits_to_keep", None)
        num_items = kwargs.get("num_items_in_batch")
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.get_decoder()(*args, **kwargs)
        hidden = outputs.last_hidden_state
        head = self.get_output_embeddings()
        target, shifted = (labels, False) if shift_labels is None else (shift_labels, True)
        loss = causal_lm_loss(hidden, head.weight, target, num_items, softcap, shifted)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    lm.forward = types.MethodType(forward, lm)
    return model


# What a family's forward may do to the logits besides lm_head(h) (and Gemma-2's softcap,
# which CCE takes): CCE would drop it, so such a model is refused.
LOGIT_SCALES = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier")


def model_problem(config: dict[str, Any] | None) -> str | None:
    """Why a model (its config.json) is not one CCE computes the loss of exactly."""
    if not config:
        return None
    text = config.get("text_config") or {}
    architectures = config.get("architectures") or []
    if architectures and not str(architectures[0]).endswith("ForCausalLM"):
        return f"{architectures[0]} is not a causal LM (multimodal models are not covered yet)"
    for key in LOGIT_SCALES:
        value = config.get(key, text.get(key))
        if value not in (None, 1, 1.0):
            return f"this model scales its logits ({key}: {value}), which CCE would drop"
    return None


def head_problem(model: Any) -> str | None:
    """Why the loaded model's LM head is not one CCE can compute through."""
    lm = causal_lm(model)
    if lm is None:
        return f"{type(model).__name__} has no output embedding (LM head)"
    head = lm.get_output_embeddings()
    if hasattr(head, "base_layer"):
        return "the LM head has a LoRA adapter (lm_head in lora_target_modules)"
    if getattr(head, "bias", None) is not None:
        return "the LM head has a bias, which CCE does not take"
    return model_problem(lm.config.to_dict())


class CutCrossEntropyPlugin(Plugin):
    name = "cut_cross_entropy"
    config = CutCrossEntropyConfig

    def problems(self, cfg: Any) -> list[tuple[str, str]]:
        if not cfg.cut_cross_entropy:
            return []
        found = []
        why = "computes a causal LM's next-token loss"
        if cfg.rl:
            found.append(("rl", f"Cut Cross-Entropy {why}; `rl: {cfg.rl}` needs the logits"))
        for key in ("reward_model", "process_reward_model"):
            if getattr(cfg, key, None):
                found.append((key, f"Cut Cross-Entropy {why}; a reward model has no LM head"))
        for key in ("tensor_parallel_size", "context_parallel_size"):
            if (getattr(cfg, key, None) or 1) > 1:
                found.append(
                    (key, "Cut Cross-Entropy is not combined with it yet: set it to 1, or "
                     "`cut_cross_entropy: false`")
                )  # fmt: skip
        if cfg.deepspeed:  # ZeRO-3 keeps the head's weight partitioned outside its forward
            found.append(("deepspeed", "Cut Cross-Entropy is not combined with DeepSpeed yet"))
        from payload.config.paths import model_config_json

        if why_not := model_problem(model_config_json(cfg)):
            found.append(("cut_cross_entropy", f"{why_not}."))
        return found

    def after_model(self, cfg: Any, model: Any) -> Any:
        if not cfg.cut_cross_entropy:
            return model
        if why_not := head_problem(model):
            from payload.errors import FerryError

            raise FerryError(f"cut_cross_entropy: {why_not}.")
        import torch

        # The model is still on the CPU here (the trainer moves it): say what will run.
        on_gpu = torch.cuda.is_available()
        how = "its Triton kernel" if on_gpu else "its torch_compile implementation (CPU)"
        print(f"plugins: cut_cross_entropy: the loss through {how}", flush=True)
        return wrap(model)
