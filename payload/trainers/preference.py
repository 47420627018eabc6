"""Preference objectives on TRL 1.16's trainers: `rl:` dpo and ipo (DPOTrainer), simpo
(the experimental CPOTrainer with loss_type simpo), kto (KTOTrainer) and orpo (the
experimental ORPOTrainer), with Axolotl's keys mapped as its RL builder maps them.

The rows are text in TRL's shape (payload.data.preference_build); the trainer tokenizes
them and truncates to `sequence_len` (its `max_length`).

The reference model (dpo, ipo, kto; simpo and orpo have none):
- LoRA: the policy with its adapter disabled. Ferry's adapter is always freshly made
  (LoRA's B is zero), so the base model is exactly the starting policy. TRL would instead
  add a frozen "ref" copy of the adapter to the PeftModel, which would be saved beside
  the trained one; the recipe takes it out again.
- full fine-tune: a frozen copy of the policy made before the trainer wraps it. TRL's
  own default reloads `config._name_or_path`, which fails for a model built from a
  config alone and ignores Ferry's loading settings.
- `precompute_ref_log_probs`: the reference log-probabilities of every row are computed
  once when the trainer is built (by the policy before any step, for a full fine-tune:
  the same weights), and no reference model is kept.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from payload.trainers import register
from payload.trainers.base import Recipe


class PairTokens:
    """Counts the tokens of the experimental CPO and ORPO trainers' batches, which hold
    `chosen_*` and `rejected_*` sequences (prompt included) and no `input_ids`: without
    it the Trainer counts nothing (no tokens/s) and warns at every step."""

    args: Any
    accelerator: Any
    state: Any

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        if "chosen_attention_mask" not in inputs:
            return super()._track_num_input_tokens(inputs)  # type: ignore[misc]
        import torch

        if self.args.include_num_input_tokens_seen == "no":
            return None
        masks = (inputs["chosen_attention_mask"], inputs["rejected_attention_mask"])
        if self.args.include_num_input_tokens_seen == "non_padding":
            tokens = sum(int(m.sum()) for m in masks)
        else:
            tokens = sum(m.numel() for m in masks)
        seen = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(seen).sum().item()
        return None


@register("dpo", "ipo", "simpo", "kto", "orpo")
class Preference(Recipe):
    # The objectives that compare the policy with a reference model.
    REFERENCED: ClassVar[tuple[str, ...]] = ("dpo", "ipo", "kto")

    @property
    def objective(self) -> str:
        return (self.cfg.rl or "").lower()

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.objective

    def datasets(self, tokenizer: Any) -> tuple[Any, Any | None, Any]:
        from payload.data.preference_build import build_preference_datasets

        return build_preference_datasets(self.cfg, tokenizer)

    def debug_lines(self, train: Any, tokenizer: Any) -> list[str]:
        """`debug: true`: the first rows as the trainer gets them, one text column each."""
        lines = []
        for i in range(min(5, len(train))):
            row = train[i]
            lines.append(f"row {i}: " + " | ".join(f"{k}={v!r}" for k, v in row.items()))
        return lines

    def arguments_class(self) -> Any:
        if self.objective in ("dpo", "ipo"):
            from trl import DPOConfig

            return DPOConfig
        if self.objective == "kto":
            from trl import KTOConfig

            return KTOConfig
        if self.objective == "simpo":
            from trl.experimental.cpo import CPOConfig

            return CPOConfig
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig

    def beta(self) -> float | None:
        """TRL's beta: `trl.beta`, else `rl_beta`, else (orpo) `orpo_alpha` — Axolotl's
        order; None leaves TRL's default."""
        cfg = self.cfg
        if cfg.trl is not None and cfg.trl.beta is not None:
            return cfg.trl.beta
        if cfg.rl_beta is not None:
            return cfg.rl_beta
        return cfg.orpo_alpha if self.objective == "orpo" else None

    def objective_arguments(self) -> dict[str, Any]:
        cfg, objective = self.cfg, self.objective
        out: dict[str, Any] = {"max_length": cfg.sequence_len}
        if (beta := self.beta()) is not None:
            out["beta"] = beta
        if objective == "dpo":
            if cfg.dpo_loss_type is not None:
                out["loss_type"] = list(cfg.dpo_loss_type)
            if cfg.dpo_loss_weights is not None:
                out["loss_weights"] = list(cfg.dpo_loss_weights)
            if cfg.dpo_label_smoothing is not None:
                out["label_smoothing"] = cfg.dpo_label_smoothing
            if cfg.dpo_use_weighting is not None:
                out["use_weighting"] = cfg.dpo_use_weighting
        elif objective == "ipo":
            out["loss_type"] = ["ipo"]
            if cfg.dpo_use_weighting is not None:
                out["use_weighting"] = cfg.dpo_use_weighting
        elif objective == "simpo":
            out["loss_type"] = "simpo"
            if cfg.simpo_gamma is not None:
                out["simpo_gamma"] = cfg.simpo_gamma
            if cfg.cpo_alpha is not None:
                out["cpo_alpha"] = cfg.cpo_alpha
        elif objective == "kto":
            out["desirable_weight"] = cfg.kto_desirable_weight or 1.0
            out["undesirable_weight"] = cfg.kto_undesirable_weight or 1.0
            # Each row's KL completion is its neighbour's in the batch, so TRL reads the
            # rows in order; the data builder shuffled them once, with `seed`.
            out["train_sampling_strategy"] = "sequential"
        if objective in self.REFERENCED and cfg.precompute_ref_log_probs is not None:
            out["precompute_ref_log_probs"] = cfg.precompute_ref_log_probs
        return out

    def trainer_class(self) -> Any:
        if self.objective in ("dpo", "ipo"):
            from trl import DPOTrainer

            return DPOTrainer
        if self.objective == "kto":
            from trl import KTOTrainer

            return KTOTrainer
        if self.objective == "simpo":
            from trl.experimental.cpo import CPOTrainer

            return type("CPOTrainer", (PairTokens, CPOTrainer), {"__module__": __name__})
        from trl.experimental.orpo import ORPOTrainer

        return type("ORPOTrainer", (PairTokens, ORPOTrainer), {"__module__": __name__})

    def reference(self, model: Any) -> Any:
        """The reference model to hand TRL (None: TRL's, as the module docstring says)."""
        cfg = self.cfg
        if self.objective not in self.REFERENCED or cfg.adapter or cfg.precompute_ref_log_probs:
            return None
        ref = copy.deepcopy(model)
        ref.requires_grad_(False)
        return ref.eval()

    def trainer_kwargs(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        if self.objective in self.REFERENCED:
            return {"ref_model": self.reference(model)}
        return {}

    def trainer(
        self,
        model: Any,
        args: Any,
        train: Any,
        eval_set: Any,
        tokenizer: Any,
        callbacks: list[Any],
    ) -> Any:
        trainer = super().trainer(model, args, train, eval_set, tokenizer, callbacks)
        peft = getattr(trainer.model, "peft_config", None)
        if peft is not None and "ref" in peft:
            # TRL's frozen copy of the fresh adapter: the adapter disabled is the same
            # reference, without a second adapter to run and to save.
            trainer.model.delete_adapter("ref")
            trainer.model.set_adapter("default")
        return trainer
