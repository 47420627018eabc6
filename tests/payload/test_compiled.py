"""`launch validate` checks configs against TrainConfig's compiled form
(payload.config.compiled: pydantic-core's schema with light records for the models, kept
in a cache file), not against the pydantic models. These tests hold the two to the same
answers on every config we have and on a few hundred fuzzed ones, and check the cache:
built once, rebuilt when the config code changes or the file is damaged, skipped when it
cannot be written."""

from __future__ import annotations

import importlib.util
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT

from payload.config import FerryError, compiled, validate_mapping
from payload.config.schema import TrainConfig

EXAMPLES = ROOT / "examples"
CORPUS = ROOT / "tests" / "compat"

# One value for each check a field validator or a nested section makes, wrong and right.
BASE = {
    "base_model": "examples/assets/tiny-llama",
    "learning_rate": 1e-4,
    "datasets": [{"path": "examples/data/alpaca_tiny.jsonl", "type": "alpaca"}],
}
CRAFTED: list[dict[str, Any]] = [
    BASE,
    {**BASE, "launch": {"gpus": "H100:0", "memory": "lots", "timeout": "soon"}},
    {**BASE, "launch": {"gpus": "H100:8", "memory": "64GB", "timeout": "2h", "stop_grace": 90}},
    {**BASE, "launch": {"env": {"HF_TOKEN": "x", "PLAIN": "1"}, "max_cost": -1}},
    {**BASE, "launch": {"sky": {"infra": "awz/us-east-1", "accelerators": [], "cluster": "-x"}}},
    {**BASE, "launch": {"sky": {"infra": "aws/us-east-1", "accelerators": [" H100:8 "]}}},
    {**BASE, "launch": {"cloud": "ray", "ray": {"address": "http://h:8265", "worker": 1}}},
    {**BASE, "launch": {"volumes": [{"name": "v"}], "image": {"pip": "one"}}},
    {
        **BASE,
        "datasets": [{"path": "examples/data/alpaca_tiny.jsonl", "type": "alpaca_chat.load_qa"}],
    },
    {**BASE, "datasets": [{"path": "examples/data/alpaca_tiny.jsonl", "typ": "alpaca"}]},
    {**BASE, "datasets": [{"path": "nowhere/rows.jsonl", "type": "alpaca"}], "lora_r": "big"},
    {**BASE, "adapter": "lora", "lora_r": 8, "lora_target_modules": ["q_proj"]},
    {**BASE, "rl": "dpo", "trl": {"beta": 0.2, "max_completion_lenght": 3}},
    {**BASE, "rl": "grpo", "trl": {"use_vllm": True, "num_generations": 0}, "vllm": {"port": "x"}},
    {**BASE, "model_config": {"rope_theta": 1}, "overrides_of_model_config": {"x": 1}},
    {**BASE, "quantization": {"weight_dtype": "int3"}},
    {**BASE, "sample_packing": "sometimes", "num_epochs": -1, "micro_batch_size": 0},
    {**BASE, "learning_rate": None, "base_model": None, "datasets": None},
    {**BASE, "wandb_project": "p", "use_mlflow": True, "deepspeed": "nowhere.json"},
    {"base_model": 3, "datasets": "rows.jsonl"},
    {**BASE, "plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_rms_norm": True},
    {**BASE, "liger_rms_norm": True, "liger_glu_activaton": True},
]


def _fuzz() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_config", ROOT / "bench" / "fuzz_config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_config"] = module
    spec.loader.exec_module(module)
    return module


def _configs() -> list[tuple[dict[str, Any], Path]]:
    """(mapping, the folder its relative paths start from)."""
    found = [
        (yaml.safe_load(p.read_text()) or {}, p.parent) for p in sorted(EXAMPLES.glob("*.yml"))
    ]
    found += [(yaml.safe_load(p.read_text()) or {}, p.parent) for p in sorted(CORPUS.glob("*.yml"))]
    found += [(c, ROOT) for c in CRAFTED]
    fuzz, rng = _fuzz(), random.Random(20)
    seeds = fuzz.seeds()
    found += [(fuzz.mutate(rng.choice(seeds), rng), EXAMPLES) for _ in range(600)]
    return found


