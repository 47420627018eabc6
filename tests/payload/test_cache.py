"""The prepared-dataset cache: a second build with the same inputs loads it, any input
that changes tokens misses it, and concurrent builders produce one cache between them.
Real files, the real tokenizer, and real processes for the race; nothing is mocked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import ASSETS, DATA, ROOT

from payload.config import validate_mapping
from payload.data import cache
from payload.data.build import build_datasets
from payload.model import load_tokenizer

ROWS = [json.loads(line) for line in DATA.read_text().splitlines()][:60]


def setup(tmp_path, rows=ROWS, **extra) -> dict:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "base_model": str(ASSETS / "tiny-llama"),
        "learning_rate": 1e-4,
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        **extra,
    }


def build(raw: dict):
    cfg = validate_mapping(raw)
    return build_datasets(cfg, load_tokenizer(cfg))


def folders(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_second_build_loads_the_cache(tmp_path):
    raw = setup(tmp_path, ROWS + [{"instruction": "x"}], val_set_size=0.1)
    train, evals, report = build(raw)
    assert not report.cache_hit and report.cache_path
    assert f"saved to cache {report.cache_path}" in report.lines()
    again, again_evals, hit = build(raw)
    assert hit.cache_hit and hit.cache_path == report.cache_path
    assert f"loaded from cache {report.cache_path}" in hit.lines()
    assert again["input_ids"] == train["input_ids"] and again_evals["labels"] == evals["labels"]
    # The counts come back with the rows: the run's summary says the same either way.
    assert hit.skipped == report.skipped == {"missing field `output`": 1}
    assert (hit.train_rows, hit.eval_rows, hit.tokens) == (54, 6, report.tokens)
    assert folders(tmp_path / "prepared") == [report.cache_path.rsplit("/", 1)[1]]


def test_settings_that_do_not_touch_tokens_share_the_cache(tmp_path):
    """A sweep over learning rates (or a copy of the same tokenizer) must not tokenize again."""
    raw = setup(tmp_path)
    first = build(raw)[2]
    copy = tmp_path / "tokenizer-copy"
    shutil.copytree(ASSETS / "tiny-tokenizer", copy)
    other = build({**raw, "learning_rate": 3e-3, "num_epochs": 5, "tokenizer_config": str(copy)})
    assert other[2].cache_hit and other[2].cache_path == first.cache_path


@pytest.mark.parametrize("change", ["data row", "special token", "tokenizer.json", "sequence_len"])
def test_any_change_to_the_tokens_misses(tmp_path, change):
    raw = setup(tmp_path)
    first = build(raw)[2]
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(ASSETS / "tiny-tokenizer", tokenizer)
    raw["tokenizer_config"] = str(tokenizer)
    assert build(raw)[2].cache_hit  # the copy alone changes nothing
    if change == "data row":
        rows = [dict(r) for r in ROWS]
        rows[7]["output"] += " Indeed."
        setup(tmp_path, rows)
    elif change == "special token":
        config = json.loads((tokenizer / "tokenizer_config.json").read_text())
        config["bos_token"] = "<|im_start|>"
        (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    elif change == "tokenizer.json":
        spec = json.loads((tokenizer / "tokenizer.json").read_text())
        spec["model"]["merges"] = spec["model"]["merges"][:-50]
        (tokenizer / "tokenizer.json").write_text(json.dumps(spec))
    else:
        raw["sequence_len"] = 300
    miss = build(raw)[2]
    assert not miss.cache_hit and miss.cache_path != first.cache_path
    assert len(folders(tmp_path / "prepared")) == 2


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    raw = setup(tmp_path, ROWS + [{"instruction": "x"}], strict=True)
    with pytest.raises(Exception, match=r"row 60: missing field `output` \(strict: true\)"):
        build(raw)
    assert folders(tmp_path / "prepared") == []
    raw["strict"] = False
    assert not build(raw)[2].cache_hit


def test_the_key_lists_its_inputs(tmp_path):
    raw = setup(tmp_path)
    report = build(raw)[2]
    inputs = json.loads(
        (tmp_path / "prepared" / report.cache_path.rsplit("/", 1)[1] / cache.INPUTS).read_text()
    )
    assert (
        inputs["format_version"] == cache.FORMAT_VERSION and inputs["code"] == cache.code_digest()
    )
    assert inputs["settings"]["sequence_len"] == 512
    assert set(inputs["sources"]) == {"datasets[0]"}


@pytest.mark.slow
def test_concurrent_builders_make_one_cache_and_both_load_it(tmp_path):
    """Two processes preparing the same config at once: one builds while the other waits
    on the lock, then loads what the first wrote. Without the lock both would tokenize
    and one rename would fail (or, worse, a reader would see a half-written folder)."""
    rows = [ROWS[i % len(ROWS)] for i in range(4000)]
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(setup(tmp_path, rows)))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "payload", "preprocess", str(config), "--result", f"r{i}.json"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for i in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    assert sorted(r["hit"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]
    assert results[0]["rows"]["kept"] == results[1]["rows"]["kept"] == 4000
    assert len(folders(tmp_path / "prepared")) == 1
    assert not [p for p in (tmp_path / "prepared").iterdir() if ".partial" in p.name]


def test_file_digests_are_remembered_until_the_file_changes(tmp_path, ferry_home, monkeypatch):
    """A big data file is read for its digest once, not on every run: a later process (here:
    the in-process memo cleared) takes it from $FERRY_HOME/cache/digests.json while size
    and mtime match, and hashes again after an edit."""
    from payload.config.schema import DatasetConfig
    from payload.data import sources

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ds = DatasetConfig(path=str(data), type="alpaca")
    first = sources.fingerprint(ds, "datasets[0]")
    assert str(data) in json.loads((ferry_home / "cache" / sources.DIGESTS).read_text())

    hashed: list[str] = []
    real = sources.sha256_file
    monkeypatch.setattr(sources, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    sources._sha256.cache_clear()
    assert sources.fingerprint(ds, "datasets[0]") == first and hashed == []

    with data.open("a") as f:
        f.write(json.dumps(ROWS[0]) + "\n")
    sources._sha256.cache_clear()
    assert sources.fingerprint(ds, "datasets[0]") != first and hashed == [str(data)]


def test_deduplication_gets_its_own_cache(tmp_path):
    """dataset_exact_deduplication changes the rows: a cache built without it is not
    loaded with it."""
    rows = ROWS[:20] + ROWS[:5]
    plain_train, _, plain = build(setup(tmp_path, rows))
    deduped_train, _, deduped = build(setup(tmp_path, rows, dataset_exact_deduplication=True))
    assert not deduped.cache_hit and deduped.cache_path != plain.cache_path
    assert (len(plain_train), len(deduped_train)) == (25, 20)
