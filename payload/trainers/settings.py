"""The Axolotl trainer settings every recipe shares: the training arguments built from a
config, torch.compile, activation offloading, the shaped cosine schedules, the callbacks
some settings add, and the plain (unpacked) collator.

`SettingsMixin` puts the settings the HF Trainer has no argument for (a quadratic
warmup, a held cosine floor, activation offloading) on any Trainer subclass, TRL's
included: `with_settings(DPOTrainer)`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import Trainer

from payload import distributed
from payload.config.rules import fsdp_reading
from payload.config.schema import TrainConfig
from payload.errors import FerryError
from payload.model import use_bf16
from payload.parallel.context import ContextParallelMixin
from payload.parallel.fsdp import ShardedTrainerMixin
from payload.parallel.mesh import data_shard

if TYPE_CHECKING:
    from payload.trackers import Trackers

log = logging.getLogger("ferry.train")


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
    trackers: Trackers | None = None,
    *,
    cls: Any = None,
    objective: dict[str, Any] | None = None,
) -> Any:
    """The arguments for the run's trainer: `cls` is the recipe's arguments class
    (TrainingArguments, or a TRL config, which subclasses it) and `objective` the
    recipe's own settings on top (DPO's beta and loss, say)."""
    import torch
    from transformers import TrainingArguments

    cls = cls or TrainingArguments

    # Steps count the data-parallel replicas' batches: a context-parallel group shares one.
    replicas = data_shard(cfg, dist.rank, dist.world_size)[1]
    per_epoch = steps_per_epoch(cfg, train_rows, replicas, batches)
    save: dict[str, Any] = {"save_strategy": "epoch"}
    if cfg.save_strategy == "no":
        save = {"save_strategy": "no"}
    elif cfg.save_strategy != "epoch" and (cfg.save_steps or cfg.saves_per_epoch):
        every = cfg.save_steps or max(per_epoch // (cfg.saves_per_epoch or 1), 1)
        save = {"save_strategy": "steps", "save_steps": every}
    evaluation: dict[str, Any] = {"eval_strategy": "no"}
    strategy = cfg.eval_strategy or cfg.evaluation_strategy
    # evals_per_epoch: 0 means no evaluation while training, unless eval_steps asks
    # for it (as in Axolotl, where 0 is simply unset).
    if strategy == "no" or not has_eval:
        pass
    elif strategy == "epoch":
        evaluation = {"eval_strategy": "epoch"}
    elif cfg.evals_per_epoch != 0 or cfg.eval_steps:
        evaluation = {"eval_strategy": "epoch"}
        if cfg.eval_steps or cfg.evals_per_epoch:
            every = cfg.eval_steps or max(per_epoch // (cfg.evals_per_epoch or 1), 1)
            evaluation = {"eval_strategy": "steps", "eval_steps": every}
    if cfg.early_stopping_patience and evaluation["eval_strategy"] != "no":
        # EarlyStoppingCallback compares this metric; the best checkpoint is loaded at the
        # end only where checkpoints fall on evaluations (transformers' own condition).
        evaluation.update(metric_for_best_model="loss", greater_is_better=False)
        same = save["save_strategy"] == evaluation["eval_strategy"]
        if same and save["save_strategy"] == "steps":
            same = save["save_steps"] % evaluation["eval_steps"] == 0
        evaluation["load_best_model_at_end"] = same
    cuda = torch.cuda.is_available()
    sharding: dict[str, Any] = {}
    if cfg.deepspeed:
        from payload.parallel.deepspeed import trainer_config

        # On a CPU, `use_cpu` below is what lets accelerate count the gloo ranks under
        # DeepSpeed (payload.parallel.deepspeed).
        sharding["deepspeed"] = trainer_config(cfg)
    # FSDP2 is applied by Ferry (payload.parallel), never asked of the Trainer: on a CPU,
    # accelerate would silently train DDP. The sharded model was checkpointed there too.
    sharded = fsdp_reading(cfg).settings is not None and dist.mesh is not None
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing.
    fields = cls.__dataclass_fields__
    checkpointing = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    # Non-reentrant checkpointing unless asked otherwise (Axolotl's default when no
    # arguments are given; kept here also when some are given without use_reentrant).
    checkpoint_kwargs = None
    if cfg.gradient_checkpointing:  # true, or Axolotl's `offload` / `offload_disk`
        checkpoint_kwargs = {"use_reentrant": False, **(cfg.gradient_checkpointing_kwargs or {})}
    # Axolotl's cosine_min_lr_ratio is transformers' cosine_with_min_lr (the same curve).
    scheduler, scheduler_kwargs = cfg.lr_scheduler, dict(cfg.lr_scheduler_kwargs or {})
    if cfg.cosine_min_lr_ratio is not None and scheduler in ("cosine", "cosine_with_min_lr"):
        scheduler = "cosine_with_min_lr"
        scheduler_kwargs.setdefault("min_lr_rate", cfg.cosine_min_lr_ratio)
    # eta_min is torch's CosineAnnealingLR name for the floor, an absolute learning rate.
    if scheduler == "cosine" and "eta_min" in scheduler_kwargs:
        scheduler = "cosine_with_min_lr"
        scheduler_kwargs["min_lr"] = scheduler_kwargs.pop("eta_min")
    adam = {
        name: value
        for name in ("adam_beta1", "adam_beta2", "adam_epsilon")
        if (value := getattr(cfg, name)) is not None
    }
    values: dict[str, Any] = dict(
        output_dir=output_dir,
        **{checkpointing: bool(cfg.gradient_checkpointing) and not sharded},
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
        save_only_model=bool(cfg.save_only_model),
        # transformers 5 took out group_by_length; this is its LengthGroupedSampler.
        # Packed batches come from their own sampler, where it has no meaning.
        train_sampling_strategy=(
            "group_by_length" if cfg.group_by_length and not cfg.sample_packing else "random"
        ),
        # Not under FSDP2 or context parallel yet (`torch_compile: true` is refused with
        # them; `auto` stays off).
        **(compile_arguments(cfg, cuda) if dist.mesh is None else {}),
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=(trackers.report_to if trackers else None) or "none",
        run_name=trackers.run_name if trackers else None,
        **(trackers.args if trackers else {}),
        disable_tqdm=True,  # MetricsCallback prints one line per log instead
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_backend=dist.backend,
        ddp_timeout=dist.timeout_s,
        ddp_find_unused_parameters=(find_unused(cfg) if dist.backend else None),
        use_cpu=not cuda,
        **save,
        **evaluation,
        **sharding,
    )
    values.update(objective or {})
    return cls(**values)


def find_unused(cfg: TrainConfig) -> bool:
    """DDP's search for parameters without a gradient: as set; else on for a
    vision-language model whose towers train (a tower's last norm, or the layers past the
    one whose features are read, never get one), off otherwise."""
    if cfg.ddp_find_unused_parameters is not None:
        return bool(cfg.ddp_find_unused_parameters)
    if not cfg.processor_type or cfg.freeze_mm_modules:
        return False
    # Under LoRA on the language model (names or all-linear) the towers do not train.
    return (
        not cfg.adapter
        or isinstance(cfg.lora_target_modules, str)
        or bool(cfg.lora_modules_to_save)
    )


def compile_arguments(cfg: TrainConfig, cuda: bool) -> dict[str, Any]:
    """torch.compile of the trained model (accelerate compiles it when the trainer
    prepares it). `auto` compiles where a CUDA GPU is: on a CPU the compile time would
    outweigh any gain in a fine-tune."""
    wanted = cuda if cfg.torch_compile == "auto" else bool(cfg.torch_compile)
    if not wanted:
        return {}
    from accelerate.utils import DynamoBackend

    backend = cfg.torch_compile_backend or "inductor"
    # accelerate, which does the compiling, takes the backends it names, not any torch has.
    known = [b.value.lower() for b in DynamoBackend if b.value != "NO"]
    if backend.lower() not in known:
        raise FerryError(
            f"torch_compile_backend: `{backend}` is not a backend the trainer can compile "
            f"with; one of: {', '.join(known)}."
        )
    return {
        "torch_compile": True,
        "torch_compile_backend": backend,
        "torch_compile_mode": cfg.torch_compile_mode,
    }


def offload_mode(cfg: TrainConfig) -> bool | str | None:
    """activation_offloading as set, or as Axolotl's older gradient_checkpointing values
    spell it (`offload`: true, `offload_disk`: disk)."""
    if cfg.gradient_checkpointing == "offload":
        return True
    if cfg.gradient_checkpointing == "offload_disk":
        return "disk"
    return cfg.activation_offloading or None


class _OffloadedFile:
    """One saved activation on disk; the file goes when autograd drops its reference
    (after the backward that used it), as in PyTorch's saved-tensor hooks example."""

    def __init__(self, path: Path, device: Any):
        self.path, self.device = path, device

    def __del__(self) -> None:
        self.path.unlink(missing_ok=True)


