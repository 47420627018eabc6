"""Tensor parallel (payload/parallel/tensor.py) through the real CLI: `launch train` with
`tensor_parallel_size: 2` on 2 gloo processes against the same config on 1 process.

- The module fixture runs both (at once); their logged losses and gradient norms (clipping
  at 0.5 bites every step) must agree, and the final model, saved whole from the split
  weights, must load with `from_pretrained` and equal the reference's. A failure means the
  plan splits a weight wrong, the tp ranks read different batches, their gradients are
  reduced where they must not be (DDP over the world) or the gathered save is wrong.
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
from helpers import ASSETS, DATA, launch

TINY = ASSETS / "tiny-llama"  # 4 attention heads, 2 key/value heads, intermediate_size 384
STEPS = 3
# fp32 on CPU: the split matmuls and the all-reduce add the same products in another order,
# which moves the last bits only (measured: losses within 1e-6, grad norms within 2.4e-6).
TOLERANCE = 1e-5
# Adam divides each update by the gradient's running RMS, so an element whose gradient is
# near zero turns a last-bit difference into a larger step: after 3 steps at lr 1e-3 the
# weights differ by up to 8.1e-6 (measured); WEIGHTS leaves room for other CPUs' sums.
WEIGHTS = 2e-5


def raw(**extra) -> dict:
    return {
        "base_model": str(TINY),
        "datasets": [{"path": str(DATA), "type": "alpaca"}],
        "sequence_len": 128,
        "micro_batch_size": 2,
        "max_steps": STEPS,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "max_grad_norm": 0.5,
        "seed": 42,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": STEPS,  # one checkpoint, at the end
        **extra,
    }


class Run:
    def __init__(self, printed: str, output_dir: str):
        from payload.storage.layout import read_metrics

        self.printed, self.output_dir = printed, Path(output_dir)
        self.records = read_metrics(output_dir)

    def values(self, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in self.records if key in r}


def train(tmp_factory, name: str, procs: int, **extra) -> Run:
    home = tmp_factory.mktemp(f"tp-{name}")
    path = home / f"{name}.yml"
    path.write_text(yaml.safe_dump(raw(**extra), sort_keys=False))
    env = {"FERRY_HOME": str(home / "ferry")}
    args = ["--gpus", str(procs)] if procs > 1 else []
    done = launch("train", str(path), *args, env=env, check=True, timeout=600)
    (run,) = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    return Run(done.stdout + done.stderr, run["output_dir"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """The 1-process reference and the tensor_parallel_size 2 run, side by side."""
    from concurrent.futures import ThreadPoolExecutor

    tmp_path_factory.getbasetemp()  # made once, before the threads ask for it
    jobs = {"ref": (1, {}), "tp2": (2, {"tensor_parallel_size": 2})}
    with ThreadPoolExecutor(2) as pool:
        done = {
            name: pool.submit(train, tmp_path_factory, name, procs, **extra)
            for name, (procs, extra) in jobs.items()
        }
        return {name: future.result() for name, future in done.items()}


@pytest.mark.slow
def test_tensor_parallel_run_logs_the_one_process_losses(runs):
    """Same losses and gradient norms at every step as one process (a wrong gradient would
    also change the later losses), and the run says what it split."""
    got, want = runs["tp2"], runs["ref"]
    assert (
        "tensor parallel: 4 LlamaDecoderLayer blocks split over 2 ranks: column-wise q_proj, "
        "k_proj, v_proj, gate_proj, up_proj; row-wise o_proj, down_proj" in got.printed
    )
    for key in ("loss", "grad_norm"):
        mine, theirs = got.values(key), want.values(key)
        assert sorted(theirs) == list(range(1, STEPS + 1)), f"{key} steps"
        assert sorted(mine) == sorted(theirs), f"{key} steps"
        for step, value in theirs.items():
            assert mine[step] == pytest.approx(value, abs=TOLERANCE), f"{key} @ {step}"


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
    """tensor_parallel_size 3 on 3 processes fits the layout (validate passes), but the
    model's 4 heads cannot be split 3 ways: refused at load, naming the numbers."""
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
    ],
)
def test_validate_names_what_cannot_run(tmp_path, extra, said):
    """Each refusal names the key and the numbers."""
    path = tmp_path / "tp.yml"
    path.write_text(yaml.safe_dump(raw(**extra), sort_keys=False))
    done = launch("validate", str(path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert said in " ".join((done.stdout + done.stderr).split())
