"""Rows to tokens, fast: a dataset's strategy over its rows, in batches, in one or more
processes, with the rules for rows that cannot be used or are too long.

Each batch takes one pass over the strategy: every row's `plan` (payload.data.core) names
the texts to tokenize, all the batch's texts go to the tokenizer in one call, and each
row is finished from its plan. The result is what calling the strategy on each row gives
(`realize`), token for token; only the time changes (bench/preprocess.py measures it).

For a fast tokenizer whose class keeps transformers' own encoding path, that one call
goes straight to the Rust encoder (`encode_batch_fast`, which skips the character offsets
unless a plan asks for them), after a call on an empty text has set the encoder up as
`tokenizer(text, add_special_tokens=False)` would. Any other tokenizer is called on the
batch through its own `__call__`.

On Linux the rows go to worker processes (forked, so the strategy and the rows are
inherited, not sent) in tasks of a few batches; each returns its rows as arrow arrays, and
the kept rows become the tokenized `Dataset` directly, without a per-row conversion.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from payload.config.schema import DatasetConfig, TrainConfig
from payload.data.core import (
    IGNORE,
    BadRow,
    Plan,
    Row,
    Segments,
    Special,
    Strategy,
    Tokenized,
    assemble,
    build_strategy,
)
from payload.data.report import TRUNCATED, DataReport, Progress
from payload.errors import FerryError

COLUMNS = ("input_ids", "attention_mask", "labels")
NOTE = "_ferry_note"  # "" kept, "truncated", or "skip:<reason>"
BATCH = 1000
TASK = 4 * BATCH  # rows a worker process takes at a time
# Below this many rows one process is faster: starting workers costs more than it saves.
SMALL = 10_000


class Encoder:
    """Texts to token ids (and offsets) in one call, exactly as `tokenizer(text,
    add_special_tokens=False)` gives them one by one (see the module docstring)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.backend = _direct_backend(tokenizer)

    def __call__(
        self, texts: list[str], offsets: bool
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]] | None]:
        if not texts:
            return [], [] if offsets else None
        if self.backend is None:
            out = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
            ids = [list(x) for x in out["input_ids"]]
            return ids, [[tuple(o) for o in x] for x in out["offset_mapping"]] if offsets else None
        self.tokenizer("", add_special_tokens=False)  # sets padding, truncation, special splits
        if offsets:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
            return [e.ids for e in encodings], [e.offsets for e in encodings]
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)], None


