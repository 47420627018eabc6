"""`launch preprocess` and bad rows as a user meets them, through the real CLI: the cache
is filled once and hit after, a training run loads it, a dataset with malformed rows
trains and its summary counts every reason, and `strict: true` stops at the first one."""

from __future__ import annotations

import json

import pytest
from helpers import DATA, ROOT, launch, quickstart_config

ROWS = [json.loads(line) for line in DATA.read_text().splitlines()][:64]
BAD = [
    {"instruction": "Say nothing."},  # row 64: no output
    {"instruction": "Count.", "output": 3},  # row 65: not text
    {"instruction": "  ", "output": "Empty."},  # row 66: empty
    {"instruction": "Say nothing else."},  # row 67: no output
    {"instruction": "Ramble.", "output": " ".join(["river"] * 400)},  # row 68: too long
]


def malformed_config(tmp_path, extra: str = ""):
    data = tmp_path / "malformed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS + BAD))
    settings = (
        f"dataset_prepared_path: {tmp_path / 'prepared'}\nmax_steps: 3\nsave_steps: 3\n"
        f"micro_batch_size: 4\n{extra}"
    )
    config = quickstart_config(tmp_path, settings)
    text = config.read_text().replace(str(DATA), str(data))
    config.write_text(text)
    return config, data


@pytest.mark.slow
def test_preprocess_fills_the_cache_then_hits_it(tmp_path):
    config, data = malformed_config(tmp_path)
    first = launch("preprocess", str(config), check=True)
    assert "(tokenized now)" in first.stdout and str(tmp_path / "prepared") in first.stdout
    assert "64 of 69 rows kept" in first.stdout and "rows/s" in first.stdout
    assert f"skipped 2: missing field `output` (first: datasets[0] ({data}) row 64)" in first.stdout
    second = launch("preprocess", str(config), "--json", check=True)
    result = json.loads(second.stdout)
    assert result["hit"] is True and not result["default_path"]
    assert result["rows"]["skipped"] == {
        "missing field `output`": 2,
        "field `output` is a int, not text": 1,
        "field `instruction` is empty": 1,
        "longer than sequence_len (256 tokens)": 1,
    }
    changed = launch("preprocess", str(config), "--set", "sequence_len=300", check=True)
    assert "(tokenized now)" in changed.stdout


@pytest.mark.slow
def test_preprocess_without_a_prepared_path_uses_ferry_home_and_says_so(tmp_path, ferry_home):
    config = quickstart_config(tmp_path)
    result = launch("preprocess", str(config), check=True)
    assert str(ferry_home / "prepared") in result.stdout
    assert "dataset_prepared_path is not set" in result.stderr


def test_preprocess_reports_config_problems_before_any_work(tmp_path):
    """Validation runs in the launcher, which never imports the training stack: with
    torch, transformers and datasets blocked it still answers (tests/launcher/test_cli.py
    has the blocker)."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("cli_tests", ROOT / "tests/launcher/test_cli.py")
    cli_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_tests)
    (tmp_path / "sitecustomize.py").write_text(cli_tests.BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    config = quickstart_config(tmp_path, "datasets: [{path: nowhere.jsonl, type: alpaca}]")
    result = launch("preprocess", str(config), env=env)
    assert result.returncode == 1 and "datasets[0].path" in result.stderr
    assert "Traceback" not in result.stderr and "BLOCKED-IMPORT" not in result.stderr
    assert launch("preprocess", "--help", env=env, check=True).stdout


@pytest.mark.slow
def test_strict_stops_at_the_first_bad_row_and_names_it(tmp_path):
    config, data = malformed_config(tmp_path, "strict: true\n")
    result = launch("preprocess", str(config))
    assert result.returncode == 1
    assert f"datasets[0] ({data}) row 64: missing field `output` (strict: true)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_malformed_rows_train_from_the_cache_and_the_summary_counts_them(tmp_path):
    config, data = malformed_config(tmp_path)
    launch("preprocess", str(config), check=True)
    result = launch("train", str(config), timeout=600, check=True)
    out = result.stdout
    assert "data: loaded from cache" in out
    assert f"data: skipped 2: missing field `output` (first: datasets[0] ({data}) row 64)" in out
    assert "data: skipped 1: longer than sequence_len (256 tokens)" in out
    assert "done: 3 steps" in out
    runs = json.loads(launch("runs", "--json", check=True).stdout)
    skipped = runs[0]["summary"]["rows"]["skipped"]
    assert skipped == {
        "missing field `output`": 2,
        "field `output` is a int, not text": 1,
        "field `instruction` is empty": 1,
        "longer than sequence_len (256 tokens)": 1,
    }


@pytest.mark.slow
def test_strict_training_run_fails_naming_the_row(tmp_path):
    config, data = malformed_config(tmp_path, "strict: true\n")
    result = launch("train", str(config), timeout=600)
    assert result.returncode == 1
    assert f"datasets[0] ({data}) row 64: missing field `output` (strict: true)" in (
        result.stdout + result.stderr
    )


@pytest.mark.slow
def test_streamed_pretraining_trains_for_max_steps(tmp_path, ferry_home):
    """`streaming: true` reads the corpus lazily: the run has no row count, so the step
    count comes from max_steps, and the stream is read again when it runs out."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"body": f"{r['instruction']} {r['output']}"}) + "\n" for r in ROWS)
    )
    config = tmp_path / "stream.yml"
    config.write_text(
        f"base_model: {ROOT / 'examples/assets/tiny-llama'}\n"
        f"pretraining_dataset:\n  - path: {corpus}\n    text_column: body\n"
        "streaming: true\nmax_steps: 6\nsequence_len: 64\nmicro_batch_size: 4\n"
        "learning_rate: 3.0e-3\noptimizer: adamw_torch\nadapter: lora\n"
        "lora_target_linear: true\nlogging_steps: 1\n"
    )
    result = launch("train", str(config), check=True, timeout=300)
    assert "pretraining_dataset streams" in result.stdout
    summary = json.loads(next((ferry_home / "runs").glob("*/output/summary.json")).read_text())
    assert summary["steps"] == 6
    assert summary["final_loss"] < summary["first_loss"]
