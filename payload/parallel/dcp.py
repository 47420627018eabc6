"""Sharded checkpoints (`fsdp_config.state_dict_type: SHARDED_STATE_DICT`): torch's
distributed checkpoint (DCP), every rank writing its own shards, nothing gathered.

A sharded `checkpoint-N` folder (and the output folder, without the optimizer, when
`final_state_dict_type` is SHARDED_STATE_DICT) holds:

    model_dcp/        the model's state dict by parameter name (LoRA: the adapter's
                      weights only): `.metadata` (rank 0) and `__<rank>_0.distcp`, one
                      file per rank with that rank's shards
    optimizer_dcp/    the optimizer's state by parameter name, not by index, so that it
                      reshards: the same layout
    sharded.json      what `launch merge-sharded` needs besides: the number of ranks that
                      wrote it, and for LoRA the name peft's files give each weight
    config.json (or adapter_config.json), the tokenizer, training_args.bin: as a
                      save_pretrained checkpoint has them
    scheduler.pt, rng_state_<rank>.pth, trainer_state.json: the Trainer's own

DCP records where each shard sits in the whole tensor, and a load asks, for each of the
loading ranks' shards, for the saved pieces that overlap it: a checkpoint written by 2
ranks loads on 1, 4 or an HSDP mesh alike. On a multi-node job each node's disk holds
only its ranks' `.distcp` files (and rank 0's node the rest); a resume needs them all.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

from payload.errors import FerryError
from payload.parallel.fsdp import _adapter_names, _is_peft

MODEL_DIR = "model_dcp"
OPTIMIZER_DIR = "optimizer_dcp"
INFO_FILE = "sharded.json"
METADATA = ".metadata"  # DCP's own name: written last, by rank 0


def has_sharded_model(folder: str | Path) -> bool:
    """Does `folder` hold a complete DCP model (its metadata is written last)?"""
    return (Path(folder) / MODEL_DIR / METADATA).is_file()


def has_sharded_optimizer(folder: str | Path) -> bool:
    return (Path(folder) / OPTIMIZER_DIR / METADATA).is_file()


def _model_options(model: Any, **kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: the trained adapter only, as the whole-weights checkpoints hold it.
    return StateDictOptions(ignore_frozen_params=_is_peft(model), **kwargs)


def _model_state(model: Any) -> dict[str, Any]:
    """This rank's shards of the model's state dict; for LoRA the trained weights only
    (torch keeps a frozen weight tied to another, the head under the embeddings)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_model_options(model))
    if _is_peft(model):
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {name: value for name, value in state.items() if name in trained}
    return state


def save_model(model: Any, folder: str) -> None:
    """Every rank writes its shards of the model to `folder`/model_dcp (a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_model_state(model), checkpoint_id=os.path.join(folder, MODEL_DIR))


def save_optimizer(model: Any, optimizer: Any, folder: str) -> None:
    """Every rank writes its shards of the optimizer state, keyed by parameter name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=os.path.join(folder, OPTIMIZER_DIR))


def _check_keys(state: dict[str, Any], where: str, what: str) -> None:
    """Every key the model asks for is in the checkpoint: named, not DCP's bare error."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(where).read_metadata().state_dict_metadata
    missing = sorted(k for k in _flat_keys(state) if k not in saved)
    if missing:
        raise FerryError(
            f"Cannot resume from {where}: it holds no {what} for {', '.join(missing[:5])}"
            f"{' and more' if len(missing) > 5 else ''} (a checkpoint of another model, or "
            "of a LoRA run loaded as a full fine-tune or the reverse)."
        )


def _flat_keys(state: dict[str, Any]) -> list[str]:
    """DCP's names for a nested state dict's entries ("state.<param>.exp_avg")."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    return list(flatten_state_dict(state)[0])


def load_model(model: Any, folder: str) -> None:
    """Load `folder`/model_dcp into the sharded model, each rank reading the saved pieces
    of its own shards (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    where = os.path.join(folder, MODEL_DIR)
    state = _model_state(model)
    _check_keys(state, where, "weights")
    dcp.load(state, checkpoint_id=where)
    set_model_state_dict(model, state, options=_model_options(model, strict=not _is_peft(model)))


def load_optimizer(model: Any, optimizer: Any, folder: str) -> None:
    """Load `folder`/optimizer_dcp into the optimizer of the sharded model. Its state is
    created first (torch takes a step with zero gradients and learning rate) so that DCP
    has tensors of this run's shards to read into."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    where = os.path.join(folder, OPTIMIZER_DIR)
    state = get_optimizer_state_dict(model, optimizer)
    _check_keys(state, where, "optimizer state")
    dcp.load(state, checkpoint_id=where)
    set_optimizer_state_dict(model, optimizer, state)


def write_info(model: Any, folder: str, world_size: int) -> None:
    """Rank 0: the model's config (or the adapter's) and sharded.json, so that the folder
    turns into a loadable model without the training code (`read_model`). `model` is
    the peft model for LoRA, else the transformers model."""

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    if _is_peft(model):
        names = {ours: peft for peft, ours in _adapter_names(model).items()}
        name = model.active_adapter
        config = copy.copy(model.peft_config[name])
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = model.get_base_model().name_or_path
        config.inference_mode = True  # as peft's save_pretrained writes it
        config.save_pretrained(str(root))
    else:
        model.config.save_pretrained(str(root))
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(str(root))
    info = {"world_size": world_size, "adapter": _is_peft(model), "names": names}
    (root / INFO_FILE).write_text(json.dumps(info, indent=1))


def read_model(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the whole weights, sharded.json) of a sharded model, read in this one process
    with no process group: DCP reassembles each tensor from every rank's file."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    root = Path(folder)
    if not has_sharded_model(root):
        raise FerryError(
            f"{root} holds no sharded (DCP) model: no {MODEL_DIR}/{METADATA} in it.",
            hint="Only runs with fsdp_config.state_dict_type: SHARDED_STATE_DICT write them; "
            "a FULL_STATE_DICT checkpoint loads with from_pretrained as it is.",
        )
    info_file = root / INFO_FILE
    if not info_file.is_file():
        raise FerryError(f"{root} has {MODEL_DIR}/ but no {INFO_FILE}: the save did not finish.")
    with warnings.catch_warnings():  # "no process group: loading in one process" is the point
        warnings.simplefilter("ignore", UserWarning)
        state = _load_state_dict_from_keys(checkpoint_id=str(root / MODEL_DIR))
    return state, json.loads(info_file.read_text())
