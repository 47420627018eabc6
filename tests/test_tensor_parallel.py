"""Tensor parallel (payload/parallel/tensor.py) through the real CLI: `launch train --gpus 4`
with `tensor_parallel_size: 2` (2 data-parallel replicas of a 2-way split model, under
FSDP2 over the replicas) against one process on the same global batch.

- The module fixture runs both (at once), with gradient accumulation over 2 micro-batches
  on both sides: the reference 2 rows a micro-batch, each replica 1. Their logged losses
  and gradient norms (clipping at 0.5 bites every step) must agree, and the final model,
  saved whole from the split and sharded weights, must load with `from_pretrained` and
  equal the reference's. A failure means the plan splits a weight wrong, the tp ranks read
  different batches or the replicas the same one, gradients are reduced where they must
  not be (DDP over the world) or not where they must (across the replicas), the
  accumulation loses a micro-batch, or the gathered save is wrong. Each rank's FSDP probe
  (FERRY_TEST_FSDP_PROBE) says the Trainer trained the FSDP module and did not take the
  2-D (dp_shard, tp) parameters for HSDP.
- A model whose heads do not divide by tensor_parallel_size is refused at load, before
  training, with the numbers; `launch validate` refuses layouts and settings it does not
  run with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ASSETS, launch, tiny_run

TINY = ASSETS / "tiny-llama"  # 4 attention heads, 2 key/value heads, intermediate_size 384
STEPS = 3
ACCUMULATE = 2  # micro-batches a step, on both sides
# fp32 on CPU: the split matmuls, the all-reduces and FSDP2's reduce-scatter add the same
# products in another order, which moves the last bits only. Measured: losses within 5e-7;
# gradient norms (about 9) 1.7e-6 relative apart, as far as a plain FSDP2 run on 2 replicas
# (no tensor parallel) is, where DDP and tensor parallel alone stay within 3e-7.
TOLERANCE = {"loss": {"abs": 1e-5}, "grad_norm": {"rel": 1e-5}}
# Adam divides each update by the gradient's running RMS, so an element whose gradient is
# near zero turns a last-bit difference into a larger step: after 3 steps at lr 1e-3 the
# weights differ by up to 7.8e-6 (measured); WEIGHTS leaves room for other CPUs' sums.
WEIGHTS = 2e-5


def raw(**extra) -> dict:
    fixed = {"gradient_accumulation_steps": ACCUMULATE, "max_grad_norm": 0.5}
    # One checkpoint, at the end.
    return tiny_run(STEPS, **{**fixed, "save_strategy": "steps", "save_steps": STEPS, **extra})


class Run:
    def __init__(self, printed: str, output_dir: str, probe: Path):
        from payload.storage.layout import read_metrics

        self.printed, self.output_dir = printed, Path(output_dir)
        self.records = read_metrics(output_dir)
        self.probes = [json.loads(p.read_text()) for p in sorted(probe.parent.glob("probe.*"))]

    def values(self, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in self.records if key in r}


def train(tmp_factory, name: str, procs: int, **extra) -> Run:
    home = tmp_factory.mktemp(f"tp-{name}")
    path = home / f"{name}.yml"
    path.write_text(yaml.safe_dump(raw(**extra), sort_keys=False))
    probe = home / "probe" / "probe"
    probe.parent.mkdir()
    env = {"FERRY_HOME": str(home / "ferry"), "FERRY_TEST_FSDP_PROBE": str(probe)}
    args = ["--gpus", str(procs)] if procs > 1 else []
    done = launch("train", str(path), *args, env=env, check=True, timeout=600)
    (run,) = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    return Run(done.stdout + done.stderr, run["output_dir"], probe)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """The 1-process reference and 2 replicas x tensor_parallel_size 2, side by side, on the
    same global batch: 2 rows x 1 process, and 1 row x 2 replicas (the tp ranks of a
    replica share its row)."""
    from concurrent.futures import ThreadPoolExecutor

    tmp_path_factory.getbasetemp()  # made once, before the threads ask for it
    jobs = {
        "ref": (1, {"micro_batch_size": 2}),
        "tp2": (4, {"micro_batch_size": 1, "tensor_parallel_size": 2}),
    }
    with ThreadPoolExecutor(2) as pool:
        done = {
            name: pool.submit(train, tmp_path_factory, name, procs, **extra)
            for name, (procs, extra) in jobs.items()
        }
        return {name: future.result() for name, future in done.items()}


@pytest.mark.slow
def test_tensor_parallel_run_logs_the_one_process_losses(runs):
    """Same losses and gradient norms at every step as one process (a wrong gradient would
    also change the later losses); the run says what it split and what FSDP2 shards over
    (the 2 replicas), and every rank trained the FSDP module, not HSDP, not DDP."""
    got, want = runs["tp2"], runs["ref"]
    assert (
        "tensor parallel: 4 LlamaDecoderLayer blocks split over 2 ranks: column-wise q_proj, "
        "k_proj, v_proj, gate_proj, up_proj; row-wise o_proj, down_proj" in got.printed
    )
    assert (
        "fsdp2: fully_shard on 4 LlamaDecoderLayer blocks and the root over dp_shard=2 (gloo)"
        in got.printed
    )
    assert [p["rank"] for p in got.probes] == [0, 1, 2, 3]
    for probe in got.probes:
        assert probe["trained_type"].startswith("FSDP"), probe["trained_type"]
        assert probe["replicated"] is False, f"rank {probe['rank']} took TP for HSDP"
    for key in TOLERANCE:
        mine, theirs = got.values(key), want.values(key)
        assert sorted(theirs) == list(range(1, STEPS + 1)), f"{key} steps"
        assert sorted(mine) == sorted(theirs), f"{key} steps"
        for step, value in theirs.items():
            assert mine[step] == pytest.approx(value, **TOLERANCE[key]), f"{key} @ {step}"


@pytest.mark.slow
@pytest.mark.parametrize("where", [".", f"checkpoint-{STEPS}"])
def test_split_model_is_saved_whole(runs, where):
    """The final model and the last checkpoint, gathered from the split weights, load with
    from_pretrained and equal the reference's weights (tied head included)."""
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(runs["tp2"].output_dir / where).state_dict()
    want = AutoModelForCausalLM.from_pretrained(runs["ref"].output_dir / where).state_dict()
    assert set(got) == set(want)
    start = AutoModelForCausalLM.from_pretrained(TINY).state_dict()
    for name, weight in want.items():
        assert not torch.equal(weight, start[name]), f"{name} did not train"
        torch.testing.assert_close(got[name], weight, atol=WEIGHTS, rtol=0, msg=name)
    assert (runs["tp2"].output_dir / f"checkpoint-{STEPS}" / "optimizer.pt").is_file()


