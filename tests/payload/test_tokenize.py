"""The batched tokenizing path (payload.data.tokenize) gives, token for token, what each
strategy gives one row at a time, with one tokenizer call per text (`realize`): for every
strategy family, bad rows, length rules, several processes; and its direct call to the
Rust encoder equals the tokenizer's own `__call__`. All on the bundled tiny tokenizer."""

from __future__ import annotations

import pytest
from helpers import tiny_config as config
from helpers import write_jsonl

from payload.config import FerryError, TrainConfig
from payload.data.build import build_datasets
from payload.data.core import IGNORE, BadRow, build_strategy
from payload.data.tokenize import Encoder

WORDS = [
    "the",
    "river",
    "runs",
    "cold",
    "and",
    "long",
    "under",
    "a",
    "grey",
    "sky",
    "while",
    "Zoë",
    "counts",
    "42",
    "boats",
]


def sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def alpaca_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        row = {
            "instruction": f"Say {sentence(i, 3)}.",
            "input": sentence(i + 1, i % 4) if i % 3 else "",
            "output": sentence(i + 2, 2 + i % 9),
        }
        if i % 17 == 5:
            del row["output"]  # a bad row: missing field `output`
        rows.append(row)
    return rows


def chat_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        turns = [{"role": "system", "content": "Be brief."}] if i % 2 else []
        for t in range(1 + i % 3):
            turns += [
                {"role": "user", "content": sentence(i + t, 3 + t)},
                {"role": "assistant", "content": sentence(i + t + 1, 2 + (i + t) % 5)},
            ]
        rows.append({"messages": turns if i % 13 != 4 else []})  # [] is a bad row
    return rows


def segment_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        segments = [
            {"text": f"<s>{sentence(i, 2)} ", "label": False},
            {"text": sentence(i + 1, 1 + i % 4), "label": i % 5 != 0},  # i % 5 == 0: untrained
            {"text": "" if i % 2 else "</s>", "label": True},
        ]
        rows.append({"segments": segments if i % 11 != 3 else [{"label": True}]})
    return rows


def one_by_one(strategy, rows: list[dict]) -> tuple[list[list[int]], list[list[int]], int]:
    """(input_ids, labels, skipped) of each row alone, through `strategy(row)`."""
    ids, labels, skipped = [], [], 0
    for row in rows:
        try:
            out = strategy(row)
        except BadRow:
            skipped += 1
            continue
        assert out["attention_mask"] == [1] * len(out["input_ids"])
        ids.append(out["input_ids"])
        labels.append(out["labels"])
    return ids, labels, skipped


CASES = {
    "alpaca": (alpaca_rows, {"type": "alpaca"}, {}),
    "alpaca, train_on_inputs": (alpaca_rows, {"type": "alpaca"}, {"train_on_inputs": True}),
    "alpaca_chat.load_concise": (alpaca_rows, {"type": "alpaca_chat.load_concise"}, {}),
    "completion": (
        lambda n: [{"text": sentence(i, 1 + i % 6)} if i % 9 else {"text": ""} for i in range(n)],
        {"type": "completion"},
        {},
    ),
    "input_output": (segment_rows, {"type": "input_output"}, {}),
    "chat_template": (chat_rows, {"type": "chat_template"}, {"chat_template": "chatml"}),
    "chat_template, train_on_eos all": (
        chat_rows,
        {"type": "chat_template", "train_on_eos": "all", "roles_to_train": ["user"]},
        {"chat_template": "chatml"},
    ),
}


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_batches_give_what_each_row_gives_alone(tokenizer, tmp_path, case, processes):
    make, entry, extra = CASES[case]
    rows = make(150)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = config([{"path": path, **entry}], dataset_processes=processes, **extra)
    train, _, report = build_datasets(cfg, tokenizer)
    ids, labels, skipped = one_by_one(build_strategy(cfg.datasets[0], cfg, tokenizer), rows)
    assert skipped > 0 and report.rows_kept == len(rows) - skipped  # the bad rows were there
    assert [list(r) for r in train["input_ids"]] == ids
    assert [list(r) for r in train["labels"]] == labels
    assert [sum(m) for m in train["attention_mask"]] == [len(r) for r in ids]
    assert report.processes == processes


