"""Instruction and raw-text strategies: the alpaca family and completion.

Each is a function `fn(row, ctx)` registered by name (see `payload.data.core`).
"""

from __future__ import annotations

from payload.data.core import Context, Row, Tokenized, from_segments, register, text_field

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
def alpaca(row: Row, ctx: Context) -> Tokenized:
    """The Stanford Alpaca prompt; the `input` section appears only when the row has one."""
    ds = ctx.ds
    instruction = text_field(row, ds.field_instruction or "instruction")
    extra = text_field(row, ds.field_input or "input", required=False)
    output = text_field(row, ds.field_output or "output")
    template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
    prompt = template.format(instruction=instruction, input=extra)
    return from_segments(ctx.tokenizer, [(prompt, ctx.train_on_inputs), (output, True)])


@register("completion")
def completion(row: Row, ctx: Context) -> Tokenized:
    """Raw text, every token trained: <bos> text <eos>."""
    return from_segments(ctx.tokenizer, [(text_field(row, ctx.ds.field or "text"), True)])
