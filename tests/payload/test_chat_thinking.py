"""chat_template datasets with reasoning traces: `field_thinking` (where a message keeps
its trace) and `template_thinking_key` (the message key the template reads it from).

The bundled tiny tokenizer's own template is plain ChatML and writes no trace, so these
tests use THINK, a small template laid out as Qwen3's: an assistant turn after the last
user message is written `<think>\\ntrace\\n</think>\\n\\ncontent`, and older turns lose
their trace. Expected texts and trained tokens are written out by hand; a failure means
the trace was dropped, mislabelled, or read from the wrong key.
"""

from __future__ import annotations

import pytest
from helpers import ASSETS, trained_runs, write_jsonl

from payload.config import ConfigError, DatasetConfig, FerryError, TrainConfig, validate_mapping
from payload.data.build import build_datasets
from payload.data.core import BadRow, build_strategy


def think_template(key: str = "reasoning_content") -> str:
    """A Qwen3-like template reading the trace from `message[key]`."""
    return (
        "{%- set ns = namespace(last_query=-1) -%}"
        "{%- for m in messages -%}"
        "{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- for m in messages -%}"
        "{{- '<|im_start|>' + m.role + '\\n' -}}"
        f"{{%- if m.role == 'assistant' and loop.index0 > ns.last_query and m['{key}'] -%}}"
        f"{{{{- '<think>\\n' + m['{key}'].strip('\\n') + '\\n</think>\\n\\n' -}}}}"
        "{%- endif -%}"
        "{{- m.content + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
    )


THINK = think_template()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")


def strategy(tokenizer, template=THINK, **keys):
    ds = DatasetConfig(
        path="think.jsonl",
        type="chat_template",
        chat_template="jinja",
        chat_template_jinja=template,
        **keys,
    )
    return build_strategy(ds, TrainConfig(), tokenizer)


def text_and_runs(tokenizer, out) -> tuple[str, list[str]]:
    """The whole decoded text, and the trained tokens decoded, one string per run of
    consecutive labelled tokens."""
    return tokenizer.decode(out["input_ids"]), trained_runs(tokenizer, out)


def row(trace_key="reasoning_content", trace="Two plus two is four."):
    return {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4.", trace_key: trace},
        ]
    }


TEXT = (
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nTwo plus two is four.\n</think>\n\n4.<|im_end|>\n"
)
# The trace, what the template writes between it and the content, the content, and the
# turn's <|im_end|>: one trained run. The role header and the user turn are not trained.
TRAINED = ["Two plus two is four.\n</think>\n\n4.<|im_end|>"]


def test_the_trace_is_written_and_trained_with_the_assistant_turn(tokenizer):
    out = strategy(tokenizer)(row())
    assert text_and_runs(tokenizer, out) == (TEXT, TRAINED)


def test_the_trace_is_not_trained_when_its_role_is_not(tokenizer):
    """With roles_to_train: [user] the assistant's trace is in the input, not the labels."""
    out = strategy(tokenizer, roles_to_train=["user"])(row())
    assert text_and_runs(tokenizer, out) == (TEXT, ["What is 2+2?<|im_end|>"])


def test_train_on_inputs_trains_the_trace_with_every_turn(tokenizer):
    ds = DatasetConfig(
        path="think.jsonl", type="chat_template", chat_template="jinja", chat_template_jinja=THINK
    )
    out = build_strategy(ds, TrainConfig(train_on_inputs=True), tokenizer)(row())
    assert text_and_runs(tokenizer, out) == (TEXT, ["What is 2+2?<|im_end|>", *TRAINED])


def test_a_custom_field_thinking_column(tokenizer):
    """Traces kept under `thoughts`: read from there, given to the template as
    reasoning_content, and not passed on under their own name."""
    out = strategy(tokenizer, field_thinking="thoughts")(row("thoughts"))
    assert text_and_runs(tokenizer, out) == (TEXT, TRAINED)
    # Without the setting, `thoughts` is no trace: the template writes none.
    out = strategy(tokenizer)(row("thoughts"))
    plain = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
    assert text_and_runs(tokenizer, out) == (plain, ["4.<|im_end|>"])


