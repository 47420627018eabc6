"""A run stopped early saves its step once: transformers' own Trainer, on the tiny model,
in this process. Without OneSavePerStep, a stop mid-epoch under `save_strategy: epoch`
saves the same step a second time at the epoch's end (rewriting the checkpoint's files
in place while the first save of them may be uploading: the CI flake of the loss
watchdog test)."""

from __future__ import annotations

import pytest
from helpers import ASSETS

from payload.durability import OneSavePerStep


def saved_steps(tmp_path, guard: bool) -> list[int]:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class StopAtTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_save = control.should_training_stop = True

    class Saves(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_save(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    rows = [{"input_ids": [1, 5, 6, 7, 2], "labels": [1, 5, 6, 7, 2]} for _ in range(8)]
    saves = Saves()
    callbacks = [StopAtTwo(), saves] + ([OneSavePerStep()] if guard else [])
    args = TrainingArguments(
        str(tmp_path / ("guarded" if guard else "bare")),
        per_device_train_batch_size=1,
        num_train_epochs=1,
        save_strategy="epoch",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks).train()
    return saves.steps


@pytest.mark.parametrize("guard", [False, True], ids=["transformers-alone", "guarded"])
def test_a_run_stopped_mid_epoch_saves_its_step_once(tmp_path, guard):
    expected = [2] if guard else [2, 2]  # the bare case: the behaviour guarded against
    assert saved_steps(tmp_path, guard) == expected
    assert (tmp_path / ("guarded" if guard else "bare") / "checkpoint-2").is_dir()
