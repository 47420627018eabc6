"""What every prompt strategy shares: the registry, the context, bad rows, token helpers.

A strategy turns one dataset row into `input_ids`, `attention_mask` and `labels` (-100
where a token is not trained). It is registered by the name users write as the dataset's
`type:` and is either a function `fn(row, ctx)` or a one-method class built once per
dataset, `cls(ctx)(row)`, for strategies that prepare something (a compiled template)
before the rows arrive. A row that cannot be used raises `BadRow` with the reason; the
builder counts it, names the dataset and row, and skips it (or stops, with `strict`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from payload.config.schema import DatasetConfig, TrainConfig

IGNORE = -100

Row = dict[str, Any]
Tokenized = dict[str, list[int]]
RowFn = Callable[[Row], Tokenized]
STRATEGIES: dict[str, Any] = {}

# Modules whose import registers strategies; imported on first lookup.
_MODULES = ("payload.data.sft", "payload.data.segments", "payload.data.chat")


class BadRow(ValueError):
    """This row cannot be turned into a training example; the message says why."""


@dataclass(frozen=True)
class Context:
    """What a strategy may read besides the row."""

    tokenizer: Any
    ds: DatasetConfig
    cfg: TrainConfig

    @property
    def train_on_inputs(self) -> bool:
        return self.cfg.train_on_inputs

    @property
    def loader(self) -> str | None:
        """The suffix of `type: name.loader`, if any (Axolotl's variant selector)."""
        t = self.ds.type
        return t.split(".", 1)[1] if isinstance(t, str) and "." in t else None


def register(*names: str) -> Callable[[Any], Any]:
    def add(obj: Any) -> Any:
        for name in names:
            STRATEGIES[name] = obj
        return obj

    return add


def registered() -> dict[str, Any]:
    for module in _MODULES:
        importlib.import_module(module)
    return STRATEGIES


def build_strategy(ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any) -> RowFn:
    """The row function for one dataset: a class is built once, a function gets the ctx."""
    strategies = registered()
    name = ds.type_name
    if name not in strategies:
        raise KeyError(name)
    ctx = Context(tokenizer, ds, cfg)
    obj = strategies[name]
    if isinstance(obj, type):
        return obj(ctx)
    return functools.partial(obj, ctx=ctx)


def text_field(row: Row, name: str, *, required: bool = True) -> str:
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


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def from_segments(
    tokenizer: Any, segments: Iterable[tuple[str, bool]], *, bos: bool = True, eos: bool = True
) -> Tokenized:
    """<bos> seg1 seg2 ... <eos>, each segment tokenized on its own and labelled when its
    flag is true (bos as the first segment, the closing eos as the last).

    Tokenizing segments separately keeps the trained/masked boundary exact where one BPE
    merge could otherwise span it.
    """
    segments = list(segments)
    input_ids: list[int] = []
    labels: list[int] = []
    if bos and tokenizer.bos_token_id is not None:
        # Labelled like the segment it opens, so a fully trained row has labels == ids.
        input_ids.append(tokenizer.bos_token_id)
        labels.append(tokenizer.bos_token_id if segments and segments[0][1] else IGNORE)
    trained = False
    for text, trained in segments:
        ids = encode(tokenizer, text)
        input_ids += ids
        labels += ids if trained else [IGNORE] * len(ids)
    if eos:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if trained else IGNORE)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def kind(value: Any) -> str:
    """`value`'s type as a BadRow reason says it: "a str", "a list", "null"."""
    return "null" if value is None else f"a {type(value).__name__}"


def list_field(row: Row, name: str) -> list[Any]:
    """The non-empty list in column `name`; missing, non-list or empty values raise BadRow."""
    if name not in row or row[name] is None:
        raise BadRow(f"missing field `{name}`")
    value = row[name]
    if not isinstance(value, list):
        raise BadRow(f"field `{name}` is {kind(value)}, not a list")
    if not value:
        raise BadRow(f"field `{name}` is empty")
    return value


def require_trained(out: Tokenized, reason: str) -> Tokenized:
    """`out` unchanged, or BadRow(reason) when no label is trained: such a row adds
    nothing to the loss and only costs compute (and can make a batch's loss 0/0)."""
    if all(label == IGNORE for label in out["labels"]):
        raise BadRow(reason)
    return out
