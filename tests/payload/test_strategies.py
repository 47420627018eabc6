"""Instruction, raw-text and segment strategies: exactly which tokens each one trains.

Every test pins the whole token sequence (prompt text written out in full, so a changed
format string fails) and the label of every token, on the bundled tiny tokenizer.
"""

from __future__ import annotations

import pytest
from helpers import ASSETS

from payload.config import DatasetConfig, FerryError, TrainConfig
from payload.data.core import IGNORE, BadRow, build_strategy


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")


def run(tokenizer, row, type_, train_on_inputs=False, **keys):
    ds = DatasetConfig(path="rows.jsonl", type=type_, **keys)
    return build_strategy(ds, TrainConfig(train_on_inputs=train_on_inputs), tokenizer)(row)


def enc(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assert_prompt_then_response(tokenizer, out, prompt, response):
    """<bos> prompt (masked) response <eos> (trained), token for token."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt_ids, response_ids = enc(tokenizer, prompt), enc(tokenizer, response)
    assert out["input_ids"] == [bos, *prompt_ids, *response_ids, eos]
    assert out["labels"] == [IGNORE] * (1 + len(prompt_ids)) + response_ids + [eos]
    assert out["attention_mask"] == [1] * len(out["input_ids"])


ROW = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
# Axolotl's prompt texts, written out here on purpose rather than imported from
# payload.data.sft: an edit to the module's text (which changes what models see) must fail.
STANFORD = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)
CONCISE_NO_INPUT = (
    "Below is an instruction from a USER that describes a task. The ASSISTANT writes a "
    "response that appropriately and concisely completes the request.\n\n"
)
CONCISE = (
    "Below is an instruction from a USER that describes a task, paired with an input that "
    "provides further context. The ASSISTANT writes a response that concisely and "
    "appropriately completes the request.\n\n"
)


def test_alpaca_instruct_is_alpaca_token_for_token(tokenizer):
    for row in (ROW, {**ROW, "input": ""}):
        assert run(tokenizer, row, "alpaca_instruct") == run(tokenizer, row, "alpaca")
    prompt = f"{STANFORD}\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
    prompt += "### Response:\n"
    assert_prompt_then_response(tokenizer, run(tokenizer, ROW, "alpaca_instruct"), prompt, "5")
    short = f"{STANFORD_NO_INPUT}\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n"
    out = run(tokenizer, {**ROW, "input": ""}, "alpaca_instruct")
    assert_prompt_then_response(tokenizer, out, short, "5")


@pytest.mark.parametrize(
    ("type_", "row", "prompt", "response"),
    [
        (
            "alpaca_chat",
            ROW,
            f"SYSTEM: {STANFORD}\nUSER: Add the numbers.\n2 and 3\nASSISTANT:",
            "5",
        ),
        (
            "alpaca_chat.load",
            {"instruction": "Say hi.", "output": "hi"},
            f"SYSTEM: {STANFORD_NO_INPUT}\nUSER: Say hi.\nASSISTANT:",
            "hi",
        ),
        (
            "alpaca_chat.load_concise",
            ROW,
            f"SYSTEM: {CONCISE}\nUSER: Add the numbers.\n2 and 3\nASSISTANT:",
            "5",
        ),
        (
            "alpaca_chat.load_qa",
            {"question": "Capital of France?", "answer": "Paris."},
            f"SYSTEM: {CONCISE_NO_INPUT}\nUSER: Capital of France?\nASSISTANT:",
            "Paris.",
        ),
        (
            "alpaca_chat.load_camel_ai",
            {"message_1": "What is H2O?", "message_2": "Water."},
            f"SYSTEM: {CONCISE_NO_INPUT}\nUSER: What is H2O?\nASSISTANT:",
            "Water.",
        ),
        (
            "alpaca_chat.load_no_prompt",
            ROW,
            "USER: Add the numbers.\n2 and 3\nASSISTANT:",
            "5",
        ),
        (
            "alpaca_w_system",
            {**ROW, "system": "Be exact."},
            "SYSTEM: Be exact.\nUSER: Add the numbers.\n2 and 3\nASSISTANT:",
            "5",
        ),
        (
            "alpaca_w_system.load_chat",
            {"instruction": "Say hi.", "output": "hi", "system": "Be warm."},
            "SYSTEM: Be warm.\nUSER: Say hi.\nASSISTANT:",
            "hi",
        ),
        (
            "alpaca_w_system.load_instruct",
            {**ROW, "system": "Be exact."},
            "Be exact.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
            "### Response:\n",
            "5",
        ),
        (
            "alpaca_w_system.load_open_orca",
            {"system_prompt": "You are kind.", "question": "Hi?", "response": "Hello."},
            "### System:\nYou are kind.\n### Human:\nHi?\n### Assistant:\n",
            "Hello.",
        ),
        (
            "alpaca_w_system.load_open_orca_chatml",
            {"system_prompt": "You are kind.", "question": "Hi?", "response": "Hello."},
            "<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
            "<|im_start|>assistant\n",
            "Hello.",
        ),
        (
            "alpaca_w_system.load_open_orca",
            {"system_prompt": "", "question": "Hi?", "response": "Hello."},
            "### Human:\nHi?\n### Assistant:\n",
            "Hello.",
        ),
    ],
)
def test_instruction_formats_write_axolotls_prompt(tokenizer, type_, row, prompt, response):
    """A failure means the prompt text (or the mask) drifted from Axolotl's format."""
    assert_prompt_then_response(tokenizer, run(tokenizer, row, type_), prompt, response)


def test_instruction_formats_train_on_inputs(tokenizer):
    out = run(tokenizer, {**ROW, "system": "S."}, "alpaca_w_system", train_on_inputs=True)
    assert out["labels"] == out["input_ids"]


def test_system_prompt_fills_in_for_rows_without_one(tokenizer):
    out = run(tokenizer, ROW, "alpaca_w_system", system_prompt="Default.")
    prompt = "SYSTEM: Default.\nUSER: Add the numbers.\n2 and 3\nASSISTANT:"
    assert_prompt_then_response(tokenizer, out, prompt, "5")


def test_alpaca_system_prompt_replaces_the_preamble(tokenizer):
    prompt = (
        "Be exact.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    out = run(tokenizer, ROW, "alpaca", system_prompt="Be exact.")
    assert_prompt_then_response(tokenizer, out, prompt, "5")
    out = run(tokenizer, {**ROW, "sys": "Be exact."}, "alpaca", field_system="sys")
    assert_prompt_then_response(tokenizer, out, prompt, "5")


def test_unknown_loader_stops_the_build(tokenizer):
    with pytest.raises(FerryError, match=r"no loader `load_orca`; choose from load, load_chat"):
        run(tokenizer, ROW, "alpaca_w_system.load_orca")


def test_field_overrides_apply_to_loaders(tokenizer):
    row = {"q": "Say hi.", "a": "hi"}
    out = run(tokenizer, row, "alpaca_chat.load_qa", field_instruction="q", field_output="a")
    prompt = f"SYSTEM: {CONCISE_NO_INPUT}\nUSER: Say hi.\nASSISTANT:"
    assert_prompt_then_response(tokenizer, out, prompt, "hi")


USER_FORMAT = {
    "system_prompt": "Answer briefly.",
    "system_format": "<<{system}>>\n",
    "field_instruction": "q",
    "field_input": "ctx",
    "field_output": "a",
    "format": "Q: {instruction}\nContext: {input}\nA:",
    "no_input_format": "Q: {instruction}\nA:",
}


@pytest.mark.parametrize(
    ("row", "prompt"),
    [
        (
            {"q": "Sky?", "ctx": "daytime", "a": " Blue."},
            "<<Answer briefly.>>\nQ: Sky?\nContext: daytime\nA:",
        ),
        ({"q": "Sky?", "a": " Blue."}, "<<Answer briefly.>>\nQ: Sky?\nA:"),
    ],
)
def test_user_defined_format(tokenizer, row, prompt):
    assert_prompt_then_response(tokenizer, run(tokenizer, row, USER_FORMAT), prompt, " Blue.")


def test_user_defined_row_system_wins_and_format_serves_without_input(tokenizer):
    spec = {
        "format": "[{instruction}]{input}=",
        "field_system": "sys",
        "system_format": "{system}|",
    }
    out = run(tokenizer, {"instruction": "x", "output": "y", "sys": "S"}, spec)
    assert_prompt_then_response(tokenizer, out, "S|[x]=", "y")
    out = run(tokenizer, {"instruction": "x", "output": "y"}, spec)
    assert_prompt_then_response(tokenizer, out, "[x]=", "y")


def test_user_defined_mistakes_are_reported_together(tokenizer):
    spec = {
        "formt": "{instruction}",
        "no_input_format": "{instruction} {input}",
        "system_format": 3,
    }
    with pytest.raises(FerryError) as raised:
        run(tokenizer, ROW, spec)
    message = str(raised.value)
    assert "The user-defined format of dataset rows.jsonl has 4 problems" in message
    assert "type.formt: is not a key of this format; did you mean `format`?" in message
    assert "type.no_input_format: uses {input}; it may use only {instruction}" in message
    assert "type.system_format: must be text, not int" in message
    assert "type.format: is required" in message


def test_completion_and_pretrain_train_every_token(tokenizer):
    text = "The quick brown fox."
    ids = [tokenizer.bos_token_id, *enc(tokenizer, text), tokenizer.eos_token_id]
    cases = [
        ("completion", {"text": text}, {}),
        ("completion", {"body": text}, {"field": "body"}),
        ("pretrain", {"text": text}, {}),
        ("pretrain", {"content": text}, {"text_column": "content"}),
        ("pretrain", {"body": text}, {"field": "body"}),
    ]
    for type_, row, keys in cases:
        out = run(tokenizer, row, type_, **keys)
        assert out["input_ids"] == ids and out["labels"] == ids, (type_, keys)
    with pytest.raises(BadRow, match="missing field `content`"):
        run(tokenizer, {"text": text}, "pretrain", text_column="content")


SEGMENTS = {
    "segments": [
        {"text": "<s>Hello\n", "label": True},
        {"text": "hi there. ", "label": True},
        {"text": "goodbye ", "label": False},
        {"text": "farewell</s>", "label": True},
    ]
}


def test_input_output_trains_labelled_segments_and_adds_nothing(tokenizer):
    parts = [enc(tokenizer, s["text"]) for s in SEGMENTS["segments"]]
    out = run(tokenizer, SEGMENTS, "input_output")
    assert out["input_ids"] == parts[0] + parts[1] + parts[2] + parts[3]
    assert out["input_ids"][0] == tokenizer.bos_token_id  # from the text, not added
    assert out["input_ids"][-1] == tokenizer.eos_token_id
    assert out["labels"] == parts[0] + parts[1] + [IGNORE] * len(parts[2]) + parts[3]
    trained = [t for t in out["labels"] if t != IGNORE]
    assert tokenizer.decode(trained) == "<s>Hello\nhi there. farewell</s>"
    everything = run(tokenizer, SEGMENTS, "input_output", train_on_inputs=True)
    assert everything["labels"] == everything["input_ids"]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({}, "missing field `segments`"),
        ({"segments": "text"}, "field `segments` is a str, not a list"),
        ({"segments": []}, "field `segments` is empty"),
        ({"segments": ["x"]}, "segment 0 is a str, not a mapping"),
        ({"segments": [{"label": True}]}, "segment 0 has no `text`"),
        (
            {"segments": [{"text": "a", "label": "yes"}]},
            "segment 0 `label` is a str, not true/false",
        ),
        ({"segments": [{"text": "a", "label": False}]}, "no segment has `label: true`"),
    ],
)
def test_input_output_bad_rows(tokenizer, row, reason):
    with pytest.raises(BadRow, match=reason):
        run(tokenizer, row, "input_output")


