"""The preference formats with chat markup, registered by `(rl family, type)` (see
`payload.data.preference`, which also has `passthrough` and `user_defined`). Two kinds:

- fixed markup (`chatml.*`, `llama3.*`): the turns written out by hand, whatever the
  tokenizer's template is, exactly as Axolotl writes them;
- `chat_template.*`: the turns rendered with the chat template that applies to the
  dataset, each answer being what the template adds after the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from payload.data.core import BadRow, Context, Row, text_field
from payload.data.preference import (
    Message,
    Pair,
    column,
    label_field,
    preference,
    prompt_turns,
    row_system,
    split_reply,
    with_system,
)


@dataclass(frozen=True)
class Markup:
    """A chat markup written out by hand: `header` opens a turn (`{role}` is the speaker),
    `turn_end` closes a turn of the prompt and `reply_end` closes the answer."""

    header: str
    turn_end: str
    reply_end: str

    def prompt(self, history: list[Message]) -> str:
        """The turns, then the opening of the assistant's turn."""
        turns = "".join(
            self.header.format(role=m["role"]) + m["content"] + self.turn_end for m in history
        )
        return turns + self.header.format(role="assistant")

    def reply(self, text: str) -> str:
        return text + self.reply_end


MARKUPS = {
    "chatml": Markup("<|im_start|>{role}\n", "<|im_end|>\n", "<|im_end|>"),
    # No <|begin_of_text|>: TRL tokenizes the prompt with the tokenizer's own BOS.
    "llama3": Markup("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", "<|eot_id|>"),
}


def _markup(ctx: Context) -> Markup:
    assert isinstance(ctx.ds.type, str)  # registered only under `markup.name` strings
    return MARKUPS[ctx.ds.type.split(".", 1)[0]]


def _one_turn(row: Row, ctx: Context, default_field: str) -> list[Message]:
    """[system?, user] from the row's system and prompt columns."""
    system = row_system(row, ctx)
    user = text_field(row, ctx.ds.field_prompt or default_field)
    return with_system([{"role": "user", "content": user}], system)


def _reply_text(row: Row, name: str, ctx: Context) -> str:
    """The assistant's text at the end of the conversation in column `name`."""
    return split_reply(column(row, name), name, ctx)[1]["content"]


def _chat_history(row: Row, name: str, ctx: Context) -> tuple[list[Message], Message]:
    """(turns before the reply with the system prompt, reply) from a conversation column
    that holds the whole exchange, e.g. argilla's `chosen`."""
    history, reply = split_reply(column(row, name), name, ctx)
    if not any(m["role"] != "system" for m in history):
        raise BadRow(f"field `{name}` has no user turn before the reply")
    return with_system(history, row_system(row, ctx)), reply


# ---- DPO, fixed markup: prompt, chosen, rejected


def _dpo_pair(markup: Markup, history: list[Message], chosen: str, rejected: str) -> Pair:
    return {
        "prompt": markup.prompt(history),
        "chosen": markup.reply(chosen),
        "rejected": markup.reply(rejected),
    }


@preference("dpo", *(f"{m}.intel" for m in MARKUPS))
def dpo_intel(row: Row, ctx: Context) -> Pair:
    """Intel/orca_dpo_pairs rows: system (optional), question, chosen, rejected as text."""
    ds = ctx.ds
    chosen = text_field(row, ds.field_chosen or "chosen")
    rejected = text_field(row, ds.field_rejected or "rejected")
    return _dpo_pair(_markup(ctx), _one_turn(row, ctx, "question"), chosen, rejected)


@preference("dpo", *(f"{m}.ultra" for m in MARKUPS))
def dpo_ultra(row: Row, ctx: Context) -> Pair:
    """UltraFeedback-binarized rows: system (optional), prompt as text, chosen and rejected
    as conversations ending in the assistant's answer."""
    ds = ctx.ds
    chosen = _reply_text(row, ds.field_chosen or "chosen", ctx)
    rejected = _reply_text(row, ds.field_rejected or "rejected", ctx)
    return _dpo_pair(_markup(ctx), _one_turn(row, ctx, "prompt"), chosen, rejected)


@preference("dpo", *(f"{m}.argilla_chat" for m in MARKUPS))
def dpo_argilla_chat(row: Row, ctx: Context) -> Pair:
    """argilla/dpo-mix rows: chosen and rejected as whole conversations; the prompt is
    every turn of `chosen` before its answer."""
    ds = ctx.ds
    history, chosen = _chat_history(row, ds.field_chosen or "chosen", ctx)
    rejected = _reply_text(row, ds.field_rejected or "rejected", ctx)
    return _dpo_pair(_markup(ctx), history, chosen["content"], rejected)


# ---- KTO, fixed markup: prompt, completion, label


@preference("kto", *(f"{m}.intel" for m in MARKUPS))
def kto_intel(row: Row, ctx: Context) -> Pair:
    """argilla/distilabel-intel-orca-kto rows: system (optional), question, completion, label."""
    return _kto(row, ctx, _one_turn(row, ctx, "question"))


@preference("kto", *(f"{m}.ultra" for m in MARKUPS))
def kto_ultra(row: Row, ctx: Context) -> Pair:
    """UltraFeedback KTO rows: system (optional), prompt, completion, label."""
    return _kto(row, ctx, _one_turn(row, ctx, "prompt"))


