"""Liger (payload/plugins/liger.py): each of liger-kernel's patched modules equals the
module it replaces, forward and backward, under Triton's interpreter on this CPU; the
tiny Llama patched by the plugin's own call has the loss and gradients of the plain one;
an Axolotl-style config listing the Liger and Cut Cross-Entropy plugins validates, plans
for Modal and trains 2 steps with the losses of the run without them.

Tolerance: fp32 throughout, the kernels and torch order their sums differently; relative
1e-5, absolute 1e-5 on values of order 1 (measured differences are below 1e-6). The
kernels run in a subprocess: the interpreter is switched on before liger-kernel is
imported, as the plugin does, and stays out of the test process."""

from __future__ import annotations

import textwrap

import pytest
from helpers import ASSETS, launch, quickstart_config, run_probe, train_losses

TOL = 1e-5

PROBE = textwrap.dedent(
    """
    import json, sys
    sys.modules["torchao"] = None
    from payload.kernels import interpret
    interpret.enable()
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig
    from transformers.models.llama import modeling_llama as ml
    from transformers.models.gemma import modeling_gemma as mg

    torch.manual_seed(0)
    out = {}

    def compare(name, ours, ref, inputs):
        # forward and the gradients of every input and parameter, ours against ref
        def run(module):
            xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
            y = module(*xs)
            ys = y if isinstance(y, tuple) else (y,)
            weights = [torch.randn(t.shape) for t in ys]  # by shape: strides may differ
            torch.manual_seed(1)
            sum((t * w).sum() for t, w in zip(ys, weights)).backward()
            grads = [x.grad for x in xs if x.grad is not None]
            params = [p.grad for p in getattr(module, "parameters", lambda: [])()]
            return ys, grads + params
        torch.manual_seed(2); ys, gs = run(ours)
        torch.manual_seed(2); yr, gr = run(ref)
        diff = max(
            ((a - b).abs().max() / (1 + b.abs().max())).item()
            for a, b in zip([*ys, *gs], [*yr, *gr], strict=True)
        )
        out[name] = {"diff": diff, "outputs": len(ys) + len(gs)}

    cfg = AutoConfig.from_pretrained(sys.argv[1])
    x = torch.randn(2, 8, cfg.hidden_size)

    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    ref = ml.LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    ref.weight.data = torch.rand(cfg.hidden_size) + 0.5
    ours = LigerRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    ours.weight.data = ref.weight.data.clone()
    compare("rms_norm", ours, ref, [x])

    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    ref = ml.LlamaMLP(cfg)
    ours = LigerSwiGLUMLP(cfg)
    ours.load_state_dict(ref.state_dict())
    compare("swiglu", ours, ref, [x])

    from liger_kernel.transformers.geglu import LigerGEGLUMLP
    gcfg = AutoConfig.for_model("gemma", hidden_size=cfg.hidden_size,
                                intermediate_size=cfg.intermediate_size,
                                hidden_activation="gelu_pytorch_tanh")
    ref = mg.GemmaMLP(gcfg)
    ours = LigerGEGLUMLP(gcfg)
    ours.load_state_dict(ref.state_dict())
    compare("geglu", ours, ref, [x])

    from liger_kernel.transformers.layer_norm import LigerLayerNorm
    ref = torch.nn.LayerNorm(cfg.hidden_size)
    ref.weight.data = torch.rand(cfg.hidden_size) + 0.5
    ref.bias.data = torch.randn(cfg.hidden_size)
    ours = LigerLayerNorm(cfg.hidden_size)
    ours.load_state_dict(ref.state_dict())
    compare("layer_norm", ours, ref, [x])

    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    q, k = torch.randn(2, heads, 8, dim), torch.randn(2, heads, 8, dim)
    rotary = ml.LlamaRotaryEmbedding(cfg)
    cos, sin = rotary(q, torch.arange(8).unsqueeze(0).expand(2, 8))
    compare("rope", lambda a, b: liger_rotary_pos_emb(a, b, cos, sin),
            lambda a, b: ml.apply_rotary_pos_emb(a, b, cos, sin), [q, k])

    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    logits = torch.randn(16, cfg.vocab_size)
    labels = torch.randint(0, cfg.vocab_size, (16,))
    labels[:3] = -100
    compare("cross_entropy", lambda z: LigerCrossEntropyLoss()(z, labels),
            lambda z: F.cross_entropy(z, labels), [logits])

    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )
    head = torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.1
    h = torch.randn(16, cfg.hidden_size)
    compare("fused_linear_cross_entropy",
            lambda a, w: LigerFusedLinearCrossEntropyLoss()(w, a, labels),
            lambda a, w: F.cross_entropy(a @ w.T, labels), [h, head])

    # The whole tiny Llama, patched as the plugin patches it (every switch on but the
    # logits' cross-entropy, which the fused loss replaces): loss and every gradient.
    from transformers import AutoModelForCausalLM
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    lab = ids.clone(); lab[:, :4] = -100
    torch.manual_seed(3)
    plain = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).train()
    ref = plain(input_ids=ids, labels=lab); ref.loss.backward()
    ref_grads = {n: p.grad for n, p in plain.named_parameters()}
    from payload.plugins.liger import FAMILIES, switches
    from types import SimpleNamespace
    keys = dict(liger_rope=True, liger_rms_norm=True, liger_glu_activation=True,
                liger_fused_linear_cross_entropy=True)
    chosen = switches(SimpleNamespace(**keys), FAMILIES["llama"])
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    MODEL_TYPE_TO_APPLY_LIGER_FN["llama"](**chosen)
    patched = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).train()
    kinds = sorted({type(m).__name__ for m in patched.modules() if "Liger" in type(m).__name__})
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    rope = ml.apply_rotary_pos_emb is liger_rotary_pos_emb
    ours = patched(input_ids=ids, labels=lab); ours.loss.backward()
    fused = ours.logits is None  # training mode: the fused loss, no logits
    diff = max(abs(ours.loss.item() - ref.loss.item()), *(
        ((p.grad - ref_grads[n]).abs().max() / (1 + ref_grads[n].abs().max())).item()
        for n, p in patched.named_parameters()))
    out["model"] = {"diff": diff, "chosen": chosen, "kinds": kinds, "rope": rope, "fused": fused,
                    "loss": ours.loss.item(), "ref_loss": ref.loss.item()}
    print("PROBE " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def probe() -> dict:
    return run_probe(PROBE, str(ASSETS / "tiny-llama"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "outputs"),
    [
        ("rms_norm", 3),  # output, input grad, weight grad
        ("swiglu", 5),  # output, input grad, gate/up/down weight grads
        ("geglu", 5),
        ("layer_norm", 4),  # output, input grad, weight and bias grads
        ("rope", 4),  # q and k rotated, both grads
        ("cross_entropy", 2),  # loss, logits grad
        ("fused_linear_cross_entropy", 3),  # loss, hidden and head grads
    ],
)
def test_each_liger_module_equals_the_module_it_replaces(probe, module, outputs):
    assert probe[module]["outputs"] == outputs
    assert probe[module]["diff"] < TOL, probe[module]


@pytest.mark.slow
def test_the_plugins_patch_of_the_tiny_llama_keeps_its_loss_and_gradients(probe):
    found = probe["model"]
    assert found["chosen"] == {
        "rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True,
        "cross_entropy": False,
    }  # fmt: skip
    assert found["kinds"] == ["LigerRMSNorm", "LigerSwiGLUMLP"]
    assert found["rope"] and found["fused"], found
    assert found["diff"] < TOL, found


def test_the_model_families_are_liger_kernels_own():
    """`launch validate` checks Liger keys against a table written here (it must not
    import liger-kernel); the table is liger-kernel's, switch for switch."""
    import inspect

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    from payload.plugins.liger import FAMILIES

    theirs = {
        kind: frozenset(p for p in inspect.signature(fn).parameters if p not in ("model", "kwargs"))
        for kind, fn in MODEL_TYPE_TO_APPLY_LIGER_FN.items()
    }
    assert theirs == FAMILIES


def test_liger_keys_the_family_or_the_config_cannot_have_are_refused(tmp_path):
    plugin = "plugins: [axolotl.integrations.liger.LigerPlugin]\n"
    cfg = quickstart_config(
        tmp_path,
        plugin + "liger_layer_norm: true\nliger_cross_entropy: true\n"
        "liger_fused_linear_cross_entropy: true\nliger_rms_norm_gated: true\n",
    )  # fmt: skip
    said = " ".join(launch("validate", str(cfg)).stderr.split())
    assert "liger_layer_norm: liger-kernel's patch for `llama` has no `layer_norm`" in said, said
    assert "liger_cross_entropy: and liger_fused_linear_cross_entropy both compute" in said
    assert "liger_rms_norm_gated: liger-kernel 0.8.5 has no separate gated RMSNorm" in said
    unlisted = quickstart_config(tmp_path, "liger_rms_norm: true\n", name="u.yml")
    said = " ".join(launch("validate", str(unlisted)).stderr.split())
    assert "liger_rms_norm: is a key of the plugin `axolotl.integrations.liger.LigerPlugin`" in said


AXOLOTL_STYLE = """\
plugins:
  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin
  - axolotl.integrations.liger.LigerPlugin
cut_cross_entropy: true
liger_rope: true
liger_rms_norm: true
liger_glu_activation: true
liger_fused_linear_cross_entropy: false
max_steps: 2
num_epochs: null
logging_steps: 1
"""


@pytest.mark.slow
def test_an_axolotl_style_config_with_both_plugins_plans_and_trains(tmp_path):
    """Validates, plans for Modal (the plugins are in the image), trains 2 steps on this
    CPU with the losses of the same run without the plugins."""
    # One row a step: the interpreter runs each kernel row by row in numpy.
    small = "micro_batch_size: 1\nlogging_steps: 1\n"
    cfg = quickstart_config(tmp_path, AXOLOTL_STYLE + small)
    launch("validate", str(cfg), check=True)
    plan = launch(
        "train", str(cfg), "--cloud", "modal", "--gpus", "H100:1", "--dry-run", check=True
    ).stdout
    assert "backend" in plan and "modal" in plan
    said, on = train_losses(tmp_path / "on", AXOLOTL_STYLE + small)
    assert "plugins: liger: rms_norm, rope, swiglu for llama through Triton's" in said, said[-2000:]
    assert "cut_cross_entropy: the loss through its torch_compile" in said
    _, off = train_losses(tmp_path / "off", "max_steps: 2\nnum_epochs: null\n" + small)
    assert len(off) == 2
    assert on == pytest.approx(off, rel=1e-4)


def test_each_liger_key_reaches_its_switch():
    """The keys map onto liger-kernel's switches for the family: the GLU key onto swiglu
    or geglu, liger_swiglu (the old name) as liger_glu_activation, every other switch
    given as off (liger-kernel's functions default most to on)."""
    from payload.config.schema import TrainConfig
    from payload.plugins import config_class, resolve
    from payload.plugins.liger import FAMILIES, switches

    model = config_class((resolve("axolotl.integrations.liger.LigerPlugin"),))
    assert issubclass(model, TrainConfig)
    base = {"base_model": "m", "datasets": [{"path": "x", "type": "alpaca"}]}
    cfg = model.model_validate({**base, "liger_layer_norm": True, "liger_swiglu": True,
                                "liger_cross_entropy": True})  # fmt: skip
    assert switches(cfg, FAMILIES["gemma3"]) == {
        "rope": False, "rms_norm": False, "geglu": True, "layer_norm": True,
        "cross_entropy": True, "fused_linear_cross_entropy": False,
    }  # fmt: skip
    cfg = model.model_validate({**base, "liger_rope": True, "liger_rms_norm": True})
    assert switches(cfg, FAMILIES["qwen2"]) == {
        "rope": True, "rms_norm": True, "swiglu": False, "cross_entropy": False,
        "fused_linear_cross_entropy": False,
    }  # fmt: skip
