"""Prompt strategies: one dataset row in, `input_ids`/`attention_mask`/`labels` out.

A strategy is a function registered by name (the dataset's `type:`). Labels are -100 where
a token is not trained: the prompt, unless `train_on_inputs`. A row that cannot be used
raises `BadRow` with the reason; the builder counts and reports it.

The prompt and the response are tokenized separately and joined, so the boundary between
masked and trained tokens is exact even where a BPE merge could have spanned it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from payload.config.schema import DatasetConfig

IGNORE = -100

Tokenized = dict[str, list[int]]
Strategy = Callable[[dict[str, Any], Any, DatasetConfig, bool], Tokenized]
STRATEGIES: dict[str, Strategy] = {}


class BadRow(ValueError):
    """This row cannot be turned into a training example; the message says why."""


def register(name: str) -> Callable[[Strategy], Strategy]:
    def add(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return add


def text_field(row: dict[str, Any], name: str, *, required: bool = True) -> str:
    """The string in column `name`; missing, non-string or empty values raise BadRow."""
    if name not in row or row[name] is None:
        if required:
            raise BadRow(f"missing field `{name}`")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise BadRow(f"field `{name}` is a {type(value).__name__}, not text")
    if required and not value.strip():
        raise BadRow(f"field `{name}` is empty")
    return value


def join(tokenizer: Any, prompt: str, response: str, train_on_inputs: bool) -> Tokenized:
    """<bos> prompt response <eos>, with the prompt's labels masked unless trained on."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = [*response_ids, tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE] * len(prompt_ids)
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": prompt_labels + response_ids,
    }


ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@register("alpaca")
def alpaca(
    row: dict[str, Any], tokenizer: Any, ds: DatasetConfig, train_on_inputs: bool
) -> Tokenized:
    """The Stanford Alpaca prompt; the `input` section appears only when the row has one."""
    instruction = text_field(row, ds.field_instruction or "instruction")
    extra = text_field(row, ds.field_input or "input", required=False)
    output = text_field(row, ds.field_output or "output")
    template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
    prompt = template.format(instruction=instruction, input=extra)
    return join(tokenizer, prompt, output, train_on_inputs)


@register("completion")
def completion(
    row: dict[str, Any], tokenizer: Any, ds: DatasetConfig, train_on_inputs: bool
) -> Tokenized:
    """Raw text, every token trained: <bos> text <eos>."""
    return join(tokenizer, "", text_field(row, ds.field or "text"), train_on_inputs=True)
