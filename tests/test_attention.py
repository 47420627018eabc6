"""The attention backends (payload/config/attention.py): each key chooses its backend, the
rules refuse what cannot work and say what context parallel replaces, flex attention on
Ferry's packed rows attends within each row exactly as sdpa does, its compile arguments
reach torch.compile, and a CPU run is refused where FlexAttention cannot train."""

from __future__ import annotations

import pytest
from helpers import ASSETS, launch, quickstart_config

from payload.config.attention import chosen
from payload.config.loader import validate_mapping
from payload.errors import ConfigError

BASE = {
    "base_model": str(ASSETS / "tiny-llama"),
    "datasets": [{"path": "x.jsonl", "type": "alpaca"}],
    "learning_rate": 1e-4,
}


def check(extra: dict) -> tuple[dict[str, str], list[str]]:
    """(errors by key, warnings) of BASE plus `extra`, from the real validation."""
    said: list[str] = []
    try:
        validate_mapping({**BASE, **extra}, resolve_paths=False, warn=said.append)
    except ConfigError as e:
        return {p.key: p.message for p in e.problems}, said
    return {}, said


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        ({}, None),
        ({"flash_attention": True}, "flash_attention_2"),
        ({"sdp_attention": True}, "sdpa"),
        ({"flex_attention": True}, "flex_attention"),
        ({"attn_implementation": "eager"}, "eager"),
        ({"attn_implementation": "kernels-community/flash-attn"}, "kernels-community/flash-attn"),
    ],
)
def test_each_key_chooses_its_backend(extra, name):
    cfg = validate_mapping({**BASE, **extra}, resolve_paths=False)
    assert chosen(cfg) == name


def test_what_cannot_work_is_refused_and_what_cp_replaces_is_said():
    errors, _ = check({"flash_attention": True, "flex_attention": True})
    assert errors["flash_attention"] == "and `flex_attention` both choose attention; set one."
    errors, _ = check({"attn_implementation": "sdpaa"})
    assert "`sdpaa` is not an attention transformers has" in errors["attn_implementation"]
    assert "Did you mean `sdpa`?" in errors["attn_implementation"]
    errors, _ = check({"flex_attention": True, "flex_attn_compile_kwargs": {"modee": "x"}})
    assert errors["flex_attn_compile_kwargs"].startswith("modee: not torch.compile arguments")
    errors, _ = check({"attn_implementation": "flash_attention_4"})
    assert errors == {}
    errors, _ = check({"flex_attn_compile_kwargs": {"dynamic": False}})
    assert errors["flex_attn_compile_kwargs"] == (
        "applies to flex attention only: add `flex_attention: true`."
    )
    errors, said = check({"flash_attention": True, "context_parallel_size": 2})
    assert "flash_attention" not in errors
    assert any(
        "flash_attention: is not used with context parallel: the split sequences attend "
        "through Ferry's all-gathered sdpa in place of flash_attention_2." in w
        for w in said
    ), said


def test_flex_attention_on_packed_rows_attends_within_each_row_as_sdpa_does():
    """Two rows packed into one by Ferry's collator (no attention_mask: the segments come
    from position_ids): flex attention's logits equal sdpa's, and equal each row's
    logits alone (forward only: FlexAttention has no backward on the CPU). fp32, and
    the two backends sum in different orders: 1e-5."""
    import torch
    from transformers import AutoModelForCausalLM

    from payload.data.collator import PackedCollator

    torch.manual_seed(0)
    rows = [
        {"input_ids": torch.randint(3, 1000, (9,)).tolist()},
        {"input_ids": torch.randint(3, 1000, (13,)).tolist()},
    ]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    batch = PackedCollator(0, 64)([rows])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 22)
    logits = {}
    for name in ("flex_attention", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(
            ASSETS / "tiny-llama", attn_implementation=name, dtype=torch.float32
        ).eval()
        with torch.no_grad():
            # No KV cache, as PackedTrainer sets: with one, transformers stops reading
            # the segments from position_ids.
            logits[name] = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
            if name == "sdpa":
                alone = [model(input_ids=torch.tensor([r["input_ids"]])).logits for r in rows]
    torch.testing.assert_close(logits["flex_attention"], logits["sdpa"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["flex_attention"][:, :9], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["flex_attention"][:, 9:], alone[1], rtol=1e-5, atol=1e-5)


def test_flex_attn_compile_kwargs_reach_torch_compile(monkeypatch):
    """The arguments given are the ones transformers' flex attention is compiled with
    (torch.compile recorded, not run)."""
    import torch
    from transformers.integrations import flex_attention as integration

    from payload.config.attention import configure_flex_compile

    wrapper = integration.WrappedFlexAttention
    for name in ("__init__", "_instance", "_is_flex_compiled", "_compiled_flex_attention"):
        monkeypatch.setattr(wrapper, name, getattr(wrapper, name))  # restored afterwards
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    configure_flex_compile({"dynamic": False, "mode": "max-autotune-no-cudagraphs"})
    wrapper(True)()
    assert seen == [{"dynamic": False, "mode": "max-autotune-no-cudagraphs"}]
    wrapper(False)()  # eval: the same compiled function, not transformers' own compile
    assert len(seen) == 1
    configure_flex_compile(None)  # the next config has none: transformers' own choice
    wrapper(True)()
    assert len(seen) == 2 and seen[1] == {}


def test_a_cpu_run_with_flex_attention_is_refused_before_it_starts(tmp_path):
    cfg = quickstart_config(tmp_path, "flex_attention: true\n")
    said = launch("train", str(cfg))
    assert said.returncode != 0
    assert "`flex_attention` needs a CUDA GPU (torch's FlexAttention has no backward on the " in (
        " ".join(said.stderr.split())
    )
    named = quickstart_config(tmp_path, "attn_implementation: flex_attention\n", name="n.yml")
    said = launch("train", str(named))
    assert said.returncode != 0
    assert "`attn_implementation: flex_attention` needs a CUDA GPU" in said.stderr
