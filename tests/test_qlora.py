"""QLoRA (LoRA on a 4-bit base) and 8-bit LoRA on the CPU with bitsandbytes, through the
real CLI and the real loading path: the runs train, the adapter reloads onto a freshly
quantized base, each bitsandbytes key reaches the quantized layers, and an evaluation
between training steps leaves the training exactly as it was (bitsandbytes' CPU
inference repacking, turned off by payload/quantized.py, would change it)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import DATA, launch, quickstart_config, tiny_config

from payload.config import ConfigError, load_config, validate_mapping
from payload.storage.layout import read_metrics

ALPACA = [{"path": str(DATA), "type": "alpaca"}]
# 20 seeded steps on the quickstart's data, 16 rows held out and evaluated as one batch.
QLORA_RUN = (
    "adapter: qlora\nload_in_4bit: true\nval_set_size: 0.05\neval_batch_size: 16\n"
    "max_steps: 20\nnum_epochs: null\nlogging_steps: 1\nsave_steps: 1000\nwarmup_steps: 2\n"
)


def _train(tmp_path: Path, name: str, extra: str) -> SimpleNamespace:
    home = tmp_path / f"{name}-home"
    cfg = quickstart_config(tmp_path, extra, name=f"{name}.yml")
    env = {"FERRY_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    result = launch("train", str(cfg), env=env, timeout=300, check=True)
    runs = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    output = Path(runs[0]["output_dir"])
    metrics = read_metrics(output)
    return SimpleNamespace(
        result=result,
        output=output,
        losses={r["step"]: r["loss"] for r in metrics if "loss" in r},
        evals={r["step"]: r["eval_loss"] for r in metrics if "eval_loss" in r},
    )


@pytest.fixture(scope="module")
def qlora_runs(tmp_path_factory):
    """The same QLoRA run twice through `launch train`: evaluating every 5 steps, and
    never evaluating."""
    tmp = tmp_path_factory.mktemp("qlora")
    return SimpleNamespace(
        evaluated=_train(tmp, "evaluated", QLORA_RUN + "eval_steps: 5\n"),
        plain=_train(tmp, "plain", QLORA_RUN + "eval_strategy: 'no'\n"),
    )


@pytest.mark.slow
def test_qlora_trains_on_cpu_and_saves_the_adapter(qlora_runs):
    run = qlora_runs.evaluated
    assert "qlora" in run.result.stdout
    losses = [run.losses[s] for s in sorted(run.losses)]
    assert len(losses) == 20
    assert losses[-1] <= 0.85 * losses[0], f"loss fell only from {losses[0]} to {losses[-1]}"
    evals = [run.evals[s] for s in sorted(run.evals)]
    assert sorted(run.evals) == [5, 10, 15, 20] and evals[-1] < evals[0]
    adapter = json.loads((run.output / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 16
    assert (run.output / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_evaluating_between_steps_leaves_the_training_unchanged(qlora_runs):
    """A failure means an evaluation changed the 4-bit layers under the training: the
    losses after the first evaluation (step 5) part from those of the run that never
    evaluated (bitsandbytes' CPU repacking changes the forward and cuts the gradient)."""
    evaluated, plain = qlora_runs.evaluated.losses, qlora_runs.plain.losses
    assert sorted(evaluated) == sorted(plain) == list(range(1, 21))
    for step in evaluated:
        assert evaluated[step] == pytest.approx(plain[step], rel=1e-6, abs=0), step


@pytest.mark.slow
def test_the_adapter_reloads_onto_a_fresh_4bit_base(qlora_runs):
    """The saved adapter on a newly quantized base gives the held-out loss the trained
    model logged at its last step (the same 16 rows, one batch, fp32 on the CPU: only
    summation order may differ, so 1e-5 relative)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from payload.data.build import build_datasets
    from payload.model import load_tokenizer
    from payload.quantized import keep_trainable_layout, quantization_config
    from payload.trainers.settings import unpacked_collator

    run = qlora_runs.evaluated
    cfg = load_config(run.output / "config.yml")
    tokenizer = load_tokenizer(cfg)
    _, eval_set, _ = build_datasets(cfg, tokenizer)
    assert len(eval_set) == 16
    base = AutoModelForCausalLM.from_pretrained(
        cfg.base_model, quantization_config=quantization_config(cfg), dtype=torch.float32
    )
    assert type(base.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    # The training evaluated in the trainable layout; so must this one to compare.
    keep_trainable_layout(base)
    model = PeftModel.from_pretrained(base, run.output).eval()
    batch = unpacked_collator(cfg, tokenizer)([eval_set[i] for i in range(len(eval_set))])
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(run.evals[20], rel=1e-5)
    # and not merely the base's loss: the adapter is applied
    with torch.no_grad(), model.disable_adapter():
        assert model(**batch).loss.item() > loss + 0.5


@pytest.mark.slow
def test_merge_lora_of_a_qlora_run_computes_what_the_trained_model_computes(qlora_runs, tmp_path):
    """`launch merge-lora` on the QLoRA run: the merged model (the adapter folded into the
    de-quantized 4-bit weights, saved in full precision) loads without peft or
    bitsandbytes, holds no 4-bit layer, and its logits equal those of the 4-bit base with
    the adapter on it (both fp32 on the CPU: the 4-bit layer de-quantizes and then
    multiplies, so only summation order differs; 1e-4 absolute on logits of size ~1)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from payload.quantized import keep_trainable_layout, quantization_config

    run = qlora_runs.evaluated
    dest = tmp_path / "merged"
    result = launch("merge-lora", str(run.output / "config.yml"), "--dest", str(dest), check=True)
    assert str(dest) in result.stdout
    merged = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    assert not any("lora" in name for name, _ in merged.named_parameters())

    cfg = load_config(run.output / "config.yml")
    base = AutoModelForCausalLM.from_pretrained(
        cfg.base_model, quantization_config=quantization_config(cfg), dtype=torch.float32
    )
    keep_trainable_layout(base)
    trained = PeftModel.from_pretrained(base, run.output).eval()
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)
        unquantized_merge = PeftModel.from_pretrained(plain, run.output).merge_and_unload()
        wrong = unquantized_merge(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    # Merging into the original full-precision weights instead would not be this model.
    assert (wrong - want).abs().max() > 1e-2


def _lora_gradients(
    extra: dict, evaluate_between: bool, guarded: bool = True
) -> tuple[float, dict]:
    """Loss and LoRA gradients of a second training step on a freshly loaded quantized
    model, with or without a `no_grad` eval forward after the first step. `guarded=False`
    undoes Ferry's guard (payload.quantized.keep_trainable_layout) after loading."""
    import torch

    from payload.model import load_model, load_tokenizer

    cfg = tiny_config(ALPACA, **{"adapter": "lora", "lora_target_linear": True, **extra})
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, tokenizer)
    if not guarded:
        from bitsandbytes.nn import Linear4bit

        for layer in model.modules():
            if isinstance(layer, Linear4bit):
                layer.support_avx512bf16_for_cpu = True
    with torch.no_grad():  # non-zero B: the gradients then flow through every base layer
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if evaluate_between:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [{"adapter": "qlora", "load_in_4bit": True}, {"load_in_8bit": True}],
    ids=["4bit", "8bit"],
)
def test_an_eval_forward_leaves_the_lora_gradients_exact(extra):
    """A failure means a `no_grad` eval forward changed the quantized layers: the next
    training step's loss or LoRA gradients differ from a run without it. (On a CPU with
    AVX512-BF16, bitsandbytes would repack the 4-bit weights into its inference layout;
    the gradients then stop at the first 4-bit layer and torch only warns.)"""
    import torch

    ref_loss, ref = _lora_gradients(extra, evaluate_between=False)
    loss, grads = _lora_gradients(extra, evaluate_between=True)
    assert loss == ref_loss
    assert grads.keys() == ref.keys() and len(ref) == 4 * 7 * 2  # 4 layers x 7 linears x A, B
    lowest = [n for n in ref if ".layers.0." in n]
    assert all(ref[n].abs().sum() > 0 for n in lowest), "no gradient reached layer 0"
    differ = [n for n in ref if not torch.equal(grads[n], ref[n])]
    assert not differ, f"{len(differ)} LoRA gradients changed, e.g. {differ[:2]}"


