"""Prompt strategies and dataset building on the bundled tiny tokenizer."""

from __future__ import annotations

import json

import pytest
from helpers import ASSETS, DATA, ROOT

from payload.config import DatasetConfig, FerryError, TrainConfig, validate_mapping
from payload.data.build import build_datasets
from payload.data.core import IGNORE, BadRow, Context
from payload.data.sft import alpaca as _alpaca
from payload.data.sft import completion as _completion


def alpaca(row, tokenizer, ds, train_on_inputs):
    return _alpaca(row, Context(tokenizer, ds, TrainConfig(train_on_inputs=train_on_inputs)))


def completion(row, tokenizer, ds, train_on_inputs):
    return _completion(row, Context(tokenizer, ds, TrainConfig(train_on_inputs=train_on_inputs)))


ALPACA = DatasetConfig(path="x.jsonl", type="alpaca")
ROW = {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "2 + 3 = 5."}


def test_alpaca_masks_exactly_the_prompt(tokenizer):
    out = alpaca(ROW, tokenizer, ALPACA, train_on_inputs=False)
    prompt = (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the two numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(ROW["output"], add_special_tokens=False)["input_ids"]
    assert out["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert out["input_ids"][0] == tokenizer.bos_token_id
    assert out["labels"] == [IGNORE] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert out["attention_mask"] == [1] * len(out["input_ids"])
    # The trained tokens decode back to the response and nothing else.
    trained = [t for t in out["labels"] if t != IGNORE]
    assert tokenizer.decode(trained, skip_special_tokens=True) == ROW["output"]


def test_alpaca_train_on_inputs_trains_every_token(tokenizer):
    out = alpaca(ROW, tokenizer, ALPACA, train_on_inputs=True)
    assert out["labels"] == out["input_ids"]


def test_alpaca_without_input_uses_the_short_template(tokenizer):
    row = {"instruction": "Which day comes after Monday?", "input": "", "output": "Tuesday."}
    out = alpaca(row, tokenizer, ALPACA, train_on_inputs=False)
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWhich day comes after Monday?\n\n"
        "### Response:\n"
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer("Tuesday.", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert out["input_ids"] == [bos, *prompt_ids, *response_ids, eos]
    assert out["labels"] == [IGNORE] * (1 + len(prompt_ids)) + response_ids + [eos]


def test_alpaca_field_mappings(tokenizer):
    ds = DatasetConfig(path="x", type="alpaca", field_instruction="q", field_output="a")
    out = alpaca({"q": "Say hi.", "a": "hi"}, tokenizer, ds, train_on_inputs=False)
    trained = [t for t in out["labels"] if t != IGNORE]
    assert tokenizer.decode(trained, skip_special_tokens=True) == "hi"


def test_completion_trains_on_all_text(tokenizer):
    ds = DatasetConfig(path="x", type="completion", field="body")
    out = completion({"body": "The quick brown fox."}, tokenizer, ds, train_on_inputs=False)
    assert out["labels"] == out["input_ids"]
    assert tokenizer.decode(out["input_ids"], skip_special_tokens=True) == "The quick brown fox."


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"instruction": "x"}, "missing field `output`"),
        ({"instruction": "x", "output": 3}, "field `output` is a int, not text"),
        ({"instruction": " ", "output": "y"}, "field `instruction` is empty"),
    ],
)
def test_bad_rows_say_why(tokenizer, row, reason):
    with pytest.raises(BadRow, match=reason):
        alpaca(row, tokenizer, ALPACA, train_on_inputs=False)


def _config(tmp_path, rows: list[dict], **extra):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "base_model": str(ASSETS / "tiny-llama"),
        "datasets": [{"path": str(path), "type": "alpaca"}],
        "learning_rate": 1e-4,
        **extra,
    }
    return validate_mapping(raw)


def test_build_counts_every_skipped_row(tmp_path, tokenizer):
    long_output = " ".join(["river"] * 400)
    rows = [ROW] * 5 + [{"instruction": "x"}] * 2 + [{**ROW, "output": long_output}]
    train, eval_set, report = build_datasets(_config(tmp_path, rows, sequence_len=128), tokenizer)
    assert len(train) == 5 and eval_set is None
    assert report.rows_in == 8 and report.rows_kept == 5
    assert report.skipped == {
        "missing field `output`": 2,
        "longer than sequence_len (128 tokens)": 1,
    }
    assert report.examples["missing field `output`"].endswith("row 5")
    assert train.column_names == ["input_ids", "attention_mask", "labels"]


def test_strict_makes_the_first_bad_row_an_error(tmp_path, tokenizer):
    rows = [ROW, ROW, {"instruction": "x", "output": ""}]
    with pytest.raises(FerryError, match=r"rows.jsonl\) row 2: field `output` is empty"):
        build_datasets(_config(tmp_path, rows, strict=True), tokenizer)


def test_no_usable_rows_is_an_error(tmp_path, tokenizer):
    with pytest.raises(FerryError, match="No usable rows"):
        build_datasets(_config(tmp_path, [{"text": "wrong format"}] * 3), tokenizer)


@pytest.mark.parametrize(("size", "expected"), [(0.25, 80), (10, 10)])
def test_val_set_size_fraction_or_count(tokenizer, size, expected):
    raw = {
        "base_model": str(ASSETS / "tiny-llama"),
        "learning_rate": 1e-4,
        "datasets": [{"path": str(DATA), "type": "alpaca"}],
        "val_set_size": size,
    }
    train, eval_set, report = build_datasets(validate_mapping(raw), tokenizer)
    assert len(eval_set) == expected and len(train) == 320 - expected
    assert (report.train_rows, report.eval_rows) == (320 - expected, expected)


def test_several_datasets_are_mixed(tmp_path, tokenizer):
    other = tmp_path / "text.jsonl"
    other.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(7)))
    raw = {
        "base_model": str(ASSETS / "tiny-llama"),
        "learning_rate": 1e-4,
        "datasets": [
            {"path": str(DATA), "type": "alpaca"},
            {"path": str(other), "type": "completion"},
        ],
    }
    train, _, report = build_datasets(validate_mapping(raw), tokenizer)
    assert len(train) == 327 and report.rows_kept == 327


def test_bundled_data_is_what_its_script_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_data", ROOT / "examples/data/make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert written == module.rows()
    assert len(written) >= 200
    chats = ROOT / "examples/data/chat_tiny.jsonl"
    assert [json.loads(line) for line in chats.read_text().splitlines()] == module.chats()
