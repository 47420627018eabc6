"""Rows to tokens, fast: a dataset's strategy over its rows, in batches, in one or more
processes, with the rules for rows that cannot be used or are too long.

Strategies tokenize one piece of text at a time (`core.encode`), and most of a tokenizer
call's time is Python overhead around the tokenizer itself. So each batch of rows is
run twice. The first pass runs the strategy against a `BatchedTokenizer` that only notes
the texts it is asked for (answering with no tokens); those texts are then tokenized in
one batched call; the second pass runs against the same tokenizer, which now answers from
that batch. A call it cannot answer from the batch (other arguments, or a text the first
pass did not ask for) goes to the real tokenizer, so the output is exactly what one row at
a time gives; only the time changes (bench/preprocess.py measures it).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from payload.config.schema import DatasetConfig, TrainConfig
from payload.data.core import IGNORE, BadRow, build_strategy
from payload.data.report import TRUNCATED, DataReport, Progress
from payload.errors import FerryError

COLUMNS = ("input_ids", "attention_mask", "labels")
NOTE = "_ferry_note"  # "" kept, "truncated", or "skip:<reason>"
BATCH = 1000
# Below this many rows one process is faster: starting workers costs more than it saves.
SMALL = 10_000
# Arguments under which one call on a list gives, item by item, what a call per text gives.
_BATCHABLE = {
    "add_special_tokens",
    "return_offsets_mapping",
    "return_attention_mask",
    "return_token_type_ids",
    "return_special_tokens_mask",
    "return_length",
}

# What a first-pass call answers: every key a call may return, empty.
_PLACEHOLDER = (
    "input_ids",
    "attention_mask",
    "offset_mapping",
    "token_type_ids",
    "special_tokens_mask",
    "length",
)


class BatchedTokenizer:
    """The tokenizer a strategy sees: the real one, except that `tokenizer(text, ...)`
    is answered from a batch tokenized ahead (see the module docstring)."""

    def __init__(self, real: Any):
        self._real = real
        self._memo: dict[tuple[str, tuple], dict[str, Any]] = {}
        self._asked: dict[tuple, list[str]] | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_real", "_memo", "_asked"):
            raise AttributeError(name)  # also keeps unpickling from recursing here
        return getattr(self._real, name)

    def __len__(self) -> int:
        return len(self._real)

    def __call__(self, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        options = tuple(sorted(kwargs.items()))
        if isinstance(text, str) and not args and set(kwargs) <= _BATCHABLE:
            if self._asked is not None:
                self._asked.setdefault(options, []).append(text)
                return _Encoding(dict.fromkeys(_PLACEHOLDER, []))
            found = self._memo.get((text, options))
            if found is not None:
                # Copies: a strategy may append to what it gets, and a text may repeat.
                return _Encoding({k: _copy(v) for k, v in found.items()})
        return self._real(text, *args, **kwargs)

    def prefetch(self, run: Callable[[], None]) -> None:
        """Run `run` (the batch's strategy calls) to learn the texts, then tokenize them."""
        self._memo.clear()
        self._asked = {}
        try:
            run()
        finally:
            asked, self._asked = self._asked, None
        for options, texts in asked.items():
            unique = list(dict.fromkeys(texts))
            encoded = self._real(unique, **dict(options))
            for i, text in enumerate(unique):
                self._memo[(text, options)] = {k: v[i] for k, v in encoded.items()}


class _Encoding(dict):
    """What a tokenizer call returns, as light as it can be: keys, and the same names as
    attributes (`out["input_ids"]`, `out.input_ids`), like transformers' BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def processes(cfg: TrainConfig, rows: int) -> int:
    """`dataset_processes` (or `dataset_num_proc`); by default 1 for small data, else the
    cores this process may use, shared among the ranks on this machine, at most 8."""
    asked = cfg.dataset_processes or cfg.dataset_num_proc
    if asked:
        return asked
    if rows < SMALL:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (cores or 1) // ranks))


@contextlib.contextmanager
def _one_thread_per_worker(num_proc: int) -> Iterator[None]:
    """Worker processes each tokenize serially: N workers with a thread pool each would
    ask for N times the cores there are."""
    if num_proc <= 1 or "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        del os.environ["TOKENIZERS_PARALLELISM"]


def strategy_for(ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any, where: str) -> Any:
    try:
        return build_strategy(ds, cfg, tokenizer)
    except KeyError as e:
        raise FerryError(f"{where}: no prompt strategy is registered as `{ds.type}`.") from e


def row_function(ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any, where: str, limit: bool):
    """The batched `datasets.map` function for one dataset. With `limit`, rows longer
    than sequence_len follow `excess_length_strategy`."""
    proxy = BatchedTokenizer(tokenizer)
    strategy = strategy_for(ds, cfg, proxy, where)
    size, policy, strict = cfg.sequence_len, cfg.excess_length_strategy, cfg.strict

    def first_pass(records: list[dict[str, Any]]) -> None:
        for record in records:
            try:
                strategy(record)
            except Exception:  # noqa: BLE001, S112 - placeholders may upset a strategy
                continue

    def one(record: dict[str, Any], row: int) -> tuple[dict[str, list[int]] | None, str]:
        try:
            out = strategy(record)
        except BadRow as e:
            if strict:
                raise FerryError(f"{where} row {row}: {e} (strict: true).") from e
            return None, f"skip:{e}"
        n = len(out["input_ids"])
        if not limit or n <= size:
            return out, ""
        if policy == "raise":
            raise FerryError(
                f"{where} row {row}: {n} tokens, longer than sequence_len ({size}).",
                hint="Raise sequence_len, or set excess_length_strategy: drop or truncate.",
            )
        if policy == "truncate":
            out = {k: out[k][:size] for k in COLUMNS}
            if all(label == IGNORE for label in out["labels"]):
                return None, f"skip:no trained tokens left once {TRUNCATED} ({size} tokens)"
            return out, "truncated"
        reason = f"longer than sequence_len ({size} tokens)"
        if strict:
            raise FerryError(f"{where} row {row}: {n} tokens, {reason} (strict: true).")
        return None, f"skip:{reason}"

    def batch(rows: dict[str, list[Any]], indices: list[int], offset: int) -> dict[str, list]:
        names = list(rows)
        records = [{name: rows[name][j] for name in names} for j in range(len(indices))]
        proxy.prefetch(lambda: first_pass(records))
        out: dict[str, list[Any]] = {c: [] for c in (*COLUMNS, NOTE)}
        for record, index in zip(records, indices, strict=True):
            tokens, note = one(record, offset + index)
            for c in COLUMNS:
                out[c].append(tokens[c] if tokens is not None else [])
            out[NOTE].append(note)
        return out

    return batch


def features() -> Any:
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({**dict.fromkeys(COLUMNS, ids), NOTE: datasets.Value("string")})


def tokenize_rows(
    rows: Any,
    fn: Callable[..., dict[str, list]],
    where: str,
    offset: int,
    report: DataReport,
    num_proc: int,
    progress: bool | None,
) -> Any:
    """Map `fn` over `rows` and record what happened in `report`: the kept rows, with
    only the token columns. On a terminal, the rows go in chunks so that a bar can move."""
    import datasets

    total = len(rows)
    bar = Progress(total, f"tokenizing {where.split(' ')[0]}", progress)
    chunk = max(SMALL, -(-total // 20)) if bar.enabled else max(total, 1)
    parts = []
    with _one_thread_per_worker(num_proc):
        for start in range(0, max(total, 1), chunk):
            piece = rows.select(range(start, min(start + chunk, total))) if chunk < total else rows
            parts.append(
                piece.map(
                    fn,
                    batched=True,
                    batch_size=BATCH,
                    with_indices=True,
                    fn_kwargs={"offset": offset + start},
                    remove_columns=piece.column_names,
                    features=features(),
                    num_proc=num_proc if num_proc > 1 else None,
                    keep_in_memory=True,
                    load_from_cache_file=False,
                    new_fingerprint=uuid.uuid4().hex,  # skips hashing fn (and its tokenizer)
                )
            )
            bar.advance(len(piece))
    mapped = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    elapsed = bar.close()
    report.tokenize_s += elapsed
    report.tokenized_rows += total
    report.processes = max(report.processes, num_proc)
    report.rows_in += total
    skipped = 0
    for i, note in enumerate(mapped[NOTE]):
        if not note:
            continue
        if note == "truncated":
            report.truncated += 1
            report.truncated_example = report.truncated_example or f"{where} row {offset + i}"
        else:
            skipped += 1
            report.skip(note.removeprefix("skip:"), f"{where} row {offset + i}")
    report.rows_kept += total - skipped
    if skipped:
        mapped = mapped.filter(
            lambda notes: [not n.startswith("skip:") for n in notes],
            input_columns=NOTE,
            batched=True,
            keep_in_memory=True,
        )
    return mapped.remove_columns(NOTE)
