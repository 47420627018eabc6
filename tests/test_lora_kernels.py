"""Ferry's fused LoRA layers (payload/kernels): each function's forward and every gradient
equal its plain torch reference under Triton's interpreter on this CPU; the tiny Llama
with the fused layers put in has the loss and gradients of the PEFT model without them;
a 5-step LoRA run with `lora_mlp_kernel`, `lora_qkv_kernel` and `lora_o_kernel` has the
losses of the run without; what they cannot run is refused by key or by module.

Tolerance: fp32 throughout; the fused functions and the references order their sums
differently (addmm against separate matmuls), so values agree to float32 rounding:
relative 1e-5 (measured: about 2e-7). Over 5 optimizer steps that rounding compounds:
relative 1e-4 on the losses. The kernels run in a subprocess that switches the
interpreter on before Triton is imported, as a training process does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import ASSETS, ROOT, launch, quickstart_config, run_probe, train_losses

TOL = 1e-5

PROBE = textwrap.dedent(
    """
    import json, sys
    sys.modules["torchao"] = None
    from payload.kernels import interpret
    interpret.enable()
    import torch
    from payload.kernels.lora import (LoRA, LoRAMLP, LoRAO, LoRAQKV, reference_lora,
                                      reference_mlp)

    torch.manual_seed(0)
    out = {}

    def layer(i, o, r=4, s=2.0):
        return LoRA(torch.randn(o, i) * 0.2, (torch.randn(r, i) * 0.2).requires_grad_(),
                    (torch.randn(o, r) * 0.2).requires_grad_(), s)

    def rel(a, b):
        return float((a - b).abs().max() / (1 + b.abs().max()))

    def check(name, ours_fn, ref_fn, x, layers):
        # outputs weighted by fixed random tensors, so every output element matters
        def run(fn):
            for t in [x] + [p for l in layers for p in (l.a, l.b)]:
                t.grad = None
            ys = fn()
            ys = ys if isinstance(ys, tuple) else (ys,)
            torch.manual_seed(7)
            weights = [torch.randn(y.shape) for y in ys]
            sum((y * w).sum() for y, w in zip(ys, weights)).backward()
            grads = [x.grad.clone()] + [p.grad.clone() for l in layers for p in (l.a, l.b)
                                        if p.grad is not None]
            return [y.detach() for y in ys], grads
        ys, gs = run(ours_fn)
        yr, gr = run(ref_fn)
        out[name] = {"diff": max(rel(a, b) for a, b in zip(ys + gs, yr + gr)),
                     "compared": len(ys) + len(gs), "matched": len(gs) == len(gr)}

    for kind in ("silu", "gelu", "gelu_tanh"):
        g, u, d = layer(16, 24), layer(16, 24), layer(24, 16)
        x = torch.randn(2, 5, 16, requires_grad=True)
        check(f"mlp_{kind}",
              lambda: LoRAMLP.apply(x, g.weight, g.a, g.b, u.weight, u.a, u.b, d.weight,
                                    d.a, d.b, (g.scale, u.scale, d.scale), kind),
              lambda: reference_mlp(x, g, u, d, kind), x, [g, u, d])

    q, k, v = layer(16, 16), layer(16, 8), layer(16, 8, s=0.5)
    x = torch.randn(3, 4, 16, requires_grad=True)
    check("qkv", lambda: LoRAQKV.apply(x, q.weight, q.a, q.b, k.weight, k.a, k.b, v.weight,
                                       v.a, v.b, (q.scale, k.scale, v.scale)),
          lambda: tuple(reference_lora(x, l) for l in (q, k, v)), x, [q, k, v])
    # v unused downstream: its gradient is None, the others as before
    check("qk_only", lambda: LoRAQKV.apply(x, q.weight, q.a, q.b, k.weight, k.a, k.b,
                                           v.weight, v.a, v.b, (q.scale, k.scale, v.scale))[:2],
          lambda: tuple(reference_lora(x, l) for l in (q, k)), x, [q, k, v])
    o = layer(16, 16)
    check("o", lambda: LoRAO.apply(x, o.weight, o.a, o.b, o.scale),
          lambda: reference_lora(x, o), x, [o])

    # The tiny Llama under PEFT (LoRA on every linear layer, B made non-zero so the
    # adapters matter), with and without the fused layers put in.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from payload.kernels import apply

    def peft_model():
        torch.manual_seed(3)
        base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules="all-linear"))
        torch.manual_seed(4)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        return model

    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone(); labels[:, :3] = -100
    plain = peft_model()
    ref = plain(input_ids=ids, labels=labels); ref.loss.backward()
    ref_grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    fused = peft_model()
    said = apply.apply(fused, True, True, True)
    ours = fused(input_ids=ids, labels=labels); ours.loss.backward()
    grads = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    out["model"] = {"said": said, "loss": rel(ours.loss, ref.loss),
                    "grads": max(rel(grads[n], ref_grads[n]) for n in ref_grads),
                    "trained": len(grads), "with_grad": sum(g is not None for g in grads.values())}

    # PEFT's disable_adapter() (TRL's reference model for DPO, KTO, GRPO): the fused
    # layers step aside, and the logits are the base model's.
    with torch.no_grad():
        with plain.disable_adapter():
            base_logits = plain(input_ids=ids).logits
        with fused.disable_adapter():
            fused_base = fused(input_ids=ids).logits
        with_adapter = fused(input_ids=ids).logits
    out["disabled"] = {"diff": rel(fused_base, base_logits),
                       "adapter_matters": rel(with_adapter, base_logits)}

    # bf16 autocast over the fp32 base (as fp16/bf16 mixed precision runs): the fused
    # model trains, its adapter gradients stay fp32 and are close to PEFT's under the
    # same autocast (bf16 rounding: 2e-2).
    for model in (plain, fused):
        model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16):
        ref = plain(input_ids=ids, labels=labels).loss
        ours = fused(input_ids=ids, labels=labels).loss
    ref.backward(); ours.backward()
    a = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    b = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    out["autocast"] = {"loss": rel(ours.float(), ref.float()),
                       "grads": max(rel(b[n], a[n]) for n in a),
                       "dtypes": sorted({str(g.dtype) for g in b.values()})}

    # The MLP's backward overwrites what it saved: a second one is refused, not wrong.
    g, u, d = layer(16, 24), layer(16, 24), layer(24, 16)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = LoRAMLP.apply(x, g.weight, g.a, g.b, u.weight, u.a, u.b, d.weight, d.a, d.b,
                      (g.scale, u.scale, d.scale), "silu").sum()
    y.backward(retain_graph=True)
    try:
        y.backward()
        out["second_backward"] = None
    except RuntimeError as e:
        out["second_backward"] = str(e)

    # Each key on its own: only its block is fused.
    alone = {}
    for flags in ((True, False, False), (False, True, False), (False, False, True)):
        one = peft_model()
        apply.apply(one, *flags)
        layer0 = one.base_model.model.model.layers[0]
        alone[str(flags)] = [layer0.mlp.forward.__name__, layer0.self_attn.q_proj.forward.__name__,
                             layer0.self_attn.o_proj.forward.__name__]
    out["alone"] = alone

    # A model the fused layers cannot run: LoRA dropout on every layer.
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    dropped = get_peft_model(base, LoraConfig(r=8, lora_dropout=0.1, target_modules="all-linear"))
    try:
        apply.apply(dropped, True, False, False)
        out["refused"] = None
    except Exception as e:
        out["refused"] = str(e)
    print("PROBE " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def probe() -> dict:
    return run_probe(PROBE, str(ASSETS / "tiny-llama"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "compared"),
    [
        ("mlp_silu", 8),  # output, x grad, 3 x (A, B) grads
        ("mlp_gelu", 8),
        ("mlp_gelu_tanh", 8),
        ("qkv", 10),  # q, k, v, x grad, 3 x (A, B)
        ("qk_only", 7),  # q, k, x grad, 2 x (A, B): v's adapter gets no gradient
        ("o", 4),  # output, x grad, A, B
    ],
)
def test_each_fused_function_equals_its_torch_reference(probe, name, compared):
    found = probe[name]
    assert found["compared"] == compared and found["matched"], found
    assert found["diff"] < TOL, found


@pytest.mark.slow
def test_the_fused_tiny_llama_has_the_plain_models_loss_and_gradients(probe):
    found = probe["model"]
    assert found["said"] == "fused LoRA mlp, qkv, o in 4 layer(s)"
    # r=8 on 7 linear layers x 4 decoder layers: 56 A and B matrices, all with gradients.
    assert found["trained"] == 56 and found["with_grad"] == 56
    assert found["loss"] < TOL and found["grads"] < TOL, found


@pytest.mark.slow
def test_each_key_fuses_its_own_block(probe):
    """lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel (model.py passes each as a flag):
    each alone replaces only its block's forward."""
    assert probe["alone"] == {
        "(True, False, False)": ["mlp_forward", "forward", "forward"],
        "(False, True, False)": ["forward", "q_forward", "forward"],
        "(False, False, True)": ["forward", "forward", "o_forward"],
    }


@pytest.mark.slow
def test_the_fused_layers_step_aside_when_peft_disables_the_adapter(probe):
    found = probe["disabled"]
    assert found["diff"] == 0.0, found  # exactly the base model's own layers
    assert found["adapter_matters"] > 1e-3, found  # the check can tell them apart


@pytest.mark.slow
def test_the_fused_layers_train_under_autocast_with_fp32_adapter_gradients(probe):
    found = probe["autocast"]
    assert found["dtypes"] == ["torch.float32"]
    assert found["loss"] < 2e-2 and found["grads"] < 2e-2, found


@pytest.mark.slow
def test_a_second_backward_through_the_fused_mlp_is_refused(probe):
    assert probe["second_backward"] == (
        "the fused LoRA MLP runs its backward once (no retain_graph)"
    )


@pytest.mark.slow
def test_a_model_with_lora_dropout_is_refused_naming_the_module(probe):
    said = probe["refused"]
    assert said is not None
    assert "The fused LoRA layers cannot run on this model:" in said
    assert "base_model.model.model.layers.0.mlp.gate_proj has LoRA dropout" in said
    assert "and 9 more" in said  # 4 layers x 3 MLP projections, 3 shown


def test_what_the_fused_layers_cannot_run_is_refused_at_validate(tmp_path):
    cfg = quickstart_config(
        tmp_path,
        "lora_mlp_kernel: true\nlora_qkv_kernel: true\nlora_dropout: 0.05\n"
        "peft_use_dora: true\nadapter: qlora\nload_in_4bit: true\n",
    )
    said = " ".join(launch("validate", str(cfg)).stderr.split())
    assert "lora_mlp_kernel: runs LoRA on unquantized base weights" in said, said
    assert "lora_mlp_kernel: needs `lora_dropout: 0` (it is 0.05)" in said
    assert "lora_mlp_kernel: does not run DoRA" in said
    ok = quickstart_config(tmp_path, "lora_mlp_kernel: true\nlora_o_kernel: true\n", name="ok.yml")
    launch("validate", str(ok), check=True)


@pytest.mark.slow
def test_a_lora_run_with_the_fused_layers_has_the_losses_of_the_run_without(tmp_path):
    """Two real `launch train` runs of the quickstart, 5 steps: the fused layers on (all
    three keys), then off."""
    base = "max_steps: 5\nnum_epochs: null\nlogging_steps: 1\nmicro_batch_size: 2\n"
    keys = "lora_mlp_kernel: true\nlora_qkv_kernel: true\nlora_o_kernel: true\n"
    said, on = train_losses(tmp_path / "on", base + keys)
    assert "kernels: fused LoRA mlp, qkv, o in 4 layer(s) (Triton's interpreter" in said
    _, off = train_losses(tmp_path / "off", base)
    assert len(off) == 5
    assert on == pytest.approx(off, rel=1e-4)


@pytest.mark.slow
def test_the_kernels_benchmark_checks_every_kernel_on_this_cpu(tmp_path):
    """bench/kernels.py without CUDA: one passing correctness line per kernel. A `kernels`
    distribution's metadata (Hugging Face's hub kernels, which some installs pull in) is put
    on the path: transformers then imports `kernels`, which must not be this script."""
    meta = tmp_path / "kernels-0.18.5.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.18.5\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "bench/kernels.py"], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = [x.split() for x in done.stdout.splitlines() if x.startswith("CHECK ")]
    assert [x[1] for x in lines] == [
        "lora_mlp_silu", "lora_mlp_gelu", "lora_mlp_gelu_tanh", "lora_qkv", "lora_o",
        "liger_rms_norm", "liger_rope", "cce_loss",
    ]  # fmt: skip
    assert all(x[3] == "ok" and float(x[2]) < TOL for x in lines), lines
