"""Axolotl's trainer settings take effect in the trainer a run builds: Adam's betas and
epsilon in the optimizer, eval_batch_size in the eval loader, the checkpointing arguments
in the model's layers, ddp_find_unused_parameters in DDP's arguments. One real step of
the HF Trainer on the bundled tiny model, CPU."""

from __future__ import annotations

import pytest
from helpers import ASSETS, DATA

from payload.config import ConfigError, validate_mapping
from payload.distributed import DistInfo
from payload.trainers.settings import training_arguments

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
    """The learning rate of each of `steps` optimizer steps, from the scheduler of Ferry's
    trainer (what `payload.train` builds)."""
    trainer = ferry_trainer(cfg, "o", ROWS)
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
    from payload.trainers.packed import packing_setup

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


# ---- Axolotl settings Ferry's trainer adds (issue 14)


def checked(**extra) -> tuple:
    """(config, warnings) for `config(**extra)`."""
    said: list[str] = []
    raw = {
        "base_model": str(ASSETS / "tiny-llama"),
        "learning_rate": 1e-3,
        "datasets": [{"path": str(DATA), "type": "alpaca"}],
        "micro_batch_size": 2,
        "max_steps": 1,
        "optimizer": "adamw_torch",
    }
    return validate_mapping({**raw, **extra}, warn=said.append), said