@pytest.mark.slow
def test_without_the_guard_the_eval_forward_does_change_the_gradients():
    """The control for the test above: the trap is real on this CPU, so that test's
    passing means the guard works (not that nothing could go wrong here). bitsandbytes
    repacks only on a CPU with AVX512-BF16; on one without, the trap cannot happen and
    there is nothing to control."""
    import torch
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks 4-bit weights here")
    qlora = {"adapter": "qlora", "load_in_4bit": True}
    _, ref = _lora_gradients(qlora, evaluate_between=False, guarded=False)
    _, grads = _lora_gradients(qlora, evaluate_between=True, guarded=False)
    differ = [n for n in ref if not torch.equal(grads[n], ref[n])]
    assert differ, "without the guard an eval forward left every LoRA gradient unchanged"


def _layer(extra: dict, module: str = "q_proj"):
    """The base layer `module` of layer 0 after Ferry's loading path (LoRA applied)."""
    from payload.model import load_model, load_tokenizer

    cfg = tiny_config(ALPACA, lora_target_linear=True, **extra)
    model = load_model(cfg, load_tokenizer(cfg))
    layer = getattr(model.base_model.model.model.layers[0].self_attn, module)
    return getattr(layer, "base_layer", layer)


QLORA = {"adapter": "qlora", "load_in_4bit": True}
LORA8 = {"adapter": "lora", "load_in_8bit": True}


def test_4bit_defaults_are_axolotls_with_a_cpu_compute_dtype():
    import torch

    layer = _layer(QLORA)
    assert type(layer).__name__ == "Linear4bit"
    assert layer.weight.quant_type == "nf4"
    assert layer.weight.quant_state.nested  # double quantization
    assert layer.weight.dtype == torch.bfloat16  # the storage dtype
    # no bf16 on this CPU-only run, so no float16 either: the layers compute in float32
    assert layer.compute_dtype == torch.float32
    assert layer.support_avx512bf16_for_cpu is False  # no CPU repacking