def _direct_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer to call directly, or None where `__call__` may do more than
    encode (a slow tokenizer, or a class that overrides transformers' encoding path)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: take the safe path
        return None
    cls = type(tokenizer)
    same = (
        isinstance(tokenizer, TokenizersBackend)
        and cls.__call__ is PreTrainedTokenizerBase.__call__
        and cls._encode_plus is TokenizersBackend._encode_plus
        and cls._convert_encoding is TokenizersBackend._convert_encoding
    )
    return backend if same else None


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


def strategy_for(ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any, where: str) -> Strategy:
    try:
        return build_strategy(ds, cfg, tokenizer)
    except KeyError as e:
        raise FerryError(f"{where}: no prompt strategy is registered as `{ds.type}`.") from e


class RowTokenizer:
    """One dataset's rows to tokens, a batch at a time. With `limit`, rows longer than
    sequence_len follow `excess_length_strategy`."""

    def __init__(
        self, ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any, where: str, limit: bool
    ):
        self.strategy = strategy_for(ds, cfg, tokenizer, where)
        self.encode = Encoder(tokenizer)
        self.special = Special.of(tokenizer)
        self.where, self.limit = where, limit
        self.size, self.policy, self.strict = (
            cfg.sequence_len,
            cfg.excess_length_strategy,
            cfg.strict,
        )

    def _bad(self, row: int, error: BadRow) -> str:
        if self.strict:
            raise FerryError(f"{self.where} row {row}: {error} (strict: true).") from error
        return f"skip:{error}"

    def _plans(self, records: list[Row], first: int) -> tuple[list[Plan | None], list[str], Any]:
        """Each record's plan (None for a bad row), the notes so far, and, with strict,
        the first row that could not plan (raised once the rows before it are done:
        one of them may stop the run first)."""
        notes = [""] * len(records)
        plans: list[Plan | None] = [None] * len(records)
        for i, record in enumerate(records):
            try:
                plans[i] = self.strategy.plan(record)
            except BadRow as e:
                if self.strict:
                    return plans, notes, (first + i, e)
                notes[i] = self._bad(first + i, e)
        return plans, notes, None

    def rows(self, records: list[Row], first: int) -> tuple[list[Tokenized | None], list[str]]:
        """Each record's tokens (None when skipped) and note ("", "truncated" or
        "skip:<reason>"); `first` is the dataset row number of `records[0]`."""
        return self._finish(*self._plans(records, first), first)

    def _finish(
        self, plans: list[Plan | None], notes: list[str], stop: Any, first: int
    ) -> tuple[list[Tokenized | None], list[str]]:
        # Every text of the batch, in two calls at most: with and without offsets.
        texts: tuple[list[str], list[str]] = ([], [])
        for plan in plans:
            if isinstance(plan, Segments):
                texts[0].extend(t for t, _ in plan.parts if t)
            elif plan is not None:
                texts[plan.offsets].extend(t for t in plan.texts if t)
        plain, _ = self.encode(texts[0], offsets=False)
        marked, spans = self.encode(texts[1], offsets=True)
        plain_it, marked_it, spans_it = iter(plain), iter(marked), iter(spans or ())
        out: list[Tokenized | None] = [None] * len(plans)
        for i, plan in enumerate(plans):
            if plan is None:
                continue
            try:
                if isinstance(plan, Segments):
                    ids = [next(plain_it) if t else [] for t, _ in plan.parts]
                    tokens = assemble(plan, ids, self.special)
                elif plan.offsets:
                    ids = [next(marked_it) if t else [] for t in plan.texts]
                    offs = [next(spans_it) if t else [] for t in plan.texts]
                    tokens = plan.finish(ids, offs)
                else:
                    tokens = plan.finish([next(plain_it) if t else [] for t in plan.texts], None)
            except BadRow as e:
                notes[i] = self._bad(first + i, e)
                continue
            keep, notes[i] = self._limit(len(tokens["input_ids"]), tokens["labels"], first + i)
            if keep is not None:
                out[i] = tokens if keep == len(tokens["input_ids"]) else _head(tokens, keep)
        if stop is not None:
            self._bad(*stop)
        return out, notes

    def _limit(self, n: int, labels: Any, row: int) -> tuple[int | None, str]:
        """How many of a row's n tokens to keep (None: skip it) and its note, by
        `excess_length_strategy`; `labels` are the row's labels."""
        size = self.size
        if not self.limit or n <= size:
            return n, ""
        if self.policy == "raise":
            raise FerryError(
                f"{self.where} row {row}: {n} tokens, longer than sequence_len ({size}).",
                hint="Raise sequence_len, or set excess_length_strategy: drop or truncate.",
            )
        if self.policy == "truncate":
            if all(label == IGNORE for label in labels[:size]):
                return None, f"skip:no trained tokens left once {TRUNCATED} ({size} tokens)"
            return size, "truncated"
        reason = f"longer than sequence_len ({size} tokens)"
        if self.strict:
            raise FerryError(f"{self.where} row {row}: {n} tokens, {reason} (strict: true).")
        return None, f"skip:{reason}"

    def table(self, records: list[Row], first: int) -> tuple[Any, list[tuple[int, str]]]:
        """The kept rows as an arrow table of the token columns, and the notes that are
        not empty, by position in `records`. A batch of Segments plans (the instruction
        and raw-text formats) is put together in arrays, without a list per row."""
        plans, notes, stop = self._plans(records, first)
        if self.special.eos is not None and all(
            p is None or isinstance(p, Segments) for p in plans
        ):
            table = self._segments_table(plans, notes, first)  # type: ignore[arg-type]
            if stop is not None:
                self._bad(*stop)
        else:
            out, notes = self._finish(plans, notes, stop, first)
            kept = [t for t in out if t is not None]
            table = token_table(kept)
        return table, [(i, note) for i, note in enumerate(notes) if note]

    def _segments_table(self, plans: list[Segments | None], notes: list[str], first: int) -> Any:
        """What `assemble` makes of each plan, for a whole batch at once (notes filled in)."""
        import numpy as np

        at = [i for i, p in enumerate(plans) if p is not None]
        texts: list[str] = []
        owner: list[int] = []  # the plan (index into `at`) of each text
        trained: list[bool] = []
        flags = np.zeros((4, len(at)), bool)  # bos, eos, first part trained, last trained
        for j, i in enumerate(at):
            plan = plans[i]
            assert plan is not None
            for text, train in plan.parts:
                if text:
                    texts.append(text)
                    owner.append(j)
                    trained.append(train)
            parts = plan.parts
            flags[:, j] = (
                plan.bos,
                plan.eos,
                bool(parts) and parts[0][1],
                bool(parts) and parts[-1][1],
            )
        bos_on = flags[0] & (self.special.bos is not None)
        ids, _ = self.encode(texts, offsets=False)
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
        body = np.bincount(np.asarray(owner, np.int64), lengths, len(at)).astype(np.int64)
        sizes = body + bos_on + flags[1]
        starts = np.zeros(len(at) + 1, np.int64)
        np.cumsum(sizes, out=starts[1:])
        input_ids = np.empty(int(starts[-1]), np.int32)
        labels = np.empty_like(input_ids)
        is_body = np.ones(len(input_ids), bool)
        bos_at, eos_at = starts[:-1][bos_on], (starts[1:] - 1)[flags[1]]
        is_body[bos_at] = is_body[eos_at] = False
        input_ids[is_body] = flat
        labels[is_body] = np.where(np.repeat(np.asarray(trained, bool), lengths), flat, IGNORE)
        for where, token, labelled in (
            (bos_at, self.special.bos, flags[2][bos_on]),
            (eos_at, self.special.eos, flags[3][flags[1]]),
        ):
            if token is not None:  # no bos token (Qwen's tokenizers): bos_on is all False
                input_ids[where] = token
                labels[where] = np.where(labelled, token, IGNORE)
        # The rows that may not stay as they are: required training missing, or too long.
        learns = (
            np.bincount(np.repeat(np.arange(len(at)), sizes)[labels != IGNORE], minlength=len(at))
            > 0
        )
        needs = np.array([plans[i].require is not None for i in at], bool)  # type: ignore[union-attr]
        keep = sizes.copy()
        kept = np.ones(len(at), bool)
        check = (needs & ~learns) | ((sizes > self.size) if self.limit else False)
        for j in np.flatnonzero(check):
            i, row = at[j], first + at[j]
            plan = plans[i]
            if needs[j] and not learns[j]:
                kept[j] = False
                notes[i] = self._bad(row, BadRow(plan.require))  # type: ignore[union-attr]
                continue
            fit, notes[i] = self._limit(int(sizes[j]), labels[starts[j] : starts[j + 1]], row)
            if fit is None:
                kept[j] = False
            else:
                keep[j] = fit
        taken = keep[kept]
        bounds = np.zeros(len(taken) + 1, np.int64)
        np.cumsum(taken, out=bounds[1:])
        index = np.repeat(starts[:-1][kept] - bounds[:-1], taken) + np.arange(bounds[-1])
        return arrow_table(bounds, input_ids[index], labels[index])

    def batch_function(self):
        """The same, as a batched `datasets.map` function (for streamed rows): every row
        stays, a skipped one with empty columns, and its note in NOTE."""

        def batch(rows: dict[str, list[Any]], indices: list[int], offset: int) -> dict:
            records = _records(rows, len(indices))
            out, notes = self.rows(records, offset + (indices[0] if indices else 0))
            columns: dict[str, list[Any]] = {c: [] for c in COLUMNS}
            for tokens in out:
                for c in COLUMNS:
                    columns[c].append(tokens[c] if tokens is not None else [])
            return {**columns, NOTE: notes}

        return batch


def _records(columns: dict[str, list[Any]], count: int) -> list[Row]:
    """A batch as `datasets` gives it (a list per column) as one dict per row."""
    names = list(columns)
    if not names:
        return [{} for _ in range(count)]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _head(tokens: Tokenized, keep: int) -> Tokenized:
    return {k: tokens[k][:keep] for k in COLUMNS}


def token_table(rows: list[Tokenized]) -> Any:
    """`rows` as an arrow table of the token columns."""
    import numpy as np

    lengths = np.fromiter((len(r["input_ids"]) for r in rows), np.int64, len(rows))
    bounds = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=bounds[1:])
    total = int(bounds[-1])
    flat = {
        name: np.fromiter(itertools.chain.from_iterable(r[name] for r in rows), np.int32, total)
        for name in COLUMNS
    }
    return arrow_table(bounds, flat["input_ids"], flat["labels"], flat["attention_mask"])


