"""What `launch merge-lora|inference|evaluate|quantize RUN|CFG` works on: a trained run
(by id) or a config, resolved to the config it trained with and the folder that holds
its trained adapter or model.

A config: its `output_dir` holds the model (the default `./model-out` when it names
none, as a run started by hand writes it). A run: the launcher looks up its registry
record (this module takes any object with the record's fields, so that the payload
never imports the launcher); its config is the one it was launched with
(`<run folder>/config.yml`, paths as on this machine), and its model is in its
`output_dir` when that is on this machine, else pulled, verified, from the final
artifacts in its storage into `<run folder>/final` (`launch pull`'s download).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from payload.config.schema import TrainConfig
from payload.errors import FerryError

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
WEIGHTS = ("*.safetensors", "*.bin")
PULLED = "final"  # under the run folder: the final artifacts pulled from storage


class RunInfo(Protocol):
    """The fields of a run's registry record (launcher.registry.RunRecord) used here."""

    run_id: str
    state: str
    run_dir: str
    output_dir: str | None
    storage_uri: str | None


@dataclass(frozen=True)
class Target:
    cfg: TrainConfig
    model_dir: Path  # the trained adapter, or the fully fine-tuned model
    name: str  # how messages name it: "run <id>" or "<config path>"
    source: str  # what the user typed

    @property
    def adapter(self) -> bool:
        """A LoRA adapter (to load onto the base), not a whole model."""
        return (self.model_dir / ADAPTER_CONFIG).is_file()


def has_model(folder: Path) -> bool:
    """Does `folder` hold a saved adapter or model (its config and weights)?"""
    if not folder.is_dir():
        return False
    weights = any(next(folder.glob(pattern), None) for pattern in WEIGHTS)
    return weights and any((folder / f).is_file() for f in (ADAPTER_CONFIG, MODEL_CONFIG))


def looks_like_config(spec: str) -> bool:
    """A path or URL to a config, rather than a run id (run ids have no suffix)."""
    return spec.endswith((".yml", ".yaml")) or "/" in spec or Path(spec).is_file()


def from_config(source: str, overrides: list[str] | None = None) -> Target:
    from payload.config import load_config

    cfg = load_config(source, overrides)
    if cfg.output_dir:
        folder = Path(cfg.output_dir)
    else:  # where a run started by hand saves; the training stack loads only for it
        from payload.train import DEFAULT_OUTPUT_DIR

        folder = Path(DEFAULT_OUTPUT_DIR).resolve()
    if not has_model(folder):
        where = "its output_dir" if cfg.output_dir else "output_dir is not set, and"
        raise FerryError(
            f"{source}: {where} {folder} holds no trained model (no adapter or model "
            "weights with their config.json / adapter_config.json).",
            hint=f"Train it first (launch train {source}), or point output_dir at the folder "
            "the training saved to.",
        )
    return Target(cfg, folder, source, source)


def _without_generation_server(raw: dict) -> dict:
    """The run's config without GRPO's vLLM settings: they need vLLM where the run
    trained (its image), which a laptop inspecting the result has no need of (these
    commands generate with transformers)."""
    trl = raw.get("trl")
    if isinstance(trl, dict):
        raw["trl"] = {k: v for k, v in trl.items() if k != "use_vllm" and not k.startswith("vllm_")}
    raw.pop("vllm", None)
    return raw


def from_run(record: RunInfo, overrides: list[str] | None = None) -> Target:
    from payload.config import validate_mapping
    from payload.config.loader import read_raw

    run_id = record.run_id
    config = Path(record.run_dir) / "config.yml"
    if not config.is_file():
        raise FerryError(f"run {run_id}: its run folder {record.run_dir} has no config.yml.")
    # As launched: its local files were found then. A data file the run shipped to a
    # remote machine need not exist here; merge, inference and quantize need none.
    cfg = validate_mapping(
        _without_generation_server(read_raw(config, overrides)),
        str(config),
        base_dir=config.parent,
        resolve_paths=False,
    )
    output = Path(record.output_dir) if record.output_dir else None
    if output is not None and has_model(output):
        return Target(cfg, output, f"run {run_id}", run_id)
    pulled = Path(record.run_dir) / PULLED
    if record.state == "succeeded" and record.storage_uri:
        _pull_final(run_id, record.storage_uri, pulled)
        if has_model(pulled):
            return Target(cfg, pulled, f"run {run_id}", run_id)
    if record.state in ("pending", "running"):
        raise FerryError(
            f"run {run_id} is still {record.state}: it has no trained model yet.",
            hint=f"Wait for it to finish (launch logs -f {run_id}).",
        )
    if record.state != "succeeded":
        raise FerryError(
            f"run {run_id} ended {record.state}, before it saved a trained model.",
            hint=f"launch status {run_id} says why; launch resume {run_id} continues it.",
        )
    where = f" nor in its storage {record.storage_uri}" if record.storage_uri else ""
    raise FerryError(
        f"run {run_id} succeeded, but its model is neither in {output}{where}.",
        hint="Was the output folder deleted? launch pull fetches what the storage holds.",
    )


def _pull_final(run_id: str, storage_uri: str, dest: Path) -> None:
    """The run's final artifacts from storage into `dest`, each file verified against
    the manifest (files already there and intact are not fetched again)."""
    import logging

    from payload.storage import FINAL, download_folder, open_store
    from payload.storage.sync import read_manifest

    store = open_store(storage_uri)
    if read_manifest(store, FINAL) is None:
        return  # nothing complete there; the caller says so
    logging.getLogger("ferry.posttrain").info(
        "run %s: pulling its final artifacts from %s to %s", run_id, store.child(FINAL), dest
    )
    download_folder(store, FINAL, dest)