@pytest.mark.parametrize(
    ("setting", "check"),
    [
        ({"bnb_4bit_quant_type": "fp4"}, lambda layer: layer.weight.quant_type == "fp4"),
        (
            {"bnb_4bit_use_double_quant": False},
            lambda layer: not layer.weight.quant_state.nested,
        ),
        (
            {"bnb_4bit_compute_dtype": "bfloat16"},
            lambda layer: str(layer.compute_dtype) == "torch.bfloat16",
        ),
        (
            {"bnb_4bit_quant_storage": "uint8"},
            lambda layer: str(layer.weight.dtype) == "torch.uint8",
        ),
        (  # q_proj left in full precision
            {"llm_int8_skip_modules": ["q_proj", "lm_head"]},
            lambda layer: type(layer).__name__ == "Linear",
        ),
    ],
    ids=["quant_type", "double_quant", "compute_dtype", "quant_storage", "skip_modules"],
)
def test_each_bnb_config_kwargs_setting_reaches_the_4bit_layers(setting, check):
    assert check(_layer({**QLORA, "bnb_config_kwargs": setting}))


def test_8bit_keys_reach_the_layers():
    import torch

    plain = _layer({"adapter": "lora", "load_in_8bit": True})
    assert type(plain).__name__ == "Linear8bitLt"
    assert plain.weight.dtype == torch.int8 and plain.state.threshold == 6.0
    tuned = _layer(
        {
            "adapter": "lora",
            "load_in_8bit": True,
            "bnb_config_kwargs": {"llm_int8_threshold": 4.0, "llm_int8_has_fp16_weight": True},
        }
    )
    assert tuned.state.threshold == 4.0
    assert tuned.weight.dtype == torch.float32  # kept unquantized
    skipped = _layer(
        {
            "adapter": "lora",
            "load_in_8bit": True,
            "bnb_config_kwargs": {"llm_int8_skip_modules": ["q_proj", "lm_head"]},
        }
    )
    assert type(skipped).__name__ == "Linear"


@pytest.mark.slow
def test_8bit_lora_trains_on_cpu(tmp_path):
    run = _train(
        tmp_path,
        "lora8",
        "load_in_8bit: true\nmax_steps: 10\nnum_epochs: null\nlogging_steps: 1\n"
        "save_steps: 1000\nwarmup_steps: 2\n",
    )
    losses = [run.losses[s] for s in sorted(run.losses)]
    assert len(losses) == 10 and losses[-1] <= 0.9 * losses[0], losses
    # bitsandbytes logs its float16 cast on every 8-bit layer call; Ferry keeps one.
    log = run.result.stdout + run.result.stderr
    assert log.count("MatMul8bitLt: inputs will be cast") <= 1


def _problems(extra: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        tiny_config(ALPACA, **extra)
    return {p.key: p.message for p in info.value.problems}


def test_bad_bitsandbytes_settings_are_named():
    found = _problems(
        {
            **QLORA,
            "bnb_config_kwargs": {
                "llm_int8_treshold": 5,
                "bnb_4bit_use_double_quant": "yes",
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "int4",
            },
        }
    )
    assert "did you mean `llm_int8_threshold`" in found["bnb_config_kwargs.llm_int8_treshold"]
    assert "true or false" in found["bnb_config_kwargs.bnb_4bit_use_double_quant"]
    assert "top-level `load_in_4bit`" in found["bnb_config_kwargs.load_in_4bit"]
    assert "nf4 or fp4, not 'int4'" in found["bnb_config_kwargs.bnb_4bit_quant_type"]
    # Axolotl has no top-level bnb_4bit_* keys; nor has Ferry (they go in bnb_config_kwargs).
    assert "bnb_4bit_quant_type" in _problems({**QLORA, "bnb_4bit_quant_type": "nf4"})


def test_ignored_bitsandbytes_settings_warn():
    seen: list[str] = []
    raw = {"base_model": str(DATA.parents[1] / "assets" / "tiny-llama"), "learning_rate": 1e-4}
    validate_mapping(
        {**raw, "datasets": ALPACA, "bnb_config_kwargs": {"bnb_4bit_quant_type": "fp4"}},
        "t.yml",
        warn=seen.append,
    )
    validate_mapping(
        {
            **raw,
            "datasets": ALPACA,
            "adapter": "lora",
            "load_in_8bit": True,
            "bnb_config_kwargs": {"bnb_4bit_quant_type": "fp4"},
        },
        "t.yml",
        warn=seen.append,
    )
    assert any("bnb_config_kwargs: ignored" in w and "not quantized" in w for w in seen), seen
    assert any(
        "bnb_config_kwargs.bnb_4bit_quant_type" in w and "load_in_8bit" in w for w in seen
    ), seen