STEPS = {"prompt": "Is 2+2=4?", "completions": ["2+2 is 4", "so no"], "labels": [True, False]}


def test_stepwise_labels_the_last_token_of_each_step(tokenizer):
    prompt = [tokenizer.bos_token_id, *enc(tokenizer, "Is 2+2=4?")]
    step1, step2, newline = (
        enc(tokenizer, "2+2 is 4"),
        enc(tokenizer, "so no"),
        enc(tokenizer, "\n"),
    )
    assert len(newline) == 1
    out = run(tokenizer, STEPS, "stepwise_supervised")
    assert out["input_ids"] == prompt + step1 + newline + step2 + newline
    expected = [IGNORE] * (len(prompt) + len(step1)) + [1] + [IGNORE] * len(step2) + [0]
    assert out["labels"] == expected
    last_only = run(tokenizer, STEPS, "stepwise_supervised", train_on_last_step_only=True)
    assert [x for x in last_only["labels"] if x != IGNORE] == [0]


def test_stepwise_separator_and_completion_length(tokenizer):
    """max_completion_length cuts the steps' tokens: here just after step 0's separator and
    one token into step 1, so only step 0's label survives."""
    prompt = [tokenizer.bos_token_id, *enc(tokenizer, "Is 2+2=4?")]
    step1 = enc(tokenizer, "2+2 is 4") + enc(tokenizer, " ;")
    step2 = enc(tokenizer, "so no")
    cut = len(step1) + 1
    keys = {"step_separator": " ;", "max_completion_length": cut}
    out = run(tokenizer, STEPS, "stepwise_supervised", **keys)
    assert out["input_ids"] == prompt + step1 + step2[:1]
    assert out["labels"] == [IGNORE] * (len(prompt) + len(step1) - 1) + [1, IGNORE]
    with pytest.raises(BadRow, match="no step label is left"):
        run(tokenizer, STEPS, "stepwise_supervised", max_completion_length=2)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({**STEPS, "labels": [True]}, "field `labels` has 1 items for 2 `completions`"),
        ({**STEPS, "labels": [True, "bad"]}, "label 1 is 'bad', not true/false"),
        ({**STEPS, "completions": ["a", 3]}, "completion 1 is a int, not text"),
        ({**STEPS, "completions": []}, "field `completions` is empty"),
        ({"completions": ["a"], "labels": [True]}, "missing field `prompt`"),
    ],
)
def test_stepwise_bad_rows(tokenizer, row, reason):
    with pytest.raises(BadRow, match=reason):
        run(tokenizer, row, "stepwise_supervised")


def test_stepwise_empty_step_needs_a_separator(tokenizer):
    row = {**STEPS, "completions": ["", "so no"]}
    out = run(tokenizer, row, "stepwise_supervised")  # an empty step is its separator alone
    step2 = enc(tokenizer, "so no")
    assert out["input_ids"][-len(step2) - 2 :] == enc(tokenizer, "\n") + step2 + enc(
        tokenizer, "\n"
    )
    assert out["labels"][-len(step2) - 2 :] == [1] + [IGNORE] * len(step2) + [0]
    with pytest.raises(BadRow, match="completion 0 is empty and there is no step_separator"):
        run(tokenizer, row, "stepwise_supervised", step_separator="")
