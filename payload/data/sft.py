"""Instruction and raw-text strategies: the alpaca family, user_defined, completion, pretrain.

Every instruction format is the same shape, Axolotl's: an optional system section, then
the instruction (with an input section when the row has one), all masked unless
`train_on_inputs`; then the response and eos, trained. Only the format strings and the
column names differ, so each format is a `Prompt` plus `Fields`, and a dataset's
`type: name.loader` picks one (`alpaca_chat.load_qa`). Prompt strings are Axolotl's, so a
model trained here sees the same text as one trained there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from payload.config.schema import DatasetConfig
from payload.config.user_formats import user_defined_problems
from payload.data.core import Context, Planned, Row, Segments, planned, register, text_field
from payload.errors import ConfigError, FerryError

log = logging.getLogger("ferry.data")

STANFORD = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)
# Axolotl's concise prompts end in a blank line of their own, so with `SYSTEM: {system}\n`
# around them three newlines precede `USER:`; kept, since that is the text models saw.
CONCISE = (
    "Below is an instruction from a USER that describes a task, paired with an input that "
    "provides further context. The ASSISTANT writes a response that concisely and "
    "appropriately completes the request.\n\n"
)
CONCISE_NO_INPUT = (
    "Below is an instruction from a USER that describes a task. The ASSISTANT writes a "
    "response that appropriately and concisely completes the request.\n\n"
)
INSTRUCT_TURN = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCT_TURN_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
CHAT_TURN = "USER: {instruction}\n{input}\nASSISTANT:"
CHAT_TURN_NO_INPUT = "USER: {instruction}\nASSISTANT:"


@dataclass(frozen=True)
class Prompt:
    """Format strings for one instruction format. `turn` has {instruction} and {input};
    `turn_no_input` is used when the input is empty; `system_format` wraps the system
    text ({system}), which is the row's when the format has a system column, else
    `system` (with input) / `system_no_input`; empty system text means no section."""

    turn: str
    turn_no_input: str
    system_format: str = "{system}"
    system: str = ""
    system_no_input: str = ""

    def render(self, instruction: str, extra: str, system: str | None = None) -> str:
        has_input = bool(extra.strip())
        if system is None:
            system = self.system if has_input else self.system_no_input
        head = self.system_format.format(system=system) if system else ""
        turn = self.turn if has_input else self.turn_no_input
        return head + turn.format(instruction=instruction, input=extra)


@dataclass(frozen=True)
class Fields:
    """Column names; `input` and `system` are optional columns (None: the format has none)."""

    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"
    system: str | None = None

    def overridden_by(self, ds: DatasetConfig) -> Fields:
        """The dataset's `field_*` keys win over the format's defaults."""
        return Fields(
            ds.field_instruction or self.instruction,
            ds.field_input or self.input,
            ds.field_output or self.output,
            ds.field_system or self.system,
        )


ALPACA = Prompt(INSTRUCT_TURN, INSTRUCT_TURN_NO_INPUT, "{system}\n\n", STANFORD, STANFORD_NO_INPUT)
ALPACA_CHAT = Prompt(
    CHAT_TURN, CHAT_TURN_NO_INPUT, "SYSTEM: {system}\n", STANFORD, STANFORD_NO_INPUT
)
CONCISE_CHAT = replace(ALPACA_CHAT, system=CONCISE, system_no_input=CONCISE_NO_INPUT)
UNPROMPTED_CHAT = replace(ALPACA_CHAT, system="", system_no_input="")
OPEN_ORCA = Prompt(
    "### Human:\n{instruction}\n### Additional Context:\n{input}\n### Assistant:\n",
    "### Human:\n{instruction}\n### Assistant:\n",
    "### System:\n{system}\n",
)
OPEN_ORCA_CHATML = Prompt(
    "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\n{system}<|im_end|>\n",
)
ORCA_FIELDS = Fields("question", None, "response", "system_prompt")


def instruction_example(
    row: Row, ctx: Context, prompt: Prompt, fields: Fields, default_system: str | None = None
) -> Segments:
    """<bos> prompt response <eos>; the prompt is trained only with train_on_inputs."""
    instruction = text_field(row, fields.instruction)
    extra = text_field(row, fields.input, required=False) if fields.input else ""
    output = text_field(row, fields.output)
    # The row's system text, else the dataset's, else (None) the format's own.
    system = text_field(row, fields.system, required=False) if fields.system else ""
    text = prompt.render(instruction, extra, system or default_system or None)
    return Segments([(text, ctx.train_on_inputs), (output, True)])


@register("alpaca", "alpaca_instruct")
@planned
def alpaca(row: Row, ctx: Context) -> Segments:
    """The Stanford Alpaca prompt; the `input` section appears only when the row has one.
    `system_prompt` (or a `field_system` column) replaces the Stanford preamble.
    `alpaca_instruct` is Axolotl's name for the same format."""
    fields = Fields().overridden_by(ctx.ds)
    return instruction_example(row, ctx, ALPACA, fields, ctx.ds.system_prompt)