def _answer(raw: Any, base_dir: Path, *, compiled: bool) -> tuple[Any, ...]:
    """What validation says: the problems, or the validated config, and the warnings."""
    warnings: list[str] = []
    try:
        cfg = validate_mapping(raw, "c", base_dir=base_dir, warn=warnings.append, compiled=compiled)
    except FerryError as e:
        problems = getattr(e, "problems", None)
        said = sorted((p.key, p.message) for p in problems) if problems else e.message
        return "error", repr(said), warnings, None
    return "accepted", repr(cfg.model_dump()), warnings, type(cfg)


def test_the_compiled_form_answers_as_the_models_do(monkeypatch):
    """If this fails, a config gets another answer from `launch validate` than from a
    training run: the problems (keys and messages), the warnings, or the values."""
    monkeypatch.chdir(ROOT)  # the crafted configs name files from the repository root
    outcomes = {"accepted": 0, "error": 0}
    checked_plugins = 0
    for raw, base_dir in _configs():
        models = _answer(raw, base_dir, compiled=False)
        records = _answer(raw, base_dir, compiled=True)
        assert records[:3] == models[:3], raw
        outcomes[models[0]] += 1
        if models[0] == "accepted":
            assert models[3] is TrainConfig or issubclass(models[3], TrainConfig)
            lists_plugins = isinstance(raw, dict) and raw.get("plugins")
            # a config that lists plugins is checked with the models (their keys are models)
            expected = models[3] if lists_plugins else compiled.TrainConfig
            assert records[3] is expected, raw
            checked_plugins += bool(lists_plugins)
    # Both outcomes, in numbers: the comparison is not only of refusals.
    assert outcomes["accepted"] >= 30 and outcomes["error"] >= 500, outcomes
    assert checked_plugins >= 1


def test_records_read_and_copy_as_the_models_do():
    raw = {**BASE, "adapter": "lora", "lora_r": 8, "datasets": [{**BASE["datasets"][0]}]}
    raw["datasets"][0]["type"] = "alpaca_w_system.load_open_orca"
    model = validate_mapping(raw, resolve_paths=False)
    record = validate_mapping(raw, resolve_paths=False, compiled=True)
    assert isinstance(record, compiled.TrainConfig) and not isinstance(record, TrainConfig)
    # the helper properties are the models' own
    assert record.effective_lora_alpha == model.effective_lora_alpha == 16
    assert record.datasets[0].type_name == model.datasets[0].type_name == "alpaca_w_system"
    assert record.model_fields_set == model.model_fields_set
    assert record.model_fields_set == {
        "base_model",
        "learning_rate",
        "datasets",
        "adapter",
        "lora_r",
    }
    # model_copy: updated values, counted as set; the original untouched
    for cfg in (model, record):
        copy = cfg.model_copy(update={"lora_alpha": 4})
        assert copy.effective_lora_alpha == 4 and cfg.effective_lora_alpha == 16
        assert "lora_alpha" in copy.model_fields_set and "lora_alpha" not in cfg.model_fields_set
    assert record.model_copy() == record and record.model_copy(update={"lora_r": 2}) != record
    # setting a field: counted as set; a name that is no field: the same refusal
    for cfg in (model, record):
        cfg.lora_dropout = 0.1
        assert "lora_dropout" in cfg.model_fields_set and cfg.lora_dropout == 0.1
        with pytest.raises(ValueError, match='"TrainConfig" object has no field "lora_rr"'):
            cfg.lora_rr = 3


