"""Reward-model rows (`reward_model: true`, `type: bradley_terry.chat_template`): one row
-> a chosen and a rejected conversation, tokenized as TRL's RewardTrainer reads them
(`chosen_ids`, `rejected_ids`; the model scores each whole sequence).

Rows as Axolotl reads them: `input` (the prompt: text, or a list of messages), `chosen`
and `rejected` (the two answers: text, a message, or a whole conversation ending in the
answer), and an optional `system`. Rows without `input` take the prompt from `chosen`'s
conversation (argilla's layout). Each side is the chat template's rendering of the prompt
turns plus its answer, tokenized without adding special tokens (the template writes what
the model should see, as `apply_chat_template` does in TRL and Axolotl):

    {input: "2+2?", chosen: "4", rejected: "5"}, ChatML template ->
        chosen   "<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n"
        rejected "<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n5<|im_end|>\\n"

`build_reward_datasets` is the data step of the reward recipe: the rows of `datasets`
(and `test_datasets`, or a `val_set_size` split), each pair counted in the DataReport,
pairs longer than `sequence_len` handled by `excess_length_strategy`.
"""

from __future__ import annotations

import time
from typing import Any

from payload.config.schema import TrainConfig
from payload.data.core import BadRow, Row
from payload.data.preference import (
    Message,
    Pair,
    column,
    preference,
    prepare_preference_dataset,
    prompt_turns,
    row_system,
    split_reply,
    with_system,
)
from payload.data.preference_formats import Templated
from payload.data.report import DataReport
from payload.data.sources import load_rows, shard
from payload.errors import FerryError

COLUMNS = ("chosen_ids", "rejected_ids")


@preference("reward", "bradley_terry.chat_template")
class BradleyTerryChatTemplate(Templated):
    """The chosen and the rejected conversation, each rendered whole by the chat template."""

    def __call__(self, row: Row) -> Pair:
        ds, ctx = self.ctx.ds, self.ctx
        chosen, rejected = ds.field_chosen or "chosen", ds.field_rejected or "rejected"
        prompt = ds.field_prompt or "input"
        if row.get(prompt) is not None:
            history = prompt_turns(row, prompt, ctx)
            if history[-1]["role"] == "assistant":
                raise BadRow(f"field `{prompt}` ends with the assistant's turn; it is the prompt")
            answers = (self.answer(row, chosen), self.answer(row, rejected))
        elif isinstance(row.get(chosen), list):
            history, first = split_reply(column(row, chosen), chosen, ctx)
            answers = (first, split_reply(column(row, rejected), rejected, ctx)[1])
        else:
            raise BadRow(
                f"missing field `{prompt}` (the prompt), and `{chosen}` is not a conversation"
            )
        history = with_system(history, row_system(row, ctx))
        return {
            "chosen": self.whole([*history, answers[0]]),
            "rejected": self.whole([*history, answers[1]]),
        }

    def whole(self, turns: list[Message]) -> str:
        return self.render(turns, generation=False)


def _tokenize(texts: Any, cfg: TrainConfig, tokenizer: Any, where: str, report: DataReport) -> Any:
    """The pairs' texts -> `chosen_ids`/`rejected_ids`; a pair whose longer side passes
    sequence_len is dropped (counted), truncated (both sides) or raises, by
    `excess_length_strategy`."""
    import datasets

    started = time.perf_counter()
    size, policy = cfg.sequence_len, cfg.excess_length_strategy
    encode = tokenizer(list(texts["chosen"]) + list(texts["rejected"]), add_special_tokens=False)
    ids = encode["input_ids"]
    n = len(texts)
    kept: dict[str, list[list[int]]] = {"chosen_ids": [], "rejected_ids": []}
    for i in range(n):
        chosen, rejected = list(ids[i]), list(ids[n + i])
        longest = max(len(chosen), len(rejected))
        if longest > size:
            if policy == "raise" or (cfg.strict and policy == "drop"):
                raise FerryError(
                    f"{where} row {i}: {longest} tokens, longer than sequence_len ({size}).",
                    hint="Raise sequence_len, or set excess_length_strategy: drop or truncate.",
                )
            if policy == "drop":
                report.skip(f"longer than sequence_len ({size} tokens)", f"{where} row {i}")
                continue
            chosen, rejected = chosen[:size], rejected[:size]
            report.truncated += 1
            report.truncated_example = report.truncated_example or f"{where} row {i}"
        kept["chosen_ids"].append(chosen)
        kept["rejected_ids"].append(rejected)
    report.tokenize_s += time.perf_counter() - started
    report.tokenized_rows += n
    report.rows_kept += len(kept["chosen_ids"])
    return datasets.Dataset.from_dict(kept)


def _pairs(key: str, cfg: TrainConfig, tokenizer: Any, report: DataReport) -> list[Any]:
    """Each dataset of `key` (datasets, test_datasets) read, formatted and tokenized."""
    parts = []
    for index, ds in enumerate(getattr(cfg, key)):
        where = f"{key}[{index}] ({ds.path})"
        rows = load_rows(ds, where, report=report, strict=cfg.strict)
        rows, offset = shard(rows, ds.shards, ds.shards_idx)
        report.rows_in += len(rows)
        texts, skipped, first = prepare_preference_dataset(rows, ds, cfg, tokenizer, where)
        for reason, count in skipped.items():
            report.skipped[reason] += count
            row = int(first[reason].rsplit(" ", 1)[1]) + offset
            report.examples.setdefault(reason, f"{where} row {row}")
        parts.append(_tokenize(texts, cfg, tokenizer, where, report))
    return parts


def build_reward_datasets(cfg: TrainConfig, tokenizer: Any) -> tuple[Any, Any | None, DataReport]:
    """(train, eval or None, report) of `chosen_ids`/`rejected_ids` pairs."""
    import datasets

    report = DataReport()
    parts = _pairs("datasets", cfg, tokenizer, report)
    train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(parts) > 1 and cfg.shuffle_merged_datasets:
        train = train.shuffle(seed=cfg.seed)
    if len(train) == 0:
        reasons = [f"{n} {reason}" for reason, n in report.skipped.most_common()]
        raise FerryError("No usable pairs in any dataset: " + ("; ".join(reasons) or "all empty"))
    eval_set = None
    if cfg.test_datasets:
        evals = _pairs("test_datasets", cfg, tokenizer, report)
        eval_set = datasets.concatenate_datasets(evals) if len(evals) > 1 else evals[0]
        if len(eval_set) == 0:
            raise FerryError("test_datasets: no usable pairs: see the skipped rows above.")
    elif cfg.val_set_size:
        size = cfg.val_set_size
        test_size: float | int = int(size) if size >= 1 else size
        if isinstance(test_size, int) and test_size >= len(train):
            raise FerryError(
                f"val_set_size: {test_size} pairs leaves nothing to train on ({len(train)} pairs)."
            )
        split = train.train_test_split(test_size=test_size, seed=cfg.seed, shuffle=True)
        train, eval_set = split["train"], split["test"]
    report.train_rows = len(train)
    report.eval_rows = len(eval_set) if eval_set is not None else 0
    report.tokens = sum(
        len(a) + len(b)
        for part in (train, eval_set)
        if part is not None
        for a, b in zip(part["chosen_ids"], part["rejected_ids"], strict=True)
    )
    return train, eval_set, report
