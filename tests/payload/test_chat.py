"""chat_template (and sharegpt): which tokens of a conversation are trained, exactly.

Each test renders a conversation with the bundled tiny tokenizer (ChatML template,
<|im_start|>/<|im_end|> special tokens, eos </s>) and compares the trained tokens, as
the decoded runs of consecutive labelled tokens, with the strings expected. A failure
names the setting whose Axolotl semantics (see payload/data/chat.py) broke.
"""

from __future__ import annotations

import json

import pytest
from helpers import ASSETS, DATA, trained_runs

from payload.config import DatasetConfig, FerryError, TrainConfig, validate_mapping
from payload.data.build import build_datasets
from payload.data.core import BadRow, build_strategy
from payload.data.templates import BUILTIN_TEMPLATES, eot_token_for, resolve_template
from payload.model import load_tokenizer


def _load():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")


@pytest.fixture(scope="module")
def tokenizer():
    return _load()


@pytest.fixture(scope="module")
def llama_tokenizer():
    """The tiny tokenizer with Llama 3's header and turn-end tokens added."""
    tok = _load()
    special = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens({"additional_special_tokens": special})
    return tok


def chat(tokenizer, row, cfg=None, **keys):
    ds = DatasetConfig(path="chat.jsonl", type=keys.pop("type", "chat_template"), **keys)
    return build_strategy(ds, cfg or TrainConfig(), tokenizer)(row)


runs = trained_runs  # the trained tokens as strings, one per labelled run


def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


CONVO = {
    "messages": [
        msg("system", "Be brief."),
        msg("user", "Hi there"),
        msg("assistant", "Hello!"),
        msg("user", "Bye"),
        msg("assistant", "Goodbye."),
    ]
}
CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    "<|im_start|>assistant\nGoodbye.<|im_end|>\n"
)


def test_tokens_are_the_rendered_template(tokenizer):
    out = chat(tokenizer, CONVO)
    assert out["input_ids"] == tokenizer(CHATML, add_special_tokens=False)["input_ids"]
    assert out["attention_mask"] == [1] * len(out["input_ids"])
    assert tokenizer.decode(out["input_ids"]) == CHATML


@pytest.mark.parametrize(
    ("train_on_eos", "expected"),
    [
        (None, ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]),  # default: turn
        ("turn", ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]),
        (
            "all",
            ["<|im_end|>", "<|im_end|>", "Hello!<|im_end|>", "<|im_end|>", "Goodbye.<|im_end|>"],
        ),
        ("last", ["Hello!", "Goodbye.<|im_end|>"]),
        ("none", ["Hello!", "Goodbye."]),
    ],
)
def test_assistant_turns_and_train_on_eos(tokenizer, train_on_eos, expected):
    """With chatml the eot token is <|im_end|>; train_on_eot follows train_on_eos."""
    assert runs(tokenizer, chat(tokenizer, CONVO, train_on_eos=train_on_eos)) == expected


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {"train_on_eos": "none", "train_on_eot": "turn"},
            ["Hello!<|im_end|>", "Goodbye.<|im_end|>"],
        ),
        ({"train_on_eos": "turn", "train_on_eot": "none"}, ["Hello!", "Goodbye."]),
        ({"train_on_eot": "last"}, ["Hello!", "Goodbye.<|im_end|>"]),
        ({"roles_to_train": [], "train_on_eot": "all"}, ["<|im_end|>"] * 5),
    ],
)
def test_train_on_eot(tokenizer, keys, expected):
    assert runs(tokenizer, chat(tokenizer, CONVO, **keys)) == expected


def test_last_means_the_last_trained_turn(tokenizer):
    """A conversation that ends on a user turn: `last` is the assistant's end token."""
    row = {"messages": CONVO["messages"][:4]}
    assert runs(tokenizer, chat(tokenizer, row, train_on_eos="last")) == ["Hello!<|im_end|>"]
    assert runs(tokenizer, chat(tokenizer, row, train_on_eos="all")) == [
        "<|im_end|>",
        "<|im_end|>",
        "Hello!<|im_end|>",
        "<|im_end|>",
    ]


