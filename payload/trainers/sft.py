"""Supervised fine-tuning: the HF Trainer on tokenized rows, one row per example or, with
`sample_packing`, packed sequences (payload.trainers.packed)."""

from __future__ import annotations

from typing import Any

from payload.trainers import register
from payload.trainers.base import Recipe


@register("sft")
class SFT(Recipe):
    name = "sft"
    packing: Any = None

    def prepare(self, model: Any, tokenizer: Any, train: Any, eval_set: Any) -> int | None:
        if not self.cfg.sample_packing:
            return None
        from payload.trainers.packed import packing_setup

        attention = getattr(model.config, "_attn_implementation", None)
        self.packing = packing_setup(self.cfg, tokenizer, train, eval_set, self.dist, attention)
        return len(self.packing.train)

    def trainer_class(self) -> Any:
        if self.packing is None:
            return super().trainer_class()
        from payload.trainers.packed import PackedTrainer

        return PackedTrainer

    def trainer_kwargs(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        kwargs = super().trainer_kwargs(model, tokenizer)
        if self.packing is not None:
            kwargs["packing"] = self.packing
        return kwargs
