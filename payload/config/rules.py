"""Cross-key rules: combinations of settings that cannot work, checked all at once.

Each rule names the keys it reads. When one of those keys already failed its own
validation the rule is skipped, so one typo does not also produce a cascade of
second-hand complaints.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from payload.config.user_formats import user_defined_problems
from payload.config.vocab import (
    DATASET_TYPE_LOADERS,
    OPTIMIZERS,
    SUPPORTED_DATASET_TYPES,
    SUPPORTED_PREFERENCE_TYPES,
    preference_family,
)
from payload.errors import FerryError, Problem
from payload.trainers import RL_OBJECTIVES

if TYPE_CHECKING:
    from payload.config.schema import DatasetConfig, TrainConfig

# A finding is (key, message, is_error); warnings are settings that would be ignored.
Finding = tuple[str, str, bool]
Rule = Callable[["TrainConfig", set[str]], Iterator[Finding]]

RULES: list[tuple[tuple[str, ...], Rule]] = []


def rule(*keys: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES.append((keys, fn))
        return fn

    return register


def check_rules(
    cfg: TrainConfig, given: set[str], bad: set[str]
) -> tuple[list[Problem], list[Problem]]:
    """Run every rule whose keys are all valid. `given` is the top-level keys the user set.

    Returns (errors, warnings).
    """
    errors: list[Problem] = []
    warnings: list[Problem] = []
    for keys, fn in RULES:
        if bad.intersection(keys):
            continue
        for key, message, is_error in fn(cfg, given):
            (errors if is_error else warnings).append(Problem(key, message))
    return errors, warnings


def _error(key: str, message: str) -> Finding:
    return key, message, True


def _warn(key: str, message: str) -> Finding:
    return key, message, False


# What gradient_checkpointing_kwargs may hold: torch.utils.checkpoint.checkpoint's own
# arguments that YAML can write, and transformers' every_n_layers and offload, each with
# the kind of value it takes.
CHECKPOINT_KWARGS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "use_reentrant": ("true or false", lambda v: isinstance(v, bool)),
    "preserve_rng_state": ("true or false", lambda v: isinstance(v, bool)),
    "determinism_check": ("`default` or `none`", lambda v: v in ("default", "none")),
    "debug": ("true or false", lambda v: isinstance(v, bool)),
    "every_n_layers": (
        "a whole number >= 1",
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    ),
    "offload": ("true or false", lambda v: isinstance(v, bool)),
}


@rule("gradient_checkpointing_kwargs", "gradient_checkpointing")
def _checkpoint_kwargs(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    kwargs = cfg.gradient_checkpointing_kwargs
    if kwargs is None:
        return
    for name, value in kwargs.items():
        if name not in CHECKPOINT_KWARGS:
            close = difflib.get_close_matches(name, CHECKPOINT_KWARGS, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            yield _error(
                f"gradient_checkpointing_kwargs.{name}",
                f"is not an argument of activation checkpointing; it takes "
                f"{', '.join(CHECKPOINT_KWARGS)}.{hint}",
            )
        elif not CHECKPOINT_KWARGS[name][1](value):
            yield _error(
                f"gradient_checkpointing_kwargs.{name}",
                f"should be {CHECKPOINT_KWARGS[name][0]} (got {value!r}).",
            )
    if kwargs.get("use_reentrant") is True:
        for name in ("debug", "determinism_check"):
            if name in kwargs:
                yield _error(
                    f"gradient_checkpointing_kwargs.{name}",
                    "works only with non-reentrant checkpointing (use_reentrant: false).",
                )
    if kwargs and not cfg.gradient_checkpointing:
        yield _warn(
            "gradient_checkpointing_kwargs", "is ignored without `gradient_checkpointing: true`."
        )


@rule("unfrozen_parameters")
def _unfrozen(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    from payload.config.unfrozen import pattern_problem

    if cfg.unfrozen_parameters and cfg.adapter:
        yield _warn(
            "unfrozen_parameters",
            "with an adapter, parameter names start with `base_model.model.`, and only what "
            "the patterns match trains (the LoRA weights too, if not matched, are frozen).",
        )
    for i, pattern in enumerate(cfg.unfrozen_parameters or []):
        if problem := pattern_problem(pattern):
            yield _error(
                f"unfrozen_parameters[{i}]", f"`{pattern}` is not a usable pattern: {problem}."
            )


# The arguments each schedule's transformers function takes besides the optimizer and
# the step counts (transformers 5.24, transformers.optimization).
SCHEDULER_KWARGS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "cosine": ("num_cycles", "eta_min"),  # eta_min: torch's name for min_lr
    "cosine_with_restarts": ("num_cycles",),
    "polynomial": ("lr_end", "power"),
    "constant": (),
    "constant_with_warmup": (),
    "inverse_sqrt": ("timescale",),
    "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate"),
    "warmup_stable_decay": (
        "num_decay_steps",
        "num_stable_steps",
        "warmup_type",
        "decay_type",
        "min_lr_ratio",
        "num_cycles",
    ),
}


@rule("cosine_min_lr_ratio", "lr_scheduler", "lr_scheduler_kwargs")
def _scheduler(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    name, kwargs = cfg.lr_scheduler, cfg.lr_scheduler_kwargs or {}
    cosine = name in ("cosine", "cosine_with_min_lr")
    if cfg.cosine_min_lr_ratio is not None and not cosine:
        yield _warn(
            "cosine_min_lr_ratio",
            f"is ignored with `lr_scheduler: {name}` (it shapes the cosine schedule).",
        )
    takes = SCHEDULER_KWARGS.get(name, ())
    for key in kwargs:
        if key not in takes:
            what = ", ".join(takes) if takes else "none"
            yield _error(
                f"lr_scheduler_kwargs.{key}",
                f"is not an argument of the `{name}` schedule (it takes: {what}).",
            )
    if name == "cosine_with_min_lr" or (name == "cosine" and cfg.cosine_min_lr_ratio is not None):
        floors = [k for k in ("min_lr", "min_lr_rate", "eta_min") if k in kwargs]
        if cfg.cosine_min_lr_ratio is not None:
            floors.append("cosine_min_lr_ratio")
        if len(floors) > 1:
            yield _error(
                "lr_scheduler_kwargs", f"{' and '.join(floors)} each set the floor; set one."
            )
        elif not floors:
            yield _error(
                "lr_scheduler",
                "`cosine_with_min_lr` needs its floor: cosine_min_lr_ratio, or min_lr or "
                "min_lr_rate in lr_scheduler_kwargs.",
            )


@rule("save_strategy", "save_steps", "saves_per_epoch")
def _save_strategy(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    every = cfg.save_steps or cfg.saves_per_epoch
    if cfg.save_strategy == "steps" and not every:
        yield _error(
            "save_strategy",
            "`steps` needs save_steps or saves_per_epoch (Axolotl would fall back to every "
            "500 steps without saying so).",
        )
    elif cfg.save_strategy in ("epoch", "no") and every:
        which = "save_steps" if cfg.save_steps else "saves_per_epoch"
        yield _warn(which, f"is ignored with `save_strategy: {cfg.save_strategy}`.")
    if cfg.save_strategy == "no":
        yield _warn(
            "save_strategy",
            "`no`: no periodic checkpoints. A stop signal or the loss watchdog still saves "
            "one, but a run killed without warning starts again from step 0.",
        )


@rule("lr_scheduler", "lr_quadratic_warmup", "cosine_constant_lr_ratio", "cosine_min_lr_ratio")
def _cosine_shape(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.lr_quadratic_warmup and cfg.lr_scheduler != "cosine":
        yield _warn(
            "lr_quadratic_warmup",
            f"is ignored with `lr_scheduler: {cfg.lr_scheduler}` (it shapes the cosine warmup).",
        )
    if cfg.cosine_constant_lr_ratio is not None and (
        cfg.lr_scheduler != "cosine" or cfg.cosine_min_lr_ratio is None
    ):
        yield _error(
            "cosine_constant_lr_ratio",
            "needs `lr_scheduler: cosine` and cosine_min_lr_ratio (the floor it holds).",
        )


@rule("activation_offloading", "gradient_checkpointing")
def _offloading(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.activation_offloading and not cfg.gradient_checkpointing:
        yield _error(
            "activation_offloading",
            "needs `gradient_checkpointing: true`: what it moves off the GPU is what "
            "checkpointing keeps.",
        )
    if cfg.activation_offloading and cfg.gradient_checkpointing in ("offload", "offload_disk"):
        yield _error(
            "gradient_checkpointing",
            f"`{cfg.gradient_checkpointing}` already chooses activation offloading; set "
            "`gradient_checkpointing: true` beside activation_offloading.",
        )


@rule("torch_compile", "torch_compile_backend", "torch_compile_mode")
def _compile(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.torch_compile is False or cfg.torch_compile is None:
        stray = [k for k in ("torch_compile_backend", "torch_compile_mode") if getattr(cfg, k)]
        if stray:
            yield _warn(", ".join(stray), "is ignored without `torch_compile: true` (or auto).")


@rule(
    "eval_strategy",
    "evaluation_strategy",
    "eval_steps",
    "evals_per_epoch",
    "val_set_size",
    "test_datasets",
    "early_stopping_patience",
)
def _eval_strategy(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    key = "eval_strategy"
    strategy = cfg.eval_strategy
    if cfg.evaluation_strategy is not None:
        if strategy is not None and strategy != cfg.evaluation_strategy:
            yield _error("evaluation_strategy", "and `eval_strategy` disagree; set eval_strategy.")
            return
        if strategy is None:
            key, strategy = "evaluation_strategy", cfg.evaluation_strategy
            yield _warn("evaluation_strategy", "is Axolotl's older name; use eval_strategy.")
    every = "eval_steps" if cfg.eval_steps else "evals_per_epoch" if cfg.evals_per_epoch else None
    if strategy in ("no", "epoch") and every:
        yield _error(key, f"`{strategy}` and {every} disagree; set one.")
    if strategy == "steps" and not every:
        yield _error(key, "`steps` needs eval_steps or evals_per_epoch.")
    has_eval = bool(cfg.val_set_size or cfg.test_datasets)
    if strategy in ("steps", "epoch") and not has_eval:
        yield _warn(key, "is ignored: there is no eval set (val_set_size or test_datasets).")
    if cfg.early_stopping_patience:
        never = strategy == "no" or (strategy is None and cfg.evals_per_epoch == 0 and not every)
        if not has_eval or never:
            yield _error(
                "early_stopping_patience",
                "needs evaluation while training: an eval set (val_set_size or "
                "test_datasets) and eval_strategy other than `no`.",
            )


@rule("save_only_model", "save_safetensors", "resume_from_checkpoint")
def _save_contents(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.save_safetensors is False:
        yield _error(
            "save_safetensors",
            "false is not possible: transformers 5 always saves weights as safetensors.",
        )
    if cfg.save_only_model:
        yield _warn(
            "save_only_model",
            "checkpoints hold no optimizer or scheduler state, so a stopped run cannot "
            "resume from them; it starts again from step 0.",
        )


@rule("group_by_length", "sample_packing")
def _group_by_length(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.group_by_length and cfg.sample_packing:
        yield _warn(
            "group_by_length",
            "is ignored with sample_packing: packed rows are all sequence_len long.",
        )


@rule("dataset_exact_deduplication", "streaming")
def _deduplication(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.dataset_exact_deduplication and cfg.streaming and cfg.pretraining_dataset:
        yield _warn(
            "dataset_exact_deduplication",
            "is ignored for a streamed pretraining_dataset (rows are read as training goes).",
        )


@rule("adam_beta1", "adam_beta2", "adam_epsilon", "optimizer")
def _adam(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    set_ = [k for k in ("adam_beta1", "adam_beta2", "adam_epsilon") if getattr(cfg, k) is not None]
    if set_ and "adam" not in cfg.optimizer.lower():
        yield _warn(
            ", ".join(set_), f"is ignored by `optimizer: {cfg.optimizer}`, which is not Adam."
        )


@rule("loss_watchdog_threshold", "loss_watchdog_patience")
def _loss_watchdog(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.loss_watchdog_patience is not None and cfg.loss_watchdog_threshold is None:
        yield _warn("loss_watchdog_patience", "is ignored without `loss_watchdog_threshold`.")


@rule("base_model")
def _base_model_required(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if not cfg.base_model:
        yield _error("base_model", "is required: a local model folder or a hub id.")


@rule("learning_rate")
def _learning_rate_required(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.learning_rate is None:
        yield _error("learning_rate", "is required, e.g. `learning_rate: 2.0e-4`.")


@rule("datasets", "test_datasets", "pretraining_dataset", "rl", "reward_model")
def _datasets(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if not cfg.datasets and not cfg.pretraining_dataset:
        yield _error("datasets", "is required: at least one dataset to train on.")
    for key, entries in (("datasets", cfg.datasets), ("test_datasets", cfg.test_datasets)):
        for i, ds in enumerate(entries):
            # A reward model's rows are checked as the `reward` family of pair formats.
            yield from _dataset(
                f"{key}[{i}]", ds, cfg.rl or ("reward" if cfg.reward_model else None)
            )
    for i, ds in enumerate(cfg.pretraining_dataset or []):
        if ds.type not in (None, "pretrain", "completion"):
            yield _error(
                f"pretraining_dataset[{i}].type",
                f"`{ds.type}` cannot be streamed as raw text; use `pretrain` (or leave it out).",
            )


def _dataset(where: str, ds: DatasetConfig, rl: str | None) -> Iterator[Finding]:
    family = preference_family(rl)
    if family == "grpo":
        return  # prompt rows or a transform function: the GRPO rules below check them
    if family in SUPPORTED_PREFERENCE_TYPES:
        known = SUPPORTED_PREFERENCE_TYPES[family]
        name = "user_defined" if isinstance(ds.type, dict) else ds.type
        if name is None or name not in known:
            what = "is required" if name is None else f"`{name}` is not a {family} format"
            yield _error(f"{where}.type", f"{what}; {family} formats: {', '.join(known)}.")
        elif isinstance(ds.type, dict):
            for problem in user_defined_problems(ds.type, family):
                yield _error(f"{where}.{problem.key}", f"{problem.message}.")
        return
    if ds.type is None:
        yield _error(
            f"{where}.type", f"is required; supported: {', '.join(SUPPORTED_DATASET_TYPES)}."
        )
        return
    name = ds.type_name
    if name not in SUPPORTED_DATASET_TYPES:
        close = difflib.get_close_matches(name, SUPPORTED_DATASET_TYPES, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        if ds.type in SUPPORTED_PREFERENCE_TYPES["reward"]:
            hint = "its pairs train a reward model: set `reward_model: true`; "
        yield _error(
            f"{where}.type",
            f"`{ds.type}` is not a prompt strategy Ferry knows; {hint}"
            f"supported: {', '.join(SUPPORTED_DATASET_TYPES)}.",
        )
        return
    if isinstance(ds.type, dict):
        for problem in user_defined_problems(ds.type):
            yield _error(f"{where}.{problem.key}", f"{problem.message}.")
    elif "." in ds.type:
        loader = ds.type.split(".", 1)[1]
        loaders = DATASET_TYPE_LOADERS.get(name, ())
        if loader not in loaders:
            choices = f"one of: {', '.join(loaders)}" if loaders else "none"
            yield _error(
                f"{where}.type",
                f"`{ds.type}`: `{name}` has no loader `{loader}` ({choices}).",
            )
    alpaca_fields = ds.field_instruction or ds.field_input or ds.field_output
    if name in ("completion", "pretrain") and alpaca_fields:
        yield _warn(where, f"field_instruction/input/output are ignored by `{name}`.")
    if name.startswith("alpaca") and ds.field:
        yield _warn(f"{where}.field", "is ignored by `alpaca` (use field_instruction...).")
    chat_keys = [
        k
        for k in ("field_messages", "roles_to_train", "train_on_eos", "train_on_eot", "roles")
        if getattr(ds, k) is not None
    ]
    if chat_keys and name not in ("chat_template", "sharegpt"):
        yield _warn(f"{where}.{chat_keys[0]}", f"is ignored by `{name}` (chat_template only).")
    yield from _thinking_keys(where, ds, name)
    if (ds.chat_template == "jinja") != bool(ds.chat_template_jinja):
        yield _error(
            f"{where}.chat_template_jinja",
            "goes with `chat_template: jinja`: set both or neither.",
        )
    if ds.shards_idx is not None and ds.shards is None:
        yield _warn(f"{where}.shards_idx", "is ignored without `shards`.")
    if ds.shards is not None and (ds.shards_idx or 0) >= ds.shards:
        yield _error(f"{where}.shards_idx", f"must be below shards ({ds.shards}).")


def _thinking_keys(where: str, ds: DatasetConfig, name: str) -> Iterator[Finding]:
    """`field_thinking` / `template_thinking_key`: chat only, and not the message's
    own role or content (the trace would overwrite it)."""
    given = [k for k in ("field_thinking", "template_thinking_key") if getattr(ds, k)]
    if given and name not in ("chat_template", "sharegpt"):
        yield _warn(f"{where}.{given[0]}", f"is ignored by `{name}` (chat_template only).")
    if ds.template_thinking_key in ("role", "content"):
        yield _error(
            f"{where}.template_thinking_key",
            f"`{ds.template_thinking_key}` is the message's own key; name the one the chat "
            "template reads the reasoning trace from (e.g. reasoning_content, thinking).",
        )


@rule("chat_template", "chat_template_jinja")
def _chat_template(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if (cfg.chat_template == "jinja") != bool(cfg.chat_template_jinja):
        yield _error(
            "chat_template_jinja", "goes with `chat_template: jinja`: set both or neither."
        )


@rule("pretraining_dataset", "streaming", "max_steps")
def _streaming(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.streaming and not cfg.pretraining_dataset:
        yield _warn("streaming", "only applies to `pretraining_dataset`; ignored.")
    if cfg.streaming and cfg.pretraining_dataset and not cfg.max_steps:
        yield _error(
            "max_steps", "is required with `streaming: true`: a stream has no length to count."
        )


@rule("dataset_shard_num", "dataset_shard_idx")
def _dataset_shards(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.dataset_shard_num and (cfg.dataset_shard_idx or 0) >= cfg.dataset_shard_num:
        yield _error(
            "dataset_shard_idx", f"must be below dataset_shard_num ({cfg.dataset_shard_num})."
        )


@rule("dataset_processes", "dataset_num_proc")
def _processes(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if (
        cfg.dataset_processes
        and cfg.dataset_num_proc
        and cfg.dataset_processes != cfg.dataset_num_proc
    ):
        yield _error("dataset_num_proc", "and `dataset_processes` disagree; set one.")


@rule("val_set_size", "test_datasets")
def _eval_data(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.val_set_size and cfg.test_datasets:
        yield _error("val_set_size", "and `test_datasets` both choose the eval set; set one.")


@rule(
    "sample_packing",
    "eval_sample_packing",
    "sample_packing_sequentially",
    "sample_packing_eff_est",
    "streaming",
)
def _packing(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.sample_packing_eff_est is not None:
        yield _warn(
            "sample_packing_eff_est",
            "is ignored: rows are packed before training and the step count is exact.",
        )
    if cfg.sample_packing and cfg.streaming and cfg.pretraining_dataset:
        yield _error(
            "sample_packing",
            "needs the whole train set up front; a streamed pretraining_dataset is already "
            "cut into full sequence_len blocks, so turn packing off.",
        )
    if not cfg.sample_packing:
        if cfg.eval_sample_packing:
            yield _warn("eval_sample_packing", "is ignored without `sample_packing: true`.")
        if cfg.sample_packing_sequentially:
            yield _warn("sample_packing_sequentially", "is ignored without `sample_packing`.")


@rule("adapter", "load_in_4bit", "load_in_8bit")
def _quantisation(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        yield _error(
            "adapter", "`qlora` needs `load_in_4bit: true` (QLoRA trains on a 4-bit base)."
        )
    if cfg.load_in_4bit and cfg.load_in_8bit:
        yield _error("load_in_4bit", "and `load_in_8bit` cannot both be true.")
    if cfg.load_in_4bit and cfg.adapter != "qlora":
        yield _error(
            "load_in_4bit", "needs `adapter: qlora`; a 4-bit base cannot be trained in full."
        )
    if cfg.load_in_8bit and cfg.adapter is None:
        yield _error(
            "load_in_8bit", "needs `adapter: lora`; an 8-bit base cannot be trained in full."
        )


@rule(
    "adapter",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_linear",
    "lora_modules_to_save",
    "peft_use_rslora",
    "peft_use_dora",
)
def _lora_without_adapter(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.adapter is None:
        stray = sorted(k for k in given if k.startswith(("lora_", "peft_use_")))
        if stray:
            yield _warn(
                ", ".join(stray), "ignored: no `adapter` is set, so this is a full fine-tune."
            )


@rule("lora_target_parameters", "lora_dropout")
def _target_parameters(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.lora_target_parameters and cfg.lora_dropout:
        yield _error(
            "lora_dropout",
            "must be 0 with `lora_target_parameters`: peft adapts a bare parameter with "
            "no input of its own to drop out.",
        )


@rule("tokenizer_use_fast", "low_cpu_mem_usage", "experimental_skip_move_to_device")
def _always_on_in_transformers_5(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    # What these ask for when false no longer exists: transformers 5 (which Axolotl 0.21
    # uses too) ignores it, and so does Ferry, saying so.
    if cfg.tokenizer_use_fast is False:
        yield _warn(
            "tokenizer_use_fast",
            "`false` is ignored: transformers 5 has only the fast (`tokenizers`) "
            "tokenizer and drops use_fast.",
        )
    if cfg.low_cpu_mem_usage is False:
        yield _warn(
            "low_cpu_mem_usage",
            "`false` is ignored: transformers 5 always loads the weights straight into an "
            "empty model.",
        )
    if cfg.experimental_skip_move_to_device is False:
        yield _warn(
            "experimental_skip_move_to_device",
            "`false` is ignored: Ferry leaves the loaded model where it is and the trainer "
            "places it (Axolotl's default); the early move to the GPU it asks for only "
            "changes peak memory before FSDP sharding.",
        )


@rule(
    "tokenizer_use_mistral_common",
    "tokenizer_type",
    "tokenizer_legacy",
    "special_tokens",
    "chat_template",
    "chat_template_jinja",
    "datasets",
    "test_datasets",
    "pretraining_dataset",
)
def _mistral_common(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if not cfg.tokenizer_use_mistral_common:
        return
    why = (
        "a mistral-common tokenizer has no Jinja chat template and gives no character "
        "offsets, which Ferry's chat strategies need to find and label each turn"
    )
    for key in ("chat_template", "chat_template_jinja"):
        if getattr(cfg, key):
            yield _error(key, f"cannot be used with `tokenizer_use_mistral_common`: {why}.")
    for key in ("datasets", "test_datasets", "pretraining_dataset"):
        for i, ds in enumerate(getattr(cfg, key) or []):
            if ds.type_name in ("chat_template", "sharegpt"):
                yield _error(
                    f"{key}[{i}].type",
                    f"`{ds.type}` cannot be used with `tokenizer_use_mistral_common`: {why}. "
                    "Use completion, pretrain, input_output or an alpaca format, or the "
                    "model's transformers tokenizer.",
                )
    if cfg.special_tokens:
        yield _error(
            "special_tokens",
            "cannot be set with `tokenizer_use_mistral_common`: a mistral-common tokenizer "
            "takes no added tokens (its bos, eos and pad are its own).",
        )
    if cfg.tokenizer_type:
        yield _error(
            "tokenizer_type",
            "cannot be set with `tokenizer_use_mistral_common`, which chooses the tokenizer.",
        )
    if cfg.tokenizer_legacy is not None:
        yield _warn("tokenizer_legacy", "is ignored by a mistral-common tokenizer.")


@rule("warmup_steps", "warmup_ratio")
def _warmup(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        yield _error("warmup_steps", "and `warmup_ratio` are exclusive; set one.")


@rule("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
def _lora_kernels(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    """Ferry's fused LoRA layers (payload/kernels) run plain LoRA on unquantized weights,
    in one process per model copy; the model's own structure is checked when it loads."""
    asked = [k for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel") if getattr(cfg, k)]
    if not asked:
        return
    key = asked[0]
    if cfg.adapter != "lora" or cfg.load_in_4bit or cfg.load_in_8bit:
        yield _error(
            key,
            "runs LoRA on unquantized base weights: it needs `adapter: lora` without "
            "load_in_4bit or load_in_8bit.",
        )
    if cfg.lora_dropout:
        yield _error(key, f"needs `lora_dropout: 0` (it is {cfg.lora_dropout}): the fused "
                     "layers keep no dropout mask.")  # fmt: skip
    if cfg.peft_use_dora:
        yield _error(key, "does not run DoRA (peft_use_dora).")
    if cfg.lora_target_parameters:
        yield _error(key, "does not run LoRA on parameters (lora_target_parameters).")
    sharded = [
        name
        for name, on in (
            ("fsdp_config", bool(cfg.fsdp_config)),
            ("deepspeed", bool(cfg.deepspeed)),
            ("tensor_parallel_size", (cfg.tensor_parallel_size or 1) > 1),
            ("context_parallel_size", (cfg.context_parallel_size or 1) > 1),
        )
        if on
    ]
    if sharded:
        yield _error(key, f"is not combined with {sharded[0]} yet.")
    act = None
    from payload.config.paths import model_config_json

    found = model_config_json(cfg)
    if found and "lora_mlp_kernel" in asked:
        act = found.get("hidden_activation") or found.get("hidden_act")
        if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new"):
            yield _error(
                "lora_mlp_kernel",
                f"fuses a SiLU or GELU MLP; this model's activation is {act!r}.",
            )


@rule("fsdp_config", "deepspeed")
def _sharding(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.fsdp_config and cfg.deepspeed:
        yield _error("fsdp_config", "and `deepspeed` are exclusive; pick one way to shard.")


@rule("bf16", "fp16")
def _precision(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.bf16 is True and cfg.fp16:
        yield _error("bf16", "and `fp16` cannot both be true.")


@rule("save_steps", "saves_per_epoch", "eval_steps", "evals_per_epoch", "val_set_size")
def _schedules(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.save_steps and cfg.saves_per_epoch:
        yield _error("save_steps", "and `saves_per_epoch` are exclusive; set one.")
    if cfg.eval_steps and cfg.evals_per_epoch:
        yield _error("eval_steps", "and `evals_per_epoch` are exclusive; set one.")
    if not (cfg.val_set_size or cfg.test_datasets) and (cfg.eval_steps or cfg.evals_per_epoch):
        key = "eval_steps" if cfg.eval_steps else "evals_per_epoch"
        yield _warn(key, "ignored: there is no eval set (val_set_size or test_datasets).")


@rule(
    "flash_attention",
    "sdp_attention",
    "flex_attention",
    "attn_implementation",
    "flex_attn_compile_kwargs",
    "context_parallel_size",
)
def _attention(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    from payload.config.attention import findings  # every backend, stated in one place

    yield from findings(cfg)


@rule(
    "processor_type",
    "processor_kwargs",
    "skip_prepare_dataset",
    "remove_unused_columns",
    "freeze_mm_modules",
    "image_size",
    "image_resize_algorithm",
    "sample_packing",
    "rl",
    "datasets",
    "test_datasets",
    "context_parallel_size",
    "group_by_length",
    "dataset_exact_deduplication",
    "dataset_shard_num",
    "excess_length_strategy",
)
def _multimodal(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    from payload.config.multimodal import findings  # vision-language keys, in one place

    yield from findings(cfg, given)


# Axolotl 0.21's `rl:` values (its RLType).
AXOLOTL_RL = ("dpo", "gdpo", "grpo", "ipo", "orpo", "kto", "simpo", "ebft")


@rule("rl")
def _not_yet(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    # Recognised keys whose feature is still being built: refuse rather than ignore.
    if cfg.rl and cfg.rl.lower() not in RL_OBJECTIVES:
        # Axolotl's objectives Ferry lacks (gdpo, ebft) are not typos of the ones it has.
        close = difflib.get_close_matches(cfg.rl.lower(), RL_OBJECTIVES, n=1, cutoff=0.7)
        guess = f"did you mean `{close[0]}`? " if close and cfg.rl not in AXOLOTL_RL else ""
        yield _error(
            "rl",
            f"`{cfg.rl}` is not an objective Ferry trains; {guess}it trains "
            f"{', '.join(RL_OBJECTIVES)} (and supervised fine-tuning without `rl:`).",
        )


@rule("storage", "resume_from_checkpoint")
def _storage(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    wanted = cfg.resume_from_checkpoint
    if not cfg.storage and not (wanted and "://" in wanted):
        return
    # Imported only for a config that names a URI: the storage package (hashlib, the
    # transfer code) would add ~8 ms to every `launch validate`.
    from payload.storage.stores import check_uri

    if cfg.storage and (problem := check_uri(cfg.storage)):
        yield _error("storage", f"{problem}.")
    if wanted and "://" in wanted and (problem := check_uri(wanted)):
        yield _error("resume_from_checkpoint", f"{problem}.")


@rule("max_steps", "num_epochs")
def _length(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.max_steps and "num_epochs" in given:
        yield _warn("num_epochs", f"ignored: `max_steps: {cfg.max_steps}` decides the length.")


@rule("optimizer")
def _optimizer(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if cfg.optimizer not in OPTIMIZERS:
        close = difflib.get_close_matches(cfg.optimizer, OPTIMIZERS, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"one of: {', '.join(OPTIMIZERS)}."
        yield _error(
            "optimizer", f"`{cfg.optimizer}` is not an optimizer transformers knows; {hint}"
        )


# ---- objectives (payload/trainers): each block's rules below its own marker.
# ---- rules: preference objectives
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "simpo", "kto", "orpo")
# TRL 1.16's DPOConfig.loss_type values (its docstring and DPOTrainer's dispatch).
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# The DPO losses that read label_smoothing (TRL 1.16's DPOTrainer.loss).
DPO_SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")
# Which objectives read each key; set for another, the key would be ignored.
_PREFERENCE_KEYS = {
    "dpo_loss_type": ("dpo",),
    "dpo_loss_weights": ("dpo",),
    "dpo_label_smoothing": ("dpo",),
    "precompute_ref_log_probs": ("dpo", "ipo", "kto"),
    "simpo_gamma": ("simpo",),
    "cpo_alpha": ("simpo",),
    "kto_desirable_weight": ("kto",),
    "kto_undesirable_weight": ("kto",),
    "orpo_alpha": ("orpo",),
    "rl_beta": ("dpo", "ipo", "simpo", "kto", "orpo", "grpo"),  # GRPO too, as in Axolotl
    "dpo_use_weighting": ("dpo", "ipo"),  # DPOConfig.use_weighting, whatever the loss
}


@rule("rl", *_PREFERENCE_KEYS, "trl", "sample_packing", "pretraining_dataset", "micro_batch_size")
def _preference(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    objective = (cfg.rl or "").lower()
    for key, readers in _PREFERENCE_KEYS.items():
        if getattr(cfg, key) is not None and objective not in readers:
            yield _warn(key, f"ignored: only `rl:` {' or '.join(readers)} reads it.")
    trl_beta = cfg.trl.beta if cfg.trl is not None else None
    if objective in (*PREFERENCE_OBJECTIVES, "grpo"):
        if trl_beta is not None and cfg.rl_beta is not None and trl_beta != cfg.rl_beta:
            yield _error("rl_beta", f"({cfg.rl_beta}) and trl.beta ({trl_beta}) differ; set one.")
    elif trl_beta is not None:
        yield _warn("trl.beta", "ignored: only `rl:` objectives read it.")
    if objective not in PREFERENCE_OBJECTIVES:
        return
    if trl_beta == 0:
        yield _error(
            "trl.beta",
            f"must be above 0 with `rl: {objective}`: the loss divides by it (IPO) or it "
            "scales every reward to nothing (the others). 0 means no reference model only "
            "for GRPO.",
        )
    if cfg.sample_packing:
        yield _error(
            "sample_packing",
            f"does not apply to `rl: {objective}`: the trainer batches each prompt with its "
            "answers itself. Remove it.",
        )
    if cfg.pretraining_dataset:
        yield _error(
            "pretraining_dataset",
            f"is raw text; `rl: {objective}` trains on preference rows under `datasets`.",
        )
    if objective == "kto" and cfg.micro_batch_size < 2:
        yield _error(
            "micro_batch_size",
            "must be at least 2 with `rl: kto`: KTO estimates its KL term from the other "
            "rows of each batch.",
        )
    losses = cfg.dpo_loss_type or ["sigmoid"]
    if objective == "dpo":
        for loss in losses:
            if loss not in DPO_LOSS_TYPES:
                yield _error(
                    "dpo_loss_type",
                    f"`{loss}` is not a DPO loss TRL has; one of: {', '.join(DPO_LOSS_TYPES)}.",
                )
        smoothed = [loss for loss in losses if loss in DPO_SMOOTHED_LOSSES]
        if cfg.dpo_label_smoothing and not smoothed:
            # A warning, not an error: Axolotl passes it on and TRL ignores it, so the
            # configs written for Axolotl run as they did there.
            yield _warn(
                "dpo_label_smoothing",
                f"is read only by the DPO losses {', '.join(DPO_SMOOTHED_LOSSES)} in TRL 1.16 "
                "(its sigmoid loss no longer smooths); with dpo_loss_type "
                f"[{', '.join(losses)}] it is ignored. For conservative DPO set "
                "`dpo_loss_type: [robust]`.",
            )
        weights = cfg.dpo_loss_weights
        if weights is not None and len(weights) != len(losses):
            yield _error(
                "dpo_loss_weights",
                f"has {len(weights)} weights for {len(losses)} losses in dpo_loss_type "
                f"({', '.join(losses)}); give one per loss.",
            )


# ---- rules: GRPO
@rule(
    "rl",
    "trl",
    "datasets",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "launch",
    "sequence_len",
)
def _grpo(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    """GRPO's settings that TRL would refuse only once the model is loaded, and `trl:`
    keys set for an objective that does not read them. The reward functions and prompt
    transforms are imported and checked where files are found (payload.config.rewards,
    called from paths.resolve: it needs the config's folder)."""
    trl = cfg.trl
    if (cfg.rl or "").lower() != "grpo":
        if trl is not None:
            unread = sorted(k for k in trl.model_fields_set if k != "beta")
            if unread:
                yield _warn(f"trl.{unread[0]}", "ignored: only `rl: grpo` reads trl: settings.")
        return
    if "sequence_len" in given:
        yield _warn(
            "sequence_len",
            "ignored with `rl: grpo`: TRL 1.16's GRPO does not cut prompts; "
            "trl.max_completion_length limits what it generates.",
        )
    if trl is None or not trl.reward_funcs:
        yield _error(
            "trl.reward_funcs",
            "is required with `rl: grpo`: at least one reward function as `module.function` "
            "(e.g. `rewards.my_reward` for my_reward in rewards.py next to the config).",
        )
        return
    if trl.reward_weights is not None and len(trl.reward_weights) != len(trl.reward_funcs):
        yield _error(
            "trl.reward_weights",
            f"has {len(trl.reward_weights)} weights for {len(trl.reward_funcs)} reward "
            "functions; give one per function.",
        )
    group = trl.num_generations or 8  # TRL's default
    if trl.generation_batch_size is not None:
        if trl.generation_batch_size % group:
            yield _error(
                "trl.generation_batch_size",
                f"({trl.generation_batch_size}) must be a multiple of num_generations "
                f"({group}): each prompt's completions are generated together.",
            )
        if trl.generation_batch_size % cfg.micro_batch_size:
            yield _error(
                "trl.generation_batch_size",
                f"({trl.generation_batch_size}) must be a multiple of micro_batch_size "
                f"({cfg.micro_batch_size}).",
            )
    elif (cfg.micro_batch_size * cfg.gradient_accumulation_steps) % group:
        # The generation batch is micro_batch_size x GPUs x accumulation; on one GPU it
        # must hold whole groups. More GPUs may fix it, so this is only a warning.
        yield _warn(
            "trl.num_generations",
            f"({group}) does not divide micro_batch_size x gradient_accumulation_steps "
            f"({cfg.micro_batch_size * cfg.gradient_accumulation_steps}); on one GPU TRL "
            "refuses this. Set trl.generation_batch_size to a multiple of both.",
        )
    if trl.sync_ref_model and not (trl.beta if trl.beta is not None else cfg.rl_beta):
        yield _error(
            "trl.sync_ref_model",
            "needs `trl.beta` (or `rl_beta`) above 0: with beta 0 there is no reference "
            "model to sync.",
        )
    if trl.sync_ref_model and cfg.adapter:
        yield _error(
            "trl.sync_ref_model",
            "does not work with an adapter (the reference is the base with the adapter "
            "off); leave it out or train without `adapter`.",
        )
    ref_keys = [
        k for k in ("ref_model_sync_steps", "ref_model_mixup_alpha") if k in trl.model_fields_set
    ]
    if ref_keys and not trl.sync_ref_model:
        yield _warn(f"trl.{ref_keys[0]}", "ignored without `trl.sync_ref_model: true`.")
    yield from _vllm(cfg)
    for i, ds in enumerate(cfg.datasets):
        if isinstance(ds.type, dict):
            yield _error(
                f"datasets[{i}].type",
                "GRPO rows need a `prompt` column, or `type: module.function` naming a "
                "function that maps a row to {'prompt': ...}.",
            )


def _vllm(cfg: TrainConfig) -> Iterator[Finding]:
    trl = cfg.trl
    assert trl is not None
    vllm_keys = [
        k for k in trl.model_fields_set if k.startswith("vllm_") and getattr(trl, k) is not None
    ]
    if not trl.use_vllm:
        if vllm_keys:
            yield _warn(f"trl.{sorted(vllm_keys)[0]}", "ignored without `trl.use_vllm: true`.")
        return
    image = cfg.launch.image if cfg.launch else None
    in_image = bool(image and "vllm" in image.extras)
    import importlib.util

    if not in_image and importlib.util.find_spec("vllm") is None:
        yield _error(
            "trl.use_vllm",
            "needs vLLM, which is neither installed here nor in the run's image. Add it to "
            "the image (`launch: {image: {extras: [vllm]}}`) for a cloud run, install it "
            "(`pip install vllm`, on a machine with a GPU) for a local one, or set "
            "`use_vllm: false` to generate with transformers.",
        )
    mode = trl.vllm_mode or "colocate"
    server = ("vllm_server_host", "vllm_server_port", "vllm_server_timeout")
    if mode == "colocate" and (stray := [k for k in server if k in vllm_keys]):
        yield _warn(f"trl.{stray[0]}", "ignored with `vllm_mode: colocate` (server mode only).")
    if mode == "server" and "vllm_gpu_memory_utilization" in vllm_keys:
        yield _warn(
            "trl.vllm_gpu_memory_utilization",
            "ignored with `vllm_mode: server`: the server has its own share, "
            "`vllm.gpu_memory_utilization` for the server the job starts.",
        )
    from payload.config import vllm

    if vllm.self_started(cfg):
        # The server loads base_model from disk; TRL then sends it the trained weights,
        # but not a config or tokenizer that differ from the one on disk.
        apart = [
            key
            for key, value in (
                ("model_config", cfg.overrides_of_model_config),
                ("base_model_config", cfg.base_model_config),
                ("tokenizer_config", cfg.tokenizer_config),
            )
            if value
        ]
        if apart:
            yield _warn(
                apart[0],
                "does not reach the vLLM server the job starts: it loads `base_model` as it is "
                "on disk, so it generates with another config or tokenizer than the trainer "
                "has. Leave it out, or generate with transformers (no `use_vllm`).",
            )


@rule("vllm", "trl", "rl")
def _vllm_server(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    """The `vllm:` section describes the server a GRPO job starts itself in server mode
    (payload.config.vllm); anywhere else nothing reads it. The GPU split, which needs the
    run's GPU count, is checked by the executors (`split_problems`)."""
    from payload.config import vllm

    v = cfg.vllm
    if v is None:
        return
    trl = cfg.trl
    if not vllm.self_started(cfg):
        if (cfg.rl or "").lower() != "grpo" or trl is None or not trl.use_vllm:
            why = "only GRPO with `trl.use_vllm: true` and `trl.vllm_mode: server` reads it"
        elif trl.vllm_mode != "server":
            why = (
                "it describes the server of `trl.vllm_mode: server`; colocate mode runs vLLM in "
                "the training processes (its share: trl.vllm_gpu_memory_utilization)"
            )
        else:
            why = (
                f"`trl.vllm_server_host` ({trl.vllm_server_host}) names another machine, whose "
                "server is yours to start; the job starts one itself only when that key is "
                f"unset or one of {', '.join(vllm.LOCAL_HOSTS)}"
            )
        yield _warn("vllm", f"ignored: {why}.")
        return
    if v.host is not None and v.host not in vllm.BIND_HOSTS:
        yield _error(
            "vllm.host",
            f"({v.host}): the server the job starts runs on the training node and the trainer "
            f"connects to it there; bind {' or '.join(vllm.BIND_HOSTS)} (default 127.0.0.1).",
        )
    if v.port is not None and trl and trl.vllm_server_port not in (None, v.port):
        yield _error(
            "vllm.port",
            f"({v.port}) and trl.vllm_server_port ({trl.vllm_server_port}) are the port of the "
            "same server (the one the job starts, and the one the trainer connects to); set one.",
        )


def grpo_rank_problems(cfg: TrainConfig, ranks: int) -> list[str]:
    """GRPO's batch shapes on `ranks` training processes in all (TRL's GRPOConfig refuses
    these only once the model is loaded): known to the executors, which know the GPUs
    and how many of them a self-started vLLM server keeps from training."""
    trl = cfg.trl
    if (cfg.rl or "").lower() != "grpo" or trl is None:
        return []
    group = trl.num_generations or 8  # TRL's default
    global_batch = cfg.micro_batch_size * ranks
    if trl.generation_batch_size is not None:
        if trl.generation_batch_size % global_batch:
            return [
                f"trl.generation_batch_size ({trl.generation_batch_size}) must be a multiple of "
                f"micro_batch_size x training ranks ({cfg.micro_batch_size} x {ranks} = "
                f"{global_batch}): each rank takes whole micro-batches of it."
            ]
        return []
    generated = global_batch * cfg.gradient_accumulation_steps
    if generated % group:
        return [
            f"trl.num_generations ({group}) must divide the generation batch, micro_batch_size "
            f"x training ranks x gradient_accumulation_steps ({cfg.micro_batch_size} x {ranks} "
            f"x {cfg.gradient_accumulation_steps} = {generated}); set trl.generation_batch_size "
            f"to a multiple of both {group} and {global_batch}."
        ]
    return []


# ---- rules: reward models
@rule(
    "reward_model",
    "process_reward_model",
    "rl",
    "sample_packing",
    "num_labels",
    "center_rewards_coefficient",
    "model_type",
)
def _reward_models(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    reward, process = bool(cfg.reward_model), bool(cfg.process_reward_model)
    which = "reward_model" if reward else "process_reward_model"
    if reward and process:
        yield _error(
            "process_reward_model",
            "and `reward_model` are two different models (one score per sequence, or one "
            "label per step); set one.",
        )
    if (reward or process) and cfg.rl:
        yield _error("rl", f"and `{which}: true` are two objectives; set one.")
    if (reward or process) and cfg.sample_packing:
        yield _error(
            "sample_packing",
            f"cannot be used with `{which}`: a packed row holds several examples, and the "
            "reward head scores one sequence (or one example's steps) per row; set "
            "sample_packing: false.",
        )
    if cfg.num_labels is not None:
        if not (reward or process):
            yield _error(
                "num_labels",
                "sets the outputs of a reward head; it needs `reward_model: true` or "
                "`process_reward_model: true`.",
            )
        elif reward and cfg.num_labels != 1:
            yield _error(
                "num_labels",
                f"is {cfg.num_labels}, but a reward model gives one score per sequence "
                "(TRL's RewardTrainer takes num_labels: 1 only); leave it out or set 1.",
            )
        elif process and not reward and cfg.num_labels < 2:
            yield _error(
                "num_labels",
                "must be at least 2 for a process reward model: each step is labelled 0 "
                "(wrong) or 1 (right).",
            )
    if cfg.center_rewards_coefficient is not None and not reward:
        yield _error(
            "center_rewards_coefficient",
            "is a reward-model setting; it needs `reward_model: true`.",
        )
    head = {
        "reward_model": "AutoModelForSequenceClassification",
        "process_reward_model": "AutoModelForTokenClassification",
    }
    if (reward or process) and cfg.model_type and cfg.model_type != head[which]:
        yield _error(
            "model_type",
            f"is `{cfg.model_type}`, but `{which}` trains a {head[which]} head; leave "
            "model_type out.",
        )


@rule("process_reward_model", "reward_model", "datasets", "test_datasets", "pretraining_dataset")
def _process_reward_rows(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    process = bool(cfg.process_reward_model)
    for key, entries in (("datasets", cfg.datasets), ("test_datasets", cfg.test_datasets)):
        for i, ds in enumerate(entries):
            stepwise = ds.type == "stepwise_supervised"
            if stepwise and not process and not cfg.rl and not cfg.reward_model:
                yield _error(
                    f"{key}[{i}].type",
                    "`stepwise_supervised` rows label reasoning steps right or wrong: they "
                    "train a process reward model; set `process_reward_model: true`.",
                )
            elif process and not stepwise and ds.type is not None:
                yield _error(
                    f"{key}[{i}].type",
                    f"`{ds.type}` rows cannot train a process reward model; it trains on "
                    "`stepwise_supervised` rows (prompt, completions, labels).",
                )
    if (cfg.reward_model or process) and cfg.pretraining_dataset:
        which = "reward_model" if cfg.reward_model else "process_reward_model"
        yield _error(
            "pretraining_dataset",
            f"is raw text, which has nothing for `{which}` to learn from; use datasets.",
        )
    if cfg.reward_model and cfg.dataset_prepared_path:
        yield _warn(
            "dataset_prepared_path",
            "is not used by reward_model: its pairs are tokenized at the start of each run.",
        )


# ---- rules: QLoRA
# BitsAndBytesConfig's settings (transformers 5), with what each accepts; the rest of its
# fields are derived. load_in_4bit/load_in_8bit are top-level keys of their own.
_BNB_SETTINGS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "llm_int8_threshold": ("a number", lambda v: isinstance(v, int | float)),
    "llm_int8_skip_modules": (
        "a list of module names",
        lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    ),
    "llm_int8_enable_fp32_cpu_offload": ("true or false", lambda v: isinstance(v, bool)),
    "llm_int8_has_fp16_weight": ("true or false", lambda v: isinstance(v, bool)),
    "bnb_4bit_compute_dtype": (
        "float32, bfloat16 or float16",
        lambda v: v in ("float32", "bfloat16", "float16"),
    ),
    "bnb_4bit_quant_type": ("nf4 or fp4", lambda v: v in ("nf4", "fp4")),
    "bnb_4bit_use_double_quant": ("true or false", lambda v: isinstance(v, bool)),
    "bnb_4bit_quant_storage": (
        "uint8, bfloat16, float16 or float32",
        lambda v: v in ("uint8", "bfloat16", "float16", "float32"),
    ),
}
# Settings bitsandbytes reads only for 8-bit layers.
_BNB_8BIT_ONLY = ("llm_int8_threshold", "llm_int8_has_fp16_weight")


@rule("load_in_4bit", "load_in_8bit", "bnb_config_kwargs")
def _bitsandbytes(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    extra = dict(cfg.bnb_config_kwargs or {})
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        if extra:
            yield _warn(
                "bnb_config_kwargs",
                "ignored: the base is not quantized (set `load_in_4bit` or `load_in_8bit`).",
            )
        return
    for key, value in extra.items():
        where = f"bnb_config_kwargs.{key}"
        if key in ("load_in_4bit", "load_in_8bit"):
            yield _error(where, f"set the top-level `{key}` instead.")
        elif key not in _BNB_SETTINGS:
            close = difflib.get_close_matches(key, _BNB_SETTINGS, n=1)
            hint = (
                f"did you mean `{close[0]}`?" if close else f"one of: {', '.join(_BNB_SETTINGS)}."
            )
            yield _error(where, f"is not a bitsandbytes setting; {hint}")
        elif not _BNB_SETTINGS[key][1](value):
            yield _error(where, f"must be {_BNB_SETTINGS[key][0]}, not {value!r}.")
        elif cfg.load_in_8bit and key.startswith("bnb_4bit_"):
            yield _warn(where, "ignored: it sets 4-bit layers, and `load_in_8bit` is on.")
        elif cfg.load_in_4bit and key in _BNB_8BIT_ONLY:
            yield _warn(where, "ignored: it sets 8-bit layers, and `load_in_4bit` is on.")


# ---- rules: after training
# What `launch quantize` builds for each (weights, activations) pair: the rest are refused
# here, by name, before any model is loaded. Which of these run on which device is
# checked when it runs (payload/posttrain/quantize.py).
QUANT_PAIRS = {
    ("int8", None): "int8 weight-only",
    ("int4", None): "int4 weight-only",
    ("int8", "int8"): "int8 dynamic activations, int8 weights",
    ("int4", "int8"): "int8 dynamic activations, int4 weights",
    ("float8", "float8"): "float8 dynamic activations, float8 weights (GPU)",
}
# Per-row scales, whatever group_size says.
QUANT_NO_GROUPS = {("int8", "int8"), ("float8", "float8")}


def quant_dtype(name: str | None) -> str | None:
    """Axolotl's aliases of float8 as one name."""
    return "float8" if name in ("fp8", "float8", "float8_e4m3fn") else name


@rule("quantization")
def _quantization(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    q = cfg.quantization
    if q is None:
        return
    pair = (quant_dtype(q.weight_dtype), quant_dtype(q.activation_dtype))
    if pair not in QUANT_PAIRS:
        shown = f"weight_dtype {q.weight_dtype}" + (
            f" with activation_dtype {q.activation_dtype}" if q.activation_dtype else ""
        )
        yield _error(
            "quantization",
            f"{shown} is not a format `launch quantize` makes (NVFP4, MXFP4 and ternary "
            "need prototype torchao kernels and recent GPUs). It makes: "
            + "; ".join(
                f"{w}{f' + activations {a}' if a else ''} ({what})"
                for (w, a), what in QUANT_PAIRS.items()
            )
            + ".",
        )
    elif pair in QUANT_NO_GROUPS and q.group_size is not None:
        yield _error(
            "quantization.group_size",
            f"is not used by {QUANT_PAIRS[pair]}, which keeps one scale per row; remove it.",
        )
    if q.quantize_embedding:
        yield _error(
            "quantization.quantize_embedding",
            "is not supported yet: with torchao 0.18 and transformers 5.24 a quantized "
            "embedding that shares its weights with the output head does not load again. "
            "Remove it (the embeddings stay in full precision).",
        )


# ---- rules: deepspeed
# A DeepSpeed config is checked before launch: an inline mapping by the rule below, a
# JSON file once payload.config.paths has found it (`deepspeed_problems`). What the HF
# Trainer would refuse at start-up (a value that contradicts the config) is named here.
ZERO_STAGES = (0, 1, 2, 3)
# Where ZeRO-Offload puts states: `none` turns it off. DeepSpeed's `nvme` needs libaio and
# its compiled async-io op, which Ferry does not build or test yet.
OFFLOAD_DEVICES = ("cpu", "none")
# The objectives run under DeepSpeed so far (the SFT recipes): TRL's trainers keep a
# second (reference or reward) model that ZeRO-3 must shard too, untested here.
DEEPSPEED_UNTESTED = ("rl", "reward_model", "process_reward_model")


def deepspeed_json(path: str) -> tuple[Any, str | None]:
    """The contents of a DeepSpeed JSON file, or (None, why it cannot be used)."""
    import json

    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115 - read at once
    except (OSError, UnicodeDecodeError) as e:
        return None, f"`{path}` cannot be read: {getattr(e, 'strerror', None) or e}."
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"`{path}` is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})."


def _node(ds: dict[str, Any], dotted: str) -> Any:
    """The value at `a.b.c` in the DeepSpeed config, or None."""
    value: Any = ds
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def deepspeed_precision(ds: dict[str, Any], name: str) -> Any:
    """`<name>.enabled` (True, False or "auto"), None when the section is absent.
    DeepSpeed also reads bf16 as `bfloat16`."""
    for section in (name, "bfloat16") if name == "bf16" else (name,):
        if isinstance(ds.get(section), dict) and "enabled" in ds[section]:
            return ds[section]["enabled"]
    return None


def deepspeed_problems(ds: Any, cfg: TrainConfig, given: set[str], where: str) -> list[str]:
    """What is wrong with DeepSpeed config `ds` (read from `where`) for this config: each
    a message for the `deepspeed` key. Values left "auto" are the trainer's to fill."""
    if not isinstance(ds, dict):
        return [f"{where} must hold a JSON object (a mapping), not {type(ds).__name__}."]
    found: list[str] = []
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return [f"`zero_optimization` in {where} must be a mapping, not {zero!r}."]
    stage = zero.get("stage", 0)
    if stage not in ZERO_STAGES or isinstance(stage, bool):
        found.append(f"`zero_optimization.stage` is {stage!r} in {where}; ZeRO has stages 0 to 3.")
        stage = 0
    for section, least in (("offload_optimizer", 1), ("offload_param", 3)):
        offload = zero.get(section)
        if offload is None:
            continue
        device = offload.get("device", "none") if isinstance(offload, dict) else offload
        if device == "nvme":
            found.append(
                f"`zero_optimization.{section}.device: nvme` in {where} is not supported yet "
                "(it needs libaio and DeepSpeed's async-io op); offload to `cpu`."
            )
        elif device not in OFFLOAD_DEVICES:
            found.append(
                f"`zero_optimization.{section}.device` is {device!r} in {where}; DeepSpeed "
                "offloads to `cpu` (or `none`: no offload)."
            )
        elif device == "cpu" and stage < least:
            what = "stages 1 to 3" if least == 1 else "stage 3, which partitions the parameters"
            found.append(
                f"`zero_optimization.{section}` in {where} needs ZeRO {what}, not stage {stage}."
            )
    fp16, bf16 = deepspeed_precision(ds, "fp16"), deepspeed_precision(ds, "bf16")
    if fp16 is True and bf16 is True:
        found.append(f"{where} turns on both `fp16` and `bf16`; keep one.")
    # The config's own choice: bf16 "auto" is decided on the machine (payload.parallel).
    wanted = {"fp16": bool(cfg.fp16), "bf16": None if cfg.bf16 == "auto" else bool(cfg.bf16)}
    for name, value in (("fp16", fp16), ("bf16", bf16)):
        if isinstance(value, bool) and wanted[name] is not None and value != wanted[name]:
            found.append(
                f"`{name}.enabled` is {str(value).lower()} in {where}, but the config's "
                f"`{name}` is {str(wanted[name]).lower()}; set `{name}: "
                f'{str(value).lower()}` or write "auto" in the JSON.'
            )
    # Values the trainer fills where the JSON says "auto", and otherwise must equal.
    adam = [cfg.adam_beta1 or 0.9, cfg.adam_beta2 or 0.999]  # transformers' defaults
    steps = cfg.gradient_accumulation_steps
    must_match = (
        ("train_micro_batch_size_per_gpu", "micro_batch_size", cfg.micro_batch_size),
        ("gradient_accumulation_steps", "gradient_accumulation_steps", steps),
        ("gradient_clipping", "max_grad_norm", cfg.max_grad_norm or 0.0),
        ("optimizer.params.lr", "learning_rate", cfg.learning_rate),
        ("optimizer.params.betas", "adam_beta1/adam_beta2", adam),
        ("optimizer.params.eps", "adam_epsilon", cfg.adam_epsilon or 1e-8),
        ("optimizer.params.weight_decay", "weight_decay", cfg.weight_decay),
        ("scheduler.params.warmup_max_lr", "learning_rate", cfg.learning_rate),
    )
    for dotted, key, expected in must_match:
        value = _node(ds, dotted)
        if value is None or value == "auto" or expected is None:
            continue
        if isinstance(value, list | tuple) and list(value) == expected or value == expected:
            continue
        found.append(
            f"`{dotted}` is {value!r} in {where}, but the config's `{key}` is {expected!r}; "
            'set them alike or write "auto" in the JSON.'
        )
    # A JSON optimizer or scheduler replaces the config's: both set is a contradiction.
    for section, key in (("optimizer", "optimizer"), ("scheduler", "lr_scheduler")):
        if isinstance(ds.get(section), dict) and key in given:
            kind = ds[section].get("type", "?")
            found.append(
                f"the `{section}` section of {where} ({kind}) replaces `{key}: "
                f"{getattr(cfg, key)}`; keep one of them."
            )
    return found


@rule("deepspeed", "fp16", "bf16", "micro_batch_size", "gradient_accumulation_steps", "adapter")
def _deepspeed(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if not cfg.deepspeed:
        return
    for key in DEEPSPEED_UNTESTED:
        if getattr(cfg, key):
            yield _error(
                key,
                "with `deepspeed` is not supported yet: Ferry runs DeepSpeed with supervised "
                "fine-tuning only so far (its reference and reward models are not sharded).",
            )
    for key in ("load_in_4bit", "load_in_8bit"):
        if getattr(cfg, key):
            yield _error(
                key,
                "with `deepspeed` is not supported yet: ZeRO cannot partition bitsandbytes' "
                "quantized weights; use QLoRA without DeepSpeed.",
            )
    if context_parallel_size(cfg) > 1:
        yield _error(
            "context_parallel_size",
            "with `deepspeed` is not supported yet (DeepSpeed's Ulysses sequence parallelism "
            "is not wired in).",
        )
    # A file is checked once it has been found (payload.config.paths).
    if isinstance(cfg.deepspeed, dict):
        for message in deepspeed_problems(cfg.deepspeed, cfg, given, "the inline mapping"):
            yield _error("deepspeed", message)


# ---- rules: fsdp
# FSDP2 is Ferry's own (payload/parallel applies `fully_shard`): its keys are read here,
# once, by `fsdp_reading`, for the rules and for the payload alike, so what `launch
# validate` says is what a run does. Axolotl's FSDP1 spellings (the `fsdp:` list,
# `fsdp_version: 1`, `fsdp_`-prefixed and FSDP1-only fsdp_config keys) are mapped onto
# FSDP2 as Axolotl's and accelerate's migrations map them, with one warning naming each.


@dataclass(frozen=True)
class FsdpSettings:
    """FSDP2 as the config asks for it."""

    reshard_after_forward: bool = True  # free each block's gathered weights after forward
    activation_checkpointing: bool = False
    layer_classes: tuple[str, ...] = ()  # the blocks to shard; empty: _no_split_modules
    # How checkpoints / the final model are saved: FULL_STATE_DICT (gathered to rank 0,
    # save_pretrained) or SHARDED_STATE_DICT (each rank its shards, torch DCP).
    state_dict_type: str = "FULL_STATE_DICT"
    final_state_dict_type: str = "FULL_STATE_DICT"


@dataclass
class FsdpReading:
    """What the FSDP keys say: the settings (None: no FSDP), and the findings about them."""

    settings: FsdpSettings | None
    findings: list[Finding] = field(default_factory=list)


# fsdp_config keys Ferry runs, with what each accepts.
_FSDP_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "reshard_after_forward": ("true or false", lambda v: isinstance(v, bool)),
    "activation_checkpointing": ("true or false", lambda v: isinstance(v, bool)),
    "transformer_layer_cls_to_wrap": (
        "a class name (or several, comma-separated or as a list)",
        lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v),
    ),
    "auto_wrap_policy": (
        "TRANSFORMER_BASED_WRAP or SIZE_BASED_WRAP",
        lambda v: v in ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP"),
    ),
    "state_dict_type": (
        "FULL_STATE_DICT, SHARDED_STATE_DICT or LOCAL_STATE_DICT",
        lambda v: v in ("FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT"),
    ),
    "offload_params": ("true or false", lambda v: isinstance(v, bool)),
    "cpu_offload_pin_memory": ("true or false", lambda v: isinstance(v, bool)),
    "cpu_ram_efficient_loading": ("true or false", lambda v: isinstance(v, bool)),
    "min_num_params": ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "mixed_precision_policy": ("a string", lambda v: isinstance(v, str)),
}
_FSDP_CHECKS["final_state_dict_type"] = _FSDP_CHECKS["state_dict_type"]
_LOCAL_REFUSED = "it is FSDP1's flattened per-rank parameters, which FSDP2 does not have; "
_LOCAL_REFUSED += "SHARDED_STATE_DICT writes each rank's shards (and reshards on resume)"
# Values Ferry cannot honour yet, refused by name: (key, value) -> why.
_FSDP_NOT_YET: dict[tuple[str, Any], str] = {
    ("auto_wrap_policy", "SIZE_BASED_WRAP"): "Ferry shards one transformer block at a time "
    "(TRANSFORMER_BASED_WRAP)",
    ("state_dict_type", "LOCAL_STATE_DICT"): _LOCAL_REFUSED,
    ("final_state_dict_type", "LOCAL_STATE_DICT"): _LOCAL_REFUSED,
    ("offload_params", True): "parameters stay on the training device",
    ("cpu_ram_efficient_loading", True): "every rank reads the whole model before it is sharded",
}
# Set to anything, refused: FSDP2 settings of Axolotl's that Ferry does not run yet.
_FSDP_KEYS_NOT_YET = {
    "min_num_params": "it sizes SIZE_BASED_WRAP, and Ferry shards one transformer block at a time",
    "mixed_precision_policy": "the precision comes from bf16 (FSDP2's MixedPrecisionPolicy: "
    "bf16 compute, fp32 gradient reduction)",
}
# FSDP1-only settings with no FSDP2 counterpart: dropped, as Axolotl and accelerate drop them.
_FSDP1_DROPPED = (
    "backward_prefetch",
    "backward_prefetch_policy",
    "forward_prefetch",
    "sync_module_states",
    "limit_all_gathers",
    "use_orig_params",
)
# FSDP1's sharding_strategy (by name or number) as FSDP2's reshard_after_forward.
_SHARDING_STRATEGIES = {"FULL_SHARD": True, "1": True, "SHARD_GRAD_OP": False, "2": False}
_HYBRID = "is hybrid sharding: set dp_replicate_size (copies, usually the nodes) and "
_HYBRID += "dp_shard_size (processes per copy) instead"
_SHARDING_REFUSED = {
    "NO_SHARD": "is plain data parallelism (DDP): remove the FSDP settings",
    "3": "(NO_SHARD) is plain data parallelism (DDP): remove the FSDP settings",
    "HYBRID_SHARD": _HYBRID,
    "4": f"(HYBRID_SHARD) {_HYBRID}",
    "HYBRID_SHARD_ZERO2": _HYBRID,
    "5": f"(HYBRID_SHARD_ZERO2) {_HYBRID}",
}


def _fsdp_version(value: Any) -> int | None:
    """1 or 2 from how a config may write it (2, "2", 2.0), else None."""
    text = str(value).strip()
    return {"1": 1, "1.0": 1, "2": 2, "2.0": 2}.get(text)


def fsdp_reading(cfg: TrainConfig) -> FsdpReading:
    """Read the FSDP keys: the FSDP2 settings they ask for (None without FSDP) and every
    finding about them, one warning listing each FSDP1 key mapped or dropped among them."""
    findings: list[Finding] = []
    mapped: list[str] = []
    dropped: list[str] = []
    values: dict[str, Any] = {}
    where: dict[str, str] = {}  # FSDP2 name -> the key as the user wrote it

    def put(name: str, value: Any, key: str) -> None:
        # FSDP1 configs often say it twice (`fsdp: [full_shard]` and FULL_SHARD): fine
        # when both agree.
        if name in where and where[name] != key and values[name] != value:
            findings.append(
                _error(key, f"and `{where[name]}` set {name} both ways ({value}, {values[name]}).")
            )
            return
        values[name], where[name] = value, key

    words = cfg.fsdp.split() if isinstance(cfg.fsdp, str) else list(cfg.fsdp or [])
    for word in words:
        said = str(word).strip().lower()
        if said in ("full_shard", "shard_grad_op"):
            put("reshard_after_forward", said == "full_shard", "fsdp")
            flag = "true" if said == "full_shard" else "false"
            mapped.append(f"fsdp `{said}` -> reshard_after_forward: {flag}")
        elif said == "auto_wrap":
            mapped.append("fsdp `auto_wrap` -> fully_shard per transformer block (always)")
        elif said == "offload":
            put("offload_params", True, "fsdp")
            mapped.append("fsdp `offload` -> offload_params: true")
        elif said in ("hybrid_shard", "hybrid_shard_zero2", "no_shard"):
            findings.append(_error("fsdp", f"`{said}` {_SHARDING_REFUSED[said.upper()]}."))
        else:
            findings.append(
                _error(
                    "fsdp",
                    f"`{word}` is not an FSDP option; the list takes full_shard, "
                    "shard_grad_op, auto_wrap and offload (prefer fsdp_config).",
                )
            )

    versions = [("fsdp_version", cfg.fsdp_version)] if cfg.fsdp_version is not None else []
    raw = dict(cfg.fsdp_config or {})
    for key, value in raw.items():
        shown = f"fsdp_config.{key}"
        name = key.removeprefix("fsdp_") if key != "fsdp_version" else key
        if name in ("fsdp_version", "version"):
            versions.append((shown, value))
            continue
        if name != key and name != "sharding_strategy" and name not in _FSDP1_DROPPED:
            mapped.append(f"{shown} -> {name}")
        if name == "sharding_strategy":
            strategy = str(value).strip().upper()
            if strategy in _SHARDING_STRATEGIES:
                put("reshard_after_forward", _SHARDING_STRATEGIES[strategy], shown)
                flag = str(_SHARDING_STRATEGIES[strategy]).lower()
                mapped.append(f"{shown} {value} -> reshard_after_forward: {flag}")
            else:
                why = _SHARDING_REFUSED.get(strategy, "is not an FSDP sharding strategy")
                findings.append(_error(shown, f"`{value}` {why}."))
        elif name in _FSDP1_DROPPED:
            dropped.append(shown)
        elif name not in _FSDP_CHECKS:
            known = [*_FSDP_CHECKS, "fsdp_version"]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"one of: {', '.join(known)}."
            findings.append(_error(shown, f"is not an FSDP2 setting; {hint}"))
        elif not _FSDP_CHECKS[name][1](value):
            findings.append(_error(shown, f"must be {_FSDP_CHECKS[name][0]}, not {value!r}."))
        else:
            put(name, value, shown)
    if cfg.fsdp_final_state_dict_type is not None:
        mapped.append("fsdp_final_state_dict_type -> fsdp_config.final_state_dict_type")
        value = cfg.fsdp_final_state_dict_type
        if not _FSDP_CHECKS["final_state_dict_type"][1](value):
            message = f"must be {_FSDP_CHECKS['final_state_dict_type'][0]}, not {value!r}."
            findings.append(_error("fsdp_final_state_dict_type", message))
        else:
            put("final_state_dict_type", value, "fsdp_final_state_dict_type")

    for key, value in versions:
        version = _fsdp_version(value)
        if version is None:
            findings.append(_error(key, f"must be 1 or 2, not {value!r} (Ferry runs FSDP2)."))
        elif version == 1:
            mapped.append(f"{key} 1 -> 2")
    known = {_fsdp_version(v) for _, v in versions} - {None}
    if len(known) > 1:
        findings.append(
            _error(
                versions[0][0],
                "and " + " and ".join(f"`{k}`" for k, _ in versions[1:]) + " "
                "disagree; set the version once (FSDP2 is what runs).",
            )
        )

    if not (raw or words):
        for key, value in (
            ("fsdp_version", cfg.fsdp_version),
            ("fsdp_final_state_dict_type", cfg.fsdp_final_state_dict_type),
        ):
            if value is not None:
                findings.append(_warn(key, "ignored: there is no fsdp_config (FSDP is off)."))
        return FsdpReading(None, findings)

    for (name, value), why in _FSDP_NOT_YET.items():
        if name in values and values[name] == value:
            shown = where[name]
            said = "true" if value is True else value
            said = f"`{said}`" if shown != "fsdp" else f"`offload` ({name}: {said})"
            findings.append(_error(shown, f"{said} is not supported yet: {why}."))
    for name, why in _FSDP_KEYS_NOT_YET.items():
        if name in values:
            findings.append(_error(where[name], f"is not supported yet: {why}."))
    if "cpu_offload_pin_memory" in values and not values.get("offload_params"):
        findings.append(_warn(where["cpu_offload_pin_memory"], "ignored: offload_params is off."))
    if mapped or dropped:
        said = "FSDP1 settings read as FSDP2: " + "; ".join(mapped) if mapped else ""
        if dropped:
            said += "; " if said else ""
            said += "dropped (FSDP2 has no such setting): " + ", ".join(dropped)
        key = "fsdp_config" if raw else "fsdp"
        findings.append(_warn(key, said + "."))

    layers = values.get("transformer_layer_cls_to_wrap") or ()
    if isinstance(layers, str):
        layers = [name.strip() for name in layers.split(",") if name.strip()]
    settings = FsdpSettings(
        reshard_after_forward=values.get("reshard_after_forward", True),
        activation_checkpointing=values.get("activation_checkpointing", False),
        layer_classes=tuple(layers),
        state_dict_type=values.get("state_dict_type", "FULL_STATE_DICT"),
        final_state_dict_type=values.get("final_state_dict_type", "FULL_STATE_DICT"),
    )
    return FsdpReading(settings, findings)


@rule("fsdp", "fsdp_config", "fsdp_version", "fsdp_final_state_dict_type")
def _fsdp(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    yield from fsdp_reading(cfg).findings


# Settings a sharded run cannot take yet, each with the test of whether it is on.
_NOT_WITH_FSDP: dict[str, Callable[[TrainConfig], bool]] = {
    "rl": lambda c: bool(c.rl),
    "reward_model": lambda c: bool(c.reward_model),
    "process_reward_model": lambda c: bool(c.process_reward_model),
    "load_in_4bit": lambda c: bool(c.load_in_4bit),
    "load_in_8bit": lambda c: bool(c.load_in_8bit),
    "fp16": lambda c: bool(c.fp16),
    "torch_compile": lambda c: c.torch_compile is True,
    "unfrozen_parameters": lambda c: bool(c.unfrozen_parameters),
    "activation_offloading": lambda c: bool(c.activation_offloading),
    "gradient_checkpointing": lambda c: c.gradient_checkpointing in ("offload", "offload_disk"),
    "lora_modules_to_save": lambda c: bool(c.lora_modules_to_save),
    "peft_use_dora": lambda c: bool(c.peft_use_dora),
}


@rule("fsdp", "fsdp_config", "deepspeed", *_NOT_WITH_FSDP)
def _fsdp_with(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    if fsdp_reading(cfg).settings is None:
        return
    if cfg.fsdp and cfg.deepspeed:
        yield _error("fsdp", "and `deepspeed` are exclusive; pick one way to shard.")
    for key, on in _NOT_WITH_FSDP.items():
        if on(cfg):
            yield _error(key, "is not supported yet with FSDP2 (fsdp_config).")


# Settings context parallel does not run with, and why (payload.parallel.context).
_NOT_WITH_CONTEXT_PARALLEL = {
    "rl": "the preference and RL trainers score whole sequences (their losses and "
    "reference models are not split)",
    "torch_compile": "its all-gather of keys and values inside attention is not compiled yet",
    "reward_model": "a reward model scores the last token of each sequence, on one rank",
    "process_reward_model": "a reward model scores tokens with its own head, not split yet",
    "streaming": "the ranks of a context-parallel group must read the same batches, and a "
    "stream is dealt out to every process",
    "dp_replicate_size": "HSDP copies with split sequences are not tested yet; leave "
    "dp_replicate_size out (FSDP2 then shards over the data-parallel and context ranks)",
}


@rule("context_parallel_size", "sequence_parallel_degree", *_NOT_WITH_CONTEXT_PARALLEL)
def _context_parallel_with(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    cp = context_parallel_size(cfg)
    if cp == 1:
        return
    for key, why in _NOT_WITH_CONTEXT_PARALLEL.items():
        value = getattr(cfg, key)
        if key == "dp_replicate_size":
            value = (value or 1) > 1
        if value and not (key == "torch_compile" and value == "auto"):
            yield _error(key, f"with context_parallel_size ({cp}) is not supported: {why}.")


@rule("heads_k_stride", "ring_attn_func")
def _ring_attention(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    # Knobs of ring-flash-attn's kernels, which Ferry's context parallel does not use.
    for key in ("heads_k_stride", "ring_attn_func"):
        if getattr(cfg, key) is not None:
            yield _error(
                key,
                "tunes ring-flash-attn's kernels, which Ferry does not use: its context "
                "parallel all-gathers keys and values and runs torch's sdpa on every device "
                "(payload.parallel.context). Remove it.",
            )


# Settings tensor parallel does not run with, and why (payload.parallel.tensor), each with
# the test of whether it is on.
_NOT_WITH_TENSOR_PARALLEL: dict[str, tuple[Callable[[TrainConfig], bool], str]] = {
    "adapter": (
        lambda c: bool(c.adapter),
        "peft's LoRA layers wrap q_proj, o_proj and the rest, and the plan does not split "
        "their base weights and adapters yet; train LoRA with FSDP2 (fsdp_config)",
    ),
    "deepspeed": (
        lambda c: bool(c.deepspeed),
        "DeepSpeed partitions the model its own way (ZeRO); Ferry's tensor parallel runs "
        "under FSDP2",
    ),
    "context_parallel_size": (
        lambda c: context_parallel_size(c) > 1,
        "the two together are not tested yet",
    ),
    "dp_replicate_size": (
        lambda c: (c.dp_replicate_size or 1) > 1,
        "HSDP copies of a tensor-parallel model are not tested yet; leave dp_replicate_size "
        "out (the replicas then shard with FSDP2)",
    ),
    "rl": (lambda c: bool(c.rl), "the preference and RL trainers are not tested with it yet"),
    "reward_model": (lambda c: bool(c.reward_model), "reward models are not tested with it yet"),
    "process_reward_model": (
        lambda c: bool(c.process_reward_model),
        "reward models are not tested with it yet",
    ),
    "load_in_4bit": (lambda c: bool(c.load_in_4bit), "bitsandbytes' weights cannot be split"),
    "load_in_8bit": (lambda c: bool(c.load_in_8bit), "bitsandbytes' weights cannot be split"),
    "fp16": (
        lambda c: bool(c.fp16),
        "a tensor-parallel model runs under FSDP2, which Ferry runs in fp32 or bf16 only",
    ),
    "torch_compile": (lambda c: c.torch_compile is True, "the split blocks are not compiled yet"),
    "gradient_checkpointing": (
        lambda c: (
            bool(c.gradient_checkpointing)
            or bool((s := fsdp_reading(c).settings) and s.activation_checkpointing)
        ),
        "activation checkpointing is not tested with it yet",
    ),
    "activation_offloading": (
        lambda c: bool(c.activation_offloading),
        "activation offloading is not tested with it yet",
    ),
    "unfrozen_parameters": (
        lambda c: bool(c.unfrozen_parameters),
        "freezing parts of split weights is not tested yet",
    ),
    "streaming": (
        lambda c: bool(c.streaming),
        "the ranks of a tensor-parallel group must read the same batches, and a stream is "
        "dealt out to every process",
    ),
}


@rule("tensor_parallel_size", "fsdp", "fsdp_config", *_NOT_WITH_TENSOR_PARALLEL)
def _tensor_parallel_with(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    tp = cfg.tensor_parallel_size or 1
    if tp == 1:
        return
    for key, (on, why) in _NOT_WITH_TENSOR_PARALLEL.items():
        if on(cfg):
            yield _error(key, f"with tensor_parallel_size ({tp}) is not supported: {why}.")
    # The heads and MLP width must divide by tp: checked here when the model's config is
    # on this machine (a folder, or the hub cache), else when the model loads.
    from types import SimpleNamespace

    from payload.config.paths import model_config_json
    from payload.parallel.tensor import check

    found = model_config_json(cfg)
    if found is not None:
        try:
            check(SimpleNamespace(**found), tp)
        except FerryError as e:
            key, _, said = e.message.partition(": ")
            yield _error(key, said)


MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")  # outermost first, as torchtitan lays them


def context_parallel_size(cfg: TrainConfig) -> int:
    """The processes each sequence is split over (either of its two names)."""
    return max(cfg.context_parallel_size, cfg.sequence_parallel_degree or 1)


def mesh_layout(cfg: TrainConfig, world: int) -> tuple[dict[str, int], list[str]]:
    """The device mesh of a run on `world` processes, {dimension: size} in MESH_DIMS
    order (dp_shard, when unset, takes the processes the others leave), or the problems
    that make it impossible, each with the numbers."""
    rep, cp = cfg.dp_replicate_size or 1, context_parallel_size(cfg)
    tp = cfg.tensor_parallel_size or 1
    named = [
        ("dp_replicate_size", rep),
        ("context_parallel_size", cp),
        ("tensor_parallel_size", tp),
    ]
    shown = [
        f"{key} ({size})"
        for key, size in named
        if size > 1 or (key != "context_parallel_size" and getattr(cfg, key) is not None)
    ]
    others = rep * cp * tp
    if cfg.dp_shard_size is None:
        if world % others:
            return {}, [
                f"{' x '.join(shown)} = {others} does not divide the job's {world} processes "
                "(nodes x processes per node): dp_shard_size would not be a whole number."
            ]
        shard = world // others
    else:
        shard = cfg.dp_shard_size
        if shard * others != world:
            factors = [f"dp_shard_size ({shard})", *shown]
            product = " x ".join(factors) + (f" = {shard * others}" if shown else "")
            return {}, [
                f"{product}, but the job runs {world} processes (nodes x processes per node); "
                "the product must equal it."
            ]
    return dict(zip(MESH_DIMS, (rep, shard, cp, tp), strict=True)), []


def uses_mesh(cfg: TrainConfig) -> bool:
    """Does the run lay its processes out as a device mesh (FSDP2, or a layout key)?"""
    sizes = (cfg.dp_shard_size, cfg.dp_replicate_size, cfg.tensor_parallel_size)
    if fsdp_reading(cfg).settings is not None or context_parallel_size(cfg) > 1:
        return True
    return any(s is not None for s in sizes)


def mesh_problems(cfg: TrainConfig, world: int) -> list[str]:
    """Why the config's layout cannot run on `world` processes (for the executors, which
    know the processes before launch)."""
    return mesh_layout(cfg, world)[1] if uses_mesh(cfg) else []


def _launch_world(cfg: TrainConfig) -> int | None:
    """The processes the config's `launch:` section asks for, when it says."""
    launch = cfg.launch
    if launch is None or launch.gpus is None:
        return None
    count = str(launch.gpus).rsplit(":", 1)[-1]
    # An accelerator alone (`gpus: H100`) is one of it (the schema checked the form).
    return (int(count) if count.isdigit() else 1) * (launch.nodes or 1)


@rule(
    "dp_shard_size",
    "dp_replicate_size",
    "context_parallel_size",
    "sequence_parallel_degree",
    "tensor_parallel_size",
    "fsdp",
    "fsdp_config",
    "launch",
    "sequence_len",
)
def _layout(cfg: TrainConfig, given: set[str]) -> Iterator[Finding]:
    spd, cp = cfg.sequence_parallel_degree, cfg.context_parallel_size
    if spd is not None and "context_parallel_size" in given and spd != cp:
        yield _error(
            "sequence_parallel_degree",
            f"({spd}) and `context_parallel_size` ({cp}) are the same setting; set one.",
        )
    if context_parallel_size(cfg) > cfg.sequence_len:
        yield _error(
            "context_parallel_size",
            f"({context_parallel_size(cfg)}) splits each sequence, and sequence_len is only "
            f"{cfg.sequence_len} tokens.",
        )
    if fsdp_reading(cfg).settings is None:
        for key in ("dp_shard_size", "dp_replicate_size"):
            if getattr(cfg, key) is not None:
                yield _error(
                    key, "shapes FSDP2's device mesh; set fsdp_config (fsdp_version: 2) too."
                )
        if context_parallel_size(cfg) == 1 and (cfg.tensor_parallel_size or 1) == 1:
            return
    world = _launch_world(cfg)
    if world is not None:
        named = (
            "dp_shard_size",
            "dp_replicate_size",
            "context_parallel_size",
            "tensor_parallel_size",
        )
        key = next((k for k in named if getattr(cfg, k) not in (None, 1)), "launch.gpus")
        for problem in mesh_layout(cfg, world)[1]:
            yield _error(key, f"the layout does not fit launch.gpus x launch.nodes: {problem}")
