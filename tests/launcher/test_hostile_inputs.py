"""Hostile inputs through the real `launch` CLI: odd path values, broken files, bad
sweeps, profiles, `--set` overrides and launch sections. Each must end in one clean error
(exit 1) that names the key or the file, and never in a traceback. A failure here means a
user sees a Python stack trace, or an error that does not say what to fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import ASSETS, DATA, launch, quickstart_config

LONG = "x" * 300


def _clean_error(result, *expected: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


# ---- path values: (extra YAML on the quickstart, key named, what is said)
PATH_CASES = {
    "base_model_300_chars": (
        f"base_model: {LONG}",
        "base_model: `",
        "the path is too long (a name of 300 characters; the limit is 255 per name).",
    ),
    "base_model_nul": (
        'base_model: "models/tiny\\0llama"',
        "base_model: `models/tiny\\x00llama`",
        "contains a NUL byte, which no path can hold.",
    ),
    "dataset_path_too_long": (
        f"datasets: [{{path: ./{LONG}.jsonl, type: alpaca}}]",
        "datasets[0].path: `",
        "the path is too long (a name of 306 characters; the limit is 255 per name).",
    ),
    "dataset_path_nul": (
        'datasets: [{path: "data\\0.jsonl", type: alpaca}]',
        "datasets[0].path: `data\\x00.jsonl`",
        "contains a NUL byte",
    ),
    "data_files_nul": (
        f'datasets: [{{path: {DATA.parent}, type: alpaca, data_files: ["a\\0.jsonl"]}}]',
        "datasets[0].data_files: `a\\x00.jsonl`",
        "contains a NUL byte",
    ),
    "base_model_is_a_file": (
        f"base_model: {DATA}",
        "base_model: ",
        "alpaca_tiny.jsonl` is a file; a folder is expected.",
    ),
    "deepspeed_is_a_folder": (
        f"deepspeed: {ASSETS}",
        "deepspeed: ",
        "assets` is a folder; a file is expected.",
    ),
    "template_is_a_folder": (
        f"chat_template: jinja\nchat_template_jinja: {ASSETS}",
        "chat_template_jinja: ",
        "assets` is a folder; a file is expected.",
    ),
    "output_dir_is_a_file": (
        f"output_dir: {DATA}",
        "output_dir: ",
        "alpaca_tiny.jsonl` is a file; a folder is expected.",
    ),
    "output_dir_under_a_file": (
        f"output_dir: {DATA}/out",
        "output_dir: ",
        "alpaca_tiny.jsonl/out` cannot be made: `",
    ),
    "base_model_config_is_a_file": (
        f"base_model_config: {DATA}",
        "base_model_config: ",
        "alpaca_tiny.jsonl` is a file; a folder is expected.",
    ),
    "output_dir_too_long": (
        f"output_dir: out/{LONG}",
        "output_dir: `",
        "the path is too long (a name of 300 characters; the limit is 255 per name).",
    ),
    "unknown_home": (
        "base_model: ~nosuchuser_ferry/model",
        "base_model: `~nosuchuser_ferry/model`",
        "`~nosuchuser_ferry` names no user on this machine",
    ),
    "storage_nul": (
        'storage: "s3://bucket/\\0runs"',
        "storage: 's3://bucket/\\x00runs' holds a NUL byte",
    ),
}


@pytest.mark.parametrize("case", sorted(PATH_CASES))
def test_path_values_are_clean_errors_naming_the_key(tmp_path, case):
    extra, *expected = PATH_CASES[case]
    result = launch("validate", str(quickstart_config(tmp_path, extra)))
    _clean_error(result, *expected)


def test_non_utf8_path_from_set_names_the_key(tmp_path):
    """A byte that is not UTF-8 reaches Ferry as a lone surrogate (argv on Linux). The CLI
    refuses the argument, which holds the key, before anything reads it; through the API
    (`validate_mapping`, where no argv check runs) the value is refused naming the key."""
    from payload.config import validate_mapping
    from payload.config.loader import ConfigError

    cfg = quickstart_config(tmp_path)
    result = launch("validate", str(cfg), "--set", "base_model=mod\udcffel")
    _clean_error(result, "The argument 'base_model=mod\\xffel' is not UTF-8 text.")
    with pytest.raises(ConfigError) as e:
        validate_mapping({"base_model": "mod\udcffel", "learning_rate": 1e-4, "datasets": []})
    assert "base_model: `mod\\udcffel`: is not valid UTF-8 (it holds the undecodable " in str(
        e.value
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file: no unreadable file exists")
def test_unreadable_template_names_the_key(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{{ messages }}")
    template.chmod(0)
    cfg = quickstart_config(tmp_path, f"chat_template: jinja\nchat_template_jinja: {template}")
    _clean_error(
        launch("validate", str(cfg)),
        f"chat_template_jinja: `{template}` cannot be read (permission denied).",
    )


# ---- files given as the config, the sweep and the profile
def _file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A broken file of `kind` and what the error must say about it."""
    path = tmp_path / f"{kind}.yml"
    if kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
        return path, f"{path} is not UTF-8 text: byte 0x89 on line 1 cannot be decoded"
    if kind == "latin1":
        path.write_bytes(b"lr: 1\nname: caf\xe9\n")
        return path, f"{path} is not UTF-8 text: byte 0xe9 on line 2 cannot be decoded"
    if kind == "folder":
        path.mkdir()
        return path, f"{path} is a folder; give a YAML file."
    if kind == "list":
        path.write_text("- a\n- b\n")
        return path, f"{path} must hold a mapping of keys, not a list."
    if kind == "malformed":
        path.write_text("a: [1\n")
        return path, f"{path} is not valid YAML"
    if kind == "nul":
        path.write_text("a: b\x00\n")
        return path, f"{path} is not valid YAML"
    raise AssertionError(kind)


