"""`launch merge-sharded`: a sharded (DCP) checkpoint of an FSDP2 run turned into what
a FULL_STATE_DICT save writes: a save_pretrained model folder (config, safetensors,
tokenizer) or, for a LoRA run, a peft adapter folder, in this one process with no
process group (payload.parallel.dcp reads every rank's file).

Which folder: `--checkpoint N` names checkpoint-N; without it, the newest: the output
folder itself when the final save was sharded (final_state_dict_type), else the
checkpoint with the highest step. A run's folders are read where it trained when they
are on this machine, else downloaded, verified, from its storage into its run folder.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payload.errors import FerryError
from payload.parallel.dcp import METADATA, MODEL_DIR, has_sharded_model, read_model
from payload.posttrain.target import RunInfo

DEFAULT_DEST = "merged"  # under the sharded folder, as merge-lora's under the model's
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class MergedSharded:
    source: Path  # the sharded folder
    dest: Path
    adapter: bool  # a peft adapter folder, not a whole model
    world_size: int  # the ranks that wrote it
    tensors: int


def _local(output_dir: Path, step: int | None) -> Path | None:
    """The sharded folder under a local output folder: checkpoint-`step`, or the newest."""
    if step is not None:
        folder = output_dir / f"checkpoint-{step}"
        return folder if folder.is_dir() else None
    if has_sharded_model(output_dir):  # the final save, newer than any checkpoint
        return output_dir
    found = [
        (int(m.group(1)), folder)
        for folder in output_dir.glob("checkpoint-*")
        if (m := CHECKPOINT.match(folder.name)) and has_sharded_model(folder)
    ]
    return max(found)[1] if found else None


def from_config(source: str, step: int | None) -> Path:
    """The sharded folder under a config's output folder (`./model-out` when it names
    none, as a run started by hand writes it)."""
    from payload.config import load_config

    cfg = load_config(source)
    if cfg.output_dir:
        output_dir = Path(cfg.output_dir)
    else:
        from payload.train import DEFAULT_OUTPUT_DIR

        output_dir = Path(DEFAULT_OUTPUT_DIR).resolve()
    folder = _local(output_dir, step) if output_dir.is_dir() else None
    if folder is None:
        said = f"checkpoint-{step}" if step is not None else "sharded checkpoint"
        raise FerryError(f"{source}: {output_dir} holds no {said}.", hint=_available(output_dir))
    return folder


def _available(output_dir: Path) -> str | None:
    steps = sorted(
        int(m.group(1))
        for folder in (output_dir.glob("checkpoint-*") if output_dir.is_dir() else [])
        if (m := CHECKPOINT.match(folder.name))
    )
    return f"Its checkpoints: {', '.join(map(str, steps))}." if steps else None


def from_run(record: RunInfo, step: int | None) -> Path:
    """The sharded folder of a run: in its output folder on this machine, else pulled
    from its storage into its run folder."""
    output = Path(record.output_dir) if record.output_dir else None
    if output is not None and output.is_dir():
        folder = _local(output, step)
        if folder is not None:
            return folder
    if record.storage_uri:
        folder = _pull(record, step)
        if folder is not None:
            return folder
    where = f"{output}" + (
        f" nor in its storage {record.storage_uri}" if record.storage_uri else ""
    )
    said = f"checkpoint-{step}" if step is not None else "sharded checkpoint"
    raise FerryError(
        f"run {record.run_id}: no {said} in {where}.",
        hint=_available(output) if output else None,
    )


def _pull(record: RunInfo, step: int | None) -> Path | None:
    """checkpoint-`step` (or the newest sharded folder: the final one, else the newest
    complete checkpoint) from the run's storage; None when it has none."""
    from payload.storage import FINAL, download_folder, list_checkpoints, open_store
    from payload.storage.sync import read_manifest

    store = open_store(record.storage_uri or "")
    if step is None:
        final = read_manifest(store, FINAL)
        if final and any(f.path == f"{MODEL_DIR}/{METADATA}" for f in final.files):
            dest = Path(record.run_dir) / FINAL
            download_folder(store, FINAL, dest)
            return dest
    complete = [c for c in list_checkpoints(store) if c.complete]
    chosen = [c for c in complete if step is None or c.step == step]
    if not chosen:
        return None
    checkpoint = chosen[-1]
    dest = Path(record.run_dir) / f"checkpoint-{checkpoint.step}"
    download_folder(store, checkpoint.prefix, dest)
    return dest


def merge(folder: Path, dest: str | Path | None = None) -> MergedSharded:
    """Write the sharded model in `folder` whole to `dest` (default `folder`/merged)."""
    from payload.posttrain import loading

    loading.quiet()
    state, info = read_model(folder)
    out = Path(dest).expanduser().resolve() if dest else folder / DEFAULT_DEST
    out.mkdir(parents=True, exist_ok=True)
    if info["adapter"]:
        _write_adapter(folder, state, info["names"], out)
    else:
        _write_model(folder, state, out)
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(out))
    return MergedSharded(folder, out, info["adapter"], info["world_size"], len(state))


def _write_adapter(folder: Path, state: dict[str, Any], names: dict[str, str], out: Path) -> None:
    """peft's own files: adapter_model.safetensors under peft's names, its config."""
    from safetensors.torch import save_file

    unknown = sorted(set(state) - set(names))
    if unknown:
        raise FerryError(f"{folder}: adapter weights with no file name recorded: {unknown[:5]}.")
    tensors = {names[key]: value.contiguous() for key, value in state.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(folder / "adapter_config.json", out / "adapter_config.json")


def _write_model(folder: Path, state: dict[str, Any], out: Path) -> None:
    """The model built on the meta device (no memory, no initialisation) from the saved
    config, given the loaded tensors as its own, and saved as save_pretrained saves it
    (tied weights once, large models in several files)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder))
    architectures = config.architectures or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise FerryError(f"{folder}/config.json names no model class transformers has.")
    with torch.device("meta"):
        model = cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise FerryError(
            f"{folder}: the weights do not fit {cls.__name__}: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    model.tie_weights()  # `assign` gave each tied name a tensor of its own
    model.save_pretrained(str(out))
