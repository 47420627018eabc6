"""Training recipes: one per objective, registered by name.

A recipe (`payload.trainers.base.Recipe`) says what the common path in
`payload.train` cannot know: which datasets to build, which model head and peft task
type, which arguments class and objective settings, which trainer (the HF Trainer or a
TRL one). `payload.train.run` asks `recipe_for(cfg, dist)` for it.

This module stays light (no torch): `launch validate` reads `OBJECTIVES` to check `rl:`
and imports nothing else. A recipe's module is imported only when a run needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from payload.config.schema import TrainConfig
    from payload.distributed import DistInfo
    from payload.trainers.base import Recipe

# objective -> the module whose `@register` defines its recipe.
OBJECTIVES: dict[str, str] = {
    "sft": "payload.trainers.sft",
    "dpo": "payload.trainers.preference",
    "ipo": "payload.trainers.preference",
    "simpo": "payload.trainers.preference",
    "kto": "payload.trainers.preference",
    "orpo": "payload.trainers.preference",
    "grpo": "payload.trainers.grpo",
    "reward": "payload.trainers.reward",
    "process_reward": "payload.trainers.reward",
    "vision": "payload.trainers.vision",
}
# The `rl:` values Ferry trains; any other (Axolotl's `ebft`, `gdpo`) is refused by name.
RL_OBJECTIVES: tuple[str, ...] = ("dpo", "ipo", "simpo", "kto", "orpo", "grpo")

_RECIPES: dict[str, type[Recipe]] = {}


def register(*names: str) -> Any:
    """Class decorator: the recipe for each of `names`."""

    def add(cls: Any) -> Any:
        for name in names:
            _RECIPES[name] = cls
        return cls

    return add


def objective(cfg: TrainConfig) -> str:
    """The recipe a config asks for: its `rl:`, a reward model, or supervised."""
    if cfg.rl:
        return cfg.rl.lower()
    if getattr(cfg, "processor_type", None):
        return "vision"
    if getattr(cfg, "process_reward_model", None):
        return "process_reward"
    if getattr(cfg, "reward_model", None):
        return "reward"
    return "sft"


def recipe_for(cfg: TrainConfig, dist: DistInfo) -> Recipe:
    name = objective(cfg)
    if name not in OBJECTIVES:
        from payload.errors import FerryError

        raise FerryError(f"rl: `{name}` is not an objective Ferry trains.")
    importlib.import_module(OBJECTIVES[name])
    return _RECIPES[name](cfg, dist)
