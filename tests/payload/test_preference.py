"""Preference formats (DPO, KTO, ORPO): exact strings per format, bad rows, the dataset
builder, and one real TRL step on the tiny model to show the shape is what TRL reads."""

from __future__ import annotations

import math

import pytest
from helpers import ASSETS

from payload.config import DatasetConfig, FerryError, TrainConfig
from payload.config.schema import SUPPORTED_PREFERENCE_TYPES
from payload.data.core import BadRow
from payload.data.preference import (
    build_preference_fn,
    prepare_preference_dataset,
    registered,
)
from payload.errors import ConfigError

# The two markups as Axolotl writes them, spelled out so a change to the code shows here.
CHATML_SYS = "<|im_start|>system\nBe brief.<|im_end|>\n"
CHATML_USER = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
LLAMA3_SYS = "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
LLAMA3_USER = (
    "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
END = {
    "chatml": ("<|im_end|>", CHATML_SYS, CHATML_USER),
    "llama3": ("<|eot_id|>", LLAMA3_SYS, LLAMA3_USER),
}


def conversation(answer: str, question: str = "2+2?") -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def formatter(type_, rl="dpo", tokenizer=None, cfg=None, **ds_fields):
    ds = DatasetConfig(path="prefs.jsonl", type=type_, **ds_fields)
    return build_preference_fn(ds, cfg or TrainConfig(rl=rl), tokenizer)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")


def test_every_supported_type_is_registered_and_nothing_else():
    """The schema's list (what validation accepts) and the code must name the same formats."""
    expected = {(f, t) for f, types in SUPPORTED_PREFERENCE_TYPES.items() for t in types}
    assert set(registered()) == expected


# ---- fixed markup


@pytest.mark.parametrize("markup", ["chatml", "llama3"])
@pytest.mark.parametrize("with_system", [True, False])
def test_dpo_intel(markup, with_system):
    end, system, user = END[markup]
    row = {"question": "2+2?", "chosen": "4", "rejected": "5"}
    if with_system:
        row["system"] = "Be brief."
    out = formatter(f"{markup}.intel")(row)
    prompt = (system if with_system else "") + user
    assert out == {"prompt": prompt, "chosen": f"4{end}", "rejected": f"5{end}"}


@pytest.mark.parametrize("markup", ["chatml", "llama3"])
def test_dpo_ultra_takes_the_answers_from_the_conversations(markup):
    end, system, user = END[markup]
    row = {
        "system": "Be brief.",
        "prompt": "2+2?",
        "chosen": conversation("4"),
        "rejected": conversation("5"),
    }
    out = formatter(f"{markup}.ultra")(row)
    assert out == {"prompt": system + user, "chosen": f"4{end}", "rejected": f"5{end}"}


@pytest.mark.parametrize("markup", ["chatml", "llama3"])
def test_dpo_argilla_chat_takes_the_prompt_from_chosen(markup):
    end, _, user = END[markup]
    row = {"chosen": conversation("4"), "rejected": conversation("5")}
    out = formatter(f"{markup}.argilla_chat")(row)
    assert out == {"prompt": user, "chosen": f"4{end}", "rejected": f"5{end}"}


def test_dpo_argilla_chat_keeps_earlier_turns_in_the_prompt():
    earlier = conversation("Hi.", question="Hello")
    row = {"chosen": [*earlier, *conversation("4")], "rejected": [*earlier, *conversation("5")]}
    out = formatter("chatml.argilla_chat")(row)
    assert out["prompt"] == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi.<|im_end|>\n" + CHATML_USER
    )


@pytest.mark.parametrize("markup", ["chatml", "llama3"])
@pytest.mark.parametrize("type_", ["intel", "ultra"])
def test_kto_single_turn(markup, type_):
    end, system, user = END[markup]
    question = "question" if type_ == "intel" else "prompt"
    row = {"system": "Be brief.", question: "2+2?", "completion": "4", "label": True}
    out = formatter(f"{markup}.{type_}", rl="kto")(row)
    assert out == {"prompt": system + user, "completion": f"4{end}", "label": True}


