"""Build the tokenized train (and eval) sets from the config's data section.

    datasets            each tokenized by its strategy (payload.data.tokenize), then mixed:
                        concatenated in order, and shuffled with `seed` when there are
                        several and `shuffle_merged_datasets` (one dataset keeps its order;
                        the trainer's sampler shuffles anyway)
    pretraining_dataset raw text in sequence_len blocks (payload.data.pretrain), added
    dataset_exact_deduplication   rows whose tokens and labels repeat an earlier row's are
                        dropped (train first; eval rows also against the train rows)
    dataset_shard_num   one contiguous shard of the mixed rows is kept
    test_datasets       the eval set, tokenized the same way; else `val_set_size` holds out
                        a fraction (< 1) or a count (>= 1) of the rows, with `seed`

Rows that cannot be used are skipped and counted by reason, or raise on the first one
with `strict: true`; so are lines of a data file that cannot be read as rows, named
"<file> line N" (payload.data.sources.careful). Rows longer than `sequence_len` follow
`excess_length_strategy`.
Nothing is dropped without appearing in the returned `DataReport`. With
`dataset_prepared_path` the result is cached there (payload.data.cache).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from payload.config.schema import DatasetConfig, TrainConfig
from payload.data import cache, pretrain
from payload.data.report import DataReport
from payload.data.sources import data_home, load_rows, shard
from payload.data.tokenize import COLUMNS, RowTokenizer, processes, tokenize_rows
from payload.errors import FerryError

__all__ = ["COLUMNS", "DataReport", "build_datasets", "default_prepared_path", "preprocess"]


def tokenize_dataset(
    key: str,
    index: int,
    ds: DatasetConfig,
    cfg: TrainConfig,
    tokenizer: Any,
    report: DataReport,
    progress: bool | None = None,
) -> Any:
    """One entry of `key` (datasets, test_datasets) read, sharded and tokenized."""
    where = f"{key}[{index}] ({ds.path})"
    rows = load_rows(ds, where, report=report, strict=cfg.strict)
    rows, offset = shard(rows, ds.shards, ds.shards_idx)
    rt = RowTokenizer(ds, cfg, tokenizer, where, limit=True)
    return tokenize_rows(rows, rt, where, offset, report, processes(cfg, len(rows)), progress)


def _mix(parts: list[Any], shuffle: bool, seed: int) -> Any:
    import datasets

    if len(parts) == 1:
        return parts[0]
    mixed = datasets.concatenate_datasets(parts)
    return mixed.shuffle(seed=seed) if shuffle else mixed


def _tokens(rows: Any) -> int:
    import pyarrow.compute as pc

    if rows is None or len(rows) == 0:
        return 0
    lengths = pc.list_value_length(rows.with_format("arrow")[:]["input_ids"])
    return int(pc.sum(lengths).as_py())


DUPLICATE = "an exact duplicate of an earlier row (dataset_exact_deduplication)"


def _deduplicate(rows: Any, name: str, report: DataReport, seen: set[int]) -> tuple[Any, set]:
    """`rows` without those whose tokens and labels equal an earlier row's (or one in
    `seen`), each counted in `report` as skipped; and the rows seen so far."""
    import hashlib

    import numpy as np

    keep = []
    i = 0
    for batch in rows.with_format("arrow").iter(batch_size=10_000):  # bounded memory
        for ids, labels in zip(
            batch["input_ids"].to_pylist(), batch["labels"].to_pylist(), strict=True
        ):
            row = np.asarray(ids + [-1] + labels, np.int64).tobytes()
            key = int.from_bytes(hashlib.blake2b(row, digest_size=16).digest(), "big")
            if key in seen:
                report.skip(DUPLICATE, f"the {name} rows' row {i} (counted after mixing)")
                report.rows_kept -= 1
            else:
                seen.add(key)
                keep.append(i)
            i += 1
    return (rows if len(keep) == len(rows) else rows.select(keep)), seen


def _build(cfg: TrainConfig, tokenizer: Any, progress: bool | None) -> cache.Built:
    report = DataReport()
    parts = [
        tokenize_dataset("datasets", i, ds, cfg, tokenizer, report, progress)
        for i, ds in enumerate(cfg.datasets)
    ]
    if cfg.pretraining_dataset:
        parts.append(pretrain.blocks(cfg, tokenizer, report, progress))
    train = _mix(parts, cfg.shuffle_merged_datasets, cfg.seed) if parts else None
    if train is None or len(train) == 0:
        reasons = [f"{n} {reason}" for reason, n in report.skipped.most_common()]
        raise FerryError("No usable rows in any dataset: " + ("; ".join(reasons) or "all empty"))
    seen: set[int] | None = None
    if cfg.dataset_exact_deduplication:
        train, seen = _deduplicate(train, "train", report, set())
    if cfg.dataset_shard_num:
        before = len(train)
        index = cfg.dataset_shard_idx or 0
        train = train.shard(num_shards=cfg.dataset_shard_num, index=index, contiguous=True)
        report.notes.append(
            f"dataset_shard_num: kept shard {index} of {cfg.dataset_shard_num} "
            f"({len(train)} of {before} rows)"
        )
    eval_set = None
    if cfg.test_datasets:
        evals = [
            tokenize_dataset("test_datasets", i, ds, cfg, tokenizer, report, progress)
            for i, ds in enumerate(cfg.test_datasets)
        ]
        eval_set = _mix(evals, False, cfg.seed)
        if seen is not None:  # also against the train rows, as Axolotl does
            eval_set, _ = _deduplicate(eval_set, "eval", report, seen)
        if len(eval_set) == 0:
            raise FerryError("test_datasets: no usable rows: see the skipped rows above.")
    elif cfg.val_set_size:
        size = cfg.val_set_size
        test_size: float | int = int(size) if size >= 1 else size
        if isinstance(test_size, int) and test_size >= len(train):
            raise FerryError(
                f"val_set_size: {test_size} rows leaves nothing to train on ({len(train)} rows)."
            )
        split = train.train_test_split(test_size=test_size, seed=cfg.seed, shuffle=True)
        train, eval_set = split["train"], split["test"]
    report.train_rows = len(train)
    report.eval_rows = len(eval_set) if eval_set is not None else 0
    report.tokens = _tokens(train) + _tokens(eval_set)
    return train, eval_set, report


def build_datasets(
    cfg: TrainConfig,
    tokenizer: Any,
    *,
    prepared_path: str | Path | None = None,
    progress: bool | None = None,
) -> tuple[Any, Any | None, DataReport]:
    """(train, eval or None, report). With `dataset_prepared_path` (or `prepared_path`)
    the sets come from the prepared cache, built first if missing; without, they are
    tokenized in memory, each rank on its own (they share no files, so none can race).
    `progress`: draw a bar (default: when stdout is a terminal)."""
    if cfg.pretraining_dataset and cfg.streaming:
        return _build_stream(cfg, tokenizer)
    build = functools.partial(_build, cfg, tokenizer, progress)
    root = prepared_path or cfg.dataset_prepared_path
    if root is None:
        return build()
    return cache.prepared(Path(root).expanduser().resolve(), cfg, tokenizer, build)


def _build_stream(cfg: TrainConfig, tokenizer: Any) -> tuple[Any, Any | None, DataReport]:
    if cfg.datasets:
        raise FerryError(
            "`datasets` cannot be mixed into a streamed pretraining_dataset.",
            hint="Set streaming: false to train on both, or move the rows to their own run.",
        )
    if cfg.val_set_size:
        raise FerryError(
            "val_set_size cannot hold rows out of a stream.",
            hint="Name the eval rows under test_datasets instead.",
        )
    report = DataReport()
    train = pretrain.stream(cfg, tokenizer, report)
    eval_set = None
    if cfg.test_datasets:
        evals = [
            tokenize_dataset("test_datasets", i, ds, cfg, tokenizer, report)
            for i, ds in enumerate(cfg.test_datasets)
        ]
        eval_set = _mix(evals, False, cfg.seed)
        report.eval_rows = len(eval_set)
    return train, eval_set, report


def default_prepared_path() -> Path:
    """Where `preprocess` puts the cache when the config names no dataset_prepared_path."""
    return data_home() / "prepared"


def preprocess(cfg: TrainConfig, progress: bool | None = None) -> dict[str, Any]:
    """Tokenize into the prepared cache (or find it there) without training; returns
    where it is, whether it was a hit, and the report."""
    from payload.model import load_tokenizer

    if (cfg.rl or "").lower() in ("dpo", "ipo", "simpo", "kto", "orpo"):
        raise FerryError(
            f"Nothing to prepare: `rl: {cfg.rl}` rows stay text until the trainer tokenizes "
            "them when it starts (payload.data.preference_build); `launch validate` checks "
            "the config, and a train run reports the rows it skips."
        )
    if cfg.pretraining_dataset and cfg.streaming:
        raise FerryError(
            "Nothing to prepare: with `streaming: true` the pretraining text is tokenized "
            "while training reads it.",
            hint="Set streaming: false to prepare its blocks ahead.",
        )
    if cfg.processor_type:  # image chats: every row checked, nothing cached (vision.py)
        from payload.data import vision
        from payload.model import load_processor

        _, _, report = vision.build(cfg, load_processor(cfg))
        return {"path": None, "hit": False, "default_path": False, "lines": report.lines(),
                "rate": None, "rows": report.summary()}  # fmt: skip
    default = cfg.dataset_prepared_path is None
    root = Path(cfg.dataset_prepared_path or default_prepared_path())
    _, _, report = build_datasets(cfg, load_tokenizer(cfg), prepared_path=root, progress=progress)
    return {
        "path": report.cache_path,
        "hit": report.cache_hit,
        "default_path": default,
        "lines": report.lines(),
        "rate": report.rate_line() if report.tokenized_rows and not report.cache_hit else None,
        "rows": report.summary(),
    }
