"""Training throughput of each way Ferry spreads one run over 2 processes: trained tokens
per second of the tiny Llama through the real `launch train --gpus 2` (on CPU: torchrun,
2 gloo processes), DDP the baseline.

    python bench/distributed.py [--variants ddp,fsdp2,zero2,cp2] [--runs 2] [--steps 20]

Every variant is a full fp32 fine-tune of the same data, from the same seed, with the
same global batch (`--batch` blocks of `--sequence-len` tokens a step) for the same steps:
- ddp: no sharding (the HF Trainer's DistributedDataParallel), the baseline;
- fsdp2: `fsdp_version: 2`, every decoder block and the root sharded, resharded after
  forward (examples/fsdp2.yml's fsdp_config, less activation checkpointing, which would
  measure recomputation rather than sharding);
- zero2: `deepspeed:` the shipped examples/deepspeed/zero2.json (optimizer states and
  gradients partitioned);
- cp2: `context_parallel_size: 2`: both processes take the same rows, each computes half
  of every sequence (attention gathers the other half's keys and values), so its
  micro-batch is the whole global batch.

The data is `pretraining_dataset` text (the bundled alpaca rows as plain text, 16 times
over: ~176 blocks of 512, one epoch for the default 20 steps x 8) cut into blocks of
exactly sequence_len tokens, so a step trains batch x sequence_len tokens, none of them
padding: the runs' own token counts must equal that. The last step's loss of every
variant must match the first variant's to LOSS_REL, or they did not train the same model
and their speeds mean nothing. Every variant's config goes through `launch validate`
before anything trains; a refused one stops the benchmark (leave it out with --variants).
Tokens/s comes from the run's metrics.jsonl (one record a step: tokens seen, seconds
since training began), between the end of step `--skip` and the last step: start-up,
loading, data preparation, the first steps' warm-up (lazy allocation, DeepSpeed's and
FSDP's first gathers) and saving are all outside it. With `--runs N` the variants
alternate N times and the best of each counts, so load from other work on a shared
machine shows up less. Each variant is also printed as a ratio to ddp in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "examples" / "assets"
ALPACA = ROOT / "examples" / "data" / "alpaca_tiny.jsonl"
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "offload_params": False,
        "cpu_ram_efficient_loading": False,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True,
        "activation_checkpointing": False,
    },
}
VARIANTS = ("ddp", "fsdp2", "zero2", "cp2")
# The last step's loss of every variant against the first variant's: all are the same
# fp32 training, only summed in another order (ranks, shards, sequence halves).
LOSS_REL = 1e-3


def variant_keys(name: str, batch: int) -> dict:
    """The keys that make `name`, for a global batch of `batch` blocks over 2 processes."""
    if name == "ddp":
        return {"micro_batch_size": batch // 2}
    if name == "fsdp2":
        return {"micro_batch_size": batch // 2, **FSDP2}
    if name == "zero2":
        return {
            "micro_batch_size": batch // 2,
            "deepspeed": str(ROOT / "examples/deepspeed/zero2.json"),
        }
    if name == "cp2":  # one data-parallel rank: the two processes share each batch
        return {"micro_batch_size": batch, "context_parallel_size": 2}
    raise ValueError(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")


def write_text_data(path: Path, repeats: int) -> None:
    """The alpaca rows as plain text documents, `repeats` times over."""
    rows = [json.loads(line) for line in ALPACA.read_text().splitlines() if line.strip()]
    texts = [" ".join(v for v in (r["instruction"], r["input"], r["output"]) if v) for r in rows]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * repeats))


def config(name: str, data: Path, args: argparse.Namespace) -> dict:
    return {
        "base_model": str(ASSETS / "tiny-llama"),
        "pretraining_dataset": [{"path": str(data)}],
        "sequence_len": args.sequence_len,
        "max_steps": args.steps,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "bf16": False,
        "seed": 42,
        "logging_steps": 1,
        "save_strategy": "no",
        **variant_keys(name, args.batch),
    }


def launch(name: str, work: Path, *args: str) -> str:
    """Run the real `launch` CLI with its own FERRY_HOME under `work`; its output. A
    failure ends the benchmark with the variant's name and the command's last words."""
    env = {**os.environ, "FERRY_HOME": str(work / "ferry"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "launcher", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise SystemExit(
            f"{name}: launch {args[0]} exited {done.returncode} (leave the variant out with "
            f"--variants)\n{tail}"
        )
    return done.stdout


def write_config(name: str, work: Path, data: Path, args: argparse.Namespace) -> Path:
    work.mkdir(parents=True)
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(config(name, data, args), sort_keys=False))
    return path


def train(name: str, work: Path, data: Path, args: argparse.Namespace) -> list[dict]:
    """`launch train --gpus 2` of one variant in a folder of its own; its step records."""
    from payload.storage.layout import read_metrics

    launch(name, work, "train", str(write_config(name, work, data, args)), "--gpus", "2")
    (run,) = json.loads(launch(name, work, "runs", "--json"))
    return [r for r in read_metrics(run["output_dir"]) if "loss" in r]


def tokens_per_s(name: str, steps: list[dict], args: argparse.Namespace) -> float:
    """Trained tokens per second from the end of step `args.skip` to the last step."""
    per_step = args.batch * args.sequence_len
    assert [r["step"] for r in steps] == list(range(1, args.steps + 1)), (name, steps)
    seen = [r["tokens_seen"] for r in steps]
    expected = [per_step * r["step"] for r in steps]
    if seen != expected:
        raise SystemExit(f"{name}: the run counted tokens {seen}, not {expected}")
    first, last = steps[args.skip - 1], steps[-1]
    return (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--runs", type=int, default=2, help="rounds; the best of each counts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps not timed")
    parser.add_argument("--batch", type=int, default=8, help="global batch, in blocks")
    parser.add_argument("--sequence-len", type=int, default=512)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in variants:
        variant_keys(name, args.batch)
    if args.batch % 2 or not 0 < args.skip < args.steps:
        parser.error("--batch must be even and 0 < --skip < --steps")

    rates: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="ferry-bench-distributed-") as tmp:
        data = Path(tmp) / "text.jsonl"
        write_text_data(data, repeats=16)
        # Every variant's config is validated before any trains: a refused one (a layout
        # this build does not support) stops the benchmark before minutes are spent.
        for name in variants:
            work = Path(tmp) / f"{name}-validate"
            launch(name, work, "validate", str(write_config(name, work, data, args)))
        final_loss: dict[str, float] = {}
        for round_ in range(args.runs):
            for name in variants:
                steps = train(name, Path(tmp) / f"{name}-{round_}", data, args)
                rates[name].append(tokens_per_s(name, steps, args))
                final_loss[name] = steps[-1]["loss"]
                reference = final_loss[variants[0]]
                if abs(final_loss[name] - reference) > LOSS_REL * reference:
                    raise SystemExit(
                        f"{name}: loss {final_loss[name]:.5f} after step {args.steps}, "
                        f"{variants[0]} {reference:.5f}: the variants do not train the "
                        "same model, so their speeds cannot be compared"
                    )
                timed = steps[-1]["elapsed_s"] - steps[args.skip - 1]["elapsed_s"]
                print(
                    f"{name}: {rates[name][-1]:,.0f} tokens/s over steps {args.skip + 1}-"
                    f"{args.steps} ({timed:.1f} s); loss {steps[0]['loss']:.3f} -> "
                    f"{steps[-1]['loss']:.3f}",
                    flush=True,
                )
    best = {name: max(r) for name, r in rates.items()}
    for name in variants:
        print(f"RESULT tokens_per_s_{name} {best[name]:.0f}")
    if "ddp" in best:
        for name in variants:
            if name != "ddp":
                print(f"RESULT {name}_vs_ddp {best[name] / best['ddp']:.2f} x")


if __name__ == "__main__":
    main()
