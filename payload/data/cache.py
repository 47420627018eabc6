"""The prepared-dataset cache: tokenized train/eval sets kept under
`dataset_prepared_path/<key>`, so a second run (or every rank, or a sweep's trials) loads
them instead of tokenizing again.

The key is a digest of everything that changes the tokens: each dataset entry as
configured, the contents of its files (size and sha256; an S3 object's ETag), the
tokenizer (its whole serialized form, special tokens and chat template), the settings in
`KEY_SETTINGS`, `FORMAT_VERSION` (raised when the saved layout changes), and a digest of
the data code itself, so an edited strategy never reads tokens an older one made. The
inputs are written beside the data (`inputs.json`) to tell why two runs missed.

Writers never race: a process takes `<key>.lock` (a `filelock`, released by the OS if the
process dies), looks again, and only then builds, into a partial folder renamed to
`<key>` once complete. The others wait on the lock, find the folder, and load it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from payload.config.schema import TrainConfig
from payload.data.report import DataReport
from payload.data.sources import fingerprint

log = logging.getLogger("ferry.data")

FORMAT_VERSION = 1
KEY_SETTINGS = (
    "chat_template",
    "chat_template_jinja",
    "default_system_message",
    "eot_tokens",
    "special_tokens",
    "sequence_len",
    "excess_length_strategy",
    "strict",
    "train_on_inputs",
    "val_set_size",
    "seed",
    "shuffle_merged_datasets",
    "dataset_shard_num",
    "dataset_shard_idx",
    "dataset_exact_deduplication",
    "streaming",
    "rl",
    "sample_packing",
    "eval_sample_packing",
    "sample_packing_group_size",
    "sample_packing_bin_size",
    "sample_packing_sequentially",
    "sample_packing_eff_est",
    "pad_to_sequence_len",
)
DATASET_LISTS = ("datasets", "test_datasets", "pretraining_dataset")
REPORT = "report.json"
INPUTS = "inputs.json"

Built = tuple[Any, Any, DataReport]


def tokenizer_digest(tokenizer: Any) -> str:
    """The tokenizer's vocabulary, merges, normalizer and added tokens (its serialized
    backend, or its vocabulary for a slow one), special tokens and chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "special": tokenizer.special_tokens_map,
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "chat_template": getattr(tokenizer, "chat_template", None),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@functools.cache
def code_digest() -> str:
    """The source of every module in payload.data: the strategies, templates and this
    pipeline (comments too; a needless miss is cheaper than a stale hit)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def key_inputs(cfg: TrainConfig, tokenizer: Any) -> dict[str, Any]:
    """Everything the key covers, as JSON-ready values."""
    dumped = cfg.model_dump(mode="json")
    sources = {}
    for name in DATASET_LISTS:
        for i, ds in enumerate(getattr(cfg, name) or []):
            sources[f"{name}[{i}]"] = {
                "config": ds.model_dump(mode="json"),
                "contents": fingerprint(ds, f"{name}[{i}] ({ds.path})"),
            }
    return {
        "format_version": FORMAT_VERSION,
        "code": code_digest(),
        "settings": {k: dumped[k] for k in KEY_SETTINGS},
        "sources": sources,
        "tokenizer": tokenizer_digest(tokenizer),
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def prepared(root: Path, cfg: TrainConfig, tokenizer: Any, build: Callable[[], Built]) -> Built:
    """(train, eval, report) from `root/<key>`, built there first if it is missing."""
    from filelock import FileLock, Timeout

    inputs = key_inputs(cfg, tokenizer)
    key = cache_key(inputs)
    folder = root / key
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f"{key}.lock"))
    try:
        lock.acquire(timeout=1)
    except Timeout:
        log.info("waiting for another process preparing %s", folder)
        lock.acquire()
    try:
        if (folder / REPORT).is_file():
            return load(folder, hit=True)
        train, eval_set, report = build()
        _save(folder, train, eval_set, report, inputs)
    finally:
        lock.release()
    return load(folder, hit=False)


def _save(folder: Path, train: Any, eval_set: Any, report: DataReport, inputs: dict) -> None:
    # Whoever held the lock before and left a folder behind died while writing it.
    partial = folder.with_name(f".{folder.name}.partial")
    for stale in (partial, folder):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        train.save_to_disk(str(partial / "train"))
        if eval_set is not None:
            eval_set.save_to_disk(str(partial / "eval"))
        (partial / INPUTS).write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n")
        (partial / REPORT).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def load(folder: Path, hit: bool) -> Built:
    import datasets

    report = DataReport.from_dict(json.loads((folder / REPORT).read_text()))
    report.cache_path, report.cache_hit = str(folder), hit
    train = datasets.load_from_disk(str(folder / "train"))
    eval_set = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    return train, eval_set, report