@pytest.mark.parametrize("markup", ["chatml", "llama3"])
def test_kto_argilla_chat(markup):
    end, _, user = END[markup]
    out = formatter(f"{markup}.argilla_chat", rl="kto")(
        {"completion": conversation("5"), "label": False}
    )
    assert out == {"prompt": user, "completion": f"5{end}", "label": False}


def test_kto_argilla_chat_answer_only_reads_the_prompt_column():
    row = {
        "prompt": "2+2?",
        "completion": [{"role": "assistant", "content": "4"}],
        "label": 1,  # CSV files give 0/1
    }
    out = formatter("chatml.argilla_chat", rl="kto")(row)
    assert out == {"prompt": CHATML_USER, "completion": "4<|im_end|>", "label": True}


def test_field_mappings_rename_the_columns():
    fn = formatter(
        "chatml.intel",
        field_prompt="q",
        field_chosen="good",
        field_rejected="bad",
        field_system="s",
    )
    row = {"s": "Be brief.", "q": "2+2?", "good": "4", "bad": "5"}
    assert fn(row) == {
        "prompt": CHATML_SYS + CHATML_USER,
        "chosen": "4<|im_end|>",
        "rejected": "5<|im_end|>",
    }


def test_default_system_message_fills_rows_without_one():
    cfg = TrainConfig(rl="dpo", default_system_message="Be brief.")
    fn = formatter("chatml.intel", cfg=cfg)
    row = {"question": "2+2?", "chosen": "4", "rejected": "5"}
    assert fn(row)["prompt"] == CHATML_SYS + CHATML_USER
    own = fn({**row, "system": "Be kind."})["prompt"]
    assert own.startswith("<|im_start|>system\nBe kind.<|im_end|>\n")


# ---- rows already in shape


def test_passthrough_keeps_the_text():
    row = {"prompt": "P", "chosen": "C", "rejected": "R", "extra": 1}
    assert formatter("passthrough")(row) == {"prompt": "P", "chosen": "C", "rejected": "R"}


def test_user_defined_dpo_with_system():
    fn = formatter(
        {
            "field_prompt": "q",
            "field_system": "sys",
            "prompt_format": "[{system}] Q: {prompt}\nA: ",
            "chosen_format": "{chosen}</s>",
            "rejected_format": "{rejected}</s>",
        }
    )
    out = fn({"sys": "Be brief.", "q": "2+2?", "chosen": "4", "rejected": "5"})
    assert out == {"prompt": "[Be brief.] Q: 2+2?\nA: ", "chosen": "4</s>", "rejected": "5</s>"}


