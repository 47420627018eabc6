"""What every recipe has, with the supervised defaults: `payload.train` calls these in
order (datasets, model, prepare, arguments, trainer), and a recipe overrides the steps
its objective does differently."""

from __future__ import annotations

from typing import Any, ClassVar

from payload.config.schema import TrainConfig
from payload.distributed import DistInfo
from payload.model import load_model
from payload.trainers.settings import FerryTrainer, debug_rows, unpacked_collator, with_settings


class Recipe:
    name: ClassVar[str] = ""
    # The auto class of the model head, and peft's task type for an adapter on it.
    head: ClassVar[str] = "AutoModelForCausalLM"
    task_type: ClassVar[str] = "CAUSAL_LM"

    def __init__(self, cfg: TrainConfig, dist: DistInfo):
        self.cfg, self.dist = cfg, dist

    def tokenizer(self) -> Any:
        """The run's tokenizer (a VLM recipe loads its processor here too)."""
        from payload.model import load_tokenizer

        return load_tokenizer(self.cfg)

    def processing_class(self, tokenizer: Any) -> Any:
        """What the trainer saves with each checkpoint, and the run with its output."""
        return tokenizer

    def datasets(self, tokenizer: Any) -> tuple[Any, Any | None, Any]:
        """(train, eval or None, DataReport)."""
        from payload.data.build import build_datasets

        return build_datasets(self.cfg, tokenizer)

    def debug_lines(self, train: Any, tokenizer: Any) -> list[str]:
        """`debug: true`: the first prepared rows, as the trainer will see them."""
        return debug_rows(train, tokenizer)

    def model_kwargs(self) -> dict[str, Any]:
        """Settings of the head passed to `from_pretrained` (`num_labels`, say)."""
        return {}

    def load_model(self, tokenizer: Any) -> Any:
        return load_model(
            self.cfg, tokenizer, head=self.head, task_type=self.task_type, **self.model_kwargs()
        )

    def prepare(self, model: Any, tokenizer: Any, train: Any, eval_set: Any) -> int | None:
        """Work between the model load and the arguments; returns the batches per rank
        per epoch where the recipe decides them (packing), else None."""
        return None

    def arguments_class(self) -> Any:
        from transformers import TrainingArguments

        return TrainingArguments

    def objective_arguments(self) -> dict[str, Any]:
        """The objective's own settings, on top of the shared training arguments."""
        return {}

    def trainer_class(self) -> Any:
        return FerryTrainer

    def trainer_kwargs(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        """What the trainer takes beyond model, args, datasets, tokenizer, callbacks."""
        return {"data_collator": unpacked_collator(self.cfg, tokenizer)}

    def trainer(
        self,
        model: Any,
        args: Any,
        train: Any,
        eval_set: Any,
        tokenizer: Any,
        callbacks: list[Any],
    ) -> Any:
        cls = with_settings(self.trainer_class())
        return cls(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=eval_set,
            processing_class=self.processing_class(tokenizer),
            callbacks=callbacks,
            cfg=self.cfg,
            **self.trainer_kwargs(model, tokenizer),
        )
