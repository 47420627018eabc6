"""FSDP2: torch's `fully_shard`, applied by Ferry, under the HF Trainer.

Ferry shards the model itself, on CPU and GPU alike: accelerate and the HF Trainer refuse
FSDP on a CPU (`--cpu` and `--use_fsdp` are exclusive) or silently train DDP instead
(`Accelerator(cpu=True, fsdp_plugin=...)`, the Trainer with `fsdp=` and `use_cpu=True`),
so a CPU test of theirs would prove nothing. One code path: `shard` calls `fully_shard` on
each transformer block (the classes `fsdp_config.transformer_layer_cls_to_wrap` names, or
the model's `_no_split_modules`) and then on the root, over the data-parallel dimensions
of the run's mesh; with bf16, FSDP2's MixedPrecisionPolicy computes in bf16 and reduces
gradients in fp32. Every parameter becomes a DTensor holding this rank's shard, LoRA's
included: peft puts the adapter on before sharding, so its weights are sharded and train
on every rank (Axolotl #3772 was adapter shards that silently did not).

The Trainer stays the engine (optimizer, schedule, accumulation, clipping, logging,
callbacks). `ShardedTrainerMixin` tells it the model is already distributed, with the
marker transformers sets on a model it sharded at load time
(`is_distributed_loading_by_transformers`): the Trainer then neither moves the model nor
lets accelerate wrap it in DDP, and clips the DTensor gradients with one global norm.
With gradient accumulation, FSDP2 reduce-scatters each micro-batch's gradients as it goes,
so they stay sharded (deferring that would hold whole gradients on every rank); HSDP's
all-reduce across the copies waits for the window's last micro-batch. The marker also
makes the Trainer refuse checkpoints with an optimizer, since it cannot save one for such
a model; the mixin saves and loads them itself, so it sets the marker after the Trainer's
constructor:

- FULL_STATE_DICT (`fsdp_config.state_dict_type`, the default): the model (or the LoRA
  adapter) is gathered whole to rank 0 and written with `save_pretrained`, so that a
  checkpoint loads with `from_pretrained` like any other; the optimizer's state is
  gathered whole too (keyed by parameter name, so it does not depend on the number of
  processes) and written by rank 0 as `optimizer.pt`; a resume has rank 0 read both and
  broadcast each rank its shards;
- SHARDED_STATE_DICT: every rank writes its own shards of both with torch's distributed
  checkpoint, and reads its new shards back on resume, on any number of processes
  (payload.parallel.dcp: the folder's layout); `launch merge-sharded` turns one into a
  plain model;
- the final save follows `final_state_dict_type` the same way (default FULL_STATE_DICT);
- a resume reads whichever kind the checkpoint folder holds.

Test hook: FERRY_TEST_FSDP_PROBE=PATH makes every rank write PATH.rank<N>.json when
training ends: its shard of each trained parameter (elements, and a checksum before and
after training), the type the Trainer trained, whether it took the model for HSDP, and
for each sharded block whether it reshards after forward and is checkpointed
(tests/test_fsdp.py, tests/test_tensor_parallel.py).

Torch is imported inside the functions: `payload.trainers.settings` puts the mixin on
every trainer, and this module must not slow down what does not shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from payload.config.rules import FsdpSettings, fsdp_reading
from payload.config.schema import TrainConfig
from payload.distributed import DistInfo
from payload.errors import FerryError

log = logging.getLogger("ferry.train")

PROBE_ENV = "FERRY_TEST_FSDP_PROBE"  # test hook: see the module docstring
SHARDED = "SHARDED_STATE_DICT"
OPTIMIZER_FILE = "optimizer.pt"  # the Trainer's names, which its resume looks for
SCHEDULER_FILE = "scheduler.pt"


def _hf_model(model: Any) -> Any:
    """The transformers model: the model itself, or the one under a peft adapter."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sharded(model: Any) -> bool:
    """Has `fully_shard` been applied to this model's root?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def checkpoint_activations(model: Any, cfg: TrainConfig, settings: FsdpSettings) -> None:
    """Activation checkpointing on every block (fsdp_config.activation_checkpointing, or
    gradient_checkpointing with its kwargs), before sharding; the Trainer is then not asked
    to do it again (payload.trainers.settings). Non-reentrant unless the kwargs say
    otherwise: FSDP2's hooks run inside the recomputed block."""
    if not (settings.activation_checkpointing or cfg.gradient_checkpointing):
        return
    kwargs = {"use_reentrant": False, **(cfg.gradient_checkpointing_kwargs or {})}
    every = kwargs.pop("every_n_layers", 1)
    offload = kwargs.pop("offload", False)
    hf = _hf_model(model)
    hf.activation_checkpointing_enable(
        activation_checkpointing_kwargs=kwargs, every_n_layers=every, offload=offload
    )
    hf.config.use_cache = False  # a KV cache is of no use to a recomputed forward