class DiskOffload:
    """`activation_offloading: disk`: during a step, every activation autograd saves
    for backward (at least `min_bytes`, not a weight) is written to a file in a
    temporary folder and read back when backward needs it. With checkpointing on, what
    is saved is mostly each layer's input. `offloaded` counts the tensors written."""

    def __init__(self, model: Any, min_bytes: int = 1024):
        self.folder = tempfile.TemporaryDirectory(prefix="ferry-offload-")
        self.min_bytes = min_bytes
        self.offloaded = 0
        self._weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._hooks: Any = None

    def _pack(self, tensor: Any) -> Any:
        import torch

        if (
            tensor.numel() * tensor.element_size() < self.min_bytes
            or tensor.untyped_storage().data_ptr() in self._weights
        ):
            return tensor
        path = Path(self.folder.name) / f"{self.offloaded}.pt"
        self.offloaded += 1
        torch.save(tensor.detach().clone(), path)
        return _OffloadedFile(path, tensor.device)

    @staticmethod
    def _unpack(packed: Any) -> Any:
        import torch

        if not isinstance(packed, _OffloadedFile):
            return packed
        return torch.load(packed.path, map_location=packed.device, weights_only=True)

    def __enter__(self) -> DiskOffload:
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def activation_offloader(cfg: TrainConfig, model: Any) -> Any:
    """The context each training step runs in: where saved activations go."""
    mode = offload_mode(cfg)
    if not mode:
        return contextlib.nullcontext()
    if mode == "disk":
        return DiskOffload(model)
    import torch

    if not torch.cuda.is_available():
        log.warning(
            "activation_offloading: `%s` moves activations from the GPU to CPU memory; "
            "there is no GPU here, so this run keeps them where they are.",
            mode,
        )
        return contextlib.nullcontext()
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    # true / hidden_states overlap the copies with compute on a second CUDA stream;
    # legacy copies synchronously (fewer activations in flight on the GPU).
    return get_act_offloading_ctx_manager(model, use_streams=mode != "legacy")


