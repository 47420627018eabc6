"""Chat strategies: `chat_template`, and `sharegpt` (its alias for legacy ShareGPT rows).

A row's messages (see `conversation.py`) are rendered with the dataset's chat template
and tokenized once; the labels follow Axolotl's ChatTemplateStrategy:

- A turn is trained when its `message_field_training` flag says so; else, when it has
  `message_field_training_detail` spans, only the tokens inside its `train: true` spans;
  else when `train_on_inputs` is set or its role is in `roles_to_train` (default
  [assistant]; names are mapped through `roles`, so `gpt` means assistant). Only a
  turn's content is trained, never the role header the template writes around it.
- A message's reasoning trace (`field_thinking`, given to the template as
  `template_thinking_key`) is part of its turn: the template writes it (Qwen3's as
  `<think>\ntrace\n</think>\n\n` before the content), and it is labelled with the
  content, with what the template writes between the two. With training-detail spans,
  which count characters of the content, the trace is not trained (as in Axolotl).
  A trace the template does not write stops the run, naming the dataset and the key,
  unless the template writes it when that turn ends the conversation (Qwen3's drops
  the traces of turns before the last user message, on purpose).
- The end-of-turn token (one of `eot_tokens`) and the eos token that the template puts
  within 3 tokens after a turn's content are trained by `train_on_eot` / `train_on_eos`:
  `all` after every turn, `turn` (default) after trained turns, `last` after the last
  trained turn only, `none` never. `train_on_eot` defaults to `train_on_eos`.
- `eot_tokens` is the dataset's, else the top-level one, else the template's own turn
  end (<|im_end|> for chatml), else the tokenizer's eos. Each must be one token.

Finding each turn's tokens needs no per-template rules: the conversation is rendered
again with that turn's content (and reasoning trace) swapped for placeholders, and the
characters where the two texts differ are the turn's (trimmed, if the template trims).
The fast tokenizer's offsets then say which tokens overlap those characters.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

from payload.data.conversation import Conversation, Turn, role_map
from payload.data.core import IGNORE, BadRow, Context, Encoded, Planned, Row, Tokenized, register
from payload.data.templates import eot_token_for, resolve_template
from payload.errors import FerryError

log = logging.getLogger("ferry.data")

# Stands in for a turn's content; a character no real content starts or ends with.
PLACEHOLDER = "\x00"
# Stands in for a turn's reasoning trace; being another character, it also shows whether
# the template wrote the trace at all.
THOUGHT = "\x01"
# How far after a turn's content its eot/eos token may sit (Axolotl allows 3).
EOT_WINDOW = 3


@register("chat_template", "sharegpt")
class ChatTemplate(Planned):
    """Messages through a chat template, with per-turn label masks (module docstring)."""

    def __init__(self, ctx: Context):
        ds, cfg, tokenizer = ctx.ds, ctx.cfg, ctx.tokenizer
        where = f"dataset {ds.path}"
        if ctx.loader not in (None, "load", "default"):
            raise FerryError(f"`type: {ds.type}` ({where}): chat_template has no loaders.")
        if not getattr(tokenizer, "is_fast", False):
            raise FerryError(
                f"{where}: `{ds.type_name}` needs a fast tokenizer (its character offsets "
                "locate each turn); this one is a slow, Python tokenizer."
            )
        self.tokenizer = tokenizer
        self.where = where
        self.template = resolve_template(cfg, ds, tokenizer)
        self.conversation = Conversation(ds, cfg, prefer_sharegpt=ds.type_name == "sharegpt")
        roles = role_map(ds.roles)
        train_roles = ["assistant"] if ds.roles_to_train is None else ds.roles_to_train
        self.roles_to_train = {roles.get(r, r) for r in train_roles}
        self.train_on_inputs = cfg.train_on_inputs
        self.train_on_eos = ds.train_on_eos or "turn"
        self.train_on_eot = ds.train_on_eot or self.train_on_eos
        names = ds.eot_tokens or cfg.eot_tokens
        names = names or [eot_token_for(self.template) or tokenizer.eos_token]
        self.eot_ids = {self._single_token(name, where) for name in names}
        for name in names:
            via_variable = name == tokenizer.eos_token and "eos_token" in self.template
            if name not in self.template and not via_variable:
                log.warning("%s: eot token %r does not appear in the chat template", where, name)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id in self.eot_ids and self.train_on_eos != self.train_on_eot:
            raise FerryError(
                f"{where}: the eos token {tokenizer.eos_token!r} is also an eot token, so "
                f"train_on_eos ({self.train_on_eos}) and train_on_eot ({self.train_on_eot}) "
                "must agree."
            )

    def _single_token(self, name: str, where: str) -> int:
        ids = self.tokenizer.encode(name, add_special_tokens=False)
        if len(ids) != 1:
            raise FerryError(
                f"{where}: eot token {name!r} is {len(ids)} tokens in this tokenizer, not one.",
                hint="Add it with `special_tokens`, or list another in `eot_tokens`.",
            )
        return ids[0]

    def plan(self, row: Row) -> Encoded:
        turns = self.conversation(row)
        tools = row.get("tools") if isinstance(row.get("tools"), list) else None
        text = self._render(turns, tools)
        spans = [self._span(text, turns, tools, i) for i in range(len(turns))]

        def finish(ids: list[list[int]], offsets: list | None) -> Tokenized:
            assert offsets is not None
            return self._labelled(turns, text, spans, ids[0], offsets[0])

        return Encoded([text], finish, offsets=True)

    def _labelled(
        self,
        turns: list[Turn],
        text: str,
        spans: list[tuple[int, int] | None],
        ids: list[int],
        offsets: list[tuple[int, int]],
    ) -> Tokenized:
        tokens = [_tokens(offsets, span) for span in spans]
        labels = [IGNORE] * len(ids)
        last: dict[str, int] = {}
        for i, (turn, span, bound) in enumerate(zip(turns, spans, tokens, strict=True)):
            trained = self._trains(turn)
            if span is None or bound is None:
                if trained:
                    raise BadRow(
                        f"the template leaves out turn {i} ({turn.role}), which is trained"
                    )
                continue
            first, stop = bound
            if trained:
                keep = _detail_filter(text, span, turn) if turn.detail is not None else None
                for k in range(first, stop):
                    if keep is None or keep(offsets[k]):
                        labels[k] = ids[k]
            # The turn's end tokens sit right after its content, before the next turn's.
            later = next((b[0] for b in tokens[i + 1 :] if b), len(ids))
            window = range(stop, min(stop + EOT_WINDOW + 1, later, len(ids)))
            for which, wanted, option in (
                ("eot", self.eot_ids, self.train_on_eot),
                ("eos", {self.eos_id}, self.train_on_eos),
            ):
                k = next((k for k in window if ids[k] in wanted), None)
                if k is None:
                    continue
                if option == "all" or (option == "turn" and trained):
                    labels[k] = ids[k]
                elif option == "last" and trained:
                    last[which] = k
        for k in last.values():
            labels[k] = ids[k]
        if all(label == IGNORE for label in labels):
            roles = ", ".join(sorted(self.roles_to_train))
            raise BadRow(f"nothing to train: no trained message (roles_to_train: {roles})")
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def _trains(self, turn: Turn) -> bool:
        if turn.train is not None:
            return turn.train
        if turn.detail is not None:
            return bool(turn.detail)
        return self.train_on_inputs or turn.role in self.roles_to_train

    def _span(self, text: str, turns: list[Turn], tools: Any, i: int) -> tuple[int, int] | None:
        """The characters of `text` that are turn i's: its content and its reasoning
        trace, or the content alone when training-detail spans pick within it."""
        turn = turns[i]
        swapped = self._render(turns, tools, swap=i)
        if turn.thinking:
            if THOUGHT not in swapped:
                self._check_written(turns, tools, i)
            if turn.detail is not None:
                swapped = self._render(turns, tools, swap=i, content_only=True)
        return _diff(text, swapped)

    def _check_written(self, turns: list[Turn], tools: Any, i: int) -> None:
        """Turn i's trace is not in the render: fine if the template writes it once the
        turn ends the conversation (it drops older traces), else a FerryError."""
        try:
            alone = self._render(turns[: i + 1], tools, swap=i)
        except BadRow:
            alone = ""
        if THOUGHT in alone:
            return
        key = turns[i].thinking_key
        raise FerryError(
            f"{self.where}: turn {i} ({turns[i].role}) has a reasoning trace, but the chat "
            f"template does not write `{key}` (`template_thinking_key`), so the trace would "
            "be silently left out of training.",
            hint="Set `template_thinking_key` to the message key the template reads the "
            "trace from, or choose a template that writes it (`chat_template: jinja` with "
            "`chat_template_jinja`), or remove the traces from the rows.",
        )

    def _render(
        self, turns: list[Turn], tools: Any, swap: int | None = None, content_only: bool = False
    ) -> str:
        """The conversation as text; with `swap`, that turn's content (and reasoning
        trace, unless `content_only`) replaced by placeholders."""
        thought = None if content_only else THOUGHT
        messages = [
            t.message(PLACEHOLDER, thought if t.thinking else None) if i == swap else t.message()
            for i, t in enumerate(turns)
        ]
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tools=tools, tokenize=False
            )
        except Exception as e:  # jinja2's TemplateError and the template's own raises
            raise BadRow(f"the chat template rejected this conversation: {e}") from e


def _diff(full: str, swapped: str) -> tuple[int, int] | None:
    """[start, end) of the characters of `full` that differ from `swapped`, or None."""
    if full == swapped:
        return None
    n = min(len(full), len(swapped))
    lo, hi = 0, n  # longest common prefix, by bisection on C-speed slice compares
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if full[:mid] == swapped[:mid] else (lo, mid - 1)
    prefix = lo
    lo, hi = 0, n - prefix
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (
            (mid, hi) if full[len(full) - mid :] == swapped[len(swapped) - mid :] else (lo, mid - 1)
        )
    return prefix, len(full) - lo


def _tokens(offsets: list[tuple[int, int]], span: tuple[int, int] | None) -> tuple[int, int] | None:
    """[first, stop) of the tokens overlapping the characters `span`, or None."""
    if span is None:
        return None
    start, end = span
    stop = bisect.bisect_left([a for a, _ in offsets], end)
    if start == end:
        return stop, stop
    return bisect.bisect_right([b for _, b in offsets], start), stop


def _detail_filter(text: str, span: tuple[int, int], turn: Turn) -> Any:
    """A test of whether a token (by its offsets) lies in one of the turn's `train: true`
    spans: one of its non-space characters does (any, for a token of spaces). Spans count
    characters of the message's content, `end_offset` included, as in Axolotl."""
    start, end = span
    rendered = text[start:end]
    shift = turn.content.find(rendered) if rendered != turn.content else 0
    if shift < 0:
        raise BadRow("training detail needs a template that writes the content unchanged")
    trained = set()
    for d in turn.detail or ():
        if d["train"]:
            trained.update(
                range(d["begin_offset"] - shift + start, d["end_offset"] - shift + start + 1)
            )

    def keep(offset: tuple[int, int]) -> bool:
        chars = range(max(offset[0], start), min(offset[1], end))
        solid = [c for c in chars if not text[c].isspace()] or list(chars)
        return any(c in trained for c in solid)

    return keep