def test_user_defined_dpo_without_system_and_default_formats():
    """A format left out is its part alone; a system column the formats do not use is unread."""
    fn = formatter({"prompt_format": "Q: {prompt}\nA: "})
    out = fn({"system": "unused", "prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert out == {"prompt": "Q: 2+2?\nA: ", "chosen": "4", "rejected": "5"}


def test_user_defined_by_name_reads_the_dataset_field_keys():
    fn = formatter("user_defined", field_prompt="q", field_chosen="good")
    out = fn({"q": "2+2?", "good": "4", "rejected": "5"})
    assert out == {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


def test_user_defined_needs_a_system_when_the_format_uses_one():
    fn = formatter({"prompt_format": "{system}\n{prompt}"})
    with pytest.raises(BadRow, match="missing field `system`"):
        fn({"prompt": "2+2?", "chosen": "4", "rejected": "5"})


def test_user_defined_kto():
    fn = formatter(
        {
            "field_completion": "answer",
            "field_label": "good",
            "prompt_format": "<s>{system} {prompt}",
            "completion_format": "{completion}.",
        },
        rl="kto",
    )
    out = fn({"system": "S", "prompt": "P", "answer": "A", "good": False})
    assert out == {"prompt": "<s>S P", "completion": "A.", "label": False}


def test_user_defined_mapping_is_checked_up_front_every_problem_at_once():
    bad = {
        "field_promt": "q",
        "prompt_format": "{question}",
        "chosen_format": "no placeholder",
        "rejected_format": "{rejected",
        "field_chosen": 3,
    }
    with pytest.raises(ConfigError) as info:
        formatter(bad)
    text = str(info.value)
    assert "prefs.jsonl" in text
    assert "type.field_promt: is not a key of this format; did you mean `field_prompt`?" in text
    assert "type.prompt_format: uses {question}; it may use only {prompt}, {system}" in text
    assert "type.prompt_format: has no {prompt}" in text
    assert "type.chosen_format: has no {chosen}" in text
    assert "type.rejected_format: is not a format string" in text
    assert "type.field_chosen: must be text, not int" in text
    assert len(info.value.problems) == 6


def test_user_defined_kto_keys_differ_from_dpo():
    with pytest.raises(ConfigError, match="type.chosen_format: is not a key of this format"):
        formatter({"chosen_format": "{chosen}"}, rl="kto")


# ---- rendered with the chat template (the tiny tokenizer's own is chatml)


def test_chat_template_default_renders_with_the_tokenizer_template(tokenizer):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
        ],
        "chosen": {"role": "assistant", "content": "4"},
        "rejected": {"role": "assistant", "content": "5"},
    }
    out = formatter("chat_template.default", tokenizer=tokenizer)(row)
    # The same text chatml.intel writes by hand: the answer ends at its <|im_end|>.
    assert out == {
        "prompt": CHATML_SYS + CHATML_USER,
        "chosen": "4<|im_end|>",
        "rejected": "5<|im_end|>",
    }


def test_chat_template_default_accepts_text_and_conversations(tokenizer):
    """The prompt may be text (one user turn) and each answer text, one message, or a
    conversation ending in the answer; the columns and message keys follow the config."""
    fn = formatter(
        "chat_template.default",
        tokenizer=tokenizer,
        field_messages="conv",
        field_chosen="good",
        field_rejected="bad",
        message_property_mappings={"role": "from", "content": "value"},
        roles={"assistant": ["gpt"]},
    )
    row = {
        "conv": "2+2?",
        "good": "4",
        "bad": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "5"}],
    }
    assert fn(row) == {"prompt": CHATML_USER, "chosen": "4<|im_end|>", "rejected": "5<|im_end|>"}


def test_chat_template_default_uses_the_dataset_template_and_drops_a_second_bos(tokenizer):
    """The built-in llama3 template writes <s> itself; TRL tokenizes the prompt with the
    tokenizer's own <s>, so the rendered one is left out rather than doubled."""
    row = {
        "messages": [{"role": "user", "content": "2+2?"}],
        "chosen": {"role": "assistant", "content": "4"},
        "rejected": {"role": "assistant", "content": "5"},
    }
    cfg = TrainConfig(rl="dpo", default_system_message="Be brief.")
    fn = formatter("chat_template.default", tokenizer=tokenizer, cfg=cfg, chat_template="llama3")
    out = fn(row)
    assert out == {
        "prompt": LLAMA3_SYS + LLAMA3_USER,
        "chosen": "4<|eot_id|>",
        "rejected": "5<|eot_id|>",
    }


def test_chat_template_argilla_chat_matches_the_chatml_markup(tokenizer):
    row = {"chosen": conversation("4"), "rejected": conversation("5")}
    rendered = formatter("chat_template.argilla_chat", tokenizer=tokenizer)(row)
    assert rendered == formatter("chatml.argilla_chat")(row)


def test_orpo_argilla_keeps_the_template_text_after_the_answer(tokenizer):
    row = {"system": "Be brief.", "chosen": conversation("4"), "rejected": conversation("5")}
    out = formatter("chat_template.argilla", rl="orpo", tokenizer=tokenizer)(row)
    assert out == {
        "prompt": CHATML_SYS + CHATML_USER,
        "chosen": "4<|im_end|>\n",
        "rejected": "5<|im_end|>\n",
    }


def test_chat_template_answer_found_when_the_prompt_renders_differently(tokenizer):
    """A template whose generation prompt is not a prefix of the rendered answer turn
    (here it opens a <think> block): the answer starts where its text does."""
    source = (
        "{% for m in messages %}{% if m.role == 'user' %}U: {{ m.content }}\n"
        "{% else %}A: {{ m.content }}</s>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A: <think>{% endif %}"
    )
    fn = formatter(
        "chat_template.argilla_chat",
        tokenizer=tokenizer,
        chat_template="jinja",
        chat_template_jinja=source,
    )
    out = fn({"chosen": conversation("4"), "rejected": conversation("5")})
    assert out == {"prompt": "U: 2+2?\nA: <think>", "chosen": "4</s>", "rejected": "5</s>"}