class _ByLoader(Planned):
    """An instruction format chosen by the `type:` loader suffix (default `load`)."""

    LOADERS: dict[str, tuple[Prompt, Fields]] = {}

    def __init__(self, ctx: Context):
        name = ctx.loader or "load"
        if name not in self.LOADERS:
            raise FerryError(
                f"`type: {ctx.ds.type}` (dataset {ctx.ds.path}): no loader `{name}`; "
                f"choose from {', '.join(self.LOADERS)}."
            )
        self.ctx, self.tokenizer = ctx, ctx.tokenizer
        self.prompt, fields = self.LOADERS[name]
        self.fields = fields.overridden_by(ctx.ds)

    def plan(self, row: Row) -> Segments:
        return instruction_example(
            row, self.ctx, self.prompt, self.fields, self.ctx.ds.system_prompt
        )


@register("alpaca_chat")
class AlpacaChat(_ByLoader):
    """`USER: {instruction}\\n{input}\\nASSISTANT:` after a `SYSTEM:` line. Loaders: `load`
    (Stanford system text), `load_concise` (a concise-answer system text), `load_qa`
    (question/answer columns), `load_camel_ai` (message_1/message_2), `load_no_prompt`
    (no system line)."""

    LOADERS = {
        "load": (ALPACA_CHAT, Fields()),
        "load_concise": (CONCISE_CHAT, Fields()),
        "load_qa": (CONCISE_CHAT, Fields("question", None, "answer")),
        "load_camel_ai": (CONCISE_CHAT, Fields("message_1", None, "message_2")),
        "load_no_prompt": (UNPROMPTED_CHAT, Fields()),
    }


@register("alpaca_w_system")
class AlpacaWithSystem(_ByLoader):
    """Instruction rows that carry their own system prompt (`system`; `system_prompt` in
    dataset config when a row has none). Loaders: `load`/`load_chat` (`SYSTEM:` /
    `USER:` / `ASSISTANT:`), `load_instruct` (alpaca sections), `load_open_orca`
    (`### System:` / `### Human:` / `### Assistant:` on system_prompt/question/response
    rows), `load_open_orca_chatml` (the same rows in ChatML; the response still ends with
    the tokenizer's eos, as in Axolotl)."""

    LOADERS = {
        "load": (UNPROMPTED_CHAT, Fields(system="system")),
        "load_chat": (UNPROMPTED_CHAT, Fields(system="system")),
        "load_instruct": (replace(ALPACA, system="", system_no_input=""), Fields(system="system")),
        "load_open_orca": (OPEN_ORCA, ORCA_FIELDS),
        "load_open_orca_chatml": (OPEN_ORCA_CHATML, ORCA_FIELDS),
    }


@register("completion")
@planned
def completion(row: Row, ctx: Context) -> Segments:
    """Raw text, every token trained: <bos> text <eos>."""
    return Segments([(text_field(row, ctx.ds.field or "text"), True)])


@register("pretrain")
@planned
def pretrain(row: Row, ctx: Context) -> Segments:
    """One row of raw text for continued pretraining, every token trained: <bos> text
    <eos>, from `text_column` (else `field`, else `text`). Packing rows into sequence_len
    blocks is the builder's job, not the strategy's."""
    name = ctx.ds.text_column or ctx.ds.field or "text"
    return Segments([(text_field(row, name), True)])


# Axolotl's user-defined format keys, and the placeholders each format string may use.
@register("user_defined")
class UserDefined(Planned):
    """A format written in the config as a `type:` mapping (Axolotl's user-defined SFT
    format): `format` (with {instruction} and {input}), `no_input_format` (default:
    `format`, with an empty input), `system_format` ({system}), `system_prompt` (system
    text for rows without `field_system`), and the column names `field_instruction`,
    `field_input`, `field_output`, `field_system` (defaults: instruction, input, output,
    none). The prompt is masked unless train_on_inputs; the response and eos are trained.
    Mistakes in the mapping stop the build, all reported at once."""

    def __init__(self, ctx: Context):
        spec = dict(ctx.ds.type) if isinstance(ctx.ds.type, dict) else {}
        if problems := user_defined_problems(spec):
            raise ConfigError(f"The user-defined format of dataset {ctx.ds.path}", problems)
        if spec.get("field"):
            log.warning("dataset %s: `type.field` is not used by user-defined formats", ctx.ds.path)
        ds = ctx.ds
        self.ctx, self.tokenizer = ctx, ctx.tokenizer
        self.system = spec.get("system_prompt") or ds.system_prompt or ""
        self.prompt = Prompt(
            spec["format"],
            spec.get("no_input_format") or spec["format"],
            spec.get("system_format") or "{system}",
            self.system,
            self.system,
        )
        self.fields = Fields(
            spec.get("field_instruction") or ds.field_instruction or "instruction",
            spec.get("field_input") or ds.field_input or "input",
            spec.get("field_output") or ds.field_output or "output",
            spec.get("field_system") or ds.field_system,
        )

    def plan(self, row: Row) -> Segments:
        return instruction_example(row, self.ctx, self.prompt, self.fields, self.system)
