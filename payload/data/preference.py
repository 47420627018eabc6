"""Preference data for the RL trainers: one dataset row -> the text columns TRL reads.

DPO and ORPO rows become `{"prompt", "chosen", "rejected"}`; KTO rows become
`{"prompt", "completion", "label"}` with `label` a bool (is the completion desirable).
The prompt ends where the model starts to answer, and each answer carries its own
end-of-turn marker, so that TRL can tokenize `prompt + answer` as one sequence:

    chatml.intel on {question: "2+2?", chosen: "4", rejected: "5"} ->
        prompt   "<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n"
        chosen   "4<|im_end|>"
        rejected "5<|im_end|>"

A format is registered under `(family, type)`, the family being `rl:` and the type the
dataset's `type:` as users write it (Axolotl's names). Like the SFT strategies
(`payload.data.core`) it is a function `fn(row, ctx)` or a one-method class built once
per dataset, `cls(ctx)(row)`; a row that cannot be used raises `BadRow` naming the field.
This module holds the registry, the builders the data pipeline calls, the formats that
need no chat markup (`passthrough`, `user_defined`) and the row readers every format
shares; the markup and chat-template formats are in `preference_formats`.
"""

from __future__ import annotations

import functools
import importlib
from collections import Counter
from collections.abc import Callable
from typing import Any

from payload.config.schema import (
    SUPPORTED_PREFERENCE_TYPES,
    DatasetConfig,
    TrainConfig,
    preference_family,
)
from payload.config.user_formats import (
    PREFERENCE,
    PREFERENCE_EXTRA_FIELDS,
    PREFERENCE_PARTS,
    mapping_problems,
    placeholders,
)
from payload.data.conversation import role_map
from payload.data.core import BadRow, Context, Row, text_field
from payload.errors import ConfigError, FerryError

Pair = dict[str, Any]
PairFn = Callable[[Row], Pair]
Message = dict[str, str]
PREFERENCE_FORMATS: dict[tuple[str, str], Any] = {}
# The columns each family's rows have after their format ran, in order.
COLUMNS = {
    "dpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "orpo": ("prompt", "chosen", "rejected"),
    "reward": ("chosen", "rejected"),  # whole conversations, for a reward model
}
_MODULES = ("payload.data.preference_formats", "payload.data.bradley_terry")


def preference(family: str, *names: str) -> Callable[[Any], Any]:
    """Register a format under `(family, name)` for each name."""

    def add(obj: Any) -> Any:
        for name in names:
            PREFERENCE_FORMATS[(family, name)] = obj
        return obj

    return add


def registered() -> dict[tuple[str, str], Any]:
    for module in _MODULES:
        importlib.import_module(module)
    return PREFERENCE_FORMATS


def format_key(ds: DatasetConfig, cfg: TrainConfig) -> tuple[str, str]:
    """(family, type) for this dataset: a mapping `type:` is `user_defined`; ipo and
    simpo read dpo's formats."""
    family = preference_family(cfg.rl) or ("reward" if cfg.reward_model else "")
    name = "user_defined" if isinstance(ds.type, dict) else (ds.type or "")
    return family, name


def build_preference_fn(ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any) -> PairFn:
    """The row function for one dataset. An unknown format, or a `user_defined` mapping
    with a bad key, is a `FerryError` here, before any row is read."""
    family, name = format_key(ds, cfg)
    if family not in SUPPORTED_PREFERENCE_TYPES:
        known = ", ".join(SUPPORTED_PREFERENCE_TYPES)
        raise FerryError(f"Preference data needs `rl:` set to one of {known} (got {cfg.rl!r}).")
    formats = registered()
    if (family, name) not in formats:
        known = ", ".join(SUPPORTED_PREFERENCE_TYPES[family])
        raise FerryError(f"{ds.path}: `type: {name}` is not a {family} format; use one of {known}.")
    obj = formats[(family, name)]
    ctx = Context(tokenizer, ds, cfg)
    if isinstance(obj, type):
        return obj(ctx)
    return functools.partial(obj, ctx=ctx)


def prepare_preference_dataset(
    rows: Any, ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any, name: str
) -> tuple[Any, Counter[str], dict[str, str]]:
    """(the rows in TRL's shape, skipped rows by reason, reason -> "`name` row N" of the
    first row skipped for it). Only the format's columns are kept. With `strict: true`
    the first bad row is a `FerryError` naming the dataset and row."""
    fn = build_preference_fn(ds, cfg, tokenizer)
    columns = COLUMNS[format_key(ds, cfg)[0]]

    def one(row: Row, index: int) -> dict[str, Any]:
        try:
            return {**fn(row), "skip": ""}
        except BadRow as e:
            if cfg.strict:
                raise FerryError(f"{name} row {index}: {e} (strict: true).") from e
            # None fits any column type, so a skipped row never changes the schema.
            return {**dict.fromkeys(columns), "skip": str(e)}

    mapped = rows.map(
        one,
        with_indices=True,
        remove_columns=rows.column_names,
        keep_in_memory=True,
        desc=f"formatting {name}",
    )
    skipped: Counter[str] = Counter()
    first: dict[str, str] = {}
    for index, reason in enumerate(mapped["skip"]):
        if reason:
            skipped[reason] += 1
            first.setdefault(reason, f"{name} row {index}")
    kept = mapped.filter(lambda r: not r, input_columns="skip", keep_in_memory=True)
    return kept.select_columns(list(columns)), skipped, first


# ---- rows already in shape


@preference("dpo", "passthrough")
def passthrough(row: Row, ctx: Context) -> Pair:
    """Rows that already hold the final prompt, chosen and rejected text: checked, kept."""
    ds = ctx.ds
    return {
        "prompt": text_field(row, ds.field_prompt or "prompt"),
        "chosen": text_field(row, ds.field_chosen or "chosen"),
        "rejected": text_field(row, ds.field_rejected or "rejected"),
    }


