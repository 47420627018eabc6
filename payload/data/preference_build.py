"""Build the train (and eval) sets of a preference run (`rl:` dpo, ipo, simpo, kto, orpo).

    datasets            each read and sharded like SFT data (payload.data.sources), then put
                        in TRL's shape by its preference format (payload.data.preference):
                        text columns prompt/chosen/rejected, or prompt/completion/label for
                        KTO; mixed as SFT data is (concatenated, shuffled with `seed` when
                        several and `shuffle_merged_datasets`)
    dataset_exact_deduplication   rows whose text repeats an earlier row's are dropped
    dataset_shard_num   one contiguous shard of the mixed rows is kept
    test_datasets       the eval set, formatted the same way; else `val_set_size` holds out
                        a fraction (< 1) or a count (>= 1) of the rows, with `seed`

The rows stay text: the TRL trainer tokenizes them when it starts (and truncates to
`sequence_len`, its `max_length`). Rows a format cannot use are skipped and counted by
reason in the `DataReport`, or raise on the first one with `strict: true`.
"""

from __future__ import annotations

from typing import Any

from payload.config.schema import DatasetConfig, TrainConfig
from payload.data.preference import prepare_preference_dataset
from payload.data.report import DataReport
from payload.data.sources import load_rows, shard
from payload.errors import FerryError

DUPLICATE = "an exact duplicate of an earlier row (dataset_exact_deduplication)"


def _one(
    key: str, index: int, ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any, report: DataReport
) -> Any:
    """One entry of `key` (datasets, test_datasets) read, sharded and formatted."""
    where = f"{key}[{index}] ({ds.path})"
    rows = load_rows(ds, where, report=report, strict=cfg.strict)
    rows, offset = shard(rows, ds.shards, ds.shards_idx)
    report.rows_in += len(rows)
    kept, skipped, first = prepare_preference_dataset(rows, ds, cfg, tokenizer, where)
    for reason, n in skipped.items():
        # "<where> row N" counts from the shard's first row; name the row in the file.
        name, row = first[reason].rsplit(" row ", 1)
        report.skipped[reason] += n
        report.examples.setdefault(reason, f"{name} row {int(row) + offset}")
    report.rows_kept += len(kept)
    return kept


def _mix(parts: list[Any], shuffle: bool, seed: int) -> Any:
    import datasets

    if len(parts) == 1:
        return parts[0]
    mixed = datasets.concatenate_datasets(parts)
    return mixed.shuffle(seed=seed) if shuffle else mixed


def _deduplicate(rows: Any, name: str, report: DataReport, seen: set[tuple]) -> Any:
    """`rows` without those whose every column equals an earlier row's (or one in
    `seen`), each counted in `report` as skipped."""
    keep = []
    for i, row in enumerate(rows):
        key = tuple(row.values())
        if key in seen:
            report.skip(DUPLICATE, f"the {name} rows' row {i} (counted after mixing)")
            report.rows_kept -= 1
        else:
            seen.add(key)
            keep.append(i)
    return rows if len(keep) == len(rows) else rows.select(keep)


def _tokens(rows: Any, tokenizer: Any) -> int:
    """Tokens in the text columns, as the trainer will see them (prompt once per answer)."""
    if rows is None or len(rows) == 0:
        return 0
    total = 0
    answers = [c for c in ("chosen", "rejected", "completion") if c in rows.column_names]
    for batch in rows.iter(batch_size=1000):
        prompts = [len(ids) for ids in tokenizer(batch["prompt"])["input_ids"]]
        for column in answers:
            lengths = [len(ids) for ids in tokenizer(batch[column])["input_ids"]]
            total += sum(lengths) + sum(prompts)
    return total


def build_preference_datasets(cfg: TrainConfig, tokenizer: Any) -> tuple[Any, Any, DataReport]:
    """(train, eval or None, report) of text rows in TRL's shape."""
    report = DataReport()
    if cfg.dataset_prepared_path:
        # The prepared cache holds token ids; preference rows stay text until TRL
        # tokenizes them, so there is nothing to cache. Said, not silently skipped.
        report.notes.append(
            "dataset_prepared_path: not used for preference data (the trainer tokenizes "
            "the text rows when it starts)"
        )
    parts = [_one("datasets", i, ds, cfg, tokenizer, report) for i, ds in enumerate(cfg.datasets)]
    train = _mix(parts, cfg.shuffle_merged_datasets, cfg.seed)
    if len(train) == 0:
        reasons = [f"{n} {reason}" for reason, n in report.skipped.most_common()]
        raise FerryError("No usable rows in any dataset: " + ("; ".join(reasons) or "all empty"))
    seen: set[tuple] | None = None
    if cfg.dataset_exact_deduplication:
        seen = set()
        train = _deduplicate(train, "train", report, seen)
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
            _one("test_datasets", i, ds, cfg, tokenizer, report)
            for i, ds in enumerate(cfg.test_datasets)
        ]
        eval_set = _mix(evals, False, cfg.seed)
        if seen is not None:  # also against the train rows, as for SFT data
            eval_set = _deduplicate(eval_set, "eval", report, seen)
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
    if (cfg.rl or "").lower() == "kto":
        # KTO's trainer reads its rows in order (each row's KL completion is its
        # neighbour's), so the shuffling a sampler would do is done here, once, seeded.
        train = train.shuffle(seed=cfg.seed)
    report.train_rows = len(train)
    report.eval_rows = len(eval_set) if eval_set is not None else 0
    report.tokens = _tokens(train, tokenizer) + _tokens(eval_set, tokenizer)
    return train, eval_set, report
