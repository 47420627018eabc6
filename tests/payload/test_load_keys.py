"""Axolotl's model and tokenizer load keys: each one reaches the tokenizer or model it
names, shown on what loads (a token id, a config value, a parameter, a trained adapter).

Expected values are worked out here from the assets, not read back from the code."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ASSETS, DATA, ROOT

from payload.config import ConfigError, validate_mapping
from payload.model import load_model, load_tokenizer


def _raw(**extra):
    return {
        "base_model": str(ASSETS / "tiny-llama"),
        "learning_rate": 1e-4,
        "datasets": [{"path": str(DATA), "type": "alpaca"}],
        **extra,
    }


def _cfg(warnings=None, **extra):
    return validate_mapping(_raw(**extra), warn=(warnings.append if warnings is not None else None))


def _problems(**extra) -> str:
    with pytest.raises(ConfigError) as e:
        validate_mapping(_raw(**extra))
    return str(e.value)


# ---- tokenizer_legacy, tokenizer_use_fast


def _metaspace_tokenizer(folder):
    """A 9-token SentencePiece-style (Metaspace) Llama tokenizer: `▁Hi` (id 8) is "Hi" at
    the start of a word, `Hi` (id 7) the same letters without the word-start marker."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "H": 4, "i": 5, "▁H": 6, "Hi": 7, "▁Hi": 8}
    merges = [("▁", "H"), ("H", "i"), ("▁H", "i")]
    LlamaTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    return str(folder)


def test_tokenizer_legacy_decides_the_word_start_after_a_special_token(tmp_path):
    """`legacy: true` (the old SentencePiece behaviour) marks text right after a special
    token as a word start (▁Hi = 8); `false` does not (Hi = 7). The same ids for both
    mean tokenizer_legacy does not reach the tokenizer."""
    folder = _metaspace_tokenizer(tmp_path / "spm")
    ids = {}
    for legacy in (True, False):
        tokenizer = load_tokenizer(_cfg(tokenizer_config=folder, tokenizer_legacy=legacy))
        ids[legacy] = tokenizer("Hi</s>Hi", add_special_tokens=False)["input_ids"]
    assert ids[True] == [8, 2, 8]
    assert ids[False] == [8, 2, 7]


def test_tokenizer_use_fast_true_is_the_fast_tokenizer_and_false_warns():
    """transformers 5 has only fast tokenizers: `true` (Axolotl's default) is what loads;
    `false` cannot be honoured, so validation says it is ignored rather than staying
    silent."""
    warnings: list[str] = []
    assert load_tokenizer(_cfg(warnings, tokenizer_use_fast=True)).is_fast
    assert warnings == []
    tokenizer = load_tokenizer(_cfg(warnings, tokenizer_use_fast=False))
    assert tokenizer.is_fast
    assert len(warnings) == 1 and "tokenizer_use_fast: `false` is ignored" in warnings[0]


# ---- low_cpu_mem_usage, experimental_skip_move_to_device


def test_load_placement_keys_true_is_what_happens_and_false_warns():
    """Both keys' `true` describes how Ferry loads (straight into an empty model; left on
    the CPU for the trainer to place), so it is accepted quietly and the model is still
    on the CPU after loading; `false` asks for something Ferry does not do, and says so."""
    warnings: list[str] = []
    cfg = _cfg(warnings, low_cpu_mem_usage=True, experimental_skip_move_to_device=True)
    assert warnings == []
    model = load_model(cfg, load_tokenizer(cfg))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    _cfg(warnings, low_cpu_mem_usage=False, experimental_skip_move_to_device=False)
    assert sorted(w.split(":")[1].strip() for w in warnings) == [
        "experimental_skip_move_to_device",
        "low_cpu_mem_usage",
    ]


# ---- revision_of_model / model_revision


