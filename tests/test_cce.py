"""Cut Cross-Entropy (payload/plugins/cce.py): its loss and gradients equal the standard
cross-entropy over materialised logits, for a loss alone and for the tiny Llama's own
forward, and a real run with the plugin listed has the losses of the run without it.

On this CPU the plugin uses CCE's torch_compile implementation (its Triton kernel needs
CUDA): fp32 throughout, so the tolerance is float32 rounding over a sum of a few hundred
terms, relative 1e-5 (measured differences are around 1e-7)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import ASSETS, launch, quickstart_config, train_losses

from payload.plugins.cce import causal_lm_loss, implementation, wrap

RTOL, ATOL = 1e-5, 1e-6


def reference_loss(hidden, weight, labels, count=None):  # type: ignore[no-untyped-def]
    """The next-token cross-entropy from logits, written out: position t predicts
    label t+1, -100 is ignored; the sum over the batch's labelled tokens, divided by
    their number (or by `count`, the labelled tokens of the whole accumulated batch)."""
    logits = hidden[:, :-1] @ weight.T
    targets = labels[:, 1:]
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
        reduction="sum",
    )  # fmt: skip
    return total / (count if count is not None else (targets != -100).sum())


def test_the_device_picks_the_implementation():
    assert implementation(torch.device("cpu")) == "torch_compile"
    assert implementation(torch.device("cuda", 0)) == "cce"


@pytest.mark.parametrize("count", [None, 37])
def test_the_loss_and_its_gradients_equal_cross_entropy_over_logits(count):
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 32, requires_grad=True)
    weight = torch.randn(100, 32, requires_grad=True)
    labels = torch.randint(0, 100, (2, 12))
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[1, -3:] = -100  # padding
    ours = causal_lm_loss(hidden, weight, labels, num_items_in_batch=count)
    ours_grads = torch.autograd.grad(ours, (hidden, weight))
    ref = reference_loss(hidden, weight, labels, count)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=ATOL)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_the_wrapped_model_trains_on_the_same_loss_and_gradients_and_still_generates():
    """The tiny Llama's forward with labels: the loss and every parameter's gradient as
    the model computes them from its logits; no logits are returned. Without labels
    (generation) the model's own forward runs and returns logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    ref = model(input_ids=ids, labels=labels)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    wrap(model)
    ours = model(input_ids=ids, labels=labels)
    assert ours.logits is None
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, ref.loss, rtol=RTOL, atol=ATOL)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name], rtol=RTOL, atol=ATOL, msg=name)
    plain = model(input_ids=ids)
    assert plain.logits.shape == (2, 16, model.config.vocab_size)


def test_cce_keys_need_the_plugin_and_refuse_what_it_cannot_do(tmp_path):
    unlisted = quickstart_config(tmp_path, "cut_cross_entropy: true\n", name="a.yml")
    said = " ".join(launch("validate", str(unlisted)).stderr.split())
    assert (
        "cut_cross_entropy: is a key of the plugin "
        "`axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin`: list it" in said
    ), said
    dpo = quickstart_config(
        tmp_path,
        "plugins: [axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin]\nrl: dpo\n",
        name="b.yml",
    )
    said = " ".join(launch("validate", str(dpo)).stderr.split())
    assert "rl: Cut Cross-Entropy computes a causal LM's next-token loss; `rl: dpo` needs" in (
        said
    ), said


@pytest.mark.slow
def test_a_run_with_the_plugin_has_the_losses_of_the_run_without(tmp_path):
    """Two real `launch train` runs of the quickstart, 4 steps, with and without the
    plugin (listed by Axolotl's path): the same per-step losses, and the run says which
    implementation it used."""
    base = "max_steps: 4\nnum_epochs: null\nlogging_steps: 1\n"
    _, off = train_losses(tmp_path / "off", base)
    plugin = "plugins: [axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin]\n"
    said, on = train_losses(tmp_path / "on", base + plugin)
    assert "cut_cross_entropy: the loss through its torch_compile implementation" in said
    assert len(off) == 4
    assert on == pytest.approx(off, rel=1e-4)


def test_models_whose_logits_cce_would_get_wrong_are_refused():
    """CCE computes lm_head(h) (and a softcap): a model that scales its logits, a head
    with a bias or a LoRA adapter, or a model that is not a causal LM is refused."""
    from transformers import AutoModelForCausalLM

    from payload.plugins.cce import head_problem, model_problem

    llama = json.loads((ASSETS / "tiny-llama" / "config.json").read_text())
    assert model_problem(llama) is None
    assert "scales its logits (logits_scaling: 8.0)" in model_problem(
        {**llama, "logits_scaling": 8.0}
    )
    assert "is not a causal LM" in model_problem(
        {**llama, "architectures": ["LlavaForConditionalGeneration"]}
    )
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    assert head_problem(model) is None
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    assert (
        head_problem(adapted) == "the LM head has a LoRA adapter (lm_head in lora_target_modules)"
    )


def test_cut_cross_entropy_false_leaves_the_model_as_it_was():
    """Listed with `cut_cross_entropy: false`, the plugin wraps nothing: the model's own
    loss, logits and all; with the default (true), no logits."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from payload.plugins.cce import CutCrossEntropyPlugin

    ids = torch.randint(0, 1000, (1, 8))
    for on, has_logits in ((False, True), (True, False)):
        model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama")
        model = CutCrossEntropyPlugin().after_model(SimpleNamespace(cut_cross_entropy=on), model)
        out = model(input_ids=ids, labels=ids)
        assert (out.logits is not None) is has_logits