def test_eos_and_eot_are_separate_tokens(tokenizer):
    """A template that closes assistant turns with <|im_end|> then </s>: the two settings
    pick their own token."""
    jinja = BUILTIN_TEMPLATES["chatml"].replace(
        "'<|im_end|>' + '\\n'",
        "'<|im_end|>' + (eos_token if message['role'] == 'assistant' else '') + '\\n'",
    )
    keys = {"chat_template": "jinja", "chat_template_jinja": jinja}
    both = chat(tokenizer, CONVO, **keys)
    assert runs(tokenizer, both) == ["Hello!<|im_end|></s>", "Goodbye.<|im_end|></s>"]
    eot_only = chat(tokenizer, CONVO, train_on_eos="none", train_on_eot="turn", **keys)
    assert runs(tokenizer, eot_only) == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]
    eos_last = chat(tokenizer, CONVO, train_on_eos="last", train_on_eot="none", **keys)
    assert runs(tokenizer, eos_last) == ["Hello!", "Goodbye.", "</s>"]


def test_eot_tokens_setting_and_its_errors(tokenizer):
    """eot_tokens: the dataset's, else the top level's; each must be one token, and if
    eos is one of them train_on_eos and train_on_eot must agree."""
    out = chat(tokenizer, CONVO, eot_tokens=["</s>"])  # </s> never appears in chatml
    assert runs(tokenizer, out) == ["Hello!", "Goodbye."]
    out = chat(tokenizer, CONVO, TrainConfig(eot_tokens=["</s>"]))
    assert runs(tokenizer, out) == ["Hello!", "Goodbye."]
    with pytest.raises(FerryError, match=r"eot token '<\|eot_id\|>' is \d+ tokens"):
        chat(tokenizer, CONVO, eot_tokens=["<|eot_id|>"])
    with pytest.raises(FerryError, match="train_on_eos .turn. and train_on_eot .none. must agree"):
        chat(tokenizer, CONVO, eot_tokens=["</s>"], train_on_eot="none")


def test_roles_to_train_and_train_on_inputs(tokenizer):
    both = chat(tokenizer, CONVO, roles_to_train=["user", "assistant"])
    assert runs(tokenizer, both) == [
        "Hi there<|im_end|>",
        "Hello!<|im_end|>",
        "Bye<|im_end|>",
        "Goodbye.<|im_end|>",
    ]
    # Row names are mapped, so `human` means user.
    assert runs(tokenizer, chat(tokenizer, CONVO, roles_to_train=["human"])) == [
        "Hi there<|im_end|>",
        "Bye<|im_end|>",
    ]
    # train_on_inputs trains every role's content, never the headers.
    everything = chat(tokenizer, CONVO, TrainConfig(train_on_inputs=True))
    assert runs(tokenizer, everything) == [
        "Be brief.<|im_end|>",
        "Hi there<|im_end|>",
        "Hello!<|im_end|>",
        "Bye<|im_end|>",
        "Goodbye.<|im_end|>",
    ]


def test_message_training_flag_overrides_roles(tokenizer):
    row = {
        "messages": [
            msg("user", "Hi there", train=True),
            msg("assistant", "Hello!", train=False),
            msg("user", "Bye"),
            msg("assistant", "Goodbye."),
        ]
    }
    out = chat(tokenizer, row, message_field_training="train")
    assert runs(tokenizer, out) == ["Hi there<|im_end|>", "Goodbye.<|im_end|>"]
    with pytest.raises(BadRow, match="message 0 `train` is a str, not true/false"):
        chat(
            tokenizer, {"messages": [msg("user", "a", train="yes")]}, message_field_training="train"
        )


DETAIL_ROW = {
    "conversations": [
        {"from": "human", "value": "How are you?"},
        {
            "from": "gpt",
            "value": "I'm doing very well, thank you!",
            "detail": [
                {"begin_offset": 0, "end_offset": 8, "train": False},
                {"begin_offset": 9, "end_offset": 18, "train": True},
                {"begin_offset": 19, "end_offset": 30, "train": False},
            ],
        },
    ]
}


