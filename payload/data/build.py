"""Build the tokenized train (and eval) sets from the config's `datasets:`.

Rows that cannot be used are skipped and counted by reason, or raise on the first one
with `strict: true`; rows longer than `sequence_len` are dropped and counted. Nothing is
dropped without appearing in the returned `DataReport`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from payload.config.schema import DatasetConfig, TrainConfig
from payload.data.core import BadRow, build_strategy
from payload.errors import FerryError

SUFFIX_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
COLUMNS = ["input_ids", "attention_mask", "labels"]


@dataclass
class DataReport:
    """What happened to the rows: kept, skipped per reason, and examples of each."""

    rows_in: int = 0
    rows_kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> "dataset row N"
    train_rows: int = 0
    eval_rows: int = 0

    def lines(self) -> list[str]:
        out = [
            f"{self.rows_kept} of {self.rows_in} rows kept "
            f"({self.train_rows} train, {self.eval_rows} eval)"
        ]
        for reason, n in self.skipped.most_common():
            out.append(f"skipped {n}: {reason} (first: {self.examples[reason]})")
        return out


def load_rows(ds: DatasetConfig) -> Any:
    """The dataset's rows as a `datasets.Dataset`, from a local file, folder or the hub."""
    import datasets

    path = Path(ds.path)
    try:
        if path.is_file():
            fmt = ds.ds_type or SUFFIX_FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise FerryError(f"{ds.path}: cannot tell the file format; set `ds_type`.")
            return datasets.load_dataset(fmt, data_files=str(path), split=ds.split)
        if path.is_dir() and (path / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded[ds.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(
            ds.path, name=ds.name, data_files=ds.data_files, split=ds.split, revision=ds.revision
        )
    except (FileNotFoundError, ValueError) as e:
        raise FerryError(f"Could not read dataset {ds.path} (split {ds.split!r}): {e}") from e


def tokenize_dataset(
    rows: Any, index: int, ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any, report: DataReport
) -> Any:
    strategy = build_strategy(ds, cfg, tokenizer)
    name = f"datasets[{index}] ({Path(ds.path).name})"
    limit = cfg.sequence_len

    def one(row: dict[str, Any], row_index: int) -> dict[str, Any]:
        try:
            out = strategy(row)
        except BadRow as e:
            if cfg.strict:
                raise FerryError(f"{name} row {row_index}: {e} (strict: true).") from e
            return {**dict.fromkeys(COLUMNS, []), "skip": str(e)}
        if len(out["input_ids"]) > limit:
            reason = f"longer than sequence_len ({limit} tokens)"
            if cfg.strict:
                raise FerryError(
                    f"{name} row {row_index}: {len(out['input_ids'])} tokens, {reason}."
                )
            return {**dict.fromkeys(COLUMNS, []), "skip": reason}
        return {**out, "skip": ""}

    mapped = rows.map(
        one,
        with_indices=True,
        remove_columns=rows.column_names,
        keep_in_memory=True,
        desc=f"tokenizing {name}",
    )
    report.rows_in += len(mapped)
    reasons = mapped["skip"]
    for row_index, reason in enumerate(reasons):
        if reason:
            report.skipped[reason] += 1
            report.examples.setdefault(reason, f"{name} row {row_index}")
    kept = mapped.filter(lambda r: not r, input_columns="skip", keep_in_memory=True)
    report.rows_kept += len(kept)
    return kept.remove_columns("skip")


def build_datasets(cfg: TrainConfig, tokenizer: Any) -> tuple[Any, Any | None, DataReport]:
    """(train, eval or None, report). Eval is held out by `val_set_size` with the seed."""
    import datasets

    report = DataReport()
    parts = [
        tokenize_dataset(load_rows(ds), i, ds, cfg, tokenizer, report)
        for i, ds in enumerate(cfg.datasets)
    ]
    merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(merged) == 0:
        raise FerryError(
            "No usable rows in any dataset: " + "; ".join(report.lines()[1:] or ["all empty"])
        )
    eval_set = None
    size = cfg.val_set_size
    if size:
        test_size: float | int = int(size) if size >= 1 else size
        if isinstance(test_size, int) and test_size >= len(merged):
            raise FerryError(
                f"val_set_size: {test_size} rows leaves nothing to train on ({len(merged)} rows)."
            )
        split = merged.train_test_split(test_size=test_size, seed=cfg.seed, shuffle=True)
        merged, eval_set = split["train"], split["test"]
    report.train_rows = len(merged)
    report.eval_rows = len(eval_set) if eval_set is not None else 0
    return merged, eval_set, report