@pytest.mark.slow
def test_heads_that_do_not_divide_are_refused_before_training(tmp_path):
    """tensor_parallel_size 3 on 3 processes fits the layout, but the model's 4 heads
    cannot be split 3 ways: `launch train` refuses it before anything starts (its
    validation reads the model's config.json, which is on this machine), naming the
    numbers. (A model whose config is not here is checked the same way when it loads.)"""
    path = tmp_path / "tp3.yml"
    path.write_text(yaml.safe_dump(raw(tensor_parallel_size=3), sort_keys=False))
    env = {"FERRY_HOME": str(tmp_path / "ferry")}
    done = launch("train", str(path), "--gpus", "3", env=env, timeout=600)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, said
    assert (
        "tensor_parallel_size: (3) splits each block's attention heads and MLP over 3 ranks, "
        "and the model's num_attention_heads (4) and num_key_value_heads (2) are not "
        "divisible by 3" in said
    )
    assert "'loss'" not in said and not list(tmp_path.rglob("metrics.jsonl"))


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (
            {"tensor_parallel_size": 2, "launch": {"gpus": 3}},
            "tensor_parallel_size: the layout does not fit launch.gpus x launch.nodes: "
            "tensor_parallel_size (2) = 2 does not divide the job's 3 processes",
        ),
        (
            {"tensor_parallel_size": 2, "adapter": "lora"},
            "adapter: with tensor_parallel_size (2) is not supported: peft's LoRA layers",
        ),
        (
            {"tensor_parallel_size": 2, "context_parallel_size": 2},
            "context_parallel_size: with tensor_parallel_size (2) is not supported",
        ),
        (
            {"tensor_parallel_size": 2, "dp_replicate_size": 2, "fsdp_config": {}},
            "dp_replicate_size: with tensor_parallel_size (2) is not supported: HSDP copies",
        ),
    ],
)
def test_validate_names_what_cannot_run(tmp_path, extra, said):
    """Each refusal names the key and the numbers."""
    path = tmp_path / "tp.yml"
    path.write_text(yaml.safe_dump(raw(**extra), sort_keys=False))
    done = launch("validate", str(path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert said in " ".join((done.stdout + done.stderr).split())