def test_training_detail_trains_only_marked_characters(tokenizer):
    """Axolotl's documented example: characters 9-18 (" very well") of the reply."""
    out = chat(tokenizer, DETAIL_ROW, message_field_training_detail="detail")
    assert runs(tokenizer, out) == [" very well", "<|im_end|>"]
    # A token is trained by its non-space characters: " well" starts on the span's
    # last character (a space) but its letters lie outside.
    row = json.loads(json.dumps(DETAIL_ROW))
    row["conversations"][1]["detail"] = [{"begin_offset": 0, "end_offset": 14, "train": True}]
    out = chat(tokenizer, row, message_field_training_detail="detail")
    assert runs(tokenizer, out) == ["I'm doing very", "<|im_end|>"]
    # Marking a span false everywhere leaves the turn (and its eot) untrained...
    row = json.loads(json.dumps(DETAIL_ROW))
    row["conversations"].append({"from": "human", "value": "Good."})
    row["conversations"].append({"from": "gpt", "value": "Thanks!", "detail": []})
    out = chat(tokenizer, row, message_field_training_detail="detail")
    assert runs(tokenizer, out) == [" very well", "<|im_end|>"]
    # ... and a bad span names the message and the key.
    row["conversations"][3]["detail"] = [{"begin_offset": 0}]
    with pytest.raises(BadRow, match="message 3 `detail` item 0 needs integer `begin_offset`"):
        chat(tokenizer, row, message_field_training_detail="detail")


def test_training_detail_follows_trimmed_content(llama_tokenizer):
    """llama3 trims content; offsets still count the row's characters."""
    row = {
        "messages": [
            msg("user", "Hi"),
            msg(
                "assistant",
                "  Good day, friend",
                detail=[{"begin_offset": 7, "end_offset": 9, "train": True}],
            ),
        ]
    }
    keys = {"chat_template": "llama3", "message_field_training_detail": "detail"}
    assert runs(llama_tokenizer, chat(llama_tokenizer, row, **keys)) == [" day", "<|eot_id|>"]


def test_system_messages(tokenizer):
    no_system = {"messages": CONVO["messages"][1:]}
    dropped = chat(tokenizer, CONVO, drop_system_message=True)
    assert tokenizer.decode(dropped["input_ids"]) == CHATML.split("<|im_end|>\n", 1)[1]
    # default_system_message fills in only where a conversation has no system message...
    out = chat(tokenizer, no_system, TrainConfig(default_system_message="Be kind."))
    assert tokenizer.decode(out["input_ids"]).startswith("<|im_start|>system\nBe kind.<|im_end|>\n")
    assert runs(tokenizer, out) == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]
    out = chat(tokenizer, CONVO, TrainConfig(default_system_message="Be kind."))
    assert tokenizer.decode(out["input_ids"]) == CHATML
    # ... and replaces the row's with drop_system_message.
    out = chat(
        tokenizer, CONVO, TrainConfig(default_system_message="Be kind."), drop_system_message=True
    )
    assert tokenizer.decode(out["input_ids"]) == CHATML.replace("Be brief.", "Be kind.")
    # A row's `system` column (field_system) becomes the system message.
    out = chat(tokenizer, {**no_system, "sys": "Be brief."}, field_system="sys")
    assert tokenizer.decode(out["input_ids"]) == CHATML


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi there"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Bye"},
        {"from": "gpt", "value": "Goodbye."},
    ]
}


@pytest.mark.parametrize("type_", ["chat_template", "sharegpt"])
def test_legacy_sharegpt_rows(tokenizer, type_):
    out = chat(tokenizer, SHAREGPT, type=type_)
    assert tokenizer.decode(out["input_ids"]) == CHATML
    assert runs(tokenizer, out) == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]


def test_message_property_mappings_and_legacy_fields(tokenizer):
    row = {
        "dialog": [{"speaker": m["from"], "text": m["value"]} for m in SHAREGPT["conversations"]]
    }
    mapped = {
        "field_messages": "dialog",
        "message_property_mappings": {"role": "speaker", "content": "text"},
    }
    legacy = {
        "field_messages": "dialog",
        "message_field_role": "speaker",
        "message_field_content": "text",
    }
    for keys in (mapped, legacy):
        out = chat(tokenizer, row, **keys)
        assert tokenizer.decode(out["input_ids"]) == CHATML
        assert runs(tokenizer, out) == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]
    with pytest.raises(BadRow, match="message 0 has no `text`"):
        chat(tokenizer, {"dialog": [{"speaker": "human"}]}, **mapped)


