"""Axolotl's trainer settings take effect in the trainer a run builds: Adam's betas and
epsilon in the optimizer, eval_batch_size in the eval loader, the checkpointing arguments
in the model's layers, ddp_find_unused_parameters in DDP's arguments. One real step of
the HF Trainer on the bundled tiny model, CPU."""

from __future__ import annotations

import pytest
from helpers import ASSETS, DATA

from payload.config import ConfigError, validate_mapping
from payload.distributed import DistInfo
from payload.train import training_arguments

SINGLE = DistInfo(rank=0, local_rank=0, world_size=1, backend=None, device="cpu")


def config(**extra):
    raw = {
        "base_model": str(ASSETS / "tiny-llama"),
        "learning_rate": 1e-3,
        "datasets": [{"path": str(DATA), "type": "alpaca"}],
        "micro_batch_size": 2,
        "max_steps": 1,
        "optimizer": "adamw_torch",
    }
    return validate_mapping({**raw, **extra})


def one_step(cfg, tmp_path):
    """The Trainer after one training step with `cfg`'s arguments."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer

    from payload.model import load_tokenizer

    torch.manual_seed(0)
    rows = [list(range(3, 3 + n)) for n in (5, 7, 6, 4, 8, 5, 6)]
    data = Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows}
    )
    args = training_arguments(cfg, SINGLE, str(tmp_path), len(rows), has_eval=True)
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama"),
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=DataCollatorForSeq2Seq(load_tokenizer(cfg), padding=True),
    )
    trainer.train()
    return trainer


def eval_batch_rows(trainer) -> int:
    return len(next(iter(trainer.get_eval_dataloader()))["input_ids"])


def checkpoint_keywords(model) -> dict:
    layer = model.model.layers[0]
    return dict(layer._gradient_checkpointing_func.keywords)


def test_the_settings_reach_the_optimizer_the_eval_loader_and_the_layers(tmp_path):
    cfg = config(
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        eval_batch_size=3,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    trainer = one_step(cfg, tmp_path / "set")
    group = trainer.optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
    assert eval_batch_rows(trainer) == 3
    assert checkpoint_keywords(trainer.model)["use_reentrant"] is True


def test_unset_they_are_adam_s_and_axolotl_s_defaults(tmp_path):
    trainer = one_step(config(gradient_checkpointing=True), tmp_path / "unset")
    group = trainer.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert eval_batch_rows(trainer) == 2  # micro_batch_size
    # Axolotl's default when checkpointing: non-reentrant.
    assert checkpoint_keywords(trainer.model)["use_reentrant"] is False


def test_ddp_find_unused_parameters_is_passed_to_ddp_only_when_there_is_ddp(tmp_path):
    """The TrainingArguments field DDP is built from; a one-rank gloo group stands in for
    the ranks (the two-rank run in test_train.py trains with the default)."""
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        gloo = DistInfo(rank=0, local_rank=0, world_size=1, backend="gloo", device="cpu")
        on = config(ddp_find_unused_parameters=True)
        assert training_arguments(on, gloo, "o", 8, False).ddp_find_unused_parameters is True
        assert training_arguments(config(), gloo, "o", 8, False).ddp_find_unused_parameters is False
    finally:
        td.destroy_process_group()
    assert training_arguments(on, SINGLE, "o", 8, False).ddp_find_unused_parameters is None


def test_a_checkpointing_argument_typo_is_refused_with_the_right_name():
    with pytest.raises(ConfigError) as e:
        config(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrnt": True})
    assert "gradient_checkpointing_kwargs.use_reentrnt" in str(e.value)
    assert "Did you mean `use_reentrant`?" in str(e.value)


def test_evals_per_epoch_zero_means_no_evaluation_while_training():
    """Axolotl accepts `evals_per_epoch: 0` and then never evaluates during training."""
    held_out = {"val_set_size": 0.1}
    none = training_arguments(config(evals_per_epoch=0, **held_out), SINGLE, "o", 80, True)
    assert none.eval_strategy == "no"
    two = training_arguments(config(evals_per_epoch=2, **held_out), SINGLE, "o", 80, True)
    assert two.eval_strategy == "steps" and two.eval_steps == 20  # 80 rows / batch 2 / 2
    assert training_arguments(config(**held_out), SINGLE, "o", 80, True).eval_strategy == "epoch"
    steps = training_arguments(
        config(evals_per_epoch=0, eval_steps=5, **held_out), SINGLE, "o", 80, True
    )
    assert steps.eval_strategy == "steps" and steps.eval_steps == 5


def learning_rates(cfg, steps: int) -> list[float]:
    """The learning rate of each of `steps` optimizer steps, from the trainer's scheduler."""
    from transformers import AutoModelForCausalLM, Trainer

    args = training_arguments(cfg, SINGLE, "o", 100, False)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama"), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return rates


