"""DeepSpeed ZeRO-1/2/3, with or without CPU offload, under the HF Trainer.

The Trainer does the DeepSpeed work: it fills the JSON's "auto" values from the training
arguments, hands the model and its optimizer to `deepspeed.initialize`, has every rank
write its own partition of DeepSpeed's checkpoint and resumes from one. Ferry adds what
that leaves to the launcher, in the order a run needs it:

1. `prepare`, before the model is built. DeepSpeed picks its accelerator once, when it is
   first imported: where there is no GPU, Ferry names the CPU (`DS_ACCELERATOR=cpu`), the
   user never has to. DeepSpeed's communication layer then wraps the process group
   `payload.distributed` made (nccl, or gloo on CPU) rather than making its own, which on
   a CPU would be oneCCL (not installed). Checks that only the machine can answer (what
   `bf16: auto` becomes, the world size in `train_batch_size`) fail here, by name.
2. The training arguments carry the JSON as a mapping (`trainer_config`). On a CPU they
   carry `use_cpu` too: only then does accelerate count the gloo ranks, and it still runs
   DeepSpeed because the Trainer gives it a DeepSpeed plugin.
3. `ZeroRun.report` prints which ZeRO optimizer runs, from the live optimizer: proof that
   DeepSpeed, not plain DDP, trains.
4. `ZeroRun.finish`, after the Trainer's `save_model`: the output folder must load with
   `from_pretrained`. ZeRO-1/2 keep whole weights on every rank, and ZeRO-3 with
   `stage3_gather_16bit_weights_on_model_save` gathers them for the save, so both are
   already saved. A ZeRO-3 JSON without it makes the Trainer write DeepSpeed's sharded
   checkpoint there instead; Ferry turns that into a `save_pretrained` model with
   DeepSpeed's zero_to_fp32 (the fp32 master weights) and removes the shards.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payload import distributed
from payload.config.rules import deepspeed_json, deepspeed_precision
from payload.config.schema import TrainConfig
from payload.errors import FerryError

log = logging.getLogger("ferry.train")

# What the Trainer's save leaves in a folder when ZeRO-3 does not gather the weights.
SHARDED_LEFTOVERS = ("global_step*", "latest", "zero_to_fp32.py")


def trainer_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config as a mapping, for the training arguments: the inline one, or
    the JSON file's (a path validated and made absolute by payload.config.paths)."""
    if isinstance(cfg.deepspeed, dict):
        return copy.deepcopy(cfg.deepspeed)
    assert isinstance(cfg.deepspeed, str)
    config, unreadable = deepspeed_json(cfg.deepspeed)
    if unreadable:  # it was read at validation; it changed since
        raise FerryError(f"deepspeed: {unreadable}")
    return config


def stage_of(config: dict[str, Any]) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def offload_of(config: dict[str, Any], section: str) -> str:
    """Where ZeRO-Offload puts the optimizer states or the parameters: cpu or none."""
    offload = (config.get("zero_optimization") or {}).get(section) or {}
    return offload.get("device", "none") if isinstance(offload, dict) else str(offload)


def machine_problems(
    config: dict[str, Any], cfg: TrainConfig, dist: distributed.DistInfo
) -> list[str]:
    """What only this machine can tell is wrong: the precision `bf16: auto` chose here
    against the JSON's, and a fixed `train_batch_size` against the world size."""
    from payload.model import use_bf16

    found = []
    chosen, written = use_bf16(cfg), deepspeed_precision(config, "bf16")
    if cfg.bf16 == "auto" and isinstance(written, bool) and written != chosen:
        here = "a GPU with bf16" if chosen else "no GPU with bf16"
        found.append(
            f"bf16.enabled is {str(written).lower()} in the DeepSpeed config, but `bf16: auto` "
            f"is {str(chosen).lower()} on this machine ({here}); set `bf16:` to match, or "
            'write "auto" in the JSON.'
        )
    total = config.get("train_batch_size")
    wanted = cfg.micro_batch_size * cfg.gradient_accumulation_steps * dist.world_size
    if total not in (None, "auto") and total != wanted:
        found.append(
            f"train_batch_size is {total} in the DeepSpeed config, but this run takes "
            f"{wanted} rows a step (micro_batch_size {cfg.micro_batch_size} x "
            f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} x "
            f'{dist.world_size} ranks); write "auto" in the JSON.'
        )
    return found