def _kto(row: Row, ctx: Context, history: list[Message]) -> Pair:
    ds, markup = ctx.ds, _markup(ctx)
    completion = text_field(row, ds.field_completion or "completion")
    return {
        "prompt": markup.prompt(history),
        "completion": markup.reply(completion),
        "label": label_field(row, ds.field_label or "label"),
    }


@preference("kto", *(f"{m}.argilla_chat" for m in MARKUPS))
def kto_argilla_chat(row: Row, ctx: Context) -> Pair:
    """argilla/kto-mix rows: completion as a conversation ending in the answer, and label.
    When the conversation is the answer alone, the prompt column (text or messages) holds
    what came before."""
    ds, markup = ctx.ds, _markup(ctx)
    name = ds.field_completion or "completion"
    history, reply = split_reply(column(row, name), name, ctx)
    if not history:
        history = prompt_turns(row, ds.field_prompt or "prompt", ctx)
    return {
        "prompt": markup.prompt(with_system(history, row_system(row, ctx))),
        "completion": markup.reply(reply["content"]),
        "label": label_field(row, ds.field_label or "label"),
    }


# ---- rendered with the chat template


class Templated:
    """Base of the `chat_template.*` formats: the prompt is the template's rendering of the
    turns with the generation prompt; an answer is what rendering the turns plus the answer
    adds to it (`strip`: without trailing whitespace, as Axolotl's DPO formats write it)."""

    strip = True

    def __init__(self, ctx: Context):
        from payload.data.templates import resolve_template

        self.ctx = ctx
        self.template = resolve_template(ctx.cfg, ctx.ds, ctx.tokenizer)
        tok = ctx.tokenizer
        adds_bos = tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]
        # TRL tokenizes the prompt text with the tokenizer's own BOS; a template that
        # writes one too would give the model two.
        self.bos = tok.bos_token if adds_bos else ""

    def render(self, turns: list[Message], *, generation: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.ctx.tokenizer.apply_chat_template(
                turns, chat_template=self.template, tokenize=False, add_generation_prompt=generation
            )
        except TemplateError as e:
            raise BadRow(f"the chat template refused the conversation: {e}") from e

    def pair(self, history: list[Message], answers: dict[str, tuple[str, Message]]) -> Pair:
        """{"prompt", then each answer by its output column}; `answers` maps the output
        column to (the row's field it came from, the assistant message)."""
        prompt = self.render(history, generation=True)
        out: Pair = {"prompt": prompt.removeprefix(self.bos)}
        for key, (name, answer) in answers.items():
            full = self.render([*history, answer], generation=False)
            if full.startswith(prompt):
                text = full[len(prompt) :]
            else:
                # The template renders the prompt differently when an answer follows:
                # the answer starts where its text does.
                at = full.rfind(answer["content"].strip())
                if at < 0:
                    raise BadRow(f"the chat template does not render field `{name}` as written")
                text = full[at:]
            out[key] = text.rstrip() if self.strip else text
        return out

    def answer(self, row: Row, name: str) -> Message:
        """An assistant message from column `name`: text, one message, or a conversation
        ending in the answer."""
        value = column(row, name)
        if isinstance(value, str):
            return {"role": "assistant", "content": text_field(row, name)}
        return split_reply([value] if isinstance(value, dict) else value, name, self.ctx)[1]


@preference("dpo", "chat_template.default")
class ChatTemplateDefault(Templated):
    """Rows with the prompt turns (`field_messages`, default `messages`; text is one user
    turn) and the answers in `field_chosen` / `field_rejected`."""

    def __call__(self, row: Row) -> Pair:
        ds, ctx = self.ctx.ds, self.ctx
        name = ds.field_messages or "messages"
        history = prompt_turns(row, name, ctx)
        if history[-1]["role"] == "assistant":
            raise BadRow(f"field `{name}` ends with the assistant's turn; it is the prompt only")
        chosen, rejected = ds.field_chosen or "chosen", ds.field_rejected or "rejected"
        return self.pair(
            with_system(history, row_system(row, ctx)),
            {
                "chosen": (chosen, self.answer(row, chosen)),
                "rejected": (rejected, self.answer(row, rejected)),
            },
        )


@preference("dpo", "chat_template.argilla_chat")
class ChatTemplateArgillaChat(Templated):
    """argilla/dpo-mix rows: chosen and rejected as whole conversations; the prompt is
    every turn of `chosen` before its answer."""

    def __call__(self, row: Row) -> Pair:
        ds = self.ctx.ds
        chosen, rejected = ds.field_chosen or "chosen", ds.field_rejected or "rejected"
        history, answer = _chat_history(row, chosen, self.ctx)
        other = split_reply(column(row, rejected), rejected, self.ctx)[1]
        return self.pair(history, {"chosen": (chosen, answer), "rejected": (rejected, other)})


@preference("orpo", "chat_template.argilla")
class ChatTemplateArgilla(ChatTemplateArgillaChat):
    """ORPO on argilla rows (system optional, chosen and rejected conversations); the
    answers keep the template's text after the turn exactly, as Axolotl's ORPO does."""

    strip = False