@pytest.mark.parametrize(
    ("type_", "rl", "row", "reason"),
    [
        (
            "chat_template.default",
            "dpo",
            {"messages": conversation("4"), "chosen": "4", "rejected": "5"},
            "field `messages` ends with the assistant's turn",
        ),
        (
            "chat_template.default",
            "dpo",
            {"messages": "2+2?", "chosen": {"role": "user", "content": "4"}, "rejected": "5"},
            "field `chosen`: the last turn is `user`, not the assistant's",
        ),
        (
            "chat_template.default",
            "dpo",
            {"messages": [], "chosen": "4", "rejected": "5"},
            "field `messages` is an empty list",
        ),
        (
            "chat_template.argilla_chat",
            "dpo",
            {"chosen": conversation("4"), "rejected": conversation("5")[:1]},
            "field `rejected`: the last turn is `user`",
        ),
        (
            "chat_template.argilla",
            "orpo",
            {"chosen": conversation("4")},
            "missing field `rejected`",
        ),
    ],
)
def test_chat_template_bad_rows(tokenizer, type_, rl, row, reason):
    with pytest.raises(BadRow) as info:
        formatter(type_, rl=rl, tokenizer=tokenizer)(row)
    assert reason in str(info.value)


def test_a_template_that_refuses_the_conversation_is_a_bad_row(tokenizer):
    """gemma's template raises on a system turn: that row is skipped, not a crash."""
    fn = formatter("chat_template.argilla_chat", tokenizer=tokenizer, chat_template="gemma")
    system = [{"role": "system", "content": "Be brief."}]
    row = {"chosen": system + conversation("4"), "rejected": system + conversation("5")}
    with pytest.raises(BadRow, match="the chat template refused the conversation: System role"):
        fn(row)


# ---- the wrong format or family


def test_unknown_type_names_the_family_formats():
    with pytest.raises(FerryError, match=r"`type: chatml.nope` is not a dpo format.*chatml.intel"):
        formatter("chatml.nope")
    with pytest.raises(FerryError, match="not a kto format"):
        formatter("passthrough", rl="kto")


def test_rl_must_be_a_preference_family():
    with pytest.raises(FerryError, match="needs `rl:`"):
        formatter("chatml.intel", cfg=TrainConfig())


# ---- bad rows


INTEL = {"question": "2+2?", "chosen": "4", "rejected": "5"}
ULTRA = {"prompt": "2+2?", "chosen": conversation("4"), "rejected": conversation("5")}
KTO = {"question": "2+2?", "completion": "4", "label": True}


@pytest.mark.parametrize(
    ("type_", "rl", "row", "reason"),
    [
        ("chatml.intel", "dpo", {**INTEL, "question": None}, "missing field `question`"),
        ("chatml.intel", "dpo", {"question": "q", "chosen": "4"}, "missing field `rejected`"),
        ("chatml.intel", "dpo", {**INTEL, "chosen": "  "}, "field `chosen` is empty"),
        ("chatml.intel", "dpo", {**INTEL, "rejected": 5}, "field `rejected` is a int, not text"),
        ("chatml.intel", "dpo", {**INTEL, "system": ["x"]}, "field `system` is a list"),
        ("chatml.ultra", "dpo", {**ULTRA, "chosen": "4"}, "field `chosen` is a str, not a list"),
        ("chatml.ultra", "dpo", {**ULTRA, "chosen": []}, "field `chosen` is an empty list"),
        (
            "chatml.ultra",
            "dpo",
            {**ULTRA, "rejected": conversation("5")[:1]},
            "field `rejected`: the last turn is `user`, not the assistant's",
        ),
        (
            "chatml.ultra",
            "dpo",
            {**ULTRA, "chosen": conversation("")},
            "field `chosen`: the assistant's reply is empty",
        ),
        ("chatml.ultra", "dpo", {**ULTRA, "chosen": ["hi"]}, "field `chosen` turn 0 is a str"),
        (
            "chatml.ultra",
            "dpo",
            {**ULTRA, "chosen": [{"role": "user", "content": 3}]},
            "field `chosen` turn 0 has no text `content`",
        ),
        (
            "chatml.argilla_chat",
            "dpo",
            {**ULTRA, "chosen": conversation("4")[1:]},
            "field `chosen` has no user turn before the reply",
        ),
        ("passthrough", "dpo", {"prompt": "P", "chosen": "C"}, "missing field `rejected`"),
        ("chatml.intel", "kto", {**KTO, "label": "yes"}, "field `label` is 'yes', not true"),
        ("chatml.intel", "kto", {**KTO, "label": 2}, "field `label` is 2, not true or false"),
        ("llama3.intel", "kto", {"question": "q", "label": True}, "missing field `completion`"),
    ],
)
def test_bad_rows_name_the_field(type_, rl, row, reason):
    with pytest.raises(BadRow) as info:
        formatter(type_, rl=rl)(row)
    assert reason in str(info.value)


