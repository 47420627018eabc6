"""GRPO's data: prompts only, the completions are generated while training.

A dataset's rows either hold a `prompt` already (a string, or chat messages
`[{"role": ..., "content": ...}]`) and pass through, or its `type: module.function` names
a user function that maps a row to `{"prompt": ...}` (plus any columns the reward
functions read). As in Axolotl, a function whose first parameter is `cfg` is a factory:
called with the config (and `dataset_idx`), it returns the row function, or
`(row_function, map_kwargs)` where `map_kwargs` go to `datasets.map` (`remove_columns`,
`"__all__"` for every original column). A row function with a `tokenizer` parameter gets
the tokenizer. Every column the rows keep reaches the reward functions as a keyword.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

from payload.config import rewards
from payload.config.schema import DatasetConfig, TrainConfig
from payload.data.report import DataReport
from payload.data.sources import load_rows, shard
from payload.errors import FerryError


def build_prompts(cfg: TrainConfig, tokenizer: Any) -> tuple[Any, Any | None, DataReport]:
    """(train, eval or None, report) for `rl: grpo`."""
    import datasets

    report = DataReport()
    train = [
        _prompt_rows(cfg, ds, i, f"datasets[{i}]", tokenizer, report)
        for i, ds in enumerate(cfg.datasets)
    ]
    rows = datasets.concatenate_datasets(train) if len(train) > 1 else train[0]
    if len(train) > 1 and cfg.shuffle_merged_datasets:
        rows = rows.shuffle(seed=cfg.seed)
    eval_set = None
    if cfg.test_datasets:
        evals = [
            _prompt_rows(cfg, ds, i, f"test_datasets[{i}]", tokenizer, report)
            for i, ds in enumerate(cfg.test_datasets)
        ]
        eval_set = datasets.concatenate_datasets(evals) if len(evals) > 1 else evals[0]
    elif cfg.val_set_size:
        size = cfg.val_set_size
        held = int(size) if size >= 1 else max(int(len(rows) * size), 1)
        if held >= len(rows):
            raise FerryError(
                f"val_set_size: {held} rows leaves no prompts to train on ({len(rows)} rows)."
            )
        split = rows.train_test_split(test_size=held, seed=cfg.seed, shuffle=True)
        rows, eval_set = split["train"], split["test"]
    report.train_rows = len(rows)
    report.eval_rows = len(eval_set) if eval_set is not None else 0
    report.rows_kept = report.train_rows + report.eval_rows
    return rows, eval_set, report


def _prompt_rows(
    cfg: TrainConfig, ds: DatasetConfig, index: int, where: str, tokenizer: Any, report: DataReport
) -> Any:
    rows = load_rows(ds, where, report=report, strict=cfg.strict)
    rows, _ = shard(rows, ds.shards, ds.shards_idx)
    report.rows_in += len(rows)
    if isinstance(ds.type, str) and ds.type:
        rows = _transformed(cfg, ds.type, index, where, rows, tokenizer)
    if "prompt" not in rows.column_names:
        raise FerryError(
            f"{where}: GRPO rows need a `prompt` column; the rows have "
            f"{', '.join(rows.column_names) or 'no columns'}. Rename the column, or set "
            "`type: module.function` to a function that returns {'prompt': ...} for a row."
        )
    for n, prompt in enumerate(rows["prompt"]):
        if problem := _prompt_problem(prompt):
            raise FerryError(f"{where} row {n}: `prompt` {problem}.")
    return rows


def _prompt_problem(prompt: Any) -> str | None:
    """Why a prompt is neither text nor chat messages, or None."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "is empty"
    if isinstance(prompt, list) and prompt:
        for turn in prompt:
            if not (isinstance(turn, dict) and "role" in turn and "content" in turn):
                return f"holds {turn!r}, not a message with `role` and `content`"
        return None
    return f"is {type(prompt).__name__} {prompt!r}, not text or a list of chat messages"


def _transformed(
    cfg: TrainConfig, ref: str, index: int, where: str, rows: Any, tokenizer: Any
) -> Any:
    """The rows mapped through the user's function `ref` (see the module docstring)."""
    function = rewards.load(ref)
    map_kwargs: dict[str, Any] = {}
    if rewards.is_factory(function):
        made = function(cfg, dataset_idx=index)
        function, map_kwargs = made if isinstance(made, tuple) else (made, {})
        map_kwargs = dict(map_kwargs or {})
        if not callable(function):
            raise FerryError(
                f"{where}.type: `{ref}` takes `cfg`, so it is called as Axolotl's factory; it "
                f"returned {type(function).__name__}, not a row function."
            )
    if "tokenizer" in _parameters(function):
        function = partial(function, tokenizer=tokenizer)
    remove = map_kwargs.pop("remove_columns", None)
    if remove == "__all__":
        remove = list(rows.column_names)
    elif remove:
        remove = [c for c in remove if c in rows.column_names]

    def one(row: dict[str, Any], n: int) -> dict[str, Any]:
        try:
            out = function(row)
        except Exception as e:  # noqa: BLE001 - the user's function; named with its row
            raise FerryError(
                f"{where} row {n}: `{ref}` raised {type(e).__name__}: {e}".rstrip(": ")
            ) from e
        if not isinstance(out, dict):
            raise FerryError(
                f"{where} row {n}: `{ref}` returned {type(out).__name__}, not a dict of columns."
            )
        return out

    return rows.map(one, with_indices=True, remove_columns=remove or None, **map_kwargs)


def _parameters(function: Any) -> dict[str, Any]:
    try:
        return dict(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return {}