def test_custom_roles(tokenizer):
    row = {"messages": [msg("customer", "Hi there"), msg("agent", "Hello!")]}
    roles = {"user": ["customer"], "assistant": ["agent"]}
    out = chat(tokenizer, row, roles=roles)
    assert tokenizer.decode(out["input_ids"]).startswith("<|im_start|>user\nHi there")
    assert runs(tokenizer, out) == ["Hello!<|im_end|>"]
    assert runs(tokenizer, chat(tokenizer, row, roles=roles, roles_to_train=["customer"])) == [
        "Hi there<|im_end|>"
    ]


def test_dataset_template_overrides_the_top_level_one(tokenizer, llama_tokenizer):
    row = {"messages": [msg("user", "Hi"), msg("assistant", "Hello!")]}
    top = TrainConfig(chat_template="llama3")
    out = chat(llama_tokenizer, row, top)
    assert llama_tokenizer.decode(out["input_ids"]) == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    )
    assert runs(llama_tokenizer, out) == ["Hello!<|eot_id|>"]
    out = chat(llama_tokenizer, row, top, chat_template="chatml")
    assert llama_tokenizer.decode(out["input_ids"]).startswith("<|im_start|>user\nHi<|im_end|>")
    assert runs(llama_tokenizer, out) == ["Hello!<|im_end|>"]
    # tokenizer_default is the tokenizer's own template (ChatML for the tiny one).
    out = chat(tokenizer, row, top, chat_template="tokenizer_default")
    assert runs(tokenizer, out) == ["Hello!<|im_end|>"]


def test_llama3_without_its_tokens_is_a_clear_error(tokenizer):
    """The tiny tokenizer spells <|eot_id|> in several tokens, so it cannot end turns."""
    with pytest.raises(FerryError, match=r"eot token '<\|eot_id\|>' is \d+ tokens.*not one"):
        chat(tokenizer, CONVO, chat_template="llama3")


def test_custom_jinja_falls_back_to_eos(tokenizer):
    jinja = (
        "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + eos_token }}{% endfor %}"
    )
    row = {"messages": [msg("user", "Hi"), msg("assistant", "Hello!")]}
    out = chat(tokenizer, row, chat_template="jinja", chat_template_jinja=jinja)
    assert tokenizer.decode(out["input_ids"]) == "[user] Hi</s>[assistant] Hello!</s>"
    assert runs(tokenizer, out) == ["Hello!</s>"]  # the space is the template's


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"text": "hello"}, "missing field `messages`"),
        ({"messages": "hello"}, "field `messages` is a str, not a list"),
        ({"messages": []}, "field `messages` is empty"),
        ({"messages": ["hello"]}, "message 0 is a str, not a mapping"),
        ({"messages": [msg("user", "a"), {"role": "assistant"}]}, "message 1 has no `content`"),
        ({"messages": [msg("user", "a"), {"content": "b"}]}, "message 1 has no `role`"),
        ({"messages": [msg("user", ["a"])]}, "message 0 `content` is a list, not text"),
        ({"messages": [msg("user", "a"), msg("robot", "b")]}, "unknown role `robot` in message 1"),
        (
            {"messages": [msg("user", "a")]},
            r"nothing to train: no trained message \(roles_to_train: assistant\)",
        ),
        ({"messages": [msg("system", "a")], "x": 1}, "nothing to train"),
    ],
)
def test_bad_rows_say_why(tokenizer, row, reason):
    with pytest.raises(BadRow, match=reason):
        chat(tokenizer, row)


def test_template_errors_are_bad_rows(tokenizer):
    """gemma has no system role; its template raises, and the row is skipped."""
    with pytest.raises(BadRow, match="chat template rejected this conversation: System role"):
        chat(tokenizer, CONVO, chat_template="gemma", eot_tokens=["</s>"])
    with pytest.raises(BadRow, match="only system messages"):
        chat(tokenizer, {"messages": [msg("system", "a")]}, drop_system_message=True)