def test_message_property_mappings_and_roles_are_read():
    fn = formatter(
        "chatml.argilla_chat",
        message_property_mappings={"role": "speaker", "content": "text"},
        roles={"user": ["asker"], "assistant": ["bot"]},
    )
    turns = [{"speaker": "asker", "text": "2+2?"}, {"speaker": "bot", "text": "4"}]
    rejected = [turns[0], {"speaker": "bot", "text": "5"}]
    assert fn({"chosen": turns, "rejected": rejected})["prompt"] == CHATML_USER


def test_sharegpt_messages_are_read_without_a_mapping():
    """As in the SFT chat formats: {from, value} messages with human/gpt roles."""
    turns = [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    rejected = [turns[0], {"from": "gpt", "value": "5"}]
    out = formatter("chatml.argilla_chat")({"chosen": turns, "rejected": rejected})
    assert out == {"prompt": CHATML_USER, "chosen": "4<|im_end|>", "rejected": "5<|im_end|>"}


# ---- the dataset builder


def test_prepare_skips_counts_and_names_bad_rows(tokenizer):
    import datasets

    rows = datasets.Dataset.from_list(
        [
            {**INTEL, "system": "Be brief."},
            {**INTEL, "system": "", "chosen": ""},
            {**INTEL, "system": None},
            {**INTEL, "system": None, "chosen": ""},
        ]
    )
    ds = DatasetConfig(path="prefs.jsonl", type="chatml.intel")
    out, skipped, first = prepare_preference_dataset(
        rows, ds, TrainConfig(rl="dpo"), tokenizer, "datasets[0] (prefs.jsonl)"
    )
    assert out.column_names == ["prompt", "chosen", "rejected"]
    assert out["prompt"] == [CHATML_SYS + CHATML_USER, CHATML_USER]
    assert skipped == {"field `chosen` is empty": 2}
    assert first == {"field `chosen` is empty": "datasets[0] (prefs.jsonl) row 1"}


def test_prepare_strict_stops_at_the_first_bad_row(tokenizer):
    import datasets

    rows = datasets.Dataset.from_list([INTEL, {**INTEL, "rejected": ""}])
    ds = DatasetConfig(path="prefs.jsonl", type="chatml.intel")
    cfg = TrainConfig(rl="dpo", strict=True)
    with pytest.raises(FerryError) as info:
        prepare_preference_dataset(rows, ds, cfg, tokenizer, "datasets[0] (prefs.jsonl)")
    assert "datasets[0] (prefs.jsonl) row 1: field `rejected` is empty (strict: true)" in str(
        info.value
    )


def test_prepare_kto_labels_are_booleans(tokenizer):
    import datasets

    rows = datasets.Dataset.from_list([KTO, {**KTO, "label": False}, {**KTO, "label": None}])
    ds = DatasetConfig(path="kto.jsonl", type="chatml.intel")
    out, skipped, _ = prepare_preference_dataset(rows, ds, TrainConfig(rl="kto"), tokenizer, "k")
    assert out.column_names == ["prompt", "completion", "label"]
    assert out.features["label"].dtype == "bool"
    assert out["label"] == [True, False]
    assert skipped == {"missing field `label`": 1}


# ---- TRL reads the shape


def _trl_args(config_class, tmp_path, batch, steps=1, **extra):
    return config_class(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=64,
        seed=0,
        **extra,
    )


def _tiny_rows(rl, rows):
    """The tiny model's tokenizer and the rows formatted by chatml.intel for `rl`."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    ds = DatasetConfig(path="prefs.jsonl", type="chatml.intel")
    data, skipped, _ = prepare_preference_dataset(
        datasets.Dataset.from_list(rows), ds, TrainConfig(rl=rl), tok, "prefs"
    )
    assert not skipped and len(data) == len(rows)
    return tok, data


def _trl_train(family, rows, trainer_cls, config_cls, batch, tmp_path, steps=1, **extra):
    """Train a real TRL trainer on the tiny model with our `chatml.intel` rows for
    `steps` steps; the trainer, every logged loss checked to be finite."""
    from transformers import AutoModelForCausalLM

    tok, data = _tiny_rows(family, rows)
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama"),
        args=_trl_args(config_cls, tmp_path, batch, steps, **extra),
        train_dataset=data,
        processing_class=tok,
    )
    trainer.train()
    assert trainer.state.global_step == steps
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)
    return trainer


def _one_trl_step(family, rows, trainer_cls, config_cls, batch, tmp_path) -> dict:
    """One step of `_trl_train`; its log record."""
    trainer = _trl_train(family, rows, trainer_cls, config_cls, batch, tmp_path)
    return trainer.state.log_history[0]


def _answer_logp(model, tok, prompt: str, answer: str) -> float:
    """log p(answer | prompt) under `model`: the sum over the answer's tokens."""
    import torch

    prompt_ids = tok(prompt)["input_ids"]
    ids = tok(prompt + answer)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # the answer's tokens start after the prompt
    with torch.no_grad():
        logps = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    per_token = logps[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return per_token[len(prompt_ids) - 1 :].sum().item()


DPO_STEPS = 12


@pytest.mark.slow
def test_trl_dpo_learns_to_prefer_the_chosen_answers_of_chatml_intel_rows(tmp_path):
    """DPOTrainer takes our columns as they are and learns the preference they state. At
    step 1 the policy is the reference, so every reward is 0 and the loss is exactly
    log 2. After a few steps at a high learning rate the loss is below log 2, and the
    trained policy, scored here on the prompts and answers as written below (not
    through our formatter), favours each row's chosen answer over its rejected one by
    more than the reference does. Rows formatted with chosen and rejected swapped
    train the opposite preference and fail here."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    rows = [
        {"question": f"What is {i}+{i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea."}
        for i in range(8)
    ]
    trainer = _trl_train(
        "dpo", rows, DPOTrainer, DPOConfig, 4, tmp_path, steps=DPO_STEPS, learning_rate=1e-3
    )
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == DPO_STEPS
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert max(losses[-2:]) < math.log(2) - 0.1, losses

    tok = trainer.processing_class
    policy = trainer.model.eval()
    reference = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama").eval()
    for row in rows:
        prompt = f"<|im_start|>user\n{row['question']}<|im_end|>\n<|im_start|>assistant\n"
        chosen, rejected = f"{row['chosen']}<|im_end|>", f"{row['rejected']}<|im_end|>"
        margin = (
            _answer_logp(policy, tok, prompt, chosen) - _answer_logp(reference, tok, prompt, chosen)
        ) - (
            _answer_logp(policy, tok, prompt, rejected)
            - _answer_logp(reference, tok, prompt, rejected)
        )
        assert margin > 1.0, (row, margin)


@pytest.mark.slow
def test_trl_kto_trains_a_step_on_chatml_intel_rows(tmp_path):
    """KTOTrainer takes prompt/completion/label as they are; with the policy equal to the
    reference the KL term and rewards are 0, so the first loss is sigmoid(0) = 0.5."""
    from trl import KTOConfig, KTOTrainer

    rows = [
        {"question": f"What is {i}+{i}?", "completion": str(2 * i + i % 2), "label": i % 2 == 0}
        for i in range(4)
    ]
    logged = _one_trl_step("kto", rows, KTOTrainer, KTOConfig, 4, tmp_path)
    assert logged["loss"] == pytest.approx(0.5, abs=1e-4)
