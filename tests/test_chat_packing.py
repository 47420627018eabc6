"""The chat + packing example as a user runs it, through the real CLI: ShareGPT rows go
through the chatml template into the prepared cache, training loads that cache, packs
several conversations per row, and the loss falls. A failure here means one of the data
pieces (chat masks, cache, packing sampler or collator) broke where they meet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import ASSETS, ROOT, launch

EXAMPLE = ROOT / "examples" / "chat_packing.yml"
CHATS = ROOT / "examples" / "data" / "chat_tiny.jsonl"  # the example's data file
IGNORE = -100
ROLES = {"system": "system", "human": "user", "gpt": "assistant"}  # ShareGPT -> chatml


def chatml_runs(conversation: list[dict]) -> list[tuple[str, bool]]:
    """The example's settings, written out: each message rendered as chatml,
    `<|im_start|>{role}\\n{content}<|im_end|>\\n`, where only assistant replies are
    trained (roles_to_train: [assistant]), each with its <|im_end|> (train_on_eos: turn),
    never a role header or the newline after a turn. As runs of text, each trained or
    not, adjacent pieces of the same kind joined."""
    runs: list[tuple[str, bool]] = []
    for message in conversation:
        role = ROLES[message["from"]]
        trained = role == "assistant"
        pieces = [
            (f"<|im_start|>{role}\n", False),
            (message["value"], trained),
            ("<|im_end|>", trained),
            ("\n", False),
        ]
        for text, flag in pieces:
            if runs and runs[-1][1] == flag:
                runs[-1] = (runs[-1][0] + text, flag)
            else:
                runs.append((text, flag))
    return runs


def cached_runs(tokenizer, row: dict) -> list[tuple[str, bool]]:
    """A prepared row's tokens as runs of decoded text, trained (label != -100) or not."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        trained = label != IGNORE
        assert not trained or label == token, row  # the model shifts labels itself
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return [
        (tokenizer.decode(ids, clean_up_tokenization_spaces=False), trained)
        for ids, trained in runs
    ]


def assert_chat_masks(folder: Path) -> None:
    """Every row of the prepared cache (train and eval, loaded as the cache stores them)
    is one conversation of the data file, token for token, and exactly its assistant
    replies and their <|im_end|> are trained. Each conversation appears once."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    lines = CHATS.read_text().splitlines()
    expected = [chatml_runs(json.loads(line)["conversations"]) for line in lines]
    by_text = {"".join(text for text, _ in runs): runs for runs in expected}
    texts = []
    for part in ("train", "eval"):
        for row in datasets.load_from_disk(str(folder / part)):
            assert row["attention_mask"] == [1] * len(row["input_ids"])
            runs = cached_runs(tokenizer, row)
            text = "".join(t for t, _ in runs)
            assert text in by_text, text
            assert runs == by_text[text]
            texts.append(text)
    assert sorted(texts) == sorted("".join(t for t, _ in runs) for runs in expected)


@pytest.mark.slow
def test_chat_example_preprocesses_then_trains_packed_from_the_cache(tmp_path, ferry_home):
    """Also checks the prepared rows' masks against chatml written out here: a failure
    there means a chat turn is trained (or masked) that the example's settings say is
    not, or the template's text changed."""
    prepared = tmp_path / "prepared"
    settings = ["--set", f"dataset_prepared_path={prepared}", "--set", "num_epochs=2"]
    first = launch("preprocess", str(EXAMPLE), *settings, "--json", check=True)
    built = json.loads(first.stdout)
    assert built["hit"] is False
    assert built["rows"]["kept"] == 240 and not built["rows"]["skipped"]
    assert Path(built["path"]).parent == prepared
    assert_chat_masks(Path(built["path"]))

    run = launch("train", str(EXAMPLE), *settings, timeout=600, check=True)
    log = run.stdout + run.stderr
    assert f"loaded from cache {prepared}" in log
    packed = re.search(r"packed (\d+) train rows into (\d+) sequences .* (\d+) batches", log)
    assert packed, log
    rows, bins, batches = map(int, packed.groups())
    assert rows == 216 and bins < rows / 2  # 240 - 10% eval; several chats per row
    assert batches == -(-bins // 2)  # micro_batch_size 2, one process

    summary_path = next((ferry_home / "runs").glob("*/output/summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["final_loss"] < 0.8 * summary["first_loss"], summary
    # The step count is exact: two epochs of the sampler's batches.
    assert summary["steps"] == 2 * batches
