"""Loading the tokenizer and model a config names: special tokens, chat templates, LoRA."""

from __future__ import annotations

import pytest
from helpers import ASSETS, DATA

from payload.config import FerryError, validate_mapping
from payload.data.templates import BUILTIN_TEMPLATES
from payload.model import load_model, load_tokenizer


def _cfg(**extra):
    raw = {
        "base_model": str(ASSETS / "tiny-llama"),
        "learning_rate": 1e-4,
        "datasets": [{"path": str(DATA), "type": "alpaca"}],
        **extra,
    }
    return validate_mapping(raw)


def test_special_tokens_replace_the_tokenizer_defaults():
    tokenizer = load_tokenizer(_cfg(special_tokens={"pad_token": "<unk>"}))
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "right"


def test_chat_template_by_name_or_jinja():
    assert load_tokenizer(_cfg(chat_template="chatml")).chat_template == BUILTIN_TEMPLATES["chatml"]
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer = load_tokenizer(_cfg(chat_template=jinja))
    assert (
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    )
    with pytest.raises(FerryError, match="neither a built-in"):
        load_tokenizer(_cfg(chat_template="vicuna_v9"))


def test_tokenizer_config_points_elsewhere():
    tokenizer = load_tokenizer(_cfg(tokenizer_config=str(ASSETS / "tiny-tokenizer")))
    assert len(tokenizer) == 1024


def test_lora_wraps_every_linear_layer_and_trains_only_the_adapter():
    cfg = _cfg(adapter="lora", lora_r=4, lora_target_linear=True)
    model = load_model(cfg, load_tokenizer(cfg))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert model.peft_config["default"].lora_alpha == 8  # default: 2 x lora_r


def test_lora_on_named_modules_only():
    cfg = _cfg(adapter="lora", lora_target_modules=["q_proj", "v_proj"])
    model = load_model(cfg, load_tokenizer(cfg))
    adapted = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1]
        for n, _ in model.named_parameters()
        if "lora_A" in n
    }
    assert adapted == {"q_proj", "v_proj"}


def test_new_tokens_under_lora_need_their_embeddings_trained():
    cfg = _cfg(adapter="lora", special_tokens={"sep_token": "<|sep|>"})
    with pytest.raises(FerryError, match="lora_modules_to_save"):
        load_model(cfg, load_tokenizer(cfg))


def test_new_tokens_grow_the_embeddings_of_a_full_finetune():
    cfg = _cfg(special_tokens={"sep_token": "<|sep|>"})
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    assert len(tokenizer) == 1025
    assert model.get_input_embeddings().weight.shape[0] == 1025


def adapted_modules(model) -> set[str]:
    return {
        n.split(".lora_")[0].rsplit(".", 1)[-1]
        for n, _ in model.named_parameters()
        if "lora_A" in n or "lora_embedding_A" in n
    }


def test_lora_target_linear_with_named_modules_adapts_both():
    """Axolotl's reading: every linear layer but the output head, and the named ones."""
    cfg = _cfg(
        adapter="lora", lora_target_linear=True, lora_target_modules=["embed_tokens", "q_proj"]
    )
    model = load_model(cfg, load_tokenizer(cfg))
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapted_modules(model) == linear | {"embed_tokens"}  # lm_head is not adapted


def test_rslora_scales_by_the_root_of_the_rank_and_dora_adds_magnitudes():
    plain_cfg = _cfg(adapter="lora", lora_r=4, lora_alpha=8, lora_target_modules=["q_proj"])
    rs_cfg = _cfg(
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj"],
        peft_use_rslora=True,
    )
    dora_cfg = _cfg(adapter="lora", lora_r=4, lora_target_modules=["q_proj"], peft_use_dora=True)
    tokenizer = load_tokenizer(plain_cfg)

    def q_proj(model):
        return next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))

    assert q_proj(load_model(plain_cfg, tokenizer)).scaling["default"] == 8 / 4
    assert q_proj(load_model(rs_cfg, tokenizer)).scaling["default"] == 8 / 4**0.5
    dora = load_model(dora_cfg, tokenizer)
    magnitudes = [n for n, p in dora.named_parameters() if "magnitude" in n and p.requires_grad]
    assert len(magnitudes) == dora.config.num_hidden_layers  # one per q_proj
    plain = load_model(plain_cfg, tokenizer)
    assert not [n for n, _ in plain.named_parameters() if "magnitude" in n]


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_unfrozen_parameters_train_only_what_the_patterns_name():
    """Patterns match from the start of the name, dots are literal, `+` repeats."""
    cfg = _cfg(unfrozen_parameters=["model.layers.1.mlp", "^model.norm.weight$"])
    model = load_model(cfg, load_tokenizer(cfg))
    assert trainable(model) == {
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
    }
    # `layers.1` does not reach into layer 10+ here, and a dot is not "any character".
    assert not any("layers1" in n for n in trainable(model))


def test_an_unfrozen_row_range_trains_only_those_rows():
    import torch

    cfg = _cfg(unfrozen_parameters=["^model.embed_tokens.weight$[:10]"])
    model = load_model(cfg, load_tokenizer(cfg))
    assert trainable(model) == {"model.embed_tokens.weight"}
    ids = torch.tensor([[3, 5, 12, 40]])
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad[3].abs().sum() > 0 and grad[5].abs().sum() > 0  # in [:10], used
    assert grad[12].abs().sum() == 0 and grad[40].abs().sum() == 0  # used, outside the range


def test_unfrozen_patterns_that_are_wrong_or_match_nothing_are_errors():
    with pytest.raises(FerryError) as e:
        _cfg(unfrozen_parameters=["model.layers.(", "x[5:2]"])
    assert "unfrozen_parameters[0]: `model.layers.(` is not a usable pattern" in str(e.value)
    assert "unfrozen_parameters[1]: `x[5:2]` is not a usable pattern: the row range" in str(e.value)
    cfg = _cfg(unfrozen_parameters=["^model.norm.weight$", "layers.0", "model.layrs.1"])
    with pytest.raises(FerryError) as e:  # names start with `model.`; a typo
        load_model(cfg, load_tokenizer(cfg))
    assert "`layers.0`, `model.layrs.1` match no parameter of the model" in str(e.value)
    cfg = _cfg(unfrozen_parameters=["^model.embed_tokens.weight$[2000:]"])
    with pytest.raises(FerryError, match=r"\[2000:\] starts past the end of a parameter"):
        load_model(cfg, load_tokenizer(cfg))


def test_unfrozen_patterns_read_dots_literally_and_plus_as_repeat():
    from payload.config.unfrozen import parse_pattern

    regex, rows = parse_pattern("model.layers.1[0-9]+.mlp")
    assert regex.match("model.layers.12.mlp.up_proj.weight")
    assert not regex.match("model.layers.1.mlp.up_proj.weight")  # needs a second digit
    assert not parse_pattern("model.norm")[0].match("modelXnorm.weight")  # dot is literal
    assert parse_pattern("lm_head.+")[0].match("lm_head.weight")  # `.+`: any characters
    assert not parse_pattern("layers.0")[0].match("model.layers.0.x")  # from the start
    assert rows is None
    assert parse_pattern("a[:8]")[1] == (0, 8) and parse_pattern("a[3]")[1] == (3, 4)


def test_a_tied_output_head_answers_to_its_own_name():
    """The tiny model ties lm_head to the embeddings: naming the head trains that weight."""
    cfg = _cfg(unfrozen_parameters=["^lm_head.weight$"])
    model = load_model(cfg, load_tokenizer(cfg))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.requires_grad
    assert trainable(model) == {"model.embed_tokens.weight"}