KINDS = ["binary", "latin1", "folder", "list", "malformed", "nul"]


@pytest.mark.parametrize("kind", KINDS)
def test_broken_config_file(tmp_path, kind):
    path, expected = _file(tmp_path, kind)
    _clean_error(launch("validate", str(path)), expected)


def test_empty_config_lists_what_is_required(tmp_path):
    path = tmp_path / "empty.yml"
    path.write_text("")
    _clean_error(
        launch("validate", str(path)),
        f"{path} has 3 problems:",
        "base_model: is required: a local model folder or a hub id.",
    )


def test_config_name_too_long(tmp_path):
    name = str(tmp_path / f"{LONG}.yml")
    _clean_error(
        launch("validate", name),
        "the path is too long (a name of 304 characters; the limit is 255 per name).",
    )


@pytest.mark.parametrize("kind", ["binary", "folder", "list", "malformed"])
def test_broken_sweep_file(tmp_path, kind):
    path, expected = _file(tmp_path, kind)
    cfg = quickstart_config(tmp_path)
    _clean_error(launch("sweep", str(cfg), "--sweep", str(path), "--dry-run"), expected)


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        ("learning_rate: 5\n", "sweep key `learning_rate`: needs a list of values, got 5"),
        ("lerning_rate: [1, 2]\n", "did you mean `learning_rate`?"),
        ("_: [5]\n", "sweep key `_[0]`: needs a mapping of key: value, got 5."),
        ("datasets.7.path: [a, b]\n", "datasets.7` needs a list index from 0 to 1"),
    ],
)
def test_sweep_with_wrong_types(tmp_path, grid, expected):
    path = tmp_path / "grid.yml"
    path.write_text(grid)
    cfg = quickstart_config(tmp_path)
    _clean_error(launch("sweep", str(cfg), "--sweep", str(path), "--dry-run"), expected)


@pytest.mark.parametrize("kind", ["binary", "folder", "list", "malformed"])
def test_broken_profile(tmp_path, kind):
    path, expected = _file(tmp_path, kind)
    cfg = quickstart_config(tmp_path)
    _clean_error(launch("train", str(cfg), "--profile", str(path), "--dry-run"), expected)


def test_profile_with_wrong_types(tmp_path):
    path = tmp_path / "profile.yml"
    path.write_text("dockerfile_commands: 5\nnodes: many\n")
    cfg = quickstart_config(tmp_path)
    _clean_error(
        launch("train", str(cfg), "--profile", str(path), "--dry-run"),
        f"{path} has 2 problems:",
        "image.commands:",
        "nodes:",
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("learning_rate", "--set 'learning_rate' is not of the form key=value."),
        ("datasets.7.path=x", "--set datasets.7.path: `datasets.7` needs a list index from 0 to 1"),
        ("learning_rate.x=1", "--set learning_rate.x: `learning_rate` holds 0.003"),
        ("lora_r=[1, 2", "lora_r: should be a valid integer"),
    ],
)
def test_bad_set_overrides(tmp_path, override, expected):
    cfg = quickstart_config(tmp_path)
    _clean_error(launch("validate", str(cfg), "--set", override), expected)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("launch: 5", "launch: should be a valid dictionary"),
        ("launch: {gpus: [1, 2]}", "launch.gpus:"),
        ("launch: {gpu: A100}", "launch.gpu: unknown key; did you mean `gpus`?"),
    ],
)
def test_bad_launch_section(tmp_path, extra, expected):
    cfg = quickstart_config(tmp_path, extra)
    _clean_error(launch("validate", str(cfg)), expected)
