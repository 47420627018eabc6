"""payload.runtime.unused: which installed packages a training process keeps out, decided
from the config alone, and that keeping one out really stops its import (in a fresh
process, as a rank starts)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ASSETS, ROOT

from payload.config.schema import TrainConfig
from payload.runtime.unused import needs_bitsandbytes, needs_comet

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


def test_comet_is_kept_only_for_a_run_that_reports_to_it():
    assert not needs_comet(config(use_wandb=True, wandb_mode="offline"))
    assert needs_comet(config(use_comet=True, comet_online=False))


@pytest.mark.slow
def test_a_kept_out_package_is_never_imported_by_the_training_stack():
    """In a fresh process: with the quickstart's config, importing the training code
    (transformers, peft, the trainers) imports neither comet_ml nor bitsandbytes, both
    installed here; without keep_out, it imports both."""
    probe = (
        "import sys\n"
        "from payload.config import load_config\n"
        "cfg = load_config('examples/quickstart.yml', [])\n"
        "if sys.argv[1] == 'keep':\n"
        "    from payload.runtime.unused import keep_out\n"
        "    print('blocked', keep_out(cfg))\n"
        "import payload.train\n"
        "print('imported', sorted(m for m in ('comet_ml', 'bitsandbytes') if sys.modules.get(m)))\n"
    )
    said = {}
    for mode in ("keep", "plain"):
        done = subprocess.run(
            [sys.executable, "-c", probe, mode], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        said[mode] = done.stdout
    assert "blocked ['comet_ml', 'bitsandbytes']" in said["keep"]
    assert "imported []" in said["keep"]
    assert "imported ['bitsandbytes', 'comet_ml']" in said["plain"]
