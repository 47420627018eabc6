"""Vision-language fine-tuning (`processor_type`): the HF Trainer on image chats.

The model is the image-text-to-text head of the family (`AutoModelForImageTextToText`,
or `model_type`); the processor is loaded beside the tokenizer and saved with the
adapter or model; rows are checked up front and batched by the processor
(payload.data.vision). LoRA goes to the language model unless a regex says otherwise,
and `freeze_mm_modules` freezes the towers and projectors (payload.model).
"""

from __future__ import annotations

from typing import Any

from payload.trainers import register
from payload.trainers.base import Recipe


@register("vision")
class Vision(Recipe):
    name = "vision"
    head = "AutoModelForImageTextToText"
    processor: Any = None

    def tokenizer(self) -> Any:
        from payload.model import load_processor

        self.processor = load_processor(self.cfg)
        return self.processor.tokenizer

    def processing_class(self, tokenizer: Any) -> Any:
        return self.processor

    def datasets(self, tokenizer: Any) -> tuple[Any, Any | None, Any]:
        from payload.data import vision

        return vision.build(self.cfg, self.processor)

    def debug_lines(self, train: Any, tokenizer: Any) -> list[str]:
        from payload.data import vision

        return vision.debug_rows(train, self.processor)

    def trainer_kwargs(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        from payload.data.vision import VisionCollator

        return {"data_collator": VisionCollator(self.cfg, self.processor)}