def test_resolve_template_precedence_and_errors(tokenizer):
    own = tokenizer.chat_template
    assert resolve_template(TrainConfig(), None, tokenizer) == own
    assert (
        resolve_template(TrainConfig(chat_template="llama3"), None, tokenizer)
        == BUILTIN_TEMPLATES["llama3"]
    )
    ds = DatasetConfig(path="d", chat_template="phi_3")
    assert (
        resolve_template(TrainConfig(chat_template="llama3"), ds, tokenizer)
        == BUILTIN_TEMPLATES["phi_3"]
    )
    jinja_ds = DatasetConfig(path="d", chat_template="jinja", chat_template_jinja="{{ 1 }}")
    assert resolve_template(TrainConfig(), jinja_ds, tokenizer) == "{{ 1 }}"
    assert (
        resolve_template(TrainConfig(chat_template_jinja="{{ 2 }}"), None, tokenizer) == "{{ 2 }}"
    )
    fallback = TrainConfig(chat_template="tokenizer_default_fallback_llama3")
    assert resolve_template(fallback, None, tokenizer) == own
    bare = _load()
    bare.chat_template = None
    assert resolve_template(fallback, None, bare) == BUILTIN_TEMPLATES["llama3"]
    with pytest.raises(FerryError, match="`chat_template`: the tokenizer has no chat template"):
        resolve_template(TrainConfig(), None, bare)
    with pytest.raises(FerryError, match=r"`chat_template` of dataset d: `chatm` is neither") as e:
        resolve_template(TrainConfig(), DatasetConfig(path="d", chat_template="chatm"), tokenizer)
    assert "Did you mean `chatml`?" in str(e.value)
    with pytest.raises(FerryError, match="`jinja` needs the template in `chat_template_jinja`"):
        resolve_template(TrainConfig(chat_template="jinja"), None, tokenizer)


def test_jinja_template_from_a_file(tmp_path, tokenizer):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ds = DatasetConfig(path="d", chat_template="jinja", chat_template_jinja=str(path))
    assert resolve_template(TrainConfig(), ds, tokenizer) == path.read_text()


def test_eot_token_for_builtins_and_sources():
    assert eot_token_for("chatml") == "<|im_end|>"
    assert eot_token_for("llama3") == "<|eot_id|>"
    assert eot_token_for(BUILTIN_TEMPLATES["gemma"]) == "<end_of_turn>"
    assert eot_token_for(BUILTIN_TEMPLATES["phi_3"]) == "<|end|>"
    assert eot_token_for("{{ messages[0]['content'] }}") is None


def test_builtin_templates_render_their_formats(llama_tokenizer):
    messages = [msg("user", "Hi"), msg("assistant", "Hello!")]

    def render(name):
        return llama_tokenizer.apply_chat_template(
            messages, chat_template=BUILTIN_TEMPLATES[name], tokenize=False
        )

    assert (
        render("chatml")
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    assert (
        render("gemma")
        == "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    )
    assert render("phi_3") == "<s><|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"


def test_load_tokenizer_applies_named_and_jinja_templates():
    def cfg(**extra):
        base = {"base_model": str(ASSETS / "tiny-llama"), "learning_rate": 1e-4, "datasets": []}
        base["datasets"] = [{"path": str(DATA), "type": "alpaca"}]
        return validate_mapping({**base, **extra})

    assert load_tokenizer(cfg(chat_template="llama3")).chat_template == BUILTIN_TEMPLATES["llama3"]
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer = load_tokenizer(cfg(chat_template="jinja", chat_template_jinja=jinja))
    assert tokenizer.chat_template == jinja


def test_build_datasets_with_chat_rows(tmp_path, tokenizer):
    """The strategy class goes through the real builder (datasets.map): ShareGPT and
    OpenAI rows mixed in one file, bad rows counted by reason."""
    rows = [CONVO, SHAREGPT, {"messages": [msg("user", "a"), msg("robot", "b")]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "base_model": str(ASSETS / "tiny-llama"),
        "learning_rate": 1e-4,
        "datasets": [{"path": str(path), "type": "chat_template"}],
    }
    train, _, report = build_datasets(validate_mapping(raw), tokenizer)
    assert report.rows_kept == 2
    assert report.skipped == {"unknown role `robot` in message 1 (map it under `roles:`)": 1}
    expected = chat(tokenizer, CONVO)
    assert sorted(train["input_ids"]) == [expected["input_ids"]] * 2
    assert sorted(train["labels"]) == [expected["labels"]] * 2