def test_a_custom_template_thinking_key(tokenizer):
    """A template that reads `thought`: rows keep reasoning_content (the default field),
    template_thinking_key hands it over under the template's name. (Not `thinking`:
    transformers copies a trace between reasoning_content, thinking and reasoning itself,
    so only another name shows the key taking effect.)"""
    reads_thought = think_template("thought")
    out = strategy(tokenizer, reads_thought, template_thinking_key="thought")(row())
    assert text_and_runs(tokenizer, out) == (TEXT, TRAINED)
    both = strategy(
        tokenizer, reads_thought, template_thinking_key="thought", field_thinking="thoughts"
    )
    assert text_and_runs(tokenizer, both(row("thoughts"))) == (TEXT, TRAINED)


@pytest.mark.parametrize("name", ["thinking", "reasoning"])
def test_transformers_other_names_for_the_trace_are_traces_too(tokenizer, name):
    """transformers gives a trace kept under `thinking` or `reasoning` to the template as
    reasoning_content; unless field_thinking names another column it is read (and
    trained) as the trace, not passed on as an untrained extra key."""
    out = strategy(tokenizer)(row(name))
    assert text_and_runs(tokenizer, out) == (TEXT, TRAINED)


@pytest.mark.parametrize(
    "template, keys, key",
    [
        ("chatml", {}, "reasoning_content"),  # a template with no trace at all
        (think_template("thought"), {}, "reasoning_content"),  # reads another key
        (THINK, {"template_thinking_key": "thought"}, "thought"),  # told another key
    ],
    ids=["chatml", "template reads thought", "template_thinking_key thought"],
)
def test_a_template_that_does_not_write_the_trace_stops_the_run(tokenizer, template, keys, key):
    if template == "chatml":
        ds = DatasetConfig(path="think.jsonl", type="chat_template", chat_template="chatml")
        run = build_strategy(ds, TrainConfig(), tokenizer)
    else:
        run = strategy(tokenizer, template, **keys)
    with pytest.raises(FerryError) as e:
        run(row())
    assert e.value.message == (
        "dataset think.jsonl: turn 1 (assistant) has a reasoning trace, but the chat "
        f"template does not write `{key}` (`template_thinking_key`), so the trace would be "
        "silently left out of training."
    )
    assert "template_thinking_key" in e.value.hint


def test_older_traces_the_template_drops_on_purpose_are_no_error(tokenizer):
    """As Qwen3's, THINK drops the traces of turns before the last user message; the
    template does write the key, so this is its choice, not a silent loss."""
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "Add them."},
    ]
    out = strategy(tokenizer)({"messages": messages})
    assert text_and_runs(tokenizer, out) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n4.<|im_end|>\n",
        ["Hello.<|im_end|>", "Add them.\n</think>\n\n4.<|im_end|>"],
    )


def test_an_empty_trace_needs_no_template_support(tokenizer):
    """An empty trace has nothing to lose: chatml is fine, and only the content trains."""
    ds = DatasetConfig(path="think.jsonl", type="chat_template", chat_template="chatml")
    out = build_strategy(ds, TrainConfig(), tokenizer)(row(trace=""))
    plain = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
    assert text_and_runs(tokenizer, out) == (plain, ["4.<|im_end|>"])


def test_training_detail_picks_within_the_content_only(tokenizer):
    """Detail spans count the content's characters; the trace is then not trained (as
    in Axolotl, where only a reasoning-specific detail would train it)."""
    convo = row()
    convo["messages"][1]["content"] = "It is 4."
    convo["messages"][1]["detail"] = [
        {"begin_offset": 0, "end_offset": 4, "train": False},
        {"begin_offset": 6, "end_offset": 7, "train": True},
    ]
    out = strategy(tokenizer, message_field_training_detail="detail")(convo)
    text = TEXT.replace("\n\n4.", "\n\nIt is 4.")
    assert text_and_runs(tokenizer, out) == (text, [" 4.<|im_end|>"])


def test_a_trace_that_is_not_text_is_a_bad_row(tokenizer):
    with pytest.raises(BadRow, match=r"message 1 `reasoning_content` is a list, not text"):
        strategy(tokenizer)(row(trace=["Two", "plus"]))


def rows(n: int) -> list[dict]:
    """Chats of 1-3 exchanges; every other assistant turn has a trace, some rows none."""
    out = []
    for i in range(n):
        messages = []
        for t in range(1 + i % 3):
            answer = {"role": "assistant", "content": f"Answer {i}.{t}."}
            if (i + t) % 2:
                answer["thoughts"] = f"Think {i} then {t}."
            messages += [{"role": "user", "content": f"Question {i}.{t}?"}, answer]
        out.append({"messages": messages})
    return out


