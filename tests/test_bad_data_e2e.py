"""Malformed data files as a user meets them, through the real CLI (`launch train`, real
torchrun on CPU): a jsonl with a truncated line, a line that is not UTF-8 and a line that
is a JSON array trains on its good lines, and the log and summary.json count each reason
with its first file and line; with `strict: true` the run fails naming the first."""

from __future__ import annotations

import json

import pytest
from helpers import DATA, launch, quickstart_config

GOOD = DATA.read_bytes().splitlines()[:32]


def bad_config(tmp_path, extra: str = ""):
    """Lines 1-10 good, 11 truncated, 12-20 good, 21 not UTF-8, 22-25 good, 26 an array,
    then the rest good: 32 good lines, 3 bad."""
    lines = [
        *GOOD[:10],
        b'{"instruction": "Name a colour", "inp',
        *GOOD[10:19],
        b'{"instruction": "caf\xe9", "input": "", "output": "x"}',
        *GOOD[19:23],
        b'["not", "an", "object"]',
        *GOOD[23:],
    ]
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    config = quickstart_config(
        tmp_path, f"max_steps: 2\nsave_steps: 2\nmicro_batch_size: 4\n{extra}"
    )
    config.write_text(config.read_text().replace(str(DATA), str(data)))
    return config, data


@pytest.mark.slow
def test_bad_lines_are_skipped_and_counted_with_their_file_and_line(tmp_path, ferry_home):
    """A failure means a malformed line fails the run again (the `datasets` error), or is
    dropped without the log and summary.json naming it."""
    config, data = bad_config(tmp_path)
    result = launch("train", str(config), timeout=600, check=True)
    out = result.stdout
    assert "32 of 35 rows kept" in out
    assert f"skipped 1: not valid JSON (first: {data} line 11)" in out
    assert f"skipped 1: not valid UTF-8 (first: {data} line 21)" in out
    assert f"skipped 1: not a JSON object (first: {data} line 26)" in out
    assert "done: 2 steps" in out
    assert "Traceback" not in result.stderr
    # datasets' own ERROR line (rows counted from 0) would contradict the lines named above
    assert "Failed to load JSON" not in out + result.stderr
    summary = json.loads(next((ferry_home / "runs").glob("*/output/summary.json")).read_text())
    assert summary["rows"]["skipped"] == {
        "not valid JSON": 1,
        "not valid UTF-8": 1,
        "not a JSON object": 1,
    }
    assert summary["rows"]["skipped_first"] == {
        "not valid JSON": f"{data} line 11",
        "not valid UTF-8": f"{data} line 21",
        "not a JSON object": f"{data} line 26",
    }


@pytest.mark.slow
def test_strict_fails_naming_the_first_bad_line(tmp_path):
    config, data = bad_config(tmp_path, "strict: true\n")
    result = launch("train", str(config), timeout=600)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert f"datasets[0] ({data}): {data} line 11: not valid JSON (strict: true)." in output
    assert "Traceback" not in output
