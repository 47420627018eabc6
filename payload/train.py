"""Training: the path every backend ends up running, whatever the objective.

`run(cfg)` sets up distributed and the trackers, then asks the objective's recipe
(`payload.trainers`) for the datasets, the model, the arguments and the trainer, and
keeps for itself what every objective shares: durability (signals, storage sync,
resume), the loss watchdog, metrics and the summary. It trains, and saves the
final adapter or model with `save_pretrained` plus `metrics.jsonl`, `summary.json` and
the resolved `config.yml` in `output_dir`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from payload import distributed, parallel
from payload.config.schema import TrainConfig
from payload.data.build import DataReport
from payload.metrics import PROGRESS, MetricsCallback
from payload.parallel import deepspeed as zero
from payload.parallel import mesh
from payload.plugins import Plugins
from payload.storage.layout import CONFIG_FILE, SUMMARY_FILE, read_metrics
from payload.trackers import Trackers, reporting
from payload.trainers import recipe_for
from payload.trainers.settings import settings_callbacks, training_arguments
from payload.watchdog import LossWatchdog

if TYPE_CHECKING:
    from payload.durability import StopRequest

log = logging.getLogger("ferry.train")

DEFAULT_OUTPUT_DIR = "./model-out"  # Axolotl's default, for `python -m payload` run by hand


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


def run(cfg: TrainConfig, reporter: Any = None) -> dict[str, Any]:
    """Train as configured; return the summary (also written to `summary.json`).
    `reporter(dist, uploaded)`, if given, makes a callback that hears of each checkpoint
    once every node has uploaded it (`uploaded(step)` waits for that and returns where it
    is): Ray's driver reports checkpoints to Ray this way (payload.entry.ray)."""
    from payload.durability import StopRequest

    # From here on, SIGTERM and SIGINT mean "save and stop", even before training starts.
    stop = StopRequest(int(os.environ.get("RANK", "0"))).install()
    # The device mesh right after the process group: the one place both are made.
    dist = mesh.with_mesh(cfg, distributed.setup(cfg.ddp_timeout))
    finished = False
    try:
        with reporting(cfg, cfg.output_dir or DEFAULT_OUTPUT_DIR, dist.is_main) as trackers:
            summary = _train(cfg, dist, stop, trackers, reporter)
        finished = True
        return summary
    finally:
        # `_train` has returned, so the trainer and the DDP model are unreachable; collect
        # them while the process group still exists. Freed after `teardown`, the DDP
        # reducer would destroy the gloo group itself, holding the GIL while gloo's worker
        # thread waits for it: a deadlock at exit, seen here in one run of several.
        gc.collect()
        distributed.teardown(synchronize=finished)


def _train(
    cfg: TrainConfig,
    dist: distributed.DistInfo,
    request: StopRequest,
    trackers: Trackers,
    reporter: Any = None,
) -> dict[str, Any]:
    from transformers import PrinterCallback, set_seed

    from payload import durability

    stop = durability.StopOnSignal(request, dist)
    _quiet_libraries(dist.is_main)
    plugins = Plugins(cfg)  # payload.plugins: the config's own hooks into this run
    if plugins.items and dist.is_main:
        print(f"plugins: {', '.join(plugins.names)}", flush=True)
    plugins.after_config()
    output_dir = cfg.output_dir or DEFAULT_OUTPUT_DIR
    run_id = os.environ.get("FERRY_RUN_ID")
    store = durability.open_run_store(cfg)
    set_seed(cfg.seed)
    started = time.time()
    # DeepSpeed, if asked for, before anything imports it (it picks its device then).
    zero_run = zero.prepare(cfg, dist)
    recipe = recipe_for(cfg, dist)
    tokenizer = recipe.tokenizer()
    train_set, eval_set, report = recipe.datasets(tokenizer)
    if dist.is_main:
        for line in report.lines():
            print(f"data: {line}", flush=True)
        if cfg.debug:
            for line in recipe.debug_lines(train_set, tokenizer):
                print(f"debug: {line}", flush=True)
    plugins.before_model()
    model = plugins.after_model(recipe.load_model(tokenizer))
    model = parallel.apply(model, cfg, dist)  # FSDP2, when asked for (payload.parallel)
    if dist.is_main:
        _print_model(model, cfg, dist, recipe.name)
    batches = recipe.prepare(model, tokenizer, train_set, eval_set)
    args = training_arguments(
        cfg,
        dist,
        output_dir,
        len(train_set) if hasattr(train_set, "__len__") else None,
        eval_set is not None,
        batches,
        trackers,
        cls=recipe.arguments_class(),
        objective=recipe.objective_arguments(),
    )
    callbacks: list[Any] = [
        durability.NoStepPastTheEnd(),  # first of Ferry's: before any step's work
        MetricsCallback(output_dir, dist.is_main),
        stop,
    ]
    callbacks += settings_callbacks(cfg, args)
    callbacks += plugins.callbacks()
    if zero_run:
        callbacks.append(zero_run.report())
    watchdog = LossWatchdog.of(cfg)
    if watchdog:
        callbacks.append(watchdog)
    sync = None
    if store is not None:
        sync = durability.StorageSync.for_run(store, output_dir, run_id, cfg.save_total_limit, dist)
        callbacks.append(sync)

    def uploaded(step: int) -> str | None:
        """Where checkpoint-`step` is in storage (None without), once every node has
        uploaded its part and rank 0 the trackers' files: every rank stays until the
        uploads are done (or have failed)."""
        if sync:

            def upload() -> None:
                sync.wait()
                sync.put_trackers()

            distributed.on_each_node(dist, f"the upload of checkpoint-{step}", upload, sync.meter)
        return store.child(f"checkpoints/checkpoint-{step}") if store else None

    if reporter is not None:
        callbacks.append(reporter(dist, uploaded))  # after the sync: it queued the upload
    callbacks.append(durability.OneSavePerStep())  # last: it overrules the others at epoch end
    trainer = recipe.trainer(model, args, train_set, eval_set, tokenizer, callbacks)
    trainer.remove_callback(PrinterCallback)  # MetricsCallback prints a tidier line
    resume = durability.resume_point(cfg, output_dir, dist, store)
    trackers.begin()
    resumed_step = _checkpoint_step(resume)
    if resume and dist.is_main:
        print(f"resuming from step {resumed_step} ({resume})", flush=True)
    if stop.agreed():  # all ranks together: a signal may have reached only some so far
        raise durability.Preempted(request.signame or "a stop signal on another rank", None, None)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except durability.AlreadyTrained as done:
        _end_without_steps(trainer, done.step, dist)
    except (OSError, RuntimeError) as e:  # a save that ran out of room says so
        full = durability.full_disk_error(e, output_dir, store, dist.is_main)
        if full is None:
            raise
        raise full from e
    # The trackers' runs end with the training: their files are complete before any
    # upload below takes them (an offline W&B run flushes its records only when it ends).
    trackers.close()

    if stop.stopped_at is not None:
        step = stop.stopped_at
        raise durability.Preempted(request.signame, step, uploaded(step) or output_dir)
    if watchdog and watchdog.tripped:
        step = watchdog.tripped[0]
        where = uploaded(step) or Path(output_dir) / f"checkpoint-{step}"
        raise watchdog.error(str(where))
    trainer.save_model(output_dir)
    if zero_run:  # a ZeRO-3 model saved as shards becomes a save_pretrained one
        zero_run.finish(trainer, output_dir)
    summary: dict[str, Any] = {}
    if dist.is_main:
        recipe.processing_class(tokenizer).save_pretrained(output_dir)  # a VLM's processor
        summary = _write_summary(cfg, output_dir, report, started, resumed_step)
    plugins.after_training(summary)  # before the final upload: what it writes goes too
    if sync:
        distributed.on_each_node(dist, "the final upload", sync.finish, sync.meter)
    return summary