def test_cosine_min_lr_ratio_decays_to_that_fraction_of_the_learning_rate():
    """Axolotl's curve: warmup, then lr * ((1 - r) * (1 + cos(pi * progress)) / 2 + r)."""
    import math

    cfg = config(lr_scheduler="cosine", warmup_steps=2, cosine_min_lr_ratio=0.1)
    expected = [0.0, 0.5e-3] + [
        1e-3 * (0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) + 0.1) for s in range(2, 10)
    ]
    assert learning_rates(cfg, 10) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    plain = learning_rates(config(lr_scheduler="cosine", warmup_steps=2), 10)
    assert plain[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_lr_scheduler_kwargs_reach_the_schedule():
    """Two cosine cycles: back at the peak halfway (lr_scheduler_kwargs: {num_cycles: 2})."""
    cfg = config(lr_scheduler="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2})
    rates = learning_rates(cfg, 8)
    assert rates[0] == pytest.approx(1e-3) and rates[4] == pytest.approx(1e-3)
    assert rates[2] < 1e-3 and rates[6] < 1e-3


def test_save_strategy_chooses_when_checkpoints_are_written():
    def saving(**extra):
        args = training_arguments(config(**extra), SINGLE, "o", 80, False)
        return args.save_strategy, args.save_steps

    assert saving()[0] == "epoch"
    assert saving(save_steps=7) == ("steps", 7)
    assert saving(save_strategy="no", save_steps=7)[0] == "no"
    assert saving(save_strategy="epoch", saves_per_epoch=4)[0] == "epoch"
    assert saving(save_strategy="steps", saves_per_epoch=4) == ("steps", 10)  # 40 steps / 4
    with pytest.raises(ConfigError, match="save_strategy: `steps` needs save_steps"):
        config(save_strategy="steps")
    with pytest.raises(ConfigError, match="save_strategy"):
        config(save_strategy="best")  # needs a metric to rank checkpoints: not supported


def test_the_watchdog_sees_a_nan_loss_through_the_trainer(tmp_path):
    """The HF Trainer would log a running mean in place of a nan loss (its nan/inf
    filter): with the watchdog on, the nan itself is logged and trips it."""
    import math

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer

    from payload.model import load_tokenizer
    from payload.watchdog import LossWatchdog

    cfg = config(
        max_steps=6, logging_steps=1, loss_watchdog_threshold=50.0, loss_watchdog_patience=2
    )
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama")

    def nan_loss(module, args, kwargs, output):
        output["loss"] = output["loss"] * torch.tensor(math.nan)
        return output

    model.register_forward_hook(nan_loss, with_kwargs=True)
    rows = [list(range(3, 3 + n)) for n in (5, 7, 6, 4, 8, 5, 6, 7)]
    data = Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows}
    )
    dog = LossWatchdog.of(cfg)
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, SINGLE, str(tmp_path), len(rows), has_eval=False),
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(load_tokenizer(cfg), padding=True),
        callbacks=[dog],
    )
    trainer.train()
    assert dog.tripped is not None and dog.tripped[0] == 2 and math.isnan(dog.tripped[1])
    assert trainer.state.global_step == 2  # stopped there, not at max_steps


def test_eval_batch_size_sizes_packed_eval_batches_too():
    """With sample_packing the eval loader batches bins: eval_batch_size of them."""
    from datasets import Dataset

    from payload.model import load_tokenizer
    from payload.packed_trainer import packing_setup

    cfg = config(
        sample_packing=True,
        sequence_len=16,
        micro_batch_size=2,
        eval_batch_size=3,
        pad_to_sequence_len=True,
    )
    rows = [list(range(3, 3 + n)) for n in (9, 8, 7, 9, 8, 7, 9, 8, 7, 9, 8, 7, 9, 8)]
    data = Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows}
    )
    packing = packing_setup(cfg, load_tokenizer(cfg), data, data, SINGLE, "sdpa")
    train_sizes = [len(batch) for batch in packing.train]
    eval_sizes = [len(batch) for batch in packing.eval]
    assert packing.eval.num_bins >= 7  # 14 rows of 7-9 tokens, at most two per 16
    assert train_sizes[:-1] == [2] * (len(train_sizes) - 1)
    assert eval_sizes[:-1] == [3] * (len(eval_sizes) - 1)
    assert sum(eval_sizes) == packing.eval.num_bins
    assert packing.eval_collator.micro_batch_size == 3


def test_checkpointing_arguments_are_checked_and_non_reentrant_by_default(tmp_path):
    with pytest.raises(ConfigError) as e:
        config(
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True, "debug": True, "offload": 1},
        )
    said = str(e.value)
    assert "gradient_checkpointing_kwargs.offload: should be true or false (got 1)" in said
    assert (
        "gradient_checkpointing_kwargs.debug: works only with non-reentrant checkpointing" in said
    )
    # Arguments without use_reentrant keep the non-reentrant default.
    cfg = config(
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"preserve_rng_state": False}
    )
    keywords = checkpoint_keywords(one_step(cfg, tmp_path).model)
    assert keywords["use_reentrant"] is False and keywords["preserve_rng_state"] is False


def test_schedule_arguments_are_checked_before_anything_starts():
    cases = {
        "lr_scheduler_kwargs.num_cycle: is not an argument of the `cosine_with_restarts` "
        "schedule (it takes: num_cycles)": {
            "lr_scheduler": "cosine_with_restarts",
            "lr_scheduler_kwargs": {"num_cycle": 2},
        },
        "lr_scheduler_kwargs.num_cycles: is not an argument of the `linear` schedule "
        "(it takes: none)": {"lr_scheduler": "linear", "lr_scheduler_kwargs": {"num_cycles": 2}},
        "lr_scheduler_kwargs: min_lr and cosine_min_lr_ratio each set the floor": {
            "lr_scheduler": "cosine_with_min_lr",
            "lr_scheduler_kwargs": {"min_lr": 1e-6},
            "cosine_min_lr_ratio": 0.1,
        },
        "lr_scheduler: `cosine_with_min_lr` needs its floor": {
            "lr_scheduler": "cosine_with_min_lr"
        },
    }
    for message, keys in cases.items():
        with pytest.raises(ConfigError) as e:
            config(**keys)
        assert message in str(e.value), keys