def arrow_table(bounds: Any, input_ids: Any, labels: Any, attention_mask: Any = None) -> Any:
    """Int32 list columns from flat arrays and the row bounds (numpy); the attention
    mask is all ones unless given."""
    import numpy as np
    import pyarrow as pa

    large = int(bounds[-1]) >= 2**31
    offsets = pa.array(bounds if large else bounds.astype(np.int32))
    list_of = pa.LargeListArray if large else pa.ListArray
    if attention_mask is None:
        attention_mask = np.ones(len(input_ids), np.int32)
    columns = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return pa.table({k: list_of.from_arrays(offsets, pa.array(v)) for k, v in columns.items()})


def token_features() -> Any:
    import datasets

    return datasets.Features(dict.fromkeys(COLUMNS, datasets.Sequence(datasets.Value("int32"))))


# What a forked worker inherits: the rows and the RowTokenizer of the current call. Not a
# cache: set and cleared by tokenize_rows around its pool, so two calls may not run at
# once in one process (the builder tokenizes one dataset after another).
_JOB: tuple[Any, RowTokenizer, int] | None = None


def _task(span: tuple[int, int]) -> tuple[Any, list[tuple[int, str]]] | tuple[str, str | None]:
    """One task's rows [start, stop): its table and notes, or a FerryError's
    (message, hint) to raise in the parent."""
    assert _JOB is not None
    rows, rt, offset = _JOB
    start, stop = span
    try:
        records = _records(rows[start:stop], stop - start)
        parts, notes = [], []
        for at in range(0, len(records), BATCH):
            table, found = rt.table(records[at : at + BATCH], offset + start + at)
            parts.append(table)
            notes += [(start + at + i, note) for i, note in found]
    except FerryError as e:
        return e.message, e.hint
    import pyarrow as pa

    return pa.concat_tables(parts), notes