def _end_without_steps(trainer: Any, step: int, dist: distributed.DistInfo) -> None:
    """What transformers does at the end of training, for a run resumed from the
    checkpoint of its last step (durability.NoStepPastTheEnd): the best checkpoint
    loaded where the config asks for it, and the callbacks' end of training."""
    if dist.is_main:
        last = trainer.state.max_steps
        why = "was the run's last" if step == last else f"is past the schedule's {last} steps"
        print(f"step {step} {why}: nothing left to train", flush=True)
    if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint:
        trainer._load_best_model()  # the step transformers' own finish takes (no public form)
    trainer.control = trainer.callback_handler.on_train_end(
        trainer.args, trainer.state, trainer.control
    )


def _checkpoint_step(path: str | None) -> int | None:
    """The step a checkpoint folder holds, from its name."""
    if not path:
        return None
    name = Path(path).name
    return int(name.rsplit("-", 1)[1]) if name.startswith("checkpoint-") else None


def _print_model(model: Any, cfg: TrainConfig, dist: distributed.DistInfo, objective: str) -> None:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kind = cfg.adapter or "full fine-tune"
    if objective != "sft":
        kind = f"{objective} | {kind}"
    where = f"{dist.world_size} x {dist.device.split(':')[0]}"
    if dist.backend:
        where += f" ({dist.backend})"
    print(
        f"model: {cfg.base_model} | {kind} | {trainable:,} of {total:,} parameters trained "
        f"| {where}",
        flush=True,
    )


def _progress(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The objective's own measure of progress, first and last (GRPO's reward, DPO's
    margin, a reward model's accuracy): the first of metrics.PROGRESS the trainer logs."""
    for key, _ in PROGRESS:
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            return {"metric": key, "first": values[0], "final": values[-1]}
    return None


def _write_summary(
    cfg: TrainConfig, output_dir: str, report: DataReport, started: float, resumed: int | None
) -> dict[str, Any]:
    records = read_metrics(output_dir)
    losses = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    rates = [r["tokens_per_s"] for r in losses if r.get("tokens_per_s")]
    summary = {
        "run_id": os.environ.get("FERRY_RUN_ID"),
        # The last step trained; a run resumed from its last step logged nothing new,
        # and its history may end before that step (logging_steps, an upload cut short).
        "steps": max(records[-1]["step"] if records else 0, resumed or 0),
        "first_loss": losses[0]["loss"] if losses else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "progress": _progress(losses),
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
    if first is None or final is None:
        loss = "no loss logged"
    else:
        # A policy-gradient loss (GRPO) starts at 0: no relative change to show.
        change = f" ({(final - first) / first:+.0%})" if first else ""
        loss = f"loss {first:.4f} -> {final:.4f}{change}"
    if progress := summary["progress"]:
        loss += f", {progress['metric']} {progress['first']:.4f} -> {progress['final']:.4f}"
    print(
        f"done: {summary['steps']} steps in {summary['wall_s']}s, {loss}; "
        f"{summary['artifact']} saved to {summary['output_dir']}",
        flush=True,
    )
    return summary