@pytest.fixture
def two_revisions(tmp_path, monkeypatch):
    """A hub cache holding `ferry/tiny` at two revisions, read offline: `main` is the
    tiny model as shipped, `v2` the same with its embeddings doubled and a tokenizer whose
    model_max_length is 77 (the shipped one says 1024)."""
    import huggingface_hub.constants
    import torch
    from safetensors.torch import load_file, save_file

    repo = tmp_path / "hub" / "models--ferry--tiny"
    revisions = {"main": "a" * 40, "v2": "b" * 40}
    for ref, commit in revisions.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(ASSETS / "tiny-llama", repo / "snapshots" / commit)
    v2 = repo / "snapshots" / revisions["v2"]
    weights = load_file(v2 / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 2
    save_file(weights, v2 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((v2 / "tokenizer_config.json").read_text())
    (v2 / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    shipped = load_file(ASSETS / "tiny-llama" / "model.safetensors")["model.embed_tokens.weight"]
    return torch, shipped


@pytest.mark.parametrize("key", ["revision_of_model", "model_revision"])
def test_revision_picks_the_model_and_tokenizer_of_that_revision(two_revisions, key):
    """With a revision, the model and the tokenizer both come from that snapshot of the
    repository; without, from `main`. Shipped embeddings under `v2` (or 1024 there) mean
    the revision did not reach from_pretrained."""
    torch, shipped = two_revisions

    def _cfg(**extra):  # a hub id: not looked up as a local path
        return validate_mapping(_raw(base_model="ferry/tiny", **extra), resolve_paths=False)

    base: dict = {}
    cfg = _cfg(**base, **{key: "v2"})
    assert cfg.revision_of_model == "v2"
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.model_max_length == 77
    embeddings = load_model(cfg, tokenizer).get_input_embeddings().weight
    assert torch.equal(embeddings, shipped * 2)

    cfg = _cfg(**base)
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.model_max_length == 1024
    assert torch.equal(load_model(cfg, tokenizer).get_input_embeddings().weight, shipped)


def test_revision_names_are_one_setting():
    assert "model_revision: and `revision_of_model` are the same setting" in _problems(
        revision_of_model="v1", model_revision="v2"
    )


def test_revision_of_a_local_folder_warns(caplog):
    cfg = _cfg(revision_of_model="v2")
    with caplog.at_level(logging.WARNING, logger="ferry.model"):
        load_model(cfg, load_tokenizer(cfg))
    assert "is a local folder" in caplog.text


# ---- model_config (overrides_of_model_config)


@pytest.mark.parametrize("key", ["model_config", "overrides_of_model_config"])
def test_model_config_overrides_reach_the_model(key):
    """`model_config: {attention_dropout: 0.25}` is set on the config the model is built
    from: the model's config and every attention layer carry 0.25 (the shipped config
    says 0.0); a mapping (rope_parameters) replaces the config's whole."""
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    cfg = _cfg(**{key: {"attention_dropout": 0.25, "rope_parameters": rope}})
    assert cfg.overrides_of_model_config == {"attention_dropout": 0.25, "rope_parameters": rope}
    model = load_model(cfg, load_tokenizer(cfg))
    assert model.config.attention_dropout == 0.25
    layers = model.model.layers
    assert [layer.self_attn.attention_dropout for layer in layers] == [0.25] * len(layers)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 2.0
    # Linear scaling divides every rotary frequency by the factor: 1 / 10000^(2i/d) / 2.
    import torch

    head_dim = 32
    expected = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)) / 2.0
    assert torch.allclose(model.model.rotary_emb.inv_freq, expected)


def test_model_config_problems_name_the_key_as_written(caplog):
    assert "model_config: should be a valid dictionary (got 'x')" in _problems(model_config="x")
    assert "overrides_of_model_config: and `model_config` are the same setting" in _problems(
        model_config={"a": 1}, overrides_of_model_config={"a": 1}
    )
    cfg = _cfg(model_config={"attention_dropuot": 0.1})
    with caplog.at_level(logging.WARNING, logger="ferry.model"):
        load_model(cfg, load_tokenizer(cfg))
    assert "model_config.attention_dropuot is not a setting of LlamaConfig" in caplog.text


# ---- resize_token_embeddings_to_32x


def test_resize_token_embeddings_to_32x_rounds_up_to_a_multiple_of_32():
    """Three new tokens on the 1,024-token tokenizer make 1,027 tokens: the embeddings
    grow to 1,027 rows, or with the key to 1,056 (33 x 32). With no new token 1,024 is
    already a multiple of 32 and nothing changes."""
    new = {"pad_token": "<p1>", "sep_token": "<p2>", "cls_token": "<p3>"}
    rows = {}
    for flag in (None, True):
        cfg = _cfg(special_tokens=new, resize_token_embeddings_to_32x=flag)
        tokenizer = load_tokenizer(cfg)
        assert len(tokenizer) == 1027
        model = load_model(cfg, tokenizer)
        rows[flag] = model.get_input_embeddings().weight.shape[0]
        assert model.get_output_embeddings().weight.shape[0] == rows[flag]
    assert rows == {None: 1027, True: 1056}
    cfg = _cfg(resize_token_embeddings_to_32x=True)
    assert load_model(cfg, load_tokenizer(cfg)).get_input_embeddings().weight.shape[0] == 1024


# ---- lora_target_parameters


def test_lora_target_parameters_adapts_the_named_parameter_and_trains():
    """`lora_target_parameters: [mlp.up_proj.weight]` puts an adapter on that parameter
    of each of the 4 layers and on nothing else (no q_proj/v_proj, peft's default
    modules), and a few optimiser steps move the adapter (lora_B starts at zero) and
    lower the loss, while the base weight stays as loaded."""
    import torch
    from peft.tuners.lora.layer import ParamWrapper

    cfg = _cfg(adapter="lora", lora_r=4, lora_target_parameters=["mlp.up_proj.weight"])
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"base_model.model.model.layers.{i}.mlp.up_proj.lora_{ab}.default.weight"
        for i in range(4)
        for ab in "AB"
    }
    up = model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(up, ParamWrapper) and up.parameter_name == "weight"
    base = up.get_base_layer().weight.detach().clone()

    torch.manual_seed(0)
    batch = tokenizer(
        ["Ferry trains small models on whatever compute you have."] * 2, return_tensors="pt"
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert up.lora_B["default"].weight.abs().sum() > 0
    assert torch.equal(up.get_base_layer().weight, base)


def test_lora_target_parameters_rules():
    assert "lora_dropout: must be 0 with `lora_target_parameters`" in _problems(
        adapter="lora", lora_target_parameters="mlp.up_proj.weight", lora_dropout=0.05
    )
    warnings: list[str] = []
    _cfg(warnings, lora_target_parameters=["mlp.up_proj.weight"])
    assert any("lora_target_parameters" in w and "no `adapter`" in w for w in warnings)


# ---- tokenizer_use_mistral_common


def _tekken(folder):
    """A tiny tekken.json (mistral-common's tokenizer file): the 256 bytes, five merges,
    and 32 special tokens before them (<unk> 0, <s> 1, </s> 2, ..., <pad> 11), so the
    text ids start at 32. Built here, offline."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = [b"he", b"ll", b"llo", b"hello", b" w"]
    vocab = [
        {"rank": i, "token_bytes": base64.b64encode(piece).decode(), "token_str": None}
        for i, piece in enumerate([bytes([b]) for b in range(256)] + merges)
    ]
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]"]
    specials += ["[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]"]
    specials += ["[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]"]
    specials += ["[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
    data = {
        "config": {
            "pattern": r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+",
            "num_vocab_tokens": len(vocab),
            "default_vocab_size": len(vocab) + 32,
            "default_num_special_tokens": 32,
            "version": "v7",
        },
        "vocab": vocab,
        "special_tokens": [
            {"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(specials)
        ],
        "version": 1,
        "type": "Tekken",
    }
    (folder / "tekken.json").write_text(json.dumps(data))
    return folder


def test_mistral_common_tokenizer_loads_and_tokenizes_rows(tmp_path):
    """The tokenizer is mistral-common's, and a completion row becomes <s> text </s> with
    the ids mistral-common itself gives: "hello" is the merge `hello` (32 + 256 + 3) and
    " w", "o", "r", "l", "d" follow. Another tokenizer (the 1,024-token BPE) would give
    other ids."""
    from transformers.tokenization_mistral_common import MistralCommonBackend

    from payload.data.build import build_datasets

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "hello world"}) + "\n")
    cfg = _cfg(
        tokenizer_config=str(_tekken(tmp_path / "mistral")),
        tokenizer_use_mistral_common=True,
        datasets=[{"path": str(rows), "type": "completion"}],
    )
    tokenizer = load_tokenizer(cfg)
    assert isinstance(tokenizer, MistralCommonBackend)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 11)
    assert len(tokenizer) == 32 + 256 + 5
    train, _, _ = build_datasets(cfg, tokenizer)
    hello, space_w = 32 + 256 + 3, 32 + 256 + 4
    text = [hello, space_w] + [32 + ord(c) for c in "orld"]
    assert train[0]["input_ids"] == [1, *text, 2]
    assert train[0]["labels"] == [1, *text, 2]


def test_mistral_common_refuses_what_it_cannot_do(tmp_path):
    """Chat rows need a Jinja template and character offsets, added tokens need
    add_special_tokens: a mistral-common tokenizer has none of them, so validation
    refuses, naming each key."""
    chat = str(ROOT / "examples" / "data" / "chat_tiny.jsonl")
    text = _problems(
        tokenizer_use_mistral_common=True,
        datasets=[{"path": chat, "type": "chat_template"}],
        chat_template="chatml",
        special_tokens={"pad_token": "<pad>"},
        tokenizer_type="LlamaTokenizer",
    )
    for key in ("datasets[0].type", "chat_template", "special_tokens", "tokenizer_type"):
        assert f"{key}:" in text
    assert "no Jinja chat template" in text


@pytest.mark.slow
def test_mistral_common_tokenizer_trains_end_to_end(tmp_path):
    """`python -m payload train` with the mistral-common tokenizer on completion rows: the
    run finishes, logs its losses, and the tokenizer saved beside the model is the
    tekken.json it trained with."""
    folder = _tekken(tmp_path / "mistral")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"hello world {i}"}) + "\n" for i in range(16)))
    out = tmp_path / "out"
    config = tmp_path / "config.yml"
    config.write_text(
        json.dumps(
            {
                "base_model": str(ASSETS / "tiny-llama"),
                "tokenizer_config": str(folder),
                "tokenizer_use_mistral_common": True,
                "datasets": [{"path": str(rows), "type": "completion"}],
                "learning_rate": 1e-3,
                "micro_batch_size": 4,
                "max_steps": 3,
                "sequence_len": 64,
                "output_dir": str(out),
                "save_strategy": "no",
                "optimizer": "adamw_torch",
            }
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "payload", "train", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    from payload.storage.layout import read_metrics

    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 3
    assert (out / "tekken.json").read_bytes() == (folder / "tekken.json").read_bytes()