# Per family: the parts a user_defined row has, each read from column `field_<part>`
# (default: the part's name), and the placeholders each `<part>_format` may use.
@preference("dpo", "user_defined")
@preference("kto", "user_defined")
class UserDefined:
    """`type:` as a mapping of columns and format strings, e.g. for DPO

        type: {field_prompt: question, prompt_format: "Q: {prompt}\\nA: "}

    `prompt_format` may use {prompt} and {system}; `chosen_format` {chosen},
    `rejected_format` {rejected}, `completion_format` {completion}. A format left out is
    its part alone. KTO also reads `field_label`. The mapping is checked when the
    dataset's formatter is built, every problem at once."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.family = preference_family(ctx.cfg.rl)
        spec = ctx.ds.type if isinstance(ctx.ds.type, dict) else {}
        if problems := mapping_problems(spec, PREFERENCE[self.family]):
            raise ConfigError(f"{self.family} `user_defined` dataset {ctx.ds.path}", problems)
        self.parts = PREFERENCE_PARTS[self.family]
        columns = [*self.parts, *PREFERENCE_EXTRA_FIELDS[self.family]]
        self.fields = {
            p: spec.get(f"field_{p}") or getattr(ctx.ds, f"field_{p}") or p for p in columns
        }
        self.formats = {p: spec.get(f"{p}_format") or f"{{{p}}}" for p in self.parts}
        self.needs_system = "system" in placeholders(self.formats["prompt"])

    def __call__(self, row: Row) -> Pair:
        fields, formats = self.fields, self.formats
        values = {"prompt": text_field(row, fields["prompt"])}
        values["system"] = row_system(row, self.ctx, fields["system"])
        if self.needs_system and not values["system"]:
            raise BadRow(f"missing field `{fields['system']}` (prompt_format uses {{system}})")
        out: Pair = {"prompt": formats["prompt"].format_map(values)}
        for part in self.parts[1:]:
            out[part] = formats[part].format_map({part: text_field(row, fields[part])})
        if self.family == "kto":
            out["label"] = label_field(row, fields["label"])
        return out


# ---- row readers shared by the formats


def default_system(ctx: Context) -> str:
    """The system prompt for rows that bring none: the dataset's, else the config's."""
    return ctx.ds.system_prompt or ctx.cfg.default_system_message or ""


def row_system(row: Row, ctx: Context, field: str | None = None) -> str:
    """The row's system prompt (column `field_system`, default `system`), else the default."""
    own = text_field(row, field or ctx.ds.field_system or "system", required=False)
    return own if own.strip() else default_system(ctx)


def column(row: Row, name: str) -> Any:
    """The value in column `name`; a missing one raises BadRow."""
    if name not in row or row[name] is None:
        raise BadRow(f"missing field `{name}`")
    return row[name]


def label_field(row: Row, name: str) -> bool:
    """KTO's desirable flag: a bool (or 0/1, as CSV files give it)."""
    value = column(row, name)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BadRow(f"field `{name}` is {value!r}, not true or false")


def prompt_turns(row: Row, name: str, ctx: Context) -> list[Message]:
    """The prompt in column `name` as turns: text is one user turn, a list is read as
    messages (`messages_field`)."""
    value = column(row, name)
    if isinstance(value, str):
        return [{"role": "user", "content": text_field(row, name)}]
    return messages_field(value, name, ctx)


def messages_field(value: Any, name: str, ctx: Context) -> list[Message]:
    """The turns in `value` (column `name`) as {role, content}, read as the SFT chat
    formats read them: keys through `message_property_mappings` (or the legacy
    `message_field_*`; with neither, {role, content} else ShareGPT's {from, value}), role
    names through `roles` (human and gpt are user and assistant by default)."""
    ds = ctx.ds
    keys = dict(ds.message_property_mappings or {})
    if ds.message_field_role:
        keys["role"] = ds.message_field_role
    if ds.message_field_content:
        keys["content"] = ds.message_field_content
    roles = role_map(ds.roles)
    if not isinstance(value, list):
        raise BadRow(f"field `{name}` is a {type(value).__name__}, not a list of messages")
    if not value:
        raise BadRow(f"field `{name}` is an empty list of messages")
    out: list[Message] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRow(f"field `{name}` turn {i} is a {type(message).__name__}, not a message")
        sharegpt = not keys and message.get("role") is None and message.get("from") is not None
        role_key = keys.get("role") or ("from" if sharegpt else "role")
        content_key = keys.get("content") or ("value" if sharegpt else "content")
        role, content = message.get(role_key), message.get(content_key)
        if not isinstance(role, str) or not role:
            raise BadRow(f"field `{name}` turn {i} has no `{role_key}`")
        if not isinstance(content, str):
            raise BadRow(f"field `{name}` turn {i} has no text `{content_key}`")
        out.append({"role": roles.get(role, role), "content": content})
    return out


def split_reply(value: Any, name: str, ctx: Context) -> tuple[list[Message], Message]:
    """(the turns before the reply, the reply) of a conversation ending in an assistant
    turn with text, e.g. argilla's `chosen: [{user...}, {assistant...}]`."""
    turns = messages_field(value, name, ctx)
    reply = turns[-1]
    if reply["role"] != "assistant":
        raise BadRow(f"field `{name}`: the last turn is `{reply['role']}`, not the assistant's")
    if not reply["content"].strip():
        raise BadRow(f"field `{name}`: the assistant's reply is empty")
    return turns[:-1], reply


def with_system(history: list[Message], system: str) -> list[Message]:
    """`history` with `system` as its first turn, unless it has a system turn already."""
    if system and not (history and history[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *history]
    return history
