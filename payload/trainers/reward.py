"""Reward models: what an RLHF run scores its samples with.

`reward_model: true` is an outcome reward model: a sequence-classification head (one
score per sequence, `num_labels: 1`) trained by TRL's RewardTrainer on chosen/rejected
pairs (`bradley_terry.chat_template` rows) with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected), plus `center_rewards_coefficient` * mean(r^2) when
set. TRL logs its pairwise accuracy (chosen scored above rejected) and margin.

`process_reward_model: true` is a process reward model: a token-classification head
(`num_labels: 2`) that says at the end of each reasoning step whether the step is right,
trained on `stepwise_supervised` rows (tokenized by the SFT pipeline, labels 0/1 at each
step's last token, -100 elsewhere). TRL 1.16 no longer has its PRMTrainer; what it did
is the HF Trainer with a token-classification head, its cross-entropy over the labelled
tokens and a token-classification collator, which is what this recipe runs, with the
step-label accuracy as its eval metric.

Under LoRA peft's SEQ_CLS / TOKEN_CLS task types keep the new head (`score`) fully
trained and saved with the adapter (peft adds it to `modules_to_save`).
"""

from __future__ import annotations

import logging
from typing import Any

from payload.trainers import register
from payload.trainers.base import Recipe

log = logging.getLogger("ferry.train")


class _Head(Recipe):
    """What both reward models share: a new, randomly initialized classification head on
    the base model."""

    labels = 1

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": self.cfg.num_labels or self.labels}

    def load_model(self, tokenizer: Any) -> Any:
        model = super().load_model(tokenizer)
        _check_head(model)
        return model


def _check_head(model: Any) -> None:
    """A head transformers left uninitialized (seen with a bf16 base: the init runs on a
    float copy) would give nan rewards from the first step; start it as transformers
    means to, a small normal."""
    import torch

    for name, param in model.named_parameters():
        # `score.weight`; under LoRA also its trained copy (`score.modules_to_save...`).
        if not ({"score", "classifier"} & set(name.split("."))) or not name.endswith("weight"):
            continue
        if not torch.isfinite(param).all() or bool((param == 0).all()):
            std = getattr(model.config, "initializer_range", 0.02)
            with torch.no_grad():
                param.normal_(0.0, std)
            log.info("%s was not initialized; drawn from N(0, %s)", name, std)


@register("reward")
class RewardModel(_Head):
    name = "reward"
    head = "AutoModelForSequenceClassification"
    task_type = "SEQ_CLS"

    def datasets(self, tokenizer: Any) -> tuple[Any, Any | None, Any]:
        from payload.data.bradley_terry import build_reward_datasets

        return build_reward_datasets(self.cfg, tokenizer)

    def debug_lines(self, train: Any, tokenizer: Any) -> list[str]:
        lines = []
        for i in range(min(5, len(train))):
            row = train[i]
            for side in ("chosen", "rejected"):
                ids = row[f"{side}_ids"]
                lines.append(f"row {i} {side} ({len(ids)} tokens): {tokenizer.decode(ids)!r}")
        return lines

    def arguments_class(self) -> Any:
        from trl import RewardConfig

        return RewardConfig

    def objective_arguments(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "center_rewards_coefficient": cfg.center_rewards_coefficient,
            # The rows come tokenized and already held to sequence_len
            # (excess_length_strategy, counted in the data report); TRL would drop more.
            "max_length": None,
            # pad_to_sequence_len: every batch padded to sequence_len (fixed shapes).
            "pad_to_multiple_of": cfg.sequence_len if cfg.pad_to_sequence_len else None,
        }

    def trainer_class(self) -> Any:
        from trl import RewardTrainer

        return RewardTrainer

    def trainer_kwargs(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        # TRL's own collator: chosen rows, then rejected rows, in one padded batch.
        return {}


@register("process_reward")
class ProcessRewardModel(_Head):
    name = "process_reward"
    head = "AutoModelForTokenClassification"
    task_type = "TOKEN_CLS"
    labels = 2

    def debug_lines(self, train: Any, tokenizer: Any) -> list[str]:
        """Each row with the label of each step after its last token: `step\\n[1]`."""
        lines = []
        for i in range(min(5, len(train))):
            ids, labels = list(train[i]["input_ids"]), list(train[i]["labels"])
            text, start = [], 0
            for at, label in enumerate(labels):
                if label != -100:
                    text.append(f"{tokenizer.decode(ids[start : at + 1])}[{label}]")
                    start = at + 1
            text.append(tokenizer.decode(ids[start:]))
            lines.append(f"row {i} ({len(ids)} tokens): {''.join(text)!r}")
        return lines

    def trainer_kwargs(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        from transformers import DataCollatorForTokenClassification

        padding: dict[str, Any] = {"padding": True}
        if self.cfg.pad_to_sequence_len:
            padding = {"padding": "max_length", "max_length": self.cfg.sequence_len}
        return {
            "data_collator": DataCollatorForTokenClassification(tokenizer, **padding),
            "compute_metrics": step_accuracy,
            "preprocess_logits_for_metrics": _predicted_class,
        }


def _predicted_class(logits: Any, labels: Any) -> Any:
    """Keep the predicted class per token, not the logits, across the eval set."""
    return logits.argmax(-1)


def step_accuracy(prediction: Any) -> dict[str, float]:
    """The share of labelled steps (label not -100) whose class the model predicts, and
    the same for the correct (1) and wrong (0) steps alone."""
    import numpy as np

    predicted, labels = prediction.predictions, prediction.label_ids
    scored = labels != -100
    right = (predicted == labels) & scored
    out = {"step_accuracy": float(right.sum() / max(scored.sum(), 1))}
    for name, value in (("wrong", 0), ("right", 1)):
        these = labels == value
        if these.any():
            out[f"step_accuracy_{name}"] = float(np.sum(right & these) / these.sum())
    return out
