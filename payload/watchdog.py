"""The loss watchdog: a run whose loss has broken down stops, saved, instead of spending
the rest of its GPU hours (`loss_watchdog_threshold`, `loss_watchdog_patience`).

Each logged training loss (every `logging_steps` steps) above the threshold, or not a
number, counts; one at or below it resets the count. When the count reaches the patience
(default 3, as in Axolotl) the trainer saves a checkpoint and stops, and the run fails
with the reason. Every rank sees the same logged loss (the trainer averages it over the
ranks before logging), so all stop at the same step.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from payload.config.schema import TrainConfig
from payload.errors import FerryError

DEFAULT_PATIENCE = 3


class LossWatchdog(TrainerCallback):
    def __init__(self, threshold: float, patience: int | None):
        self.threshold = threshold
        self.patience = patience or DEFAULT_PATIENCE
        self.high: list[tuple[int, float]] = []  # (step, loss) of the current run of highs
        self.tripped: tuple[int, float] | None = None

    @classmethod
    def of(cls, cfg: TrainConfig) -> LossWatchdog | None:
        if cfg.loss_watchdog_threshold is None:
            return None
        return cls(cfg.loss_watchdog_threshold, cfg.loss_watchdog_patience)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        loss = (logs or {}).get("loss")
        if loss is None or self.tripped:
            return
        if math.isnan(loss) or loss > self.threshold:
            self.high.append((state.global_step, loss))
        else:
            self.high.clear()
        if len(self.high) >= self.patience:
            self.tripped = (state.global_step, loss)
            control.should_save = True
            control.should_training_stop = True

    def error(self, checkpoint: str) -> FerryError:
        """What the run fails with, once tripped and saved to `checkpoint`."""
        assert self.tripped is not None
        step, loss = self.tripped
        first = self.high[0][0]
        return FerryError(
            f"Stopped at step {step}: the training loss stayed above loss_watchdog_threshold "
            f"({self.threshold:g}) for {self.patience} logged steps in a row (steps {first} to "
            f"{step}; last {loss:.4g}). The learning has broken down; its checkpoint is saved: "
            f"{checkpoint}.",
            hint="Lower learning_rate or raise warmup, then resume or start again; or raise "
            "loss_watchdog_threshold if this loss is expected.",
        )