def _cosine_lambda(
    step: int,
    *,
    warmup: int,
    total: int,
    floor: float,
    hold_from: float | None,
    quadratic: bool,
    num_cycles: float,
) -> float:
    """Axolotl's cosine (utils/schedulers.py): warmup, linear or quadratic, then a
    cosine from 1 down to `floor`, reached at `hold_from` of all steps and kept after."""
    if step < warmup:
        rise = step / max(1, warmup)
        return rise * rise if quadratic else rise
    end = int(total * hold_from) if hold_from is not None else total
    progress = (min(step, end) - warmup) / max(1, end - warmup)
    return max(0.0, (1 - floor) * 0.5 * (1 + math.cos(math.pi * num_cycles * 2 * progress))) + floor


class SettingsMixin(ContextParallelMixin, ShardedTrainerMixin):
    """The Axolotl settings the HF Trainer has no argument for: a cosine with a
    quadratic warmup or a held floor (lr_quadratic_warmup, cosine_constant_lr_ratio) and
    activation offloading around each training step; under it, what context parallel
    (payload.parallel.context) and a model sharded with FSDP2 (payload.parallel.fsdp)
    need of the Trainer. Goes first in the bases of
    any Trainer subclass (see `with_settings`); takes the config as `cfg=`."""

    args: Any
    model: Any
    optimizer: Any
    lr_scheduler: Any

    def __init__(self, *args: Any, cfg: TrainConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.settings = cfg
        if cfg is not None:
            self.split_context(cfg)
        self.offload = activation_offloader(cfg, self.model) if cfg else contextlib.nullcontext()

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        cfg = self.settings
        shaped = (
            cfg is not None
            and cfg.lr_scheduler == "cosine"
            and (cfg.lr_quadratic_warmup or cfg.cosine_constant_lr_ratio is not None)
        )
        if self.lr_scheduler is not None or not shaped:
            return super().create_scheduler(num_training_steps, optimizer)  # type: ignore[misc]
        from torch.optim.lr_scheduler import LambdaLR

        kwargs = self.args.lr_scheduler_kwargs or {}
        floor = kwargs.get("min_lr_rate")
        if floor is None:
            floor = kwargs.get("min_lr", 0.0) / self.args.learning_rate
        curve = partial(
            _cosine_lambda,
            warmup=self.args.get_warmup_steps(num_training_steps),
            total=num_training_steps,
            floor=floor,
            hold_from=cfg.cosine_constant_lr_ratio,
            quadratic=bool(cfg.lr_quadratic_warmup),
            num_cycles=kwargs.get("num_cycles", 0.5),
        )
        self.lr_scheduler = LambdaLR(optimizer or self.optimizer, curve)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.offload:
            return super().training_step(*args, **kwargs)  # type: ignore[misc]


class FerryTrainer(SettingsMixin, Trainer):
    """The HF Trainer with Ferry's settings: the SFT recipe's trainer."""


def with_settings(cls: type) -> type:
    """`cls` (a Trainer subclass: TRL's DPOTrainer, say) with `SettingsMixin` first."""
    if issubclass(cls, SettingsMixin):
        return cls
    return type(f"Ferry{cls.__name__}", (SettingsMixin, cls), {"__module__": __name__})


def settings_callbacks(cfg: TrainConfig, args: Any) -> list[Any]:
    """Callbacks some settings add: early_stopping_patience is transformers'
    EarlyStoppingCallback on the eval loss (needs evaluation while training)."""
    if not cfg.early_stopping_patience:
        return []
    if args.eval_strategy == "no":
        log.warning("early_stopping_patience is ignored: this run does not evaluate.")
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(cfg.early_stopping_patience)]


def debug_rows(dataset: Any, tokenizer: Any, rows: int = 5) -> list[str]:
    """`debug: true`: the first rows of the prepared training set, decoded, with the
    tokens the loss is computed on (label not -100) between [[ and ]]."""
    import itertools

    from payload.data.core import marked

    lines = []
    for i, row in enumerate(itertools.islice(iter(dataset), rows)):
        ids = list(row["input_ids"])
        text, trained = marked(ids, list(row.get("labels", ids)), tokenizer)
        lines.append(f"row {i} ({len(ids)} tokens, {trained} trained): {text!r}")
    return lines


def unpacked_collator(cfg: TrainConfig, tokenizer: Any) -> Any:
    """One row per example, padded to the longest in the batch, or to sequence_len with
    `pad_to_sequence_len` (fixed shapes). Packed batches have their own collator."""
    from transformers import DataCollatorForSeq2Seq

    if cfg.pad_to_sequence_len:
        return DataCollatorForSeq2Seq(
            tokenizer, padding="max_length", max_length=cfg.sequence_len, label_pad_token_id=-100
        )
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