def test_long_rows_are_truncated_or_dropped_as_each_row_alone(tokenizer, tmp_path):
    rows = alpaca_rows(60)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    base = config([{"path": path, "type": "alpaca"}])
    ids, labels, _ = one_by_one(build_strategy(base.datasets[0], base, tokenizer), rows)
    size = sorted(len(r) for r in ids)[len(ids) // 2]  # half the rows are longer
    cut = config([{"path": path, "type": "alpaca"}], sequence_len=size)
    truncated, _, report = build_datasets(
        cut.model_copy(update={"excess_length_strategy": "truncate"}), tokenizer
    )
    # A row cut before its response has nothing left to train, and is skipped.
    expected = [(i[:size], lab[:size]) for i, lab in zip(ids, labels, strict=True)]
    expected = [(i, lab) for i, lab in expected if any(x != IGNORE for x in lab)]
    assert [list(r) for r in truncated["input_ids"]] == [i for i, _ in expected]
    assert [list(r) for r in truncated["labels"]] == [lab for _, lab in expected]
    assert report.truncated == sum(len(r) > size for r in ids) - (len(ids) - len(expected))
    dropped, _, report = build_datasets(cut, tokenizer)  # drop is the default
    assert [list(r) for r in dropped["input_ids"]] == [r for r in ids if len(r) <= size]
    assert report.skipped[f"longer than sequence_len ({size} tokens)"] == sum(
        len(r) > size for r in ids
    )


def test_strict_names_the_first_bad_row_whichever_step_finds_it(tokenizer, tmp_path):
    """Row 1 is found bad only once tokenized (no trained segment), row 3 already when
    planned (no `segments`): the run stops on row 1, as one row at a time would."""
    good = {"segments": [{"text": "a b", "label": True}]}
    untrained = {"segments": [{"text": "a b", "label": False}]}
    rows = [good, untrained, good, {"text": "no segments"}, good]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = config([{"path": path, "type": "input_output"}], strict=True)
    with pytest.raises(FerryError) as e:
        build_datasets(cfg, tokenizer)
    assert e.value.message == (
        f"datasets[0] ({path}) row 1: no segment has `label: true` (strict: true)."
    )


TEXTS = [
    "plain words",
    "",
    " leading and trailing spaces ",
    "a literal </s> and <s> inside",
    "<|im_end|> is not special here",
    "unicode: Zoë, naïve, 東京, 🙂",
    "line\nbreaks\n\nand\ttabs",
]


@pytest.mark.parametrize("offsets", [False, True])
def test_the_direct_encoder_equals_the_tokenizer_call(tokenizer, offsets):
    encode = Encoder(tokenizer)
    assert encode.backend is not None  # the direct path is the one under test
    # A call with other settings leaves the Rust encoder truncating and padding; the
    # encoder must not inherit that.
    tokenizer(["x y z w", "x"], truncation=True, max_length=2, padding=True)
    ids, spans = encode(TEXTS, offsets=offsets)
    for i, text in enumerate(TEXTS):
        one = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
        assert ids[i] == one["input_ids"], text
        if offsets:
            assert [tuple(o) for o in spans[i]] == [tuple(o) for o in one["offset_mapping"]]
    assert spans is None if not offsets else len(spans) == len(TEXTS)


def test_a_tokenizer_that_changes_its_own_encoding_is_called_as_itself(tokenizer):
    """A class overriding transformers' encoding path does its own thing in `__call__`
    (here: lower-cases), so the encoder must call it, not the Rust encoder beneath."""
    import copy

    changed = copy.deepcopy(tokenizer)

    class Lower(type(tokenizer)):
        def _encode_plus(self, text, *args, **kwargs):
            lower = [t.lower() for t in text] if isinstance(text, list) else text.lower()
            return super()._encode_plus(lower, *args, **kwargs)

    changed.__class__ = Lower
    encode = Encoder(changed)
    assert encode.backend is None
    ids, _ = encode(["Zoë RIVER"], offsets=False)
    assert ids == [tokenizer("zoë river", add_special_tokens=False)["input_ids"]]
    assert ids != [tokenizer("Zoë RIVER", add_special_tokens=False)["input_ids"]]


def test_stepwise_rows_batched_equal_each_row_alone(tokenizer):
    """stepwise_supervised (an `Encoded` plan without offsets) through the batch path."""
    from payload.config import DatasetConfig
    from payload.data.tokenize import RowTokenizer

    rows = [
        {"prompt": "Add 2 and 3.", "completions": ["2 + 3", "= 5"], "labels": [True, True]},
        {"prompt": "Add 1 and 1.", "completions": ["1 + 1", "= 3"], "labels": [True, False]},
        {"prompt": "Bad.", "completions": ["x"], "labels": [True, True]},
        {"prompt": "Empty step.", "completions": ["", "y"], "labels": [False, True]},
    ]
    ds = DatasetConfig(path="x.jsonl", type="stepwise_supervised", step_separator="")
    cfg = TrainConfig()
    rt = RowTokenizer(ds, cfg, tokenizer, "datasets[0]", limit=True)
    out, notes = rt.rows(rows, 0)
    strategy = build_strategy(ds, cfg, tokenizer)
    assert out[0] == strategy(rows[0]) and out[1] == strategy(rows[1])
    assert out[1]["labels"][-1] == 0 and out[0]["labels"][-1] == 1
    assert out[2] is None and notes[2] == "skip:field `labels` has 2 items for 1 `completions`"
    assert out[3] is None
    assert notes[3] == "skip:completion 0 is empty and there is no step_separator"


def test_without_fork_one_process_tokenizes_the_same_rows(tokenizer, tmp_path, monkeypatch):
    """Off Linux the workers (which need fork) are not started: the same rows come out of
    one process, and the report says one process."""
    import sys

    rows = alpaca_rows(120)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = config([{"path": path, "type": "alpaca"}], dataset_processes=2)
    linux, _, report = build_datasets(cfg, tokenizer)
    assert report.processes == 2
    monkeypatch.setattr(sys, "platform", "darwin")
    mac, _, report = build_datasets(cfg, tokenizer)
    assert report.processes == 1
    assert f"datasets[0] ({path}): tokenized in 1 process, not 2" in "\n".join(report.lines())
    assert mac["input_ids"] == linux["input_ids"] and mac["labels"] == linux["labels"]


@pytest.mark.parametrize("case", ["alpaca", "completion", "input_output"])
def test_a_tokenizer_without_bos_tokenizes_as_each_row_alone(tokenizer, tmp_path, case):
    """Qwen's tokenizers have no bos token: rows start with the prompt itself."""
    import copy

    nobos = copy.deepcopy(tokenizer)
    nobos.bos_token = None
    assert nobos.bos_token_id is None
    make, entry, extra = CASES[case]
    rows = make(40)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = config([{"path": path, **entry}], **extra)
    train, _, _ = build_datasets(cfg, nobos)
    ids, labels, _ = one_by_one(build_strategy(cfg.datasets[0], cfg, nobos), rows)
    assert [list(r) for r in train["input_ids"]] == ids
    assert [list(r) for r in train["labels"]] == labels
    if case != "input_output":  # its rows write a literal <s> themselves
        assert all(r[0] != tokenizer.bos_token_id for r in ids)
