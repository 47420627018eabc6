"""The README's main job, end to end through the real CLI: `launch train
examples/quickstart.yml` trains a LoRA on CPU, prints its progress and a summary, and
leaves the adapter and metrics behind. The recipe test pins its losses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import ROOT, launch

from payload.storage.layout import read_metrics

RECIPE = Path(__file__).parent / "recipes" / "quickstart_losses.json"

pytestmark = pytest.mark.slow


def test_quickstart_prints_progress_and_a_summary(quickstart_run):
    out = quickstart_run.result.stdout
    run_id = quickstart_run.record["run_id"]
    assert "[step 1/80] loss" in out and "[step 80/80] loss" in out and "tok/s" in out
    summary = out[out.index("\nsucceeded ") :]
    assert run_id in summary
    assert "final loss" in summary
    assert str(quickstart_run.output_dir) in summary
    assert f"launch status {run_id}" in summary and f"launch logs {run_id}" in summary


def test_quickstart_leaves_the_adapter_and_falling_metrics(quickstart_run):
    out = quickstart_run.output_dir
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
        "summary.json",
        "config.yml",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-40", "checkpoint-80"]
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] <= 0.8 * losses[0], f"loss fell only from {losses[0]} to {losses[-1]}"
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert all(r["tokens_per_s"] > 0 and "learning_rate" in r for r in steps[1:])


def test_quickstart_is_recorded_as_succeeded(quickstart_run):
    record = quickstart_run.record
    assert record["state"] == "succeeded"
    assert record["backend"] == "local"
    assert record["summary"]["steps"] == 80 and record["summary"]["rows"]["kept"] == 320
    assert record["run_id"].startswith("quickstart-")
    status = launch(
        "status",
        record["run_id"],
        "--json",
        env={"FERRY_HOME": str(quickstart_run.home)},
        check=True,
    )
    assert json.loads(status.stdout)["state"] == "succeeded"
    table = launch("runs", env={"FERRY_HOME": str(quickstart_run.home)}, check=True).stdout
    assert record["run_id"] in table and "succeeded" in table


def test_logs_replays_the_run(quickstart_run):
    run_id = quickstart_run.record["run_id"]
    env = {"FERRY_HOME": str(quickstart_run.home)}
    for follow in ([], ["-f"]):  # -f on a finished run prints everything and returns
        log = launch("logs", run_id, *follow, env=env, check=True, timeout=60).stdout
        assert "[step 80/80] loss" in log and "done: 80 steps" in log
        # The training stack's import-time notes about kernels nothing here uses stay out.
        assert "torchao" not in log and "_pytree" not in log and "kernels-community" not in log


def test_quickstart_adapter_loads_and_changes_the_model(quickstart_run):
    """The saved adapter is a real PEFT adapter for the shipped base model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = ROOT / "examples" / "assets" / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(quickstart_run.output_dir)
    batch = tokenizer("### Instruction:\nAdd the two numbers.", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        before = base(**batch).logits
        tuned = PeftModel.from_pretrained(base, quickstart_run.output_dir)
        after = tuned(**batch).logits
    assert not torch.allclose(before, after)


def test_recipe_losses_match_the_recorded_ones(quickstart_run):
    """A seeded fp32 run through the real CLI must reproduce the recorded losses. A change
    that is not meant to alter the math (a refactor) keeps them identical; one that is
    meant to must re-record them with FERRY_RECORD_RECIPES=1 and say why."""
    # The pins are CPU losses: this run must have been on CPU (conftest hides any GPU;
    # tests/test_gpu.py compares a CUDA run with them, within a tolerance).
    assert "| 1 x cpu" in quickstart_run.result.stdout
    logged = {
        str(r["step"]): r["loss"] for r in read_metrics(quickstart_run.output_dir) if "loss" in r
    }
    if os.environ.get("FERRY_RECORD_RECIPES") == "1":
        RECIPE.parent.mkdir(exist_ok=True)
        RECIPE.write_text(
            json.dumps(
                {"command": "launch train examples/quickstart.yml", "losses": logged}, indent=2
            )
            + "\n"
        )
    recorded = json.loads(RECIPE.read_text())["losses"]
    assert logged.keys() == recorded.keys()
    for step, loss in recorded.items():
        # Bit-identical across runs and thread counts on one machine; the tolerance only
        # allows for a different CPU's float summation order.
        assert logged[step] == pytest.approx(loss, rel=1e-5), f"step {step}"