def ferry_trainer(cfg, out, rows, eval_rows=None, **extra):
    """Ferry's trainer (what `payload.train` builds) on token rows, unpacked."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from payload.model import load_tokenizer
    from payload.trainers.settings import FerryTrainer, settings_callbacks

    def dataset(rows):
        return Dataset.from_dict(
            {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows}
        )

    torch.manual_seed(0)
    args = training_arguments(cfg, SINGLE, str(out), len(rows), has_eval=eval_rows is not None)
    return FerryTrainer(
        model=AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama"),
        args=args,
        train_dataset=dataset(rows),
        eval_dataset=dataset(eval_rows) if eval_rows else None,
        data_collator=DataCollatorForSeq2Seq(load_tokenizer(cfg), padding=True),
        callbacks=settings_callbacks(cfg, args),
        cfg=cfg,
        **extra,
    )


ROWS = [list(range(3, 3 + n)) for n in (5, 7, 6, 4, 8, 5, 6, 7)]


def test_eval_strategy_no_epoch_or_inferred_as_axolotl_does():
    """Axolotl: `no` skips evaluation, `epoch` evaluates at epoch ends, unset infers it
    from eval_steps / evals_per_epoch; `evaluation_strategy` is its older name."""

    def evaluation(**extra):
        cfg, _ = checked(val_set_size=0.1, **extra)
        args = training_arguments(cfg, SINGLE, "o", 80, True)
        return args.eval_strategy, args.eval_steps

    assert evaluation(eval_strategy="no")[0] == "no"
    assert evaluation(eval_strategy="epoch")[0] == "epoch"
    assert evaluation(eval_strategy="steps", eval_steps=5) == ("steps", 5)
    assert evaluation(eval_strategy="steps", evals_per_epoch=4) == ("steps", 10)  # 40 / 4
    assert evaluation()[0] == "epoch"
    assert evaluation(eval_steps=4) == ("steps", 4)
    assert evaluation(evaluation_strategy="no")[0] == "no"
    _, said = checked(val_set_size=0.1, evaluation_strategy="epoch")
    assert any("evaluation_strategy: is Axolotl's older name" in w for w in said), said
    # No eval set: nothing to evaluate whatever the strategy.
    cfg, said = checked(eval_strategy="epoch")
    assert training_arguments(cfg, SINGLE, "o", 80, False).eval_strategy == "no"
    assert any("eval_strategy: is ignored: there is no eval set" in w for w in said), said
    cases = {
        "eval_strategy: `epoch` and eval_steps disagree": {
            "eval_strategy": "epoch",
            "eval_steps": 3,
        },
        "eval_strategy: `steps` needs eval_steps or evals_per_epoch": {"eval_strategy": "steps"},
        "evaluation_strategy: and `eval_strategy` disagree": {
            "eval_strategy": "no",
            "evaluation_strategy": "epoch",
        },
        "eval_strategy: should be 'steps', 'epoch' or 'no' (got 'best')": {"eval_strategy": "best"},
    }
    for message, keys in cases.items():
        with pytest.raises(ConfigError) as e:
            config(val_set_size=0.1, **keys)
        assert message in str(e.value), (keys, str(e.value))


def test_quadratic_warmup_held_floor_and_eta_min_shape_the_cosine():
    """Axolotl's schedules (utils/schedulers.py), written out: a warmup of (s / w)^2;
    cosine_constant_lr_ratio c with floor r: the cosine from 1 to r over steps w..c*T,
    then r; eta_min: the absolute floor of torch's CosineAnnealingLR."""
    import math

    lr = 1e-3
    quadratic = config(lr_scheduler="cosine", warmup_steps=4, lr_quadratic_warmup=True)
    expected = [lr * (s / 4) ** 2 for s in range(4)] + [
        lr * 0.5 * (1 + math.cos(math.pi * (s - 4) / 6)) for s in range(4, 10)
    ]
    assert learning_rates(quadratic, 10) == pytest.approx(expected, rel=1e-9, abs=1e-15)

    held = config(
        lr_scheduler="cosine",
        warmup_steps=2,
        cosine_min_lr_ratio=0.1,
        cosine_constant_lr_ratio=0.6,
    )
    # 10 steps: the floor is reached at int(10 * 0.6) = 6 and kept.
    expected = [0.0, lr / 2] + [
        lr * (0.9 * 0.5 * (1 + math.cos(math.pi * (min(s, 6) - 2) / 4)) + 0.1) for s in range(2, 10)
    ]
    rates = learning_rates(held, 10)
    assert rates == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert rates[6:] == pytest.approx([1e-4] * 4)

    eta = config(lr_scheduler="cosine", lr_scheduler_kwargs={"eta_min": 2e-4})
    expected = [2e-4 + (lr - 2e-4) * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    assert learning_rates(eta, 10) == pytest.approx(expected, rel=1e-9)

    _, said = checked(lr_scheduler="linear", lr_quadratic_warmup=True)
    assert any("lr_quadratic_warmup: is ignored with `lr_scheduler: linear`" in w for w in said)
    with pytest.raises(ConfigError, match="cosine_constant_lr_ratio: needs `lr_scheduler: cosine`"):
        config(cosine_constant_lr_ratio=0.8)
    with pytest.raises(ConfigError, match="eta_min and cosine_min_lr_ratio each set the floor"):
        config(lr_scheduler_kwargs={"eta_min": 1e-5}, cosine_min_lr_ratio=0.1)


def padding(trainer) -> int:
    """Pad tokens in one epoch of the trainer's train batches."""
    return sum(
        int((batch["attention_mask"] == 0).sum()) for batch in trainer.get_train_dataloader()
    )


def test_group_by_length_batches_rows_of_similar_length():
    """transformers 5 has no group_by_length argument; Ferry asks for its length-grouped
    sampler, and the padding in an epoch falls well below random batches'."""
    import random

    lengths = list(range(2, 42))
    random.Random(0).shuffle(lengths)
    rows = [list(range(3, 3 + n)) for n in lengths]
    grouped = padding(ferry_trainer(config(group_by_length=True), "o", rows))
    shuffled = padding(ferry_trainer(config(), "o", rows))
    # Random pairs of 2..41 differ by ~13 on average (20 batches: ~270 pad tokens); the
    # sampler sorts each 10-row mega-batch, leaving ~4 per batch.
    assert grouped < shuffled / 3, (grouped, shuffled)
    _, said = checked(group_by_length=True, sample_packing=True)
    assert any("group_by_length: is ignored with sample_packing" in w for w in said), said


@pytest.mark.slow
def test_early_stopping_ends_the_run_once_eval_loss_stops_improving(tmp_path):
    """A learning rate far too high: the eval loss rises, and the run stops after
    `patience` evaluations without a new best, long before max_steps."""
    cfg = config(
        learning_rate=0.3,
        max_steps=30,
        val_set_size=0.1,
        eval_steps=1,
        early_stopping_patience=2,
    )
    trainer = ferry_trainer(cfg, tmp_path, ROWS, eval_rows=ROWS[:4])
    trainer.train()
    losses = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
    best, waited, stop = float("inf"), 0, None
    for step, loss in enumerate(losses, start=1):
        best, waited = (loss, 0) if loss < best else (best, waited + 1)
        if waited == 2:
            stop = step
            break
    assert stop is not None and trainer.state.global_step == stop < 30, losses
    assert max(losses) > min(losses)
    # The best checkpoint comes back at the end only where saves fall on evaluations.
    aligned = config(val_set_size=0.1, eval_steps=2, save_steps=4, early_stopping_patience=2)
    assert training_arguments(aligned, SINGLE, "o", 80, True).load_best_model_at_end is True
    apart = config(val_set_size=0.1, eval_steps=3, save_steps=4, early_stopping_patience=2)
    assert training_arguments(apart, SINGLE, "o", 80, True).load_best_model_at_end is False
    with pytest.raises(ConfigError, match="early_stopping_patience: needs evaluation"):
        config(early_stopping_patience=2)


@pytest.mark.slow
def test_save_only_model_checkpoints_hold_weights_and_cannot_be_resumed(tmp_path):
    """Checkpoints without optimizer, scheduler or RNG state; a resume from one named
    by the user is refused by name, auto-resume starts over. Weights are safetensors
    either way (transformers 5 writes nothing else): save_safetensors false is refused."""
    from payload.durability import resume_point
    from payload.errors import FerryError

    out = tmp_path / "out"
    cfg = config(save_only_model=True, save_steps=1, max_steps=1, output_dir=str(out))
    ferry_trainer(cfg, out, ROWS).train()
    files = {p.name for p in (out / "checkpoint-1").iterdir()}
    assert "model.safetensors" in files and "trainer_state.json" in files
    assert not files & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "pytorch_model.bin"}
    full = tmp_path / "full"
    ferry_trainer(config(save_steps=1, output_dir=str(full)), full, ROWS).train()
    assert {"optimizer.pt", "scheduler.pt"} <= {p.name for p in (full / "checkpoint-1").iterdir()}

    named = config(resume_from_checkpoint=str(out / "checkpoint-1"), output_dir=str(out))
    with pytest.raises(FerryError, match="resume_from_checkpoint: checkpoint-1 holds the model"):
        resume_point(named, str(out), SINGLE, None)
    auto = config(auto_resume_from_checkpoints=True, output_dir=str(out))
    assert resume_point(auto, str(out), SINGLE, None) is None
    assert resume_point(auto, str(full), SINGLE, None) == str(full / "checkpoint-1")

    _, said = checked(save_only_model=True)
    assert any("save_only_model: checkpoints hold no optimizer" in w for w in said), said
    assert config(save_safetensors=True).save_safetensors is True
    with pytest.raises(ConfigError, match="save_safetensors: false is not possible"):
        config(save_safetensors=False)


