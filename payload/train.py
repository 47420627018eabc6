"""Supervised fine-tuning with the HF Trainer: the path every backend ends up running.

`run(cfg)` sets up distributed, builds the data and the model, trains, and saves the
final adapter or model with `save_pretrained` plus `metrics.jsonl`, `summary.json` and
the resolved `config.yml` in `output_dir`.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from payload import distributed
from payload.config.schema import TrainConfig
from payload.data.build import DataReport, build_datasets
from payload.metrics import MetricsCallback
from payload.model import load_model, load_tokenizer, use_bf16
from payload.storage.layout import CONFIG_FILE, SUMMARY_FILE, read_metrics
from payload.watchdog import LossWatchdog

if TYPE_CHECKING:
    from payload.durability import StopRequest

log = logging.getLogger("ferry.train")

DEFAULT_OUTPUT_DIR = "./model-out"  # Axolotl's default, for `python -m payload` run by hand


def steps_per_epoch(
    cfg: TrainConfig, rows: int | None, world_size: int, batches: int | None = None
) -> int:
    """Optimizer steps in one epoch, as the HF Trainer counts them. `batches` (per rank)
    replaces the count from rows where packing decides it; a stream (no row count) has
    no epochs, so its `max_steps` stand in."""
    if batches is None and rows is None:
        return max(cfg.max_steps or 1, 1)
    if batches is None:
        batches = math.ceil(rows / (cfg.micro_batch_size * world_size))
    return max(batches // cfg.gradient_accumulation_steps, 1)


def training_arguments(
    cfg: TrainConfig,
    dist: distributed.DistInfo,
    output_dir: str,
    train_rows: int | None,
    has_eval: bool,
    batches: int | None = None,
) -> Any:
    import torch
    from transformers import TrainingArguments

    per_epoch = steps_per_epoch(cfg, train_rows, dist.world_size, batches)
    save: dict[str, Any] = {"save_strategy": "epoch"}
    if cfg.save_strategy == "no":
        save = {"save_strategy": "no"}
    elif cfg.save_strategy != "epoch" and (cfg.save_steps or cfg.saves_per_epoch):
        every = cfg.save_steps or max(per_epoch // (cfg.saves_per_epoch or 1), 1)
        save = {"save_strategy": "steps", "save_steps": every}
    evaluation: dict[str, Any] = {"eval_strategy": "no"}
    # evals_per_epoch: 0 means no evaluation while training, unless eval_steps asks
    # for it (as in Axolotl, where 0 is simply unset).
    if has_eval and (cfg.evals_per_epoch != 0 or cfg.eval_steps):
        evaluation = {"eval_strategy": "epoch"}
        if cfg.eval_steps or cfg.evals_per_epoch:
            every = cfg.eval_steps or max(per_epoch // (cfg.evals_per_epoch or 1), 1)
            evaluation = {"eval_strategy": "steps", "eval_steps": every}
    cuda = torch.cuda.is_available()
    sharding: dict[str, Any] = {}
    if cfg.deepspeed:
        sharding["deepspeed"] = cfg.deepspeed
    if cfg.fsdp_config:
        sharding.update(fsdp="full_shard auto_wrap", fsdp_config=dict(cfg.fsdp_config))
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing.
    fields = TrainingArguments.__dataclass_fields__
    checkpointing = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    # Non-reentrant checkpointing unless asked otherwise (Axolotl's default when no
    # arguments are given; kept here also when some are given without use_reentrant).
    checkpoint_kwargs = None
    if cfg.gradient_checkpointing:
        checkpoint_kwargs = {"use_reentrant": False, **(cfg.gradient_checkpointing_kwargs or {})}
    # Axolotl's cosine_min_lr_ratio is transformers' cosine_with_min_lr (the same curve).
    scheduler, scheduler_kwargs = cfg.lr_scheduler, dict(cfg.lr_scheduler_kwargs or {})
    if cfg.cosine_min_lr_ratio is not None and scheduler in ("cosine", "cosine_with_min_lr"):
        scheduler = "cosine_with_min_lr"
        scheduler_kwargs.setdefault("min_lr_rate", cfg.cosine_min_lr_ratio)
    adam = {
        name: value
        for name in ("adam_beta1", "adam_beta2", "adam_epsilon")
        if (value := getattr(cfg, name)) is not None
    }
    return TrainingArguments(
        output_dir=output_dir,
        **{checkpointing: cfg.gradient_checkpointing},
        **{f"{checkpointing}_kwargs": checkpoint_kwargs},
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        # transformers 5 reads a warmup below 1 as a fraction of all steps.
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else (cfg.warmup_ratio or 0),
        optim=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        **adam,
        max_grad_norm=cfg.max_grad_norm or 0.0,
        bf16=use_bf16(cfg),
        fp16=bool(cfg.fp16),
        tf32=cfg.tf32 if cuda else None,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        # The trainer logs a running mean in place of a nan/inf loss, which would hide a
        # broken-down loss from the watchdog.
        logging_nan_inf_filter=cfg.loss_watchdog_threshold is None,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,  # MetricsCallback prints one line per log instead
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_backend=dist.backend,
        ddp_timeout=dist.timeout_s,
        ddp_find_unused_parameters=(bool(cfg.ddp_find_unused_parameters) if dist.backend else None),
        use_cpu=not cuda,
        **save,
        **evaluation,
        **sharding,
    )


def unpacked_collator(cfg: TrainConfig, tokenizer: Any) -> Any:
    """One row per example, padded to the longest in the batch, or to sequence_len with
    `pad_to_sequence_len` (fixed shapes). Packed batches have their own collator."""
    from transformers import DataCollatorForSeq2Seq

    if cfg.pad_to_sequence_len:
        return DataCollatorForSeq2Seq(
            tokenizer, padding="max_length", max_length=cfg.sequence_len, label_pad_token_id=-100
        )
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def _quiet_libraries(is_main: bool) -> None:
    """Keep the run's log to what the user can act on."""
    import warnings

    import datasets
    import transformers

    # Deprecations inside transformers/peft are theirs to fix, not the user's.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if is_main:
        transformers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; return the summary (also written to `summary.json`)."""
    from payload.durability import StopRequest

    # From here on, SIGTERM and SIGINT mean "save and stop", even before training starts.
    stop = StopRequest(int(os.environ.get("RANK", "0"))).install()
    dist = distributed.setup(cfg.ddp_timeout)
    finished = False
    try:
        summary = _train(cfg, dist, stop)
        finished = True
        return summary
    finally:
        # `_train` has returned, so the trainer and the DDP model are unreachable; collect
        # them while the process group still exists. Freed after `teardown`, the DDP
        # reducer would destroy the gloo group itself, holding the GIL while gloo's worker
        # thread waits for it: a deadlock at exit, seen here in one run of several.
        gc.collect()
        distributed.teardown(synchronize=finished)


def _train(cfg: TrainConfig, dist: distributed.DistInfo, request: StopRequest) -> dict[str, Any]:
    from transformers import PrinterCallback, Trainer, set_seed

    from payload import durability

    stop = durability.StopOnSignal(request, dist)
    _quiet_libraries(dist.is_main)
    output_dir = cfg.output_dir or DEFAULT_OUTPUT_DIR
    run_id = os.environ.get("FERRY_RUN_ID")
    store = durability.open_run_store(cfg)
    set_seed(cfg.seed)
    started = time.time()
    tokenizer = load_tokenizer(cfg)
    train_set, eval_set, report = build_datasets(cfg, tokenizer)
    if dist.is_main:
        for line in report.lines():
            print(f"data: {line}", flush=True)
    model = load_model(cfg, tokenizer)
    if dist.is_main:
        _print_model(model, cfg, dist)
    packing = None
    if cfg.sample_packing:
        from payload.packed_trainer import packing_setup

        attention = getattr(model.config, "_attn_implementation", None)
        packing = packing_setup(cfg, tokenizer, train_set, eval_set, dist, attention)
    args = training_arguments(
        cfg,
        dist,
        output_dir,
        len(train_set) if hasattr(train_set, "__len__") else None,
        eval_set is not None,
        len(packing.train) if packing else None,
    )
    callbacks: list[Any] = [MetricsCallback(output_dir, dist.is_main), stop]
    watchdog = LossWatchdog.of(cfg)
    if watchdog:
        callbacks.append(watchdog)
    sync = None
    if store is not None:
        sync = durability.StorageSync(
            store, output_dir, run_id, cfg.save_total_limit, dist.is_main, dist.backend is not None
        )
        callbacks.append(sync)
    trainer_cls: Any = Trainer
    extra: dict[str, Any] = {}
    if packing:
        from payload.packed_trainer import PackedTrainer

        trainer_cls, extra = PackedTrainer, {"packing": packing}
    trainer = trainer_cls(
        model=model,
        args=args,
        data_collator=unpacked_collator(cfg, tokenizer),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=callbacks,
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # MetricsCallback prints a tidier line
    resume = durability.resume_point(cfg, output_dir, dist, store)
    resumed_step = _checkpoint_step(resume)
    if resume and dist.is_main:
        print(f"resuming from step {resumed_step} ({resume})", flush=True)
    if stop.agreed():  # all ranks together: a signal may have reached only some so far
        raise durability.Preempted(request.signame or "a stop signal on another rank", None, None)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except (OSError, RuntimeError) as e:  # a save that ran out of room says so
        full = durability.full_disk_error(e, output_dir, store, dist.is_main)
        if full is None:
            raise
        raise full from e

    def uploaded(step: int) -> str | None:
        """Where checkpoint-`step` is in storage (None without), once rank 0 has uploaded
        it: every rank stays until the upload is done (or has failed)."""
        if sync:
            distributed.on_rank0(dist, f"the upload of checkpoint-{step}", sync.wait, sync.meter)
        return store.child(f"checkpoints/checkpoint-{step}") if store else None

    if stop.stopped_at is not None:
        step = stop.stopped_at
        raise durability.Preempted(request.signame, step, uploaded(step) or output_dir)
    if watchdog and watchdog.tripped:
        step = watchdog.tripped[0]
        where = uploaded(step) or Path(output_dir) / f"checkpoint-{step}"
        raise watchdog.error(str(where))
    trainer.save_model(output_dir)
    summary: dict[str, Any] = {}
    if dist.is_main:
        tokenizer.save_pretrained(output_dir)
        summary = _write_summary(cfg, output_dir, report, started, resumed_step)
    if sync:
        distributed.on_rank0(dist, "the final upload", sync.finish, sync.meter)
    return summary


def _checkpoint_step(path: str | None) -> int | None:
    """The step a checkpoint folder holds, from its name."""
    if not path:
        return None
    name = Path(path).name
    return int(name.rsplit("-", 1)[1]) if name.startswith("checkpoint-") else None


def _print_model(model: Any, cfg: TrainConfig, dist: distributed.DistInfo) -> None:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kind = cfg.adapter or "full fine-tune"
    where = f"{dist.world_size} x {dist.device.split(':')[0]}"
    if dist.backend:
        where += f" ({dist.backend})"
    print(
        f"model: {cfg.base_model} | {kind} | {trainable:,} of {total:,} parameters trained "
        f"| {where}",
        flush=True,
    )


def _write_summary(
    cfg: TrainConfig, output_dir: str, report: DataReport, started: float, resumed: int | None
) -> dict[str, Any]:
    records = read_metrics(output_dir)
    losses = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    rates = [r["tokens_per_s"] for r in losses if r.get("tokens_per_s")]
    summary = {
        "run_id": os.environ.get("FERRY_RUN_ID"),
        "steps": records[-1]["step"] if records else 0,
        "first_loss": losses[0]["loss"] if losses else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens_per_s": round(sum(rates) / len(rates), 1) if rates else None,
        "wall_s": round(time.time() - started, 1),
        "resumed_from_step": resumed,
        "rows": report.summary(),
        "output_dir": str(Path(output_dir).resolve()),
        "artifact": "adapter" if cfg.adapter else "model",
    }
    out = Path(output_dir)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (out / CONFIG_FILE).write_text(
        yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    )
    first, final = summary["first_loss"], summary["final_loss"]
    loss = (
        f"loss {first:.4f} -> {final:.4f} ({(final - first) / first:+.0%})"
        if first and final
        else "no loss logged"
    )
    print(
        f"done: {summary['steps']} steps in {summary['wall_s']}s, {loss}; "
        f"{summary['artifact']} saved to {summary['output_dir']}",
        flush=True,
    )
    return summary
