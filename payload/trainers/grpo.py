"""GRPO (`rl: grpo`): TRL's GRPOTrainer. Each step samples `num_generations` completions
per prompt (with transformers' generate, or vLLM with `trl.use_vllm`), scores them with
the config's reward functions (`trl.reward_funcs`, user code found and checked by
`payload.config.rewards`), and moves the policy towards the completions that score above
their group's mean. `reward` in metrics.jsonl is the mean reward of the step's
completions. In `vllm_mode: server` without a server on another machine, the job started
one on this node before the ranks (payload.config.vllm); the trainer connects to it there.

The reference model (`trl.beta` > 0): with an adapter, the base model (the adapter
disabled: Ferry's adapter starts at zero, so that is the policy as training started); for
a full fine-tune TRL would load the model again from
its path, which is not the model Ferry trains when Ferry changed it after loading
(added tokens, `model_config` overrides) and fails for a model built from a config.
Ferry gives it a frozen copy of the model as loaded instead.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trl import GRPOConfig

from payload.config import rewards, vllm
from payload.config.schema import TrainConfig
from payload.errors import FerryError
from payload.trainers import register
from payload.trainers.base import Recipe
from payload.trainers.settings import with_settings

# `trl:` keys that are GRPOConfig fields of the same name; `beta` is read for DPO too.
GRPO_KEYS = (
    "beta",
    "num_generations",
    "generation_batch_size",
    "max_completion_length",
    "num_iterations",
    "epsilon",
    "epsilon_high",
    "loss_type",
    "scale_rewards",
    "importance_sampling_level",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "reward_weights",
    "sync_ref_model",
    "ref_model_sync_steps",
    "ref_model_mixup_alpha",
    "use_vllm",
    "vllm_mode",
    "vllm_server_host",
    "vllm_server_port",
    "vllm_server_timeout",
    "vllm_gpu_memory_utilization",
    "log_completions",
    "mask_truncated_completions",
    "repetition_penalty",
)
# Axolotl's defaults where they differ from TRL's (its trl: schema): the reference sync.
AXOLOTL_SYNC_DEFAULTS = {"ref_model_sync_steps": 64, "ref_model_mixup_alpha": 0.9}


def grpo_arguments(cfg: TrainConfig) -> dict[str, Any]:
    """The GRPOConfig values the config sets (unset keys keep TRL's defaults)."""
    trl = cfg.trl
    values: dict[str, Any] = {}
    if trl is not None:
        values = {k: getattr(trl, k) for k in GRPO_KEYS if getattr(trl, k) is not None}
        if trl.sync_ref_model:
            for key, default in AXOLOTL_SYNC_DEFAULTS.items():
                values.setdefault(key, default)
    if "beta" not in values and cfg.rl_beta is not None:
        values["beta"] = cfg.rl_beta  # Axolotl reads trl.beta, else rl_beta, for GRPO too
    if vllm.self_started(cfg):
        # The server the job started on this node (payload.entry.torchrun), at the port
        # either of Axolotl's two keys names.
        values["vllm_server_host"] = vllm.connect_host(cfg)
        values["vllm_server_port"] = vllm.server_port(cfg)
    # GRPOTrainer counts prompt and completion tokens into num_input_tokens_seen itself;
    # the Trainer's own count would add the (absent) input_ids of the prompt batches.
    values["include_num_input_tokens_seen"] = "no"
    return values


class FerryGRPOConfig(GRPOConfig):
    """GRPOConfig, whose refusals (batch shapes that depend on the GPU count, which the
    rules cannot see) are user errors. At module level: checkpoints pickle it."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as e:
            raise FerryError(f"trl: GRPO cannot run with these settings: {e}") from e


@contextlib.contextmanager
def _frozen_reference(model: Any) -> Iterator[None]:
    """While GRPOTrainer is built, its reference model for a full fine-tune is a frozen
    copy of `model` rather than a reload from the model's path (see the module
    docstring). TRL builds it with `create_model_from_path`, looked up in its module when
    called, so that name is what is swapped, for the construction only."""
    from trl.trainer import grpo_trainer

    assert hasattr(grpo_trainer, "create_model_from_path"), "TRL moved its reference loading"
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    original = grpo_trainer.create_model_from_path
    grpo_trainer.create_model_from_path = lambda *args, **kwargs: reference
    try:
        yield
    finally:
        grpo_trainer.create_model_from_path = original


def _user_errors(fn: Any, key: str, ref: str) -> Any:
    """`fn`, whose exceptions become the user's error naming the key, the function and
    the line of the user's code it came from (not a crash reported as Ferry's bug). The
    name stays the function's: TRL logs each reward under it."""
    import functools
    import traceback

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the user's code may raise anything
            code = getattr(fn, "__code__", None)
            lines = [
                f"{Path(frame.filename).name} line {frame.lineno}"
                for frame in traceback.extract_tb(e.__traceback__)
                if code is not None and frame.filename == code.co_filename
            ]
            at = f" ({lines[-1]})" if lines else ""
            raise FerryError(
                f"{key}: `{ref}` raised {type(e).__name__}{at} while scoring completions: "
                f"{e}".rstrip(": "),
                hint="Fix the reward function; `launch validate` checks that it imports, "
                "not what it does with the completions.",
            ) from e

    return call


@register("grpo")
class GRPO(Recipe):
    name = "grpo"

    def datasets(self, tokenizer: Any) -> tuple[Any, Any | None, Any]:
        from payload.data.prompts import build_prompts

        return build_prompts(self.cfg, tokenizer)

    def debug_lines(self, train: Any, tokenizer: Any) -> list[str]:
        """`debug: true`: the first prompts as the trainer gets them (before the chat
        template; the completions do not exist yet)."""
        first = train.select(range(min(5, len(train))))
        return [f"row {i}: prompt {row['prompt']!r}" for i, row in enumerate(first)]

    def arguments_class(self) -> Any:
        return FerryGRPOConfig

    def objective_arguments(self) -> dict[str, Any]:
        return grpo_arguments(self.cfg)

    def reward_functions(self) -> list[Any]:
        assert self.cfg.trl and self.cfg.trl.reward_funcs  # the GRPO rule requires them
        return [
            _user_errors(rewards.load(ref), f"trl.reward_funcs[{i}]", ref)
            for i, ref in enumerate(self.cfg.trl.reward_funcs)
        ]

    def trainer(
        self,
        model: Any,
        args: Any,
        train: Any,
        eval_set: Any,
        tokenizer: Any,
        callbacks: list[Any],
    ) -> Any:
        from peft import PeftModel
        from trl import GRPOTrainer

        cls = with_settings(GRPOTrainer)
        full_reference = args.beta != 0.0 and not isinstance(model, PeftModel)
        with _frozen_reference(model) if full_reference else contextlib.nullcontext():
            trainer = cls(
                model=model,
                reward_funcs=self.reward_functions(),
                args=args,
                train_dataset=train,
                eval_dataset=eval_set,
                processing_class=tokenizer,
                callbacks=callbacks,
                cfg=self.cfg,
            )
        peft = getattr(trainer.model, "peft_config", None)
        if peft is not None and "ref" in peft:
            # TRL's frozen copy of the adapter, for an adapter trained before. Ferry's is
            # always fresh (LoRA's B is zero): with it disabled, the base is the same
            # reference, without a second adapter to run and to save in every checkpoint.
            trainer.model.delete_adapter("ref")
            trainer.model.set_adapter("default")
        return trainer
