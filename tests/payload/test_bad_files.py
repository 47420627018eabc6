"""Data files the fast loader (`datasets.load_dataset`) cannot read: lines that cannot be
rows are counted by reason with the first "<file> line N" and the rest train, `strict: true`
stops at the first, and a file that cannot be read at all is an error naming it. Real
files, the real `datasets`/pyarrow readers and the bundled tiny tokenizer, in-process."""

from __future__ import annotations

import json

import pytest
from helpers import ASSETS, DATA

from payload.config import FerryError, validate_mapping
from payload.data import sources
from payload.data.build import build_datasets

ROWS = [json.loads(line) for line in DATA.read_text().splitlines()][:6]
GOOD = [json.dumps(r).encode() for r in ROWS]
TRUNCATED = b'{"instruction": "Name a colour", "inp'
NOT_UTF8 = b'{"instruction": "caf\xe9", "input": "", "output": "x"}'
ARRAY = b'["an", "array"]'


def config(path, **extra):
    raw = {"base_model": str(ASSETS / "tiny-llama"), "learning_rate": 1e-4}
    return validate_mapping({**raw, "datasets": [{"path": str(path), "type": "alpaca"}], **extra})


def ids(rows) -> list[list[int]]:
    return [list(r) for r in rows["input_ids"]]


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
    """The token ids of ROWS from a clean jsonl: what the good lines must give."""
    path = tmp_path_factory.mktemp("ref") / "clean.jsonl"
    path.write_bytes(b"\n".join(GOOD) + b"\n")
    train, _, _ = build_datasets(config(path), tokenizer)
    return ids(train)


def bad_jsonl(tmp_path):
    """Lines 1-2 good, 3 truncated, 4 good, 5 not UTF-8, 6 an array, 7-10 good (a blank
    line 8 is no row)."""
    path = tmp_path / "rows.jsonl"
    lines = [GOOD[0], GOOD[1], TRUNCATED, GOOD[2], NOT_UTF8, ARRAY, GOOD[3], b"", *GOOD[4:]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_jsonl_lines_are_counted_by_reason_and_the_rest_train(tokenizer, tmp_path, reference):
    """A failure means a malformed line fails the whole dataset again, is dropped without
    being counted, or is named by the wrong line."""
    path = bad_jsonl(tmp_path)
    train, _, report = build_datasets(config(path), tokenizer)
    assert ids(train) == reference
    assert report.rows_in == 9 and report.rows_kept == 6
    assert report.skipped == {"not valid JSON": 1, "not valid UTF-8": 1, "not a JSON object": 1}
    summary = report.summary()
    assert summary["skipped_first"] == {
        "not valid JSON": f"{path} line 3",
        "not valid UTF-8": f"{path} line 5",
        "not a JSON object": f"{path} line 6",
    }
    assert f"skipped 1: not valid UTF-8 (first: {path} line 5)" in report.lines()


def test_strict_names_the_first_bad_line(tokenizer, tmp_path):
    path = bad_jsonl(tmp_path)
    with pytest.raises(FerryError) as e:
        build_datasets(config(path, strict=True), tokenizer)
    assert e.value.message == f"datasets[0] ({path}): {path} line 3: not valid JSON (strict: true)."


def test_a_split_slice_reads_the_good_rows(tokenizer, tmp_path, reference):
    path = bad_jsonl(tmp_path)
    cfg = config(path)
    cfg.datasets[0].split = "train[:50%]"
    train, _, _ = build_datasets(cfg, tokenizer)
    assert ids(train) == reference[:3]


def test_a_json_array_with_a_bad_element(tokenizer, tmp_path, reference):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([*ROWS[:3], "not an object", *ROWS[3:]]))
    train, _, report = build_datasets(config(path), tokenizer)
    assert ids(train) == reference
    assert report.skipped == {"not a JSON object": 1}
    assert report.examples["not a JSON object"] == f"{path} element 3"


def test_a_json_array_that_does_not_parse_is_an_error_naming_the_line(tokenizer, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in ROWS[:3]) + ",\n{oops\n]")
    with pytest.raises(FerryError, match=rf"{path} line 5 is not valid JSON") as e:
        build_datasets(config(path), tokenizer)
    assert "jsonl" in e.value.hint


def test_csv_rows_with_the_wrong_number_of_fields(tokenizer, tmp_path, reference):
    import datasets

    path = tmp_path / "rows.csv"
    datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    lines = path.read_text().splitlines()
    lines.insert(3, "only one field")
    lines.insert(5, 'too,many,fields,"here",x')
    path.write_text("\n".join(lines) + "\n")
    train, _, report = build_datasets(config(path), tokenizer)
    assert ids(train) == reference
    assert report.skipped == {"not as many CSV fields as the header": 2}
    assert report.examples["not as many CSV fields as the header"] == f"{path} line 4"


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_a_truncated_parquet_or_arrow_file_is_an_error_naming_it(tokenizer, tmp_path, kind):
    import datasets
    import pyarrow as pa

    path = tmp_path / f"rows.{kind}"
    if kind == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        table = pa.Table.from_pylist(ROWS)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FerryError, match=rf"{path} is not a readable {kind} file \(") as e:
        build_datasets(config(path), tokenizer)
    assert "truncated" in e.value.hint


