"""What `launch validate` checks of a vision-language config (`processor_type`), stated
in one place: the keys that only mean something with a processor, the settings image rows
cannot have, and the shape of image_size. Light: no torch, no transformers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from payload.config.schema import TrainConfig


Finding = tuple[str, str, bool]
CHAT_TYPES = ("chat_template", "sharegpt")
# Keys that only a processor run reads.
PROCESSOR_KEYS = ("freeze_mm_modules", "image_size", "image_resize_algorithm", "processor_kwargs")


def _error(key: str, message: str) -> Finding:
    return key, message, True


def _warn(key: str, message: str) -> Finding:
    return key, message, False


def findings(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if not cfg.processor_type:
        yield from _text_only(cfg, given)
        return
    name = cfg.processor_type
    if not (name.isidentifier() and name.endswith("Processor")):
        yield _error(
            "processor_type",
            f"`{name}` is not a processor class: `AutoProcessor`, or a transformers class "
            "such as `Qwen2VLProcessor` or `LlavaProcessor`.",
        )
    reason = "image rows are laid out per row by the model's processor"
    if cfg.sample_packing:
        yield _error(
            "sample_packing",
            f"cannot pack image chats: {reason} (image tokens, pixel values and, for some "
            "families, image grid sizes), and a packed row would mix several. Set "
            "`sample_packing: false`.",
        )
    if cfg.rl or cfg.reward_model or cfg.process_reward_model:
        key = "rl" if cfg.rl else "reward_model" if cfg.reward_model else "process_reward_model"
        yield _error(
            key,
            "is not supported with processor_type yet: Ferry trains vision-language models "
            "with supervised fine-tuning on image chats only.",
        )
    if cfg.pretraining_dataset:
        yield _error("pretraining_dataset", "cannot be mixed into an image-chat run.")
    if cfg.context_parallel_size > 1:
        yield _error(
            "context_parallel_size",
            "splits each row's tokens over ranks; image tokens must stay with their row's "
            "pixel values, so a vision-language run cannot use it.",
        )
    if (cfg.tensor_parallel_size or 1) > 1:
        yield _error(
            "tensor_parallel_size",
            "is not supported for vision-language models yet (the towers are not sharded).",
        )
    for key, why in (
        ("group_by_length", "batches rows of similar token counts, which image rows only "
         "know once their pictures are processed"),
        ("dataset_exact_deduplication", "compares rows' tokens; image rows are compared by "
         "their pictures too, which Ferry does not do yet"),
        ("dataset_shard_num", "is not applied to image chats yet"),
    ):  # fmt: skip
        if getattr(cfg, key):
            yield _error(key, f"cannot be used with processor_type: it {why}.")
    if cfg.excess_length_strategy not in (None, "drop"):
        yield _warn(
            "excess_length_strategy",
            "is ignored for image chats: a row longer than sequence_len once its pictures are "
            "expanded is always dropped (cutting it would cut image tokens the model needs).",
        )
    if cfg.remove_unused_columns:
        yield _error(
            "remove_unused_columns",
            "true would drop the columns the image collator reads; Ferry's collators pass the "
            "model exactly its inputs. Set it to false or leave it out.",
        )
    for key, entries in (("datasets", cfg.datasets), ("test_datasets", cfg.test_datasets)):
        for i, ds in enumerate(entries):
            if ds.type_name not in CHAT_TYPES:
                yield _error(
                    f"{key}[{i}].type",
                    f"`{ds.type}` cannot carry images: a vision-language run reads chats "
                    "(`type: chat_template`) whose messages have image parts.",
                )
    if cfg.adapter and not cfg.lora_target_modules and not cfg.lora_target_linear:
        yield _error(
            "lora_target_modules",
            "is needed with processor_type: without it peft picks its own default modules, "
            "which may sit in the vision tower. Set `lora_target_linear: true` (the language "
            "model's linear layers) or name the modules (names, or a regex).",
        )
    size = cfg.image_size
    if isinstance(size, list) and (len(size) != 2 or min(size) < 1):
        yield _error("image_size", "is a side (one number) or [width, height], each >= 1.")
    elif isinstance(size, int) and size < 1:
        yield _error("image_size", "must be at least 1 pixel.")
    if cfg.image_resize_algorithm and size is None:
        yield _warn("image_resize_algorithm", "is ignored without image_size.")


def _text_only(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    """Keys of a processor run set on a text-only config."""
    for key in PROCESSOR_KEYS:
        if getattr(cfg, key) not in (None, False):
            yield _error(
                key,
                "only applies to a vision-language run: set `processor_type: AutoProcessor` "
                "to load the model's processor and train on image chats.",
            )
    if cfg.skip_prepare_dataset:
        yield _warn(
            "skip_prepare_dataset",
            "is ignored without processor_type: text rows are tokenized before training "
            "(cached with dataset_prepared_path), which is what lets bad rows be counted "
            "and packing be planned.",
        )
    if cfg.remove_unused_columns:
        yield _warn(
            "remove_unused_columns",
            "is ignored: Ferry's collators pass the model exactly its inputs.",
        )