def transformer_blocks(model: Any, names: tuple[str, ...]) -> list[Any]:
    """The modules to shard one by one: those of the classes named, else of the model's
    `_no_split_modules` (its transformer blocks)."""
    wanted = set(names) or set(getattr(_hf_model(model), "_no_split_modules", None) or ())
    key = "fsdp_config.transformer_layer_cls_to_wrap"
    if not wanted:
        raise FerryError(
            f"{key}: {type(_hf_model(model)).__name__} names no transformer blocks of its own "
            "(_no_split_modules); name the class of its blocks (LlamaDecoderLayer, say)."
        )
    blocks = [m for m in model.modules() if type(m).__name__ in wanted]
    if not blocks:
        classes = sorted({type(m).__name__ for m in model.modules()})
        raise FerryError(
            f"{key}: the model has no module of class {', '.join(sorted(wanted))}; its "
            f"classes are {', '.join(classes)}."
        )
    # Innermost first, should a named class hold another: `fully_shard` takes the
    # parameters no inner call took.
    return blocks[::-1] if len(blocks) > 1 and _nested(blocks) else blocks


def _nested(blocks: list[Any]) -> bool:
    inner = {id(m) for b in blocks for m in b.modules() if m is not b}
    return any(id(b) in inner for b in blocks)


