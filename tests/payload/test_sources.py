"""Where rows come from and how they are mixed: every local file type, saved folders,
folders of data files, s3:// (a real S3 API: moto's server on 127.0.0.1, the `s3_bucket`
fixture), shards, mixing, eval sets, pretraining blocks, and the length rules. All on the
bundled tiny tokenizer, in-process, through `build_datasets`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ASSETS, DATA, write_jsonl
from helpers import tiny_config as config

from payload.config import FerryError, validate_mapping
from payload.data.build import build_datasets
from payload.data.core import build_strategy

ROWS = [json.loads(line) for line in DATA.read_text().splitlines()][:40]


def alpaca(path, **extra) -> dict:
    return {"path": str(path), "type": "alpaca", **extra}


def ids(rows) -> list[list[int]]:
    return [list(r) for r in rows["input_ids"]]


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
    """The token ids of ROWS read from a .jsonl file: what every other source must give."""
    path = write_jsonl(tmp_path_factory.mktemp("ref") / "rows.jsonl", ROWS)
    train, _, _ = build_datasets(config([alpaca(path)]), tokenizer)
    return ids(train)


def write_as(kind: str, folder) -> str:
    import datasets
    import pyarrow as pa

    rows = datasets.Dataset.from_list(ROWS)
    path = folder / f"rows.{kind}"
    if kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "csv":
        rows.to_csv(str(path), index=False)
    elif kind == "parquet":
        rows.to_parquet(str(path))
    elif kind == "arrow":
        table = pa.Table.from_pylist(ROWS)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    return str(path)


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "arrow"])
def test_every_local_file_type_gives_the_same_tokens(tokenizer, tmp_path, reference, kind):
    train, _, report = build_datasets(config([alpaca(write_as(kind, tmp_path))]), tokenizer)
    assert ids(train) == reference and report.rows_kept == len(ROWS)


def test_saved_folders_and_their_splits(tokenizer, tmp_path, reference):
    import datasets

    rows = datasets.Dataset.from_list(ROWS)
    rows.save_to_disk(str(tmp_path / "one"))
    train, _, _ = build_datasets(config([alpaca(tmp_path / "one")]), tokenizer)
    assert ids(train) == reference
    split = datasets.DatasetDict({"train": rows.select(range(3)), "validation": rows})
    split.save_to_disk(str(tmp_path / "dict"))
    train, _, _ = build_datasets(config([alpaca(tmp_path / "dict", split="validation")]), tokenizer)
    assert ids(train) == reference
    with pytest.raises(FerryError, match=r"datasets\[0\] .*no split `test`; it has train, valid"):
        build_datasets(config([alpaca(tmp_path / "dict", split="test")]), tokenizer)


def test_a_folder_of_data_files(tokenizer, tmp_path, reference):
    folder = tmp_path / "parts"
    write_jsonl(folder / "a.jsonl", ROWS[:25])
    write_jsonl(folder / "sub" / "b.jsonl", ROWS[25:])
    (folder / "README.md").write_text("not data")
    train, _, _ = build_datasets(config([alpaca(folder)]), tokenizer)
    assert ids(train) == reference  # every .jsonl, in path order
    train, _, _ = build_datasets(config([alpaca(folder, data_files=["sub/b.jsonl"])]), tokenizer)
    assert ids(train) == reference[25:]
    write_as("csv", folder)
    with pytest.raises(FerryError, match="mixes csv, json files") as e:
        build_datasets(config([alpaca(folder)]), tokenizer)
    assert "ds_type" in str(e.value)
    train, _, _ = build_datasets(config([alpaca(folder, ds_type="csv")]), tokenizer)
    assert ids(train) == reference


def test_unreadable_files_name_the_dataset(tokenizer, tmp_path):
    """A file that cannot be read at all (a JSON array that does not parse) is an error
    naming the dataset; a jsonl with bad lines is read around them (test_bad_files)."""
    bad = tmp_path / "broken.jsonl"
    bad.write_text('[{"instruction": "x", "output": "y"},\n{not json\n]')
    with pytest.raises(FerryError, match=r"Could not read datasets\[0\] \(.*broken.jsonl\)"):
        build_datasets(config([alpaca(bad)]), tokenizer)


def test_s3_file_and_prefix_are_downloaded_once(tokenizer, tmp_path, s3_bucket, reference):
    """Against moto's S3 server: the rows arrive, and a second build with unchanged
    objects (same ETags) reads the local copy instead of downloading again."""
    import boto3

    from payload.storage.stores import S3Store

    s3 = boto3.client("s3")
    s3.put_object(
        Bucket=s3_bucket, Key="data/rows.jsonl", Body=Path(write_as("json", tmp_path)).read_bytes()
    )
    for name, part in (("a", ROWS[:10]), ("b", ROWS[10:])):
        body = "".join(json.dumps(r) + "\n" for r in part)
        s3.put_object(Bucket=s3_bucket, Key=f"parts/{name}.jsonl", Body=body)
    fetched: list[str] = []
    real = S3Store.get_files

    def spy(self, items):
        fetched.extend(key for key, _ in items)
        return real(self, items)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S3Store, "get_files", spy)
        one = config([alpaca(f"s3://{s3_bucket}/data/rows.jsonl")])
        prefix = config([alpaca(f"s3://{s3_bucket}/parts")])
        assert ids(build_datasets(one, tokenizer)[0]) == reference
        assert ids(build_datasets(prefix, tokenizer)[0]) == reference
        assert fetched == ["data/rows.jsonl", "parts/a.jsonl", "parts/b.jsonl"]
        assert ids(build_datasets(one, tokenizer)[0]) == reference
        assert ids(build_datasets(prefix, tokenizer)[0]) == reference
        assert len(fetched) == 3  # nothing downloaded the second time
        s3.put_object(Bucket=s3_bucket, Key="parts/b.jsonl", Body=json.dumps(ROWS[10]) + "\n")
        assert len(build_datasets(prefix, tokenizer)[0]) == 11  # a new ETag: fetched again
        assert len(fetched) == 5
    with pytest.raises(FerryError, match=r"datasets\[0\] .*no object at s3://"):
        build_datasets(config([alpaca(f"s3://{s3_bucket}/missing.jsonl")]), tokenizer)


def test_shards_keep_one_contiguous_part_and_report_file_rows(tokenizer, tmp_path, reference):
    rows = list(ROWS)
    rows[17] = {"instruction": "x"}  # in shard 1 of 3 (rows 14..26)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    train, _, report = build_datasets(config([alpaca(path, shards=3, shards_idx=1)]), tokenizer)
    assert ids(train) == reference[14:17] + reference[18:27]
    assert report.examples["missing field `output`"].endswith("rows.jsonl) row 17")


def test_mixing_shuffles_only_several_datasets(tokenizer, tmp_path, reference):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:20])
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[20:])
    single, _, _ = build_datasets(config([alpaca(a)], shuffle_merged_datasets=True), tokenizer)
    assert ids(single) == reference[:20]  # one dataset keeps its order
    both = config([alpaca(a), alpaca(b)])
    mixed = ids(build_datasets(both, tokenizer)[0])
    assert mixed != reference and sorted(mixed) == sorted(reference)
    assert ids(build_datasets(both, tokenizer)[0]) == mixed  # seeded
    other_seed = ids(build_datasets(config([alpaca(a), alpaca(b)], seed=7), tokenizer)[0])
    assert other_seed != mixed
    kept = config([alpaca(a), alpaca(b)], shuffle_merged_datasets=False)
    assert ids(build_datasets(kept, tokenizer)[0]) == reference


def test_test_datasets_are_the_eval_set(tokenizer, tmp_path, reference):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:30])
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[30:] + [{"instruction": "x"}])
    train, evals, report = build_datasets(config([alpaca(a)], test_datasets=[alpaca(b)]), tokenizer)
    assert ids(train) == reference[:30] and ids(evals) == reference[30:]
    assert (report.train_rows, report.eval_rows) == (30, 10)
    assert report.examples["missing field `output`"].startswith("test_datasets[0]")


def test_dataset_shard_num_keeps_one_shard_of_the_mix(tokenizer, tmp_path, reference):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cfg = config([alpaca(path)], dataset_shard_num=4, dataset_shard_idx=3)
    train, _, report = build_datasets(cfg, tokenizer)
    assert ids(train) == reference[30:]
    assert "dataset_shard_num: kept shard 3 of 4 (10 of 40 rows)" in report.lines()


def long_rows() -> list[dict]:
    long = {**ROWS[0], "output": " ".join(["river"] * 400)}
    return [ROWS[1], long, ROWS[2]]


def test_excess_length_drop_truncate_raise(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", long_rows())
    train, _, report = build_datasets(config([alpaca(path)], sequence_len=128), tokenizer)
    assert len(train) == 2 and report.skipped == {"longer than sequence_len (128 tokens)": 1}
    cfg = config([alpaca(path)], sequence_len=128, excess_length_strategy="truncate")
    train, _, report = build_datasets(cfg, tokenizer)
    assert [len(r) for r in train["input_ids"]][1] == 128 and not report.skipped
    assert report.truncated == 1 and report.truncated_example.endswith("row 1")
    assert "truncated to sequence_len: 1 (first: datasets[0]" in "\n".join(report.lines())
    cfg = config([alpaca(path)], sequence_len=128, excess_length_strategy="raise")
    with pytest.raises(FerryError, match=r"datasets\[0\] \(.*rows.jsonl\) row 1: \d+ tokens"):
        build_datasets(cfg, tokenizer)


def test_truncation_that_leaves_nothing_to_train_skips_the_row(tokenizer, tmp_path):
    row = {**ROWS[0], "instruction": " ".join(["river"] * 400)}
    path = write_jsonl(tmp_path / "rows.jsonl", [ROWS[1], row])
    cfg = config([alpaca(path)], sequence_len=128, excess_length_strategy="truncate")
    _, _, report = build_datasets(cfg, tokenizer)
    assert list(report.skipped) == [
        "no trained tokens left once truncated to sequence_len (128 tokens)"
    ]


def test_several_processes_give_the_same_rows_and_reports(tokenizer, tmp_path):
    rows = [ROWS[i % len(ROWS)] for i in range(3000)]
    rows[2500] = {"instruction": "x"}
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    one = build_datasets(config([alpaca(path)], dataset_processes=1), tokenizer)
    two = build_datasets(config([alpaca(path)], dataset_processes=2), tokenizer)
    assert ids(one[0]) == ids(two[0]) and two[2].processes == 2
    assert (
        one[2].examples
        == two[2].examples
        == {"missing field `output`": f"datasets[0] ({path}) row 2500"}
    )


def test_the_progress_bar_tokenizes_in_chunks_with_the_same_result(
    tokenizer, tmp_path, monkeypatch
):
    from payload.data import tokenize

    rows = [ROWS[i % len(ROWS)] for i in range(250)]
    rows[230] = {"instruction": "x"}
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    plain = build_datasets(config([alpaca(path)]), tokenizer, progress=False)
    monkeypatch.setattr(tokenize, "TASK", 40)  # tasks of 40 rows instead of 4,000
    chunked = build_datasets(config([alpaca(path)]), tokenizer, progress=True)
    assert ids(chunked[0]) == ids(plain[0])
    assert chunked[2].examples == plain[2].examples
    assert plain[2].examples["missing field `output`"].endswith("row 230")


# ---- pretraining


def docs(n: int = 12) -> list[dict]:
    return [
        {"text": f"Document {i} says the river is {'long ' * (i % 5)}and cold."} for i in range(n)
    ]


def test_pretraining_blocks_are_the_joined_documents_cut_exactly(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", docs() + [{"text": ""}])
    cfg = config([], pretraining_dataset=[{"path": path}], sequence_len=16)
    train, _, report = build_datasets(cfg, tokenizer)
    strategy = build_strategy(
        cfg.pretraining_dataset[0].model_copy(update={"type": "pretrain"}), cfg, tokenizer
    )
    joined = [t for d in docs() for t in strategy(d)["input_ids"]]
    assert joined.count(tokenizer.eos_token_id) == 12  # eos between the documents
    blocks = [joined[i : i + 16] for i in range(0, len(joined) - 15, 16)]
    assert ids(train) == blocks and train["labels"] == blocks
    assert all(sum(m) == 16 for m in train["attention_mask"])
    assert report.skipped == {"field `text` is empty": 1}
    tail = len(joined) - 16 * len(blocks)
    assert f"the last {tail} tokens (less than a block) dropped" in "\n".join(report.lines())


def test_streaming_pretraining_gives_the_same_blocks(tokenizer, tmp_path):
    import datasets

    path = write_jsonl(tmp_path / "corpus.jsonl", docs() + [{"text": 5}])
    eager = config([], pretraining_dataset=[{"path": path}], sequence_len=16)
    streamed = eager.model_copy(update={"streaming": True, "max_steps": 3})
    expected, _, _ = build_datasets(eager, tokenizer)
    train, _, report = build_datasets(streamed, tokenizer)
    assert isinstance(train, datasets.IterableDataset)
    assert [r["input_ids"] for r in train] == ids(expected)
    assert report.skipped == {"field `text` is a int, not text": 1}
    assert [r["input_ids"] for r in train] == ids(expected)  # a second epoch: same blocks
    assert report.rows_in == 13  # counted once
    with pytest.raises(FerryError, match="cannot be mixed into a streamed"):
        build_datasets(
            streamed.model_copy(update={"datasets": eager.pretraining_dataset}), tokenizer
        )


def test_dataset_paths_are_checked_before_launch(tmp_path):
    from payload.config import ConfigError

    raw = {
        "base_model": str(ASSETS / "tiny-llama"),
        "learning_rate": 1e-4,
        "datasets": [alpaca(DATA), alpaca("s3://"), alpaca("gs://bucket/x.jsonl")],
        "test_datasets": [alpaca("nowhere/eval.jsonl")],
        "pretraining_dataset": [{"path": str(tmp_path), "data_files": ["gone.jsonl"]}],
        "dataset_prepared_path": "s3://bucket/cache",
    }
    with pytest.raises(ConfigError) as e:
        validate_mapping(raw)
    found = {p.key: p.message for p in e.value.problems}
    assert "names no bucket" in found["datasets[1].path"]
    assert "s3:// URIs, local paths and hub ids" in found["datasets[2].path"]
    assert "does not exist" in found["test_datasets[0].path"]
    assert "`gone.jsonl` is not in" in found["pretraining_dataset[0].data_files"]
    assert "local folder" in found["dataset_prepared_path"]
    ok = validate_mapping(
        {
            **raw,
            "datasets": [alpaca(f"s3://bkt/{DATA.name}")],
            "test_datasets": [],
            "pretraining_dataset": None,
            "dataset_prepared_path": "prep",
        }
    )
    assert ok.datasets[0].path == f"s3://bkt/{DATA.name}"


def test_exact_duplicates_are_dropped_and_counted(tokenizer, tmp_path):
    """dataset_exact_deduplication: rows 0 and 1 repeat in the train file (twice and
    once), and the eval file repeats train row 1 and holds one new row."""
    a, b, c = ROWS[0], ROWS[1], ROWS[2]
    train_path = write_jsonl(tmp_path / "train.jsonl", [a, b, a, c, b, a])
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [b, ROWS[3]])
    entries = {"datasets": [alpaca(train_path)]}
    cfg = config(**entries, test_datasets=[alpaca(eval_path)], dataset_exact_deduplication=True)
    train, eval_set, report = build_datasets(cfg, tokenizer)
    plain, plain_eval, _ = build_datasets(
        cfg.model_copy(update={"dataset_exact_deduplication": None}), tokenizer
    )
    assert ids(train) == [ids(plain)[0], ids(plain)[1], ids(plain)[3]]  # a, b, c
    assert ids(eval_set) == [ids(plain_eval)[1]]  # b was in the train rows
    duplicate = "an exact duplicate of an earlier row (dataset_exact_deduplication)"
    assert report.skipped == {duplicate: 4}
    assert report.examples[duplicate] == "the train rows' row 2 (counted after mixing)"
    assert report.rows_in == 8 and report.rows_kept == 4
    assert f"skipped 4: {duplicate}" in "\n".join(report.lines())
    assert len(plain) == 6 and len(plain_eval) == 2  # without the key nothing is dropped