def tokenize_rows(
    rows: Any,
    rt: RowTokenizer,
    where: str,
    offset: int,
    report: DataReport,
    num_proc: int,
    progress: bool | None,
) -> Any:
    """The kept rows of `rows` tokenized by `rt` (a `Dataset` of the token columns), and
    what happened recorded in `report`. A bar moves as tasks finish, on a terminal."""
    import datasets
    import pyarrow as pa

    global _JOB
    total = len(rows)
    bar = Progress(total, f"tokenizing {where.split(' ')[0]}", progress)
    if num_proc > 1 and not sys.platform.startswith("linux"):
        # Workers inherit the job by fork, which macOS and Windows do not offer safely;
        # there one process tokenizes, and the Rust tokenizer spreads each batch over
        # the cores itself.
        note = (
            f"{where}: tokenized in 1 process, not {num_proc}: worker processes need "
            "Linux; the tokenizer used its own threads"
        )
        if note not in report.notes:
            report.notes.append(note)
        num_proc = 1
    num_proc = max(1, min(num_proc, total))
    step = max(1, min(TASK, -(-total // num_proc)))
    spans = [(s, min(s + step, total)) for s in range(0, total, step)]
    tables, notes = [], []
    _JOB = (rows, rt, offset)
    try:
        with _one_thread_per_worker(num_proc), contextlib.ExitStack() as stack:
            if num_proc > 1:
                pool = stack.enter_context(multiprocessing.get_context("fork").Pool(num_proc))
                results: Iterator[Any] = pool.imap(_task, spans)
            else:
                results = map(_task, spans)
            for (start, stop), result in zip(spans, results, strict=True):
                if isinstance(result[0], str):
                    raise FerryError(*result)
                tables.append(result[0])
                notes += result[1]
                bar.advance(stop - start)
    finally:
        _JOB = None
    elapsed = bar.close()
    table = pa.concat_tables(tables) if tables else token_table([])
    mapped = datasets.Dataset(
        table,
        info=datasets.DatasetInfo(features=token_features()),
        fingerprint=uuid.uuid4().hex,  # not a hash of every token, as it would compute
    )
    report.tokenize_s += elapsed
    report.tokenized_rows += total
    report.processes = max(report.processes, num_proc)
    report.rows_in += total
    skipped = 0
    for i, note in notes:
        if note == "truncated":
            report.truncated += 1
            report.truncated_example = report.truncated_example or f"{where} row {offset + i}"
        else:
            skipped += 1
            report.skip(note.removeprefix("skip:"), f"{where} row {offset + i}")
    report.rows_kept += total - skipped
    return mapped
