"""Continued pretraining: `pretraining_dataset` text, concatenated into sequence_len blocks.

Each document is tokenized by its row strategy (`pretrain`, the default, or `completion`:
<bos> text <eos>, every token trained), the documents are joined end to end in order,
and the joined tokens are cut into blocks of exactly sequence_len; labels are the input
ids. With sequence_len 4 and the documents "a b" and "c d e" (one token a word):

    joined   <s> a b </s> <s> c d e </s>
    blocks   [<s> a b </s>]  [<s> c d e]      and </s>, less than a block, is the tail

So an eos always separates two documents, and a document longer than a block continues in
the next one. Only the tail is dropped, and the report says how many tokens it held.

With `streaming: true` the same happens lazily: the files are read as training asks for
blocks, so a corpus larger than memory (or disk, for a hub dataset) trains; the trainer
then needs `max_steps`, since a stream has no length.
"""

from __future__ import annotations

from typing import Any

from payload.config.schema import DatasetConfig, TrainConfig
from payload.data.report import DataReport
from payload.data.sources import load_rows, shard
from payload.data.tokenize import (
    BATCH,
    NOTE,
    RowTokenizer,
    processes,
    token_features,
    tokenize_rows,
)
from payload.errors import FerryError


def as_text(ds: DatasetConfig) -> DatasetConfig:
    """The entry with its strategy: `pretrain` unless it names `completion`."""
    return ds if ds.type else ds.model_copy(update={"type": "pretrain"})


def blocks(
    cfg: TrainConfig, tokenizer: Any, report: DataReport, progress: bool | None = None
) -> Any:
    """Every pretraining_dataset entry, tokenized and cut into blocks (a `Dataset`)."""
    import datasets
    import numpy as np

    size = cfg.sequence_len
    joined = []
    documents = 0
    for i, entry in enumerate(cfg.pretraining_dataset or []):
        ds = as_text(entry)
        where = f"pretraining_dataset[{i}] ({ds.path})"
        rows = load_rows(ds, where, report=report, strict=cfg.strict)
        rows, offset = shard(rows, ds.shards, ds.shards_idx)
        rt = RowTokenizer(ds, cfg, tokenizer, where, limit=False)
        docs = tokenize_rows(rows, rt, where, offset, report, processes(cfg, len(rows)), progress)
        documents += len(docs)
        joined.append(docs.with_format("arrow")[:]["input_ids"].combine_chunks().flatten())
    tokens = np.concatenate([np.asarray(a, dtype=np.int32) for a in joined])
    count = len(tokens) // size
    if count == 0:
        raise FerryError(
            f"pretraining_dataset: its {len(tokens)} tokens do not fill one block of "
            f"sequence_len ({size}).",
            hint="Add text or lower sequence_len.",
        )
    tail = len(tokens) - count * size
    report.notes.append(
        f"pretraining_dataset: {documents:,} documents, {len(tokens):,} tokens -> "
        f"{count:,} blocks of {size}; the last {tail} tokens (less than a block) dropped"
    )
    flat = tokens[: count * size].reshape(count, size)
    return datasets.Dataset.from_dict(
        {"input_ids": flat, "attention_mask": np.ones_like(flat), "labels": flat},
        features=token_features(),
    )


def stream(cfg: TrainConfig, tokenizer: Any, report: DataReport) -> Any:
    """The blocks as an `IterableDataset`, made while training reads it. Entries are read
    one after the other. Bad rows are counted in `report` during the first pass."""
    import datasets

    size = cfg.sequence_len
    sources = []
    for i, entry in enumerate(cfg.pretraining_dataset or []):
        ds = as_text(entry)
        where = f"pretraining_dataset[{i}] ({ds.path})"
        rows, _ = shard(load_rows(ds, where, streaming=True), ds.shards, ds.shards_idx)
        fn = RowTokenizer(ds, cfg, tokenizer, where, limit=False).batch_function()
        mapped = rows.map(
            fn,
            batched=True,
            batch_size=BATCH,
            with_indices=True,
            fn_kwargs={"offset": 0},
            remove_columns=rows.column_names,
        )
        sources.append((where, mapped))
    passes = [0]

    def generate() -> Any:
        first = passes[0] == 0
        buffer: list[int] = []
        for where, mapped in sources:
            for index, row in enumerate(mapped):
                note = row[NOTE]
                if first:
                    report.rows_in += 1
                if note.startswith("skip:"):
                    if first:
                        report.skip(note.removeprefix("skip:"), f"{where} row {index}")
                    continue
                if first:
                    report.rows_kept += 1
                buffer.extend(row["input_ids"])
                while len(buffer) >= size:
                    block, buffer = buffer[:size], buffer[size:]
                    yield {"input_ids": block, "attention_mask": [1] * size, "labels": block}
        passes[0] += 1

    report.streaming = True
    return datasets.IterableDataset.from_generator(generate, features=token_features())
