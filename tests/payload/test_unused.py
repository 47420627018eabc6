"""payload.runtime.unused: which installed packages a training process keeps out, decided
from the config alone, and that keeping one out really stops its import (in a fresh
process, as a rank starts)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ASSETS, ROOT

from payload.config.schema import OPTIMIZERS, TrainConfig
from payload.runtime import unused
from payload.runtime.unused import keep_out, needs_bitsandbytes, needs_comet, needs_torchao

TINY = str(ASSETS / "tiny-llama")


def config(**extra) -> TrainConfig:
    return TrainConfig.model_validate(
        {"base_model": TINY, "datasets": [{"path": "x.jsonl", "type": "alpaca"}], **extra}
    )


@pytest.mark.parametrize(
    ("extra", "needed"),
    [
        ({}, False),
        ({"load_in_4bit": True, "adapter": "qlora"}, True),
        ({"load_in_8bit": True, "adapter": "lora"}, True),
        ({"optimizer": "adamw_bnb_8bit"}, True),
        ({"optimizer": "paged_adamw_32bit"}, True),
        ({"optimizer": "adamw_torch_fused"}, False),
        # A hub model this machine has never fetched: it may be saved in 4 bits.
        ({"base_model": "someone/not-downloaded-model-xyz"}, True),
    ],
)
def test_bitsandbytes_is_kept_only_when_the_run_may_use_it(extra, needed):
    assert needs_bitsandbytes(config(**extra)) is needed


def test_a_model_saved_in_4_bits_keeps_bitsandbytes(tmp_path):
    """A checkpoint whose config.json says bitsandbytes quantized it (as the bnb-4bit
    uploads on the hub do) needs it to load, with no load_in_4bit in the config."""
    saved = json.loads((ASSETS / "tiny-llama" / "config.json").read_text())
    saved["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert needs_bitsandbytes(config(base_model=str(tmp_path)))
    saved["quantization_config"] = {"quant_method": "gptq"}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert not needs_bitsandbytes(config(base_model=str(tmp_path)))


@pytest.mark.parametrize(
    ("extra", "needed"),
    [
        ({}, False),
        # The HF Trainer's torchao optimizers (torchao.optim's AdamW4bit, AdamW8bit).
        ({"optimizer": "adamw_torch_4bit"}, True),
        ({"optimizer": "adamw_torch_8bit"}, True),
        # Axolotl's own torchao optimizers (refused by Ferry's rules; kept all the same).
        ({"optimizer": "ao_adamw_fp8"}, True),
        ({"optimizer": "adamw_torch_fused"}, False),
        ({"optimizer": "adamw_bnb_8bit"}, False),
        ({"optimizer": "paged_adamw_8bit"}, False),
        # QLoRA quantizes with bitsandbytes, not torchao.
        ({"load_in_4bit": True, "adapter": "qlora"}, False),
        # Read by `launch quantize` alone, in the launcher's process (no keep_out there).
        ({"quantization": {"weight_dtype": "int4", "group_size": 32}}, False),
        # `model_config:` puts a quantization on the model's config itself.
        ({"model_config": {"quantization_config": {"quant_method": "torchao"}}}, True),
        # A hub model this machine has never fetched: it may be saved by torchao.
        ({"base_model": "someone/not-downloaded-model-xyz"}, True),
    ],
)
def test_torchao_is_kept_only_when_the_run_may_use_it(extra, needed):
    assert needs_torchao(config(**extra)) is needed


def test_every_optimizer_on_torchao_keeps_it():
    """If this fails, transformers runs another of Ferry's optimizer names on torchao (or
    no longer runs one on it): TORCHAO_OPTIMIZERS in payload/runtime/unused.py must
    follow, or that run fails with `torchao` kept out."""
    from transformers.trainer_optimizer import _TORCHAO_OPTIMIZERS

    on_torchao = {str(name.value) for name in _TORCHAO_OPTIMIZERS} & set(OPTIMIZERS)
    assert on_torchao == {"adamw_torch_4bit", "adamw_torch_8bit"}
    assert {name for name in OPTIMIZERS if needs_torchao(config(optimizer=name))} == on_torchao


@pytest.mark.parametrize(
    ("quantization_config", "needed"),
    [
        (
            {
                "quant_method": "torchao",
                "quant_type": {"default": {"_type": "Int8WeightOnlyConfig"}},
            },
            True,
        ),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, False),
        ({"quant_method": "gptq"}, False),
        (None, False),
    ],
)
def test_a_model_saved_by_torchao_keeps_it(tmp_path, quantization_config, needed):
    """A checkpoint whose config.json says torchao quantized it (as `launch quantize`
    writes them) needs torchao to load, whatever the training config says."""
    saved = json.loads((ASSETS / "tiny-llama" / "config.json").read_text())
    if quantization_config is not None:
        saved["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert needs_torchao(config(base_model=str(tmp_path))) is needed


def test_keep_out_blocks_only_what_the_run_does_not_use(monkeypatch):
    """With a stand-in for sys.modules: a plain run blocks all three; a torchao optimizer
    keeps torchao (and, by its name, bitsandbytes); a package already imported is never
    touched."""
    modules: dict = {}
    monkeypatch.setattr(unused, "sys", type("Sys", (), {"modules": modules}))
    assert keep_out(config()) == ["comet_ml", "bitsandbytes", "torchao"]
    assert modules == {"comet_ml": None, "bitsandbytes": None, "torchao": None}
    modules.clear()
    assert keep_out(config(optimizer="adamw_torch_8bit")) == ["comet_ml"]
    modules.clear()
    imported = object()
    modules["torchao"] = imported
    assert keep_out(config()) == ["comet_ml", "bitsandbytes"]
    assert modules["torchao"] is imported


def test_comet_is_kept_only_for_a_run_that_reports_to_it():
    assert not needs_comet(config(use_wandb=True, wandb_mode="offline"))
    assert needs_comet(config(use_comet=True, comet_online=False))


@pytest.mark.slow
def test_a_kept_out_package_is_never_imported_by_the_training_stack():
    """In a fresh process: with the quickstart's config, importing the training code
    (transformers, peft, the trainers) imports none of comet_ml, bitsandbytes and
    torchao, all installed here; without keep_out, it imports all three."""
    probe = (
        "import sys\n"
        "from payload.config import load_config\n"
        "cfg = load_config('examples/quickstart.yml', [])\n"
        "if sys.argv[1] == 'keep':\n"
        "    from payload.runtime.unused import keep_out\n"
        "    print('blocked', keep_out(cfg))\n"
        "import payload.train\n"
        "kept = ('comet_ml', 'bitsandbytes', 'torchao')\n"
        "print('imported', sorted(m for m in kept if sys.modules.get(m)))\n"
    )
    said = {}
    for mode in ("keep", "plain"):
        done = subprocess.run(
            [sys.executable, "-c", probe, mode], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        said[mode] = done.stdout
    assert "blocked ['comet_ml', 'bitsandbytes', 'torchao']" in said["keep"]
    assert "imported []" in said["keep"]
    assert "imported ['bitsandbytes', 'comet_ml', 'torchao']" in said["plain"]