def prepare(cfg: TrainConfig, dist: distributed.DistInfo) -> ZeroRun | None:
    """Ready DeepSpeed before the model is built (see the module's docstring); None
    without `deepspeed:`."""
    if not cfg.deepspeed:
        return None
    config = trainer_config(cfg)
    if dist.backend is None:
        raise FerryError(
            "deepspeed: DeepSpeed runs under torchrun, which `launch train` starts; this "
            "process was started without it (no RANK in its environment)."
        )
    if found := machine_problems(config, cfg, dist):
        raise FerryError("deepspeed: " + " ".join(found))
    wanted = "cpu" if dist.device == "cpu" else "cuda"
    if wanted == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # read once, when deepspeed is first imported
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as e:
        raise FerryError(
            f"deepspeed: DeepSpeed is not installed here ({e}): pip install 'ferry[deepspeed]'"
        ) from e
    chosen = get_accelerator().device_name()
    assert chosen == wanted, f"DeepSpeed chose {chosen}: it was imported before prepare()"
    # Its INFO lines (configs, timers) and its own calls of deprecated torch functions are
    # DeepSpeed's to fix, not the user's to act on.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.")
    if wanted == "cpu":
        # On CPU, DeepSpeed's comm layer compiles a shared-memory C++ op (about two
        # minutes, the first time on each machine) that only its inference all-reduce
        # calls; training's collectives go through torch.distributed. Marking the op
        # incompatible makes it skip the build.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # The process group exists (payload.distributed): DeepSpeed wraps it, and makes none.
    deepspeed.init_distributed(dist_backend=dist.backend)
    return ZeroRun(config, dist)


@dataclass
class ZeroRun:
    """A run under DeepSpeed: its config (as written, "auto" values unfilled)."""

    config: dict[str, Any]
    dist: distributed.DistInfo

    @property
    def stage(self) -> int:
        return stage_of(self.config)

    def report(self) -> Any:
        """A callback that prints, on rank 0 as training starts, which ZeRO optimizer
        runs and where ZeRO-Offload puts the states."""
        from transformers import TrainerCallback

        run = self

        class ZeroReport(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
                # Asked for DeepSpeed, a Trainer that fell back to DDP would still train,
                # and match a reference: it must stop instead.
                if not run.under_deepspeed(optimizer):
                    raise RuntimeError(
                        f"`deepspeed` is set, but the trainer's optimizer is "
                        f"{type(optimizer).__name__}, not DeepSpeed's: it did not start "
                        "DeepSpeed."
                    )
                if run.dist.is_main:
                    print(run.describe(optimizer), flush=True)

        return ZeroReport()

    @staticmethod
    def _chain(optimizer: Any) -> list[Any]:
        """The optimizer and those it wraps (accelerate's wrapper, DeepSpeed's ZeRO
        optimizer, the torch optimizer inside)."""
        chain = [optimizer]
        while hasattr(chain[-1], "optimizer") and len(chain) < 5:
            chain.append(chain[-1].optimizer)
        return chain

    def under_deepspeed(self, optimizer: Any) -> bool:
        return any("DeepSpeed" in type(o).__name__ for o in self._chain(optimizer))

    def describe(self, optimizer: Any) -> str:
        """One line: the ZeRO stage, the ranks, the optimizer class DeepSpeed built (under
        accelerate's and the engine's wrappers), and the offload devices."""
        chain = self._chain(optimizer)
        kind = next((type(o).__name__ for o in chain if "Zero" in type(o).__name__), None)
        kind = kind or type(chain[-1]).__name__  # stage 0: the torch optimizer itself
        return (
            f"deepspeed: ZeRO-{self.stage} over {self.dist.world_size} ranks ({kind}); "
            f"offload: optimizer states {offload_of(self.config, 'offload_optimizer')}, "
            f"parameters {offload_of(self.config, 'offload_param')}"
        )

    def finish(self, trainer: Any, output_dir: str) -> None:
        """After `trainer.save_model(output_dir)`: consolidate a ZeRO-3 model the Trainer
        could only save as shards (see the module's docstring). An adapter is always
        saved whole: the Trainer gathers its trainable weights itself."""
        from peft import PeftModel

        engine = trainer.model_wrapped
        if self.stage != 3 or engine.zero_gather_16bit_weights_on_model_save():
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        if isinstance(model, PeftModel):
            return
        from payload.runtime.deadline import Meter

        distributed.on_rank0(
            self.dist,
            "consolidating the ZeRO-3 weights",
            lambda: consolidate(model, Path(output_dir)),
            Meter(),
        )


def consolidate(model: Any, folder: Path) -> None:
    """Turn the DeepSpeed checkpoint in `folder` into the model's `save_pretrained` files
    (fp32, from the optimizer's master weights), then remove the checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder))
    # The model's own parameters are partitions here; only its config and save logic
    # (tied weights, shards, safetensors) are used.
    model.save_pretrained(folder, state_dict=state)
    for pattern in SHARDED_LEFTOVERS:
        for path in folder.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    log.info("ZeRO-3 weights consolidated into %s", folder)