def shard(model: Any, cfg: TrainConfig, dist: DistInfo, settings: FsdpSettings) -> Any:
    """`fully_shard` on each block, then the root, over the mesh's data-parallel
    dimensions; prints where the parameters went (rank 0)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from payload.model import use_bf16
    from payload.parallel.mesh import data_parallel

    mesh = data_parallel(dist.mesh)
    policy = MixedPrecisionPolicy()
    if use_bf16(cfg):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = transformer_blocks(model, settings.layer_classes)
    for i, block in enumerate(blocks):
        # Backward needs the last block's weights first thing: keeping them gathered
        # after its forward saves one all-gather (torchtitan does the same).
        keep = i == len(blocks) - 1
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=policy,
            reshard_after_forward=settings.reshard_after_forward and not keep,
        )
    fully_shard(
        model, mesh=mesh, mp_policy=policy, reshard_after_forward=settings.reshard_after_forward
    )
    _report(model, dist, mesh, blocks)
    return model


def _report(model: Any, dist: DistInfo, mesh: Any, blocks: list[Any]) -> None:
    """Check that every parameter is now a DTensor, and say (rank 0) how many elements
    each rank holds and over which data-parallel `mesh` they are sharded (tensor
    parallel's tp split is its own line): the proof, in the run's log, that it shards and
    is no DDP."""
    import torch.distributed as torch_dist
    from torch.distributed.tensor import DTensor

    from payload.parallel.mesh import describe

    params = list(model.parameters())
    plain = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:  # an invariant of fully_shard on the root
        raise RuntimeError(f"FSDP2 left parameters unsharded: {', '.join(plain[:5])}")
    held = sum(p.to_local().numel() for p in params)
    total = sum(p.numel() for p in params)
    everyone: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(everyone, held)
    placements = sorted({", ".join(repr(pl) for pl in p.placements) for p in params})
    kind = type(blocks[0]).__name__.removeprefix("FSDP")  # fully_shard subclassed it
    if dist.is_main:
        print(
            f"fsdp2: fully_shard on {len(blocks)} {kind} blocks and the "
            f"root over {describe(mesh)} ({dist.backend}); {len(params)} parameters are "
            f"DTensors [{'; '.join(placements)}]; elements held per rank: "
            f"{' / '.join(f'{n:,}' for n in everyone)} of {total:,}",
            flush=True,
        )


# ---- whole state dicts, gathered to rank 0 and broadcast from it


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def gathered_state_dict(model: Any) -> dict[str, Any]:
    """The model's whole weights on rank 0's CPU (an empty dict elsewhere): for LoRA the
    trained parameters only, which hold the adapter. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    options = _options(cpu_offload=True, ignore_frozen_params=_is_peft(model))
    whole = get_model_state_dict(model, options=options)
    # A tied weight (the head sharing the embeddings) comes back as one copy per name;
    # one tensor under each name, as in `model.state_dict()`, is what lets save_pretrained
    # see the tie and write it once.
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for aliases in names.values():
        present = [name for name in aliases if name in whole]
        for name in present[1:]:
            whole[name] = whole[present[0]]
    return whole


def _adapter_names(model: Any) -> dict[str, str]:
    """peft's file name of each adapter weight -> its name in the model. peft renames
    (it drops the adapter's name) by rules of its own; its own function applies them to
    a state dict whose values are the parameters' indices, which come out the other end."""
    import torch
    from peft import get_peft_model_state_dict

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    marked = {name: torch.tensor(i) for i, name in enumerate(names)}
    saved = get_peft_model_state_dict(model, state_dict=marked)
    return {key: names[int(value)] for key, value in saved.items()}


def _checkpoint_weights(model: Any, folder: str) -> dict[str, Any]:
    """A checkpoint's weights by the model's parameter names (rank 0 reads them)."""
    from safetensors.torch import load_file

    root = Path(folder)
    if _is_peft(model):
        files = [root / "adapter_model.safetensors"]
        rename = _adapter_names(model)
    else:
        index = root / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [root / name for name in shards]
        else:
            files = [root / "model.safetensors"]
        rename = None
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FerryError(f"Cannot resume from {folder}: {', '.join(missing)} missing.")
    weights: dict[str, Any] = {}
    for path in files:
        weights.update(load_file(str(path)))
    if rename is not None:
        unknown = sorted(set(weights) - set(rename))
        if unknown:
            raise FerryError(f"{folder}: adapter weights the model has not: {unknown[:5]}.")
        weights = {rename[key]: value for key, value in weights.items()}
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    absent = [name for name in trained if name not in weights]
    if absent:  # loading is not strict (LoRA files hold the adapter only): check here
        raise FerryError(f"{folder} holds no weights for {', '.join(absent[:5])}.")
    return weights


def load_gathered(model: Any, folder: str, rank0: bool) -> None:
    """Load a whole-weights checkpoint into the sharded model: rank 0 reads it and sends
    each rank its shards. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    weights = _checkpoint_weights(model, folder) if rank0 else {}
    options = _options(broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=options)


def _peft_or_hf(model: Any) -> Any:
    """The model whose config describes the saved weights: the peft model for LoRA."""
    return model if _is_peft(model) else _hf_model(model)


def _torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


class ShardedTrainerMixin:
    """What the HF Trainer needs to train a model `shard` sharded (see the module
    docstring). Every method defers to the Trainer when the model is not sharded; it sits
    under payload.trainers.settings.SettingsMixin on every Ferry trainer."""

    model: Any
    model_wrapped: Any
    args: Any
    optimizer: Any
    lr_scheduler: Any
    state: Any
    settings: TrainConfig | None  # SettingsMixin's: the run's config
    processing_class: Any

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.sharded = is_sharded(self.model)
        self.in_checkpoint = False  # saving a checkpoint-N, not the final model
        self.replicated = False  # HSDP: the sharded model has copies (dp_replicate)
        if self.sharded:
            first = next(iter(self.model.parameters()))
            # FSDP2's mesh has dp_replicate only for HSDP (payload.parallel.mesh.data_parallel);
            # not its number of dimensions: tensor parallel adds tp to every parameter's.
            self.replicated = "dp_replicate" in (first.device_mesh.mesh_dim_names or ())
            # After the constructor, which refuses optimizer checkpoints for such a model
            # (this class saves them; see the module docstring).
            self.is_distributed_loading_by_transformers = True
            probe = os.environ.get(PROBE_ENV)  # test hook: see the module docstring
            if probe:
                self.add_callback(_probe(self, probe))  # type: ignore[attr-defined]

    def _move_model_to_device(self, model: Any, device: Any) -> None:
        if not is_sharded(model):  # fully_shard put the shards where they train
            super()._move_model_to_device(model, device)  # type: ignore[misc]

    def _prepare_for_training(self, *args: Any, **kwargs: Any) -> Any:
        model, loader = super()._prepare_for_training(*args, **kwargs)  # type: ignore[misc]
        if self.sharded and not is_sharded(model):  # our invariant: no DDP around FSDP2
            raise RuntimeError(f"the trainer wrapped the FSDP2 model in {type(model).__name__}")
        return model, loader

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self) -> Any:
        """The Trainer's context for the micro-batches before an accumulation window's
        last. FSDP2 still reduce-scatters each one's gradients, which stay sharded; with
        HSDP, only the all-reduce across the copies waits for the last micro-batch."""
        if not self.sharded:
            with super()._defer_fsdp_gradient_reduction():  # type: ignore[misc]
                yield
            return
        if self.replicated:
            self.model.set_requires_all_reduce(False)
        try:
            yield
        finally:
            if self.replicated:
                self.model.set_requires_all_reduce(True)

    def _state_dict_type(self) -> str:
        """What this save writes: state_dict_type for a checkpoint, else
        final_state_dict_type."""
        settings = fsdp_reading(self.settings).settings if self.settings else None
        if settings is None:
            return "FULL_STATE_DICT"
        return settings.state_dict_type if self.in_checkpoint else settings.final_state_dict_type

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self.in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self.in_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        if not self.sharded:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        if self._state_dict_type() == SHARDED:
            return self._save_sharded(output_dir or self.args.output_dir)
        whole = gathered_state_dict(self.model)  # every rank: a collective
        if self.args.should_save:
            super()._save(output_dir, state_dict=whole)  # type: ignore[misc]

    def _save_sharded(self, output_dir: str) -> None:
        """Every rank writes its shards; rank 0 adds what a save_pretrained folder holds
        besides the weights (payload.parallel.dcp)."""
        import torch

        from payload.parallel import dcp

        dcp.save_model(self.model, output_dir)  # a collective
        if not self.args.should_save:
            return
        dcp.write_info(_peft_or_hf(self.model), output_dir, self.args.world_size)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # as the Trainer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.sharded:
            return super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
        import torch
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer = _torch_optimizer(self.optimizer)
        if self._state_dict_type() == SHARDED:
            from payload.parallel import dcp

            dcp.save_optimizer(self.model, optimizer, output_dir)  # a collective
            state = None
        else:
            options = _options(cpu_offload=True)
            state = get_optimizer_state_dict(self.model, optimizer, options=options)
        if self.args.should_save:
            if state is not None:
                torch.save(state, os.path.join(output_dir, OPTIMIZER_FILE))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def _load_weights(self, folder: str) -> None:
        """Whichever kind of checkpoint `folder` is: sharded (DCP) or whole."""
        from payload.parallel import dcp

        if dcp.has_sharded_model(folder):
            dcp.load_model(self.model, folder)
        else:
            load_gathered(self.model, folder, self.args.process_index == 0)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self.sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        self._load_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not self.sharded:
            return super()._load_best_model()  # type: ignore[misc]
        self._load_weights(self.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.sharded or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        import torch
        import torch.distributed as torch_dist

        from payload.parallel import dcp

        if dcp.has_sharded_optimizer(checkpoint):
            # Every rank reads its own shards, and the schedule (the Trainer's rule: both
            # files, or neither is loaded).
            scheduler = os.path.join(checkpoint, SCHEDULER_FILE)
            if os.path.isfile(scheduler):
                dcp.load_optimizer(self.model, _torch_optimizer(self.optimizer), checkpoint)
                self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        # Rank 0 reads; the others learn from it whether there is anything to load (the
        # Trainer's rule: both files, or neither is loaded) and get the schedule's state.
        optimizer_state: dict[str, Any] = {}
        box: list[Any] = [None]
        if self.args.process_index == 0:
            files = [os.path.join(checkpoint, n) for n in (OPTIMIZER_FILE, SCHEDULER_FILE)]
            if all(os.path.isfile(f) for f in files):
                optimizer_state = torch.load(files[0], map_location="cpu", weights_only=True)
                box = [torch.load(files[1], weights_only=True)]
        torch_dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        optimizer = _torch_optimizer(self.optimizer)
        options = _options(broadcast_from_rank0=True)
        set_optimizer_state_dict(self.model, optimizer, optimizer_state, options=options)
        self.lr_scheduler.load_state_dict(box[0])


def _probe(trainer: Any, path: str) -> Any:
    """The test hook's callback (see the module docstring)."""
    from transformers import TrainerCallback

    def shards() -> dict[str, list[float]]:
        found = {}
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                total = float(local.detach().double().abs().sum())
                found[name] = [local.numel(), p.numel(), total]
        return found

    def blocks() -> list[dict[str, bool]]:
        from torch.distributed.fsdp import FSDPModule

        found = []
        for module in trainer.model.modules():
            if isinstance(module, FSDPModule) and module is not trainer.model:
                group = module._get_fsdp_state()._fsdp_param_group  # torch's own record
                found.append(
                    {
                        "reshards": group.post_forward_mesh_info is not None,
                        "checkpointed": bool(getattr(module, "gradient_checkpointing", False)),
                    }
                )
        return found

    class Probe(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.before = shards()
            self.trained = type(trainer.model_wrapped).__name__
            self.blocks = blocks()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            after = shards()
            rank = args.process_index
            record = {
                "rank": rank,
                "trained_type": self.trained,
                "replicated": trainer.replicated,
                "blocks": self.blocks,
                "params": {
                    name: {"local": n, "full": full, "before": before, "after": after[name][2]}
                    for name, (n, full, before) in self.before.items()
                },
            }
            Path(f"{path}.rank{rank}.json").write_text(json.dumps(record))

    return Probe()