@pytest.mark.parametrize("processes", [1, 2])
def test_batches_give_what_each_row_gives_alone(tokenizer, tmp_path, processes):
    from helpers import tiny_config

    data = rows(60)
    template = tmp_path / "think.jinja"
    template.write_text(THINK)
    entry = {
        "path": write_jsonl(tmp_path / "rows.jsonl", data),
        "type": "chat_template",
        "chat_template": "jinja",
        "chat_template_jinja": str(template),
        "field_thinking": "thoughts",
    }
    cfg = tiny_config([entry], dataset_processes=processes)
    train, _, report = build_datasets(cfg, tokenizer)
    one = build_strategy(cfg.datasets[0], cfg, tokenizer)
    alone = [one(r) for r in data]
    assert report.rows_kept == len(data)
    assert [list(r) for r in train["input_ids"]] == [o["input_ids"] for o in alone]
    assert [list(r) for r in train["labels"]] == [o["labels"] for o in alone]
    # Row 3 is one exchange with a trace: written and trained. Row 1's trace is in its
    # first exchange, which the template drops, as Qwen3's does.
    assert text_and_runs(tokenizer, alone[3])[1] == [
        "Think 3 then 0.\n</think>\n\nAnswer 3.0.<|im_end|>"
    ]
    assert text_and_runs(tokenizer, alone[1])[1] == [
        "Answer 1.0.<|im_end|>",
        "Answer 1.1.<|im_end|>",
    ]


def test_the_batched_path_stops_on_an_unwritten_trace_too(tokenizer, tmp_path):
    from helpers import tiny_config

    path = write_jsonl(tmp_path / "rows.jsonl", [row(), row()])
    cfg = tiny_config([{"path": path, "type": "chat_template", "chat_template": "chatml"}])
    with pytest.raises(FerryError, match=r"does not write `reasoning_content`"):
        build_datasets(cfg, tokenizer)


def test_the_prepared_cache_key_follows_the_thinking_keys(tmp_path):
    """Each setting changes the tokens, so each must get its own prepared folder: a
    shared one would hand a run the tokens of the other setting."""
    from payload.data.cache import cache_key, key_inputs
    from payload.model import load_tokenizer

    template = tmp_path / "think.jinja"
    template.write_text(think_template("thought"))
    entry = {
        "path": write_jsonl(tmp_path / "rows.jsonl", [row("thoughts")] * 4),
        "type": "chat_template",
        "chat_template": "jinja",
        "chat_template_jinja": str(template),
    }

    def config(**keys):
        return validate_mapping(
            {
                "base_model": str(ASSETS / "tiny-llama"),
                "learning_rate": 1e-4,
                "dataset_prepared_path": str(tmp_path / "prepared"),
                "datasets": [{**entry, **keys}],
            }
        )

    plain = config()
    column = config(field_thinking="thoughts")  # the template reads `thought`: no build
    both = config(field_thinking="thoughts", template_thinking_key="thought")
    tokenizer = load_tokenizer(plain)
    keys = [cache_key(key_inputs(c, tokenizer)) for c in (plain, column, both)]
    assert len(set(keys)) == 3
    built = [build_datasets(c, tokenizer) for c in (plain, both)]
    assert [report.cache_path.rsplit("/", 1)[1] for _, _, report in built] == [keys[0], keys[2]]
    # 2+2's trace with its <think> wrapper is in the tokens only with both keys.
    (without, _, _), (with_trace, _, _) = built
    assert "Two plus two" not in tokenizer.decode(without["input_ids"][0])
    assert "<think>\nTwo plus two is four.\n</think>" in tokenizer.decode(
        with_trace["input_ids"][0]
    )


def test_rules_check_the_thinking_keys():
    base = {"base_model": str(ASSETS / "tiny-llama"), "learning_rate": 1e-4}
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.template_thinking_key"):
        validate_mapping(
            {
                **base,
                "datasets": [
                    {"path": "a.jsonl", "type": "chat_template", "template_thinking_key": "content"}
                ],
            },
            resolve_paths=False,
        )
    seen: list[str] = []
    validate_mapping(
        {**base, "datasets": [{"path": "a.jsonl", "type": "alpaca", "field_thinking": "t"}]},
        resolve_paths=False,
        warn=seen.append,
    )
    assert any(
        "datasets[0].field_thinking: is ignored by `alpaca` (chat_template only)." in s
        for s in seen
    )
