"""The training path for real: 2 gloo ranks against a single-process reference, a full
fine-tune with evaluation, and where a run resumes from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, launch, quickstart_config

from payload.storage.layout import read_metrics, read_summary

pytestmark = pytest.mark.slow


def payload_train(
    config: Path, *overrides: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m payload train` in one plain process (no torchrun, no process group)."""
    args = [sys.executable, "-m", "payload", "train", str(config)]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_two_gloo_ranks_match_a_single_process_reference(tmp_path, ferry_home):
    """`launch train examples/quickstart.yml --gpus 2` on CPU: 2 gloo ranks of 8 rows each
    must train exactly like one process with 16 rows per step (same global batch, same
    data order, gradients averaged over all tokens). A difference means the data is
    sharded wrongly or gradients are not all-reduced."""
    result = launch("train", "examples/quickstart.yml", "--gpus", "2", timeout=300, check=True)
    assert "2 x cpu (gloo)" in result.stdout
    record = json.loads(launch("runs", "--json", check=True).stdout)[0]
    assert record["state"] == "succeeded" and record["resources"]["gpus_per_node"] == 2
    two_ranks = Path(record["output_dir"])

    single = tmp_path / "single"
    payload_train(quickstart_config(tmp_path), "micro_batch_size=16", f"output_dir={single}")

    distributed = [r["loss"] for r in read_metrics(two_ranks) if "loss" in r]
    reference = [r["loss"] for r in read_metrics(single) if "loss" in r]
    assert len(distributed) == len(reference) == 9  # steps 1, 5, ..., 40
    assert distributed == pytest.approx(reference, rel=1e-4)

    from safetensors.torch import load_file

    a = load_file(two_ranks / "adapter_model.safetensors")
    b = load_file(single / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].allclose(b[name], atol=1e-5), name


def test_full_finetune_with_evaluation(tmp_path):
    out = tmp_path / "full"
    config = quickstart_config(tmp_path)
    payload_train(
        config,
        "adapter=null",
        "lora_r=null",
        "lora_alpha=null",
        "lora_dropout=null",
        "lora_target_linear=null",
        "learning_rate=1e-3",
        "max_steps=6",
        "num_epochs=null",
        "val_set_size=0.1",
        "eval_steps=3",
        "save_steps=3",
        f"output_dir={out}",
    )
    assert (out / "model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()
    records = read_metrics(out)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    summary = read_summary(out)
    assert summary["artifact"] == "model" and summary["steps"] == 6
    assert summary["rows"]["eval"] == 32 and summary["final_eval_loss"] == evals[-1]["eval_loss"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_auto_resume_without_storage_picks_the_newest_local_checkpoint(tmp_path):
    from payload.config import validate_mapping
    from payload.distributed import DistInfo
    from payload.durability import resume_point as durable_resume_point

    def resume_point(cfg, output_dir):
        return durable_resume_point(cfg, output_dir, DistInfo(0, 0, 1, None, "cpu"), None)

    out = tmp_path / "out"
    for step in (2, 10, 4):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    base = {
        "base_model": str(ROOT / "examples/assets/tiny-llama"),
        "learning_rate": 1e-4,
        "datasets": [{"path": str(ROOT / "examples/data/alpaca_tiny.jsonl"), "type": "alpaca"}],
        "output_dir": str(out),
    }
    assert resume_point(validate_mapping(base), str(out)) is None
    cfg = validate_mapping({**base, "auto_resume_from_checkpoints": True})
    assert resume_point(cfg, str(out)) == str(out / "checkpoint-10")
    explicit = validate_mapping({**base, "resume_from_checkpoint": str(out / "checkpoint-4")})
    assert resume_point(explicit, str(out)) == str(out / "checkpoint-4")


def test_resume_from_a_checkpoint_given_as_a_storage_uri(tmp_path, monkeypatch):
    """`resume_from_checkpoint` may name one checkpoint in any store: it is downloaded,
    verified, and training continues from it exactly as the original run did."""
    monkeypatch.setenv("FERRY_STORAGE_URI", f"file://{tmp_path}/store")
    config = quickstart_config(tmp_path)
    short = ["max_steps=8", "num_epochs=null", "save_steps=4", "logging_steps=1"]
    payload_train(config, *short, f"output_dir={tmp_path / 'first'}")
    monkeypatch.delenv("FERRY_STORAGE_URI")

    uri = f"file://{tmp_path}/store/checkpoints/checkpoint-4"
    result = payload_train(
        config, *short, f"output_dir={tmp_path / 'second'}", f"resume_from_checkpoint={uri}"
    )
    assert "resuming from step 4" in result.stdout
    first = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "first") if "loss" in r}
    second = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "second") if "loss" in r}
    assert sorted(second) == [5, 6, 7, 8]  # no history to carry over: it starts at step 5
    assert second == pytest.approx({s: first[s] for s in second}, rel=1e-5)
    assert read_summary(tmp_path / "second")["resumed_from_step"] == 4

    # Resumed from the checkpoint of its last step (a run killed after its final save),
    # it trains nothing more: 8 steps do not fill the epoch, where transformers alone
    # would train a step 9. The final adapter is checkpoint-8's.
    last = f"file://{tmp_path}/store/checkpoints/checkpoint-8"
    third = payload_train(
        config, *short, f"output_dir={tmp_path / 'third'}", f"resume_from_checkpoint={last}"
    )
    assert "resuming from step 8" in third.stdout
    assert "step 8 was the run's last: nothing left to train" in third.stdout
    assert [r for r in read_metrics(tmp_path / "third") if "loss" in r] == []
    assert read_summary(tmp_path / "third")["resumed_from_step"] == 8
    assert read_summary(tmp_path / "third")["steps"] == 8
    import torch
    from safetensors.torch import load_file

    weights = "adapter_model.safetensors"
    assert (
        load_file(tmp_path / "third" / weights).keys()
        == load_file(tmp_path / "first" / weights).keys()
    )
    for name, tensor in load_file(tmp_path / "first" / weights).items():
        assert torch.equal(load_file(tmp_path / "third" / weights)[name], tensor), name
