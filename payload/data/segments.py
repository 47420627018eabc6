"""Strategies whose rows say which tokens are trained: input_output and stepwise_supervised.

Neither uses a prompt template; the row's own pieces are tokenized one by one, so the
trained/untrained boundary falls exactly between pieces.
"""

from __future__ import annotations

from payload.data.core import (
    IGNORE,
    BadRow,
    Context,
    Encoded,
    Row,
    Segments,
    Tokenized,
    kind,
    list_field,
    planned,
    register,
    require_trained,
    text_field,
)


@register("input_output")
@planned
def input_output(row: Row, ctx: Context) -> Segments:
    """Template-free rows, `{"segments": [{"text": ..., "label": true|false}, ...]}`.

    The segments are concatenated as they are: no bos or eos is added (write `<s>` and
    `</s>` into the text where you want them, as in Axolotl). A segment's tokens are
    trained when its label is true, or for every segment with train_on_inputs.
    """
    parts: list[tuple[str, bool]] = []
    for i, segment in enumerate(list_field(row, "segments")):
        if not isinstance(segment, dict):
            raise BadRow(f"segment {i} is {kind(segment)}, not a mapping")
        text = segment.get("text")
        if not isinstance(text, str):
            what = "has no `text`" if text is None else f"`text` is {kind(text)}, not text"
            raise BadRow(f"segment {i} {what}")
        label = segment.get("label")
        if not isinstance(label, bool):
            raise BadRow(f"segment {i} `label` is {kind(label)}, not true/false")
        parts.append((text, label or ctx.train_on_inputs))
    return Segments(parts, bos=False, eos=False, require="no segment has `label: true`")


@register("stepwise_supervised")
@planned
def stepwise_supervised(row: Row, ctx: Context) -> Encoded:
    """Process-reward rows: `prompt`, `completions` (the reasoning steps) and `labels`
    (one true/false per step: is the step correct).

    As TRL's PRM trainer and Axolotl lay it out: <bos> prompt, then each step followed by
    `step_separator` (default "\\n"). The labels are classes, not token ids: the last
    token of each step (its separator) carries 1 or 0, every other token -100; with
    `train_on_last_step_only` only the last step's. `max_completion_length` cuts the
    steps' tokens (not the prompt's). This is for a token-classification head (a
    process reward model), not a causal LM loss.
    """
    ds, tokenizer = ctx.ds, ctx.tokenizer
    prompt = text_field(row, "prompt")
    steps = list_field(row, "completions")
    marks = list_field(row, "labels")
    if len(marks) != len(steps):
        raise BadRow(f"field `labels` has {len(marks)} items for {len(steps)} `completions`")
    for i, (step, mark) in enumerate(zip(steps, marks, strict=True)):
        if not isinstance(step, str):
            raise BadRow(f"completion {i} is {kind(step)}, not text")
        if not isinstance(mark, (bool, int)) or mark not in (0, 1):
            raise BadRow(f"label {i} is {mark!r}, not true/false")
    separator_text = "\n" if ds.step_separator is None else ds.step_separator

    def finish(ids: list[list[int]], _: object) -> Tokenized:
        prompt_ids, separator = ids[0], ids[1]
        pieces = [step + separator for step in ids[2:]]
        step_ids: list[int] = []
        step_labels: list[int] = []
        for i, (piece, mark) in enumerate(zip(pieces, marks, strict=True)):
            if not piece:
                raise BadRow(f"completion {i} is empty and there is no step_separator")
            last = i == len(steps) - 1
            label = int(mark) if (last or not ds.train_on_last_step_only) else IGNORE
            step_ids += piece
            step_labels += [IGNORE] * (len(piece) - 1) + [label]
        if ds.max_completion_length:
            step_ids = step_ids[: ds.max_completion_length]
            step_labels = step_labels[: ds.max_completion_length]
        if tokenizer.bos_token_id is not None:
            prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
        input_ids = prompt_ids + step_ids
        labels = [IGNORE] * len(prompt_ids) + step_labels
        out = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
        return require_trained(out, "no step label is left (max_completion_length?)")

    return Encoded([prompt, separator_text, *steps], finish)