def compiled_with(module) -> tuple[str, dict]:
    """(backend name, its arguments) torch.compile wrapped `module` with: read from the
    compiled module's chain of dynamo wrappers (torch internals; the edge we do not own)."""
    link = module.dynamo_ctx.callback
    while link is not None and not hasattr(link, "compiler_name"):
        link = getattr(link, "_torchdynamo_orig_backend", None)
    assert link is not None, "no backend found on the compiled module"
    return link.compiler_name, link.kwargs


@pytest.mark.slow
def test_torch_compile_trains_the_compiled_model_with_that_backend_and_mode(tmp_path):
    """aot_eager stands in for inductor (same tracing, no C++ build: seconds on CPU)."""
    import torch._dynamo
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    from payload.errors import FerryError
    from payload.trainers.settings import compile_arguments

    torch._dynamo.reset()
    counters.clear()
    cfg = config(
        torch_compile=True, torch_compile_backend="aot_eager", torch_compile_mode="max-autotune"
    )
    trainer = ferry_trainer(cfg, tmp_path, ROWS)
    trainer.train()
    assert isinstance(trainer.model_wrapped, OptimizedModule)
    assert compiled_with(trainer.model_wrapped) == ("aot_eager", {"mode": "max-autotune"})
    assert counters["stats"]["unique_graphs"] >= 1  # the step ran through compiled graphs
    auto = config(torch_compile="auto")
    assert compile_arguments(auto, cuda=False) == {}
    assert compile_arguments(auto, cuda=True)["torch_compile_backend"] == "inductor"
    with pytest.raises(FerryError, match="torch_compile_backend: `inductr` is not a backend"):
        compile_arguments(config(torch_compile=True, torch_compile_backend="inductr"), cuda=False)
    _, said = checked(torch_compile_mode="max-autotune")
    assert any("torch_compile_mode: is ignored without `torch_compile" in w for w in said)