def _compile_in_a_new_process(home: Path, before: str = "") -> bool:
    """Compile TrainConfig as `launch validate` does, in a fresh interpreter (no models
    loaded yet) with `home` as FERRY_HOME; whether it had to build the models."""
    script = "\n".join(
        [
            "import sys",
            before,
            "from payload.config import compiled",
            "assert compiled.train_config().model_validate({'lora_r': 3}).lora_r == 3",
            "print('BUILT' if 'payload.config.schema' in sys.modules else 'READ')",
        ]
    )
    env = {**os.environ, "FERRY_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1] == "BUILT"


def _cache_of(home: Path) -> Path:
    (path,) = (home / "cache").iterdir()
    return path


def test_the_cache_is_built_once_then_read(tmp_path):
    assert _compile_in_a_new_process(tmp_path)
    path = _cache_of(tmp_path)
    written = path.stat().st_mtime_ns
    assert not _compile_in_a_new_process(tmp_path)
    assert not _compile_in_a_new_process(tmp_path)
    assert path.stat().st_mtime_ns == written
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert path.name.startswith("config-schema-") and path.suffix == ".pickle"


@pytest.mark.parametrize("damage", ["a source changed", "torn file", "other format"])
def test_a_stale_or_damaged_cache_is_rebuilt(tmp_path, damage):
    """If this fails, `launch validate` would check configs against an old schema after
    the config code changed (or crash on a half-written file)."""
    assert _compile_in_a_new_process(tmp_path)
    path = _cache_of(tmp_path)
    data = pickle.loads(path.read_bytes())
    if damage == "a source changed":
        mtime, size = data["sources"]["schema.py"]
        data["sources"]["schema.py"] = (mtime, size + 1)
        path.write_bytes(pickle.dumps(data))
    elif damage == "torn file":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(pickle.dumps({**data, "format": compiled.FORMAT + 1}))
    assert _compile_in_a_new_process(tmp_path)
    assert pickle.loads(path.read_bytes())["sources"] == compiled.sources()
    assert not _compile_in_a_new_process(tmp_path)


def test_a_process_that_had_the_models_loaded_writes_no_cache(monkeypatch, tmp_path):
    """Its models may be older than the files (a notebook, the files edited since): the
    cache would hold the old schema under the new files' stamps. It compiles in memory."""
    monkeypatch.setenv("FERRY_HOME", str(tmp_path))
    assert "payload.config.schema" in sys.modules  # this test module imported it
    assert compiled.train_config().model_validate({"lora_r": 3}).lora_r == 3
    assert not (tmp_path / "cache").exists()
    # A new process, with nothing loaded, writes it.
    assert _compile_in_a_new_process(tmp_path) and _cache_of(tmp_path).is_file()


def test_a_cache_that_cannot_be_kept_only_costs_time(tmp_path):
    """No cache where FERRY_HOME is a file (nothing can be written) or where there is no
    home folder at all (a container user with no HOME and no passwd entry: Path.home()
    fails, as the stdlib does there): validate checks with freshly built models."""
    blocker = tmp_path / "home"
    blocker.write_text("a file where the folder would go")
    assert _compile_in_a_new_process(blocker)
    assert _compile_in_a_new_process(blocker)  # built again: nothing was kept
    assert blocker.read_text() == "a file where the folder would go"
    no_home = (
        "import os, pathlib\n"
        "os.environ.pop('FERRY_HOME')\n"
        "def _home(): raise RuntimeError('Could not determine home directory.')\n"
        "pathlib.Path.home = staticmethod(_home)"
    )
    assert _compile_in_a_new_process(tmp_path / "unused", before=no_home)
    assert not (tmp_path / "unused").exists()


def test_launch_validate_works_with_no_home_folder(tmp_path):
    script = (
        "import pathlib, sys\n"
        "def _home(): raise RuntimeError('Could not determine home directory.')\n"
        "pathlib.Path.home = staticmethod(_home)\n"
        "sys.argv = ['launch', 'validate', 'examples/quickstart.yml']\n"
        "from launcher.cli import main\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FERRY_HOME", "HOME")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "examples/quickstart.yml is valid" in done.stdout


def test_every_helper_of_a_model_is_on_its_record():
    """A property or method added to a model in schema.py must be on its record too (in
    vocab.py's helper classes, which both share), or `launch validate` would fail where
    training does not."""
    from pydantic import BaseModel

    from payload.config import schema

    checked = 0
    for name in ("TrainConfig", "DatasetConfig", "LaunchConfig", "SkyLaunch", "TRLConfig"):
        model, record = getattr(schema, name), getattr(compiled, name)
        own = {
            a
            for a in dir(model)
            if not a.startswith("_") and a not in dir(BaseModel) and a not in model.model_fields
        }
        assert own <= set(dir(record)), own - set(dir(record))
        checked += len(own)
    assert checked >= 2  # type_name, effective_lora_alpha


def test_a_model_without_a_record_refuses_to_compile(monkeypatch):
    """Adding a model to schema.py without its record here fails loudly, in this test
    (the cache could not be read back without it)."""
    monkeypatch.delattr(compiled, "VllmConfig")
    with pytest.raises(RuntimeError, match="no record for the model VllmConfig"):
        compiled.build()
