"""The loss watchdog (`loss_watchdog_threshold`, `loss_watchdog_patience`): the counting
rule on the trainer's own state objects, and a real run through the CLI (torchrun on
CPU) that stops on a broken-down loss, saved, with the run failed and the reason."""

from __future__ import annotations

import json
import math

import pytest
from helpers import launch, quickstart_config

from payload.watchdog import LossWatchdog


def feed(dog: LossWatchdog, losses: list[float]) -> list[bool]:
    """Log each loss at steps 1, 2, ...; whether the trainer was told to stop after each."""
    from transformers import TrainerControl, TrainerState

    state, stops = TrainerState(), []
    for step, loss in enumerate(losses, start=1):
        state.global_step = step
        control = TrainerControl()
        dog.on_log(None, state, control, logs={"loss": loss, "learning_rate": 1e-3})
        stops.append(control.should_training_stop and control.should_save)
    return stops


def test_only_that_many_high_losses_in_a_row_stop_the_run():
    dog = LossWatchdog(threshold=5.0, patience=3)
    # 6, 7 high; 4 resets; 6, nan, 9 high: the third in a row is step 6.
    stops = feed(dog, [6.0, 7.0, 4.0, 6.0, math.nan, 9.0, 1.0])
    assert stops == [False, False, False, False, False, True, False]
    assert dog.tripped == (6, 9.0)
    message = dog.error("/out/checkpoint-6").message
    assert message.startswith(
        "Stopped at step 6: the training loss stayed above loss_watchdog_threshold (5) "
        "for 3 logged steps in a row (steps 4 to 6; last 9)."
    )
    assert message.endswith("its checkpoint is saved: /out/checkpoint-6.")


def test_the_default_patience_is_three_and_a_loss_at_the_threshold_is_fine():
    dog = LossWatchdog(threshold=5.0, patience=None)
    assert feed(dog, [5.0, 5.0, 5.0, 5.0]) == [False] * 4
    assert feed(LossWatchdog(5.0, None), [5.1, 5.1, 5.1]) == [False, False, True]


@pytest.mark.slow
def test_a_run_whose_loss_breaks_down_stops_saved_and_fails_with_the_reason(tmp_path, ferry_home):
    """The tiny model starts near loss 7: a threshold of 1 trips at the second step."""
    config = quickstart_config(
        tmp_path,
        "max_steps: 8\nlogging_steps: 1\nloss_watchdog_threshold: 1.0\nloss_watchdog_patience: 2\n",
    )
    result = launch("train", str(config), timeout=600)
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1, said
    assert "Traceback" not in said
    assert (
        "Stopped at step 2: the training loss stayed above loss_watchdog_threshold (1) "
        "for 2 logged steps in a row (steps 1 to 2;" in said
    ), said
    (run,) = (ferry_home / "runs").iterdir()
    checkpoint = run / "output" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (run / "output" / "checkpoint-3").exists()
    record = json.loads(launch("status", run.name, "--json", check=True).stdout)
    assert record["state"] == "failed"
    assert "Stopped at step 2" in record["detail"]