def test_without_a_report_the_first_bad_line_is_an_error(tmp_path):
    """Callers that cannot count skipped rows (pretraining text) stop at the line instead
    of dropping it silently."""
    path = bad_jsonl(tmp_path)
    ds = config(path).datasets[0]
    with pytest.raises(FerryError) as e:
        sources.load_rows(ds, "x")
    assert e.value.message == f"x: {path} line 3: not valid JSON."


def test_good_files_never_reach_the_careful_reader(tokenizer, tmp_path, monkeypatch, reference):
    """The fast path stays as fast as it was: a spy on `careful` (our own function, only
    watched) sees no call for a clean file."""
    path = tmp_path / "clean.jsonl"
    path.write_bytes(b"\n".join(GOOD) + b"\n")
    calls = []
    monkeypatch.setattr(sources, "careful", lambda *a: calls.append(a))
    train, _, _ = build_datasets(config(path), tokenizer)
    assert ids(train) == reference and calls == []


# ---- the careful reader's own failures, files with no rows, and rows pyarrow refuses


def test_a_bad_split_of_a_bad_file_is_an_error_naming_the_split(tokenizer, tmp_path):
    """The careful reader must not read the file for a split it cannot pick."""
    path = bad_jsonl(tmp_path)
    cfg = config(path)
    cfg.datasets[0].split = "train[:x]"
    with pytest.raises(FerryError) as e:
        build_datasets(cfg, tokenizer)
    assert e.value.message == (
        f"Could not read datasets[0] ({path}): split `train[:x]`: "
        "Unrecognized instruction format: train[:x]"
    )


def test_an_os_error_while_reading_again_names_the_dataset_and_file(
    tokenizer, tmp_path, monkeypatch
):
    """The edge mocked: the filesystem (`Path.read_bytes`) failing between the fast
    loader's try and the careful reader's, as a file removed or unmounted would."""
    path = bad_jsonl(tmp_path)
    read_bytes = sources.Path.read_bytes

    def gone(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(sources.Path, "read_bytes", gone)
    with pytest.raises(FerryError) as e:
        build_datasets(config(path), tokenizer)
    assert e.value.message == (
        f"Could not read datasets[0] ({path}): {path}: [Errno 13] Permission denied: '{path}'"
    )


def test_an_empty_jsonl_is_an_error_naming_it(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n\n")
    with pytest.raises(FerryError) as e:
        build_datasets(config(path), tokenizer)
    assert e.value.message == f"Could not read datasets[0] ({path}): {path} is empty."


def test_a_jsonl_of_only_bad_lines_is_an_error_naming_the_first(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([TRUNCATED, ARRAY, NOT_UTF8]) + b"\n")
    with pytest.raises(FerryError) as e:
        build_datasets(config(path), tokenizer)
    assert e.value.message == (
        f"Could not read datasets[0] ({path}): {path} has no readable rows: 3 lines, all bad "
        f"(first: {path} line 1: not valid JSON)."
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_jsonl_whose_first_line_is_an_array_skips_only_that_line(
    tokenizer, tmp_path, reference, suffix
):
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(b"\n".join([ARRAY, *GOOD]) + b"\n")
    train, _, report = build_datasets(config(path), tokenizer)
    assert ids(train) == reference
    assert report.skipped == {"not a JSON object": 1}
    assert report.examples["not a JSON object"] == f"{path} line 1"


def test_lines_pyarrow_refuses_are_bad_rows_named_by_file_line(tokenizer, tmp_path, reference):
    """Each of these passes json.loads yet fails pyarrow's reader for the whole file once
    a truncated line has sent the file to the careful reader."""
    path = tmp_path / "rows.jsonl"
    clash = b'{"instruction": 5, "input": "", "output": "x"}'
    surrogate = b'{"instruction": "\\ud800", "input": "", "output": "x"}'
    twice = b'{"instruction": "a", "instruction": "b", "input": "", "output": "x"}'
    lines = [GOOD[0], clash, GOOD[1], GOOD[2], surrogate, GOOD[3], twice, *GOOD[4:], TRUNCATED]
    path.write_bytes(b"\n".join(lines) + b"\n")
    train, _, report = build_datasets(config(path), tokenizer)
    assert ids(train) == reference
    assert report.rows_in == 10 and report.rows_kept == 6
    assert report.examples == {
        "not valid JSON": f"{path} line 10",
        "not the same type as the other rows' `instruction`": f"{path} line 2",
        "not valid UTF-8": f"{path} line 5",
        "a field given twice": f"{path} line 7",
    }


def test_a_nested_type_clash_is_an_error_naming_the_file_line(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{**r, "meta": {"n": 1}} for r in ROWS[:3]] + [{**ROWS[3], "meta": {"n": "one"}}]
    path.write_text("\n".join([TRUNCATED.decode(), *map(json.dumps, rows)]) + "\n")
    with pytest.raises(FerryError) as e:
        build_datasets(config(path), tokenizer)
    assert e.value.message == (
        f"Could not read datasets[0] ({path}): {path} line 5: "
        "Column(/meta/n) changed from number to string."
    )