@pytest.mark.slow
def test_disk_offloading_moves_saved_activations_to_files_and_changes_no_number(tmp_path):
    """`gradient_checkpointing: offload_disk` (Axolotl's older spelling of
    activation_offloading: disk): during backward the saved activations are files, read
    back; the step's weights equal checkpointing alone, bit for bit. The CPU/GPU modes
    need CUDA (tests/test_gpu.py measures them); on a CPU they say so and do nothing."""
    from pathlib import Path

    import torch

    reference = ferry_trainer(config(gradient_checkpointing=True), tmp_path / "ref", ROWS)
    reference.train()
    trainer = ferry_trainer(config(gradient_checkpointing="offload_disk"), tmp_path / "disk", ROWS)
    folder = Path(trainer.offload.folder.name)
    on_disk: list[int] = []
    trainer.model.model.layers[0].register_full_backward_pre_hook(
        lambda *_: on_disk.append(len(list(folder.iterdir())))
    )
    trainer.train()
    assert trainer.args.gradient_checkpointing is True
    assert trainer.offload.offloaded > 0 and on_disk and on_disk[0] > 0
    assert list(folder.iterdir()) == []  # each file goes once backward has used it
    for (name, a), (_, b) in zip(
        reference.model.named_parameters(), trainer.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name

    assert not torch.cuda.is_available()
    cpu = ferry_trainer(config(gradient_checkpointing=True, activation_offloading=True), "o", ROWS)
    assert type(cpu.offload).__name__ == "nullcontext"
    with pytest.raises(ConfigError, match="activation_offloading: needs `gradient_checkpointing"):
        config(activation_offloading="legacy")


def test_debug_prints_the_first_rows_with_the_trained_tokens_marked():
    """`debug: true`: rank 0 prints rows of the prepared train set before training; the
    alpaca response (with the end-of-sequence token) is what is marked as trained."""
    import json

    from payload.data.build import build_datasets
    from payload.model import load_tokenizer
    from payload.trainers.settings import debug_rows

    cfg = config(debug=True, shuffle_merged_datasets=False)
    tokenizer = load_tokenizer(cfg)
    train_set, _, _ = build_datasets(cfg, tokenizer)
    lines = debug_rows(train_set, tokenizer)
    first = [json.loads(line) for line in DATA.read_text().splitlines()[:5]]
    assert len(lines) == 5
    for line, row in zip(lines, first, strict=True):
        assert f"[[{row['output']}{tokenizer.eos_token}]]" in line, line
        assert row["instruction"] in line.split("[[")[0]
