"""What every prompt strategy shares: the registry, the context, bad rows, token helpers.

A strategy turns one dataset row into `input_ids`, `attention_mask` and `labels` (-100
where a token is not trained). It is registered by the name users write as the dataset's
`type:` and is either a plan function `fn(row, ctx) -> Plan` under `@planned`, or a
`Planned` class built once per dataset, `cls(ctx).plan(row)`, for strategies that
prepare something (a compiled template) before the rows arrive. A row that cannot be used
raises `BadRow` with the reason; the builder counts it, names the dataset and row, and
skips it (or stops, with `strict`).

Strategies work in two steps so that a batch of rows is tokenized in one call: `plan(row)`
says which texts to tokenize and how the row is made from their tokens, without touching
the tokenizer's encoder; the builder (payload.data.tokenize) tokenizes the texts of a
whole batch at once and finishes each row from its plan. A plan is `Segments` (the row is
<bos> text1 text2 ... <eos>, each text labelled or not) or `Encoded` (texts, and a
function from their tokens to the row). Calling a strategy on one row, `strategy(row)`,
runs the same plan with one tokenizer call per text: `realize`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
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


def marked(ids: Any, labels: Any, tokenizer: Any) -> tuple[str, int]:
    """`debug: true`'s view of a row: its tokens decoded, the trained ones (label not
    IGNORE) between [[ and ]], and how many were trained."""
    import itertools

    parts, trained = [], 0
    pairs = zip(ids, labels, strict=True)
    for is_trained, group in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE):
        span = [token for token, _ in group]
        piece = tokenizer.decode(span)
        if is_trained:
            trained += len(span)
            piece = f"[[{piece}]]"
        parts.append(piece)
    return "".join(parts), trained


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


@dataclass(frozen=True)
class Segments:
    """A row made of texts in order, each tokenized on its own and trained when its flag
    is true: <bos> text1 text2 ... <eos> (`bos`/`eos`: whether to add them). Tokenizing
    the texts separately keeps the trained/masked boundary exact where one BPE merge could
    otherwise span it. The bos is labelled like the first text, the eos like the last.
    `require`: when no label is trained, the row is bad, for this reason."""

    parts: list[tuple[str, bool]]
    bos: bool = True
    eos: bool = True
    require: str | None = None


@dataclass(frozen=True)
class Encoded:
    """A row made by `finish` from the tokens of `texts` (no special tokens added): it
    gets one list of ids per text and, with `offsets`, one list of (start, end) character
    offsets per text, else None. It may raise BadRow."""

    texts: list[str]
    finish: Callable[[list[list[int]], list[list[tuple[int, int]]] | None], Tokenized]
    offsets: bool = False


Plan = Segments | Encoded


@dataclass
class Special:
    """A tokenizer's bos and eos ids, read once: a transformers tokenizer answers each
    attribute read through Python code, too slow to ask per row."""

    bos: int | None
    eos: int | None

    @classmethod
    def of(cls, tokenizer: Any) -> Special:
        return cls(tokenizer.bos_token_id, tokenizer.eos_token_id)


def assemble(plan: Segments, ids: list[list[int]], special: Special) -> Tokenized:
    """The row of a Segments plan from the ids of its texts (one list per part)."""
    input_ids: list[int] = []
    labels: list[int] = []
    parts = plan.parts
    if plan.bos and special.bos is not None:
        # Labelled like the segment it opens, so a fully trained row has labels == ids.
        input_ids.append(special.bos)
        labels.append(special.bos if parts and parts[0][1] else IGNORE)
    for (_, trained), part in zip(parts, ids, strict=True):
        input_ids += part
        labels += part if trained else [IGNORE] * len(part)
    if plan.eos:
        input_ids.append(special.eos)  # type: ignore[arg-type]
        labels.append(special.eos if parts and parts[-1][1] else IGNORE)  # type: ignore[arg-type]
    out = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
    return require_trained(out, plan.require) if plan.require else out


def realize(plan: Plan, tokenizer: Any) -> Tokenized:
    """One row from its plan, one tokenizer call per text (what a batch gives, slower)."""
    if isinstance(plan, Segments):
        return assemble(plan, [encode(tokenizer, t) for t, _ in plan.parts], Special.of(tokenizer))
    if not plan.offsets:
        return plan.finish([encode(tokenizer, t) for t in plan.texts], None)
    ids, offsets = [], []
    for text in plan.texts:
        out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids.append(list(out["input_ids"]))
        offsets.append([tuple(o) for o in out["offset_mapping"]])
    return plan.finish(ids, offsets)


def planned(fn: Callable[[Row, Context], Plan]) -> Callable[[Row, Context], Tokenized]:
    """Registers a plan function `fn(row, ctx) -> Plan` as a strategy: called, it
    tokenizes the row (`realize`); `.plan` is `fn`, for the batched builder."""

    @functools.wraps(fn)
    def strategy(row: Row, ctx: Context) -> Tokenized:
        return realize(fn(row, ctx), ctx.tokenizer)

    strategy.plan = fn  # type: ignore[attr-defined]
    return strategy


class Planned:
    """Base of class strategies: subclasses set `self.tokenizer` and write `plan(row)`;
    calling one on a row tokenizes it (`realize`)."""

    tokenizer: Any

    def plan(self, row: Row) -> Plan:
        raise NotImplementedError

    def __call__(self, row: Row) -> Tokenized:
        return realize(self.plan(row), self.tokenizer)


@dataclass(frozen=True)
class Strategy:
    """A dataset's strategy as the builder uses it: `plan(row)`, and `strategy(row)`."""

    plan: Callable[[Row], Plan]
    tokenizer: Any = field(repr=False)

    def __call__(self, row: Row) -> Tokenized:
        return realize(self.plan(row), self.tokenizer)


def build_strategy(ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any) -> Strategy:
    """The row function for one dataset: a class is built once, a function gets the ctx."""
    strategies = registered()
    name = ds.type_name
    if name not in strategies:
        raise KeyError(name)
    ctx = Context(tokenizer, ds, cfg)
    obj = strategies[name]
    if isinstance(obj, type):
        return Strategy(obj(ctx).plan, tokenizer)
    return Strategy(functools.partial(obj.plan, ctx=ctx), tokenizer)


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
