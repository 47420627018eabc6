"""Reward models through the real CLI on the tiny Llama (CPU): `reward_model: true` (TRL's
RewardTrainer on `bradley_terry.chat_template` pairs) and `process_reward_model: true`
(a token-classification head on `stepwise_supervised` rows).

The accuracies are computed here, not read from the trainer's logs: the test tokenizes
the example data itself (the chat template / the stepwise layout), loads the saved model
with plain transformers and peft, and counts. A failure means the model did not learn
its rule, was saved without its head, or the loss is not the one the keys ask for.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from helpers import ASSETS, ROOT, launch

from payload.config import ConfigError, validate_mapping

PAIRS = ROOT / "examples" / "data" / "pairs_rule.jsonl"
STEPS = ROOT / "examples" / "data" / "steps_rule.jsonl"
BASE = ASSETS / "tiny-llama"
# Checkpoints are not what these tests are about; skipping them keeps the runs short.
QUICK = ("--set", 'save_strategy="no"')


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train(tmp_path_factory, name: str, example: str, *sets: str) -> Path:
    home = tmp_path_factory.mktemp(f"{name}-home")
    out = home / "out"
    args = [f"examples/{example}", *QUICK, "--set", f"output_dir={out}"]
    for value in sets:
        args += ["--set", value]
    launch("train", *args, env={"FERRY_HOME": str(home)}, timeout=600, check=True)
    return out


def _metrics(out: Path) -> list[dict]:
    return _rows(out / "metrics.jsonl")


# ---- scoring, written from the data and transformers alone


def _pair_ids(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """The chosen and rejected conversations as the chat template renders them whole."""

    def ids(answer: str) -> list[int]:
        turns = [
            {"role": "user", "content": row["input"]},
            {"role": "assistant", "content": answer},
        ]
        return tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"]

    return ids(row["chosen"]), ids(row["rejected"])


def _pairwise_accuracy(model, tokenizer) -> tuple[float, list[float]]:
    """(share of pairs whose chosen answer scores above the rejected one, every score)."""
    import torch

    wins, scores = 0, []
    model.eval()
    for row in _rows(PAIRS):
        chosen, rejected = _pair_ids(tokenizer, row)
        with torch.no_grad():
            good = model(torch.tensor([chosen])).logits[0, 0].item()
            bad = model(torch.tensor([rejected])).logits[0, 0].item()
        wins += good > bad
        scores += [good, bad]
    return wins / len(_rows(PAIRS)), scores


def _fresh_reward_model(seed: int):
    """The base model with a new, seeded random score head: the untrained reward model."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1)


def _step_accuracy(model, tokenizer) -> float:
    """Share of steps whose class (argmax at the step's last token) is its label. The row
    is laid out as the stepwise format says: <bos> prompt, then each step and "\\n"."""
    import torch

    right = total = 0
    model.eval()
    for row in _rows(STEPS):
        ids = [
            tokenizer.bos_token_id,
            *tokenizer(row["prompt"], add_special_tokens=False).input_ids,
        ]
        ends = []
        for step in row["completions"]:
            ids += tokenizer(step, add_special_tokens=False).input_ids
            ids += tokenizer("\n", add_special_tokens=False).input_ids
            ends.append(len(ids) - 1)
        with torch.no_grad():
            classes = model(torch.tensor([ids])).logits[0].argmax(-1)
        for end, label in zip(ends, row["labels"], strict=True):
            right += int(classes[end].item() == int(label))
            total += 1
    return right / total


# ---- the runs (one each, shared by the tests below)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "reward", "reward_model.yml")


@pytest.fixture(scope="module")
def lora_reward_run(tmp_path_factory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("lora-reward-home")
    out = home / "out"
    sets = {
        "output_dir": out,
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_target_linear": "true",
        "num_epochs": 8,
        "learning_rate": 3.0e-3,
        "center_rewards_coefficient": "null",
    }
    args = ["examples/reward_model.yml", *QUICK]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    result = launch("train", *args, env={"FERRY_HOME": str(home)}, timeout=600, check=True)
    return out, result.stdout


@pytest.fixture(scope="module")
def process_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "process", "process_reward_model.yml")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BASE)


# ---- reward model


@pytest.mark.slow
def test_reward_model_learns_to_rank_its_pairs(reward_run, tiny_tokenizer):
    """Pairwise accuracy on the training pairs: about chance before, above 0.9 after."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    before, _ = _pairwise_accuracy(_fresh_reward_model(0), tiny_tokenizer)
    trained = AutoModelForSequenceClassification.from_pretrained(reward_run)
    after, scores = _pairwise_accuracy(trained, tiny_tokenizer)
    assert 0.3 <= before <= 0.7, before
    assert after > 0.9, f"pairwise accuracy {before:.3f} -> {after:.3f}"
    # center_rewards_coefficient (0.01 in the example) keeps the scores near zero mean.
    assert abs(sum(scores) / len(scores)) < 1.0
    config = AutoConfig.from_pretrained(reward_run)
    assert config.architectures == ["LlamaForSequenceClassification"]
    assert config.num_labels == 1 and config.pad_token_id is not None
    logged = [r for r in _metrics(reward_run) if "accuracy" in r]
    assert logged and {"margin", "mean_reward"} <= set(logged[-1])


@pytest.mark.slow
def test_center_rewards_coefficient_adds_its_term_to_the_loss(tmp_path_factory):
    """One pair per step, one step: the logged loss is -log sigmoid(r_c - r_r) plus
    c * (r_c + r_r)^2, from the two rewards the trainer logged (min and max, and which
    was the chosen one from its accuracy)."""
    c = 0.5
    out = _train(
        tmp_path_factory,
        "center",
        "reward_model.yml",
        f"center_rewards_coefficient={c}",
        "micro_batch_size=1",
        "max_steps=1",
    )
    (step,) = [r for r in _metrics(out) if "loss" in r]
    low, high = step["min_reward"], step["max_reward"]
    chosen, rejected = (high, low) if step["accuracy"] == 1.0 else (low, high)
    bradley_terry = math.log1p(math.exp(-(chosen - rejected)))
    assert step["loss"] == pytest.approx(bradley_terry + c * (chosen + rejected) ** 2, abs=1e-5)
    assert step["mean_reward"] == pytest.approx((chosen + rejected) / 2, abs=1e-6)


@pytest.mark.slow
def test_lora_reward_model_trains_and_saves_its_head(lora_reward_run, tiny_tokenizer):
    """Under LoRA the new score head trains in full (peft's SEQ_CLS task type keeps it in
    modules_to_save) and is saved with the adapter: two reloads whose fresh heads differ
    give the same scores, and they rank the pairs."""
    from peft import PeftModel

    out, stdout = lora_reward_run
    # LoRA r=8 on the 7 linear layers of 4 blocks: per block q 2*8*128, k and v
    # 8*128+64*8 each, o 2*8*128, gate/up/down (8*128+384*8) each = 19,456; plus the
    # 128 weights of the score head.
    assert "| 77,952 of " in stdout, stdout
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert any("score" in key for key in f.keys())  # noqa: SIM118 (a safe_open handle, not a dict)
    reloads = [PeftModel.from_pretrained(_fresh_reward_model(seed), out) for seed in (1, 2)]
    (first, scores_a), (_, scores_b) = (_pairwise_accuracy(m, tiny_tokenizer) for m in reloads)
    assert scores_a == pytest.approx(scores_b, abs=1e-6)
    assert first > 0.75, first


# ---- process reward model


@pytest.mark.slow
def test_process_reward_model_learns_its_step_labels(process_run, tiny_tokenizer):
    """Step-label accuracy (on every row of the data) rises from about chance to above 0.8;
    the run evaluated with the step-accuracy metric while training."""
    import torch
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(0)
    fresh = AutoModelForTokenClassification.from_pretrained(BASE, num_labels=2)
    before = _step_accuracy(fresh, tiny_tokenizer)
    after = _step_accuracy(
        AutoModelForTokenClassification.from_pretrained(process_run), tiny_tokenizer
    )
    assert before < 0.65, before
    assert after > 0.8, f"step accuracy {before:.3f} -> {after:.3f}"
    evals = [r["eval_step_accuracy"] for r in _metrics(process_run) if "eval_step_accuracy" in r]
    assert len(evals) >= 2 and evals[-1] > evals[0]


# ---- the heads and the keys


def _config(**keys):
    base = {"base_model": str(BASE), "learning_rate": 1e-3}
    return validate_mapping({**base, **keys})


def test_num_labels_sets_the_heads():
    """num_labels reaches the head: 3 outputs per token for a process reward model, one
    score for a reward model by default; a reward model with 2 is refused by name."""
    from payload.distributed import DistInfo
    from payload.model import load_tokenizer
    from payload.trainers import recipe_for

    steps = [{"path": str(STEPS), "type": "stepwise_supervised"}]
    pairs = [{"path": str(PAIRS), "type": "bradley_terry.chat_template"}]
    dist = DistInfo(rank=0, local_rank=0, world_size=1, backend=None, device="cpu")
    for keys, wanted in (
        ({"process_reward_model": True, "num_labels": 3, "datasets": steps}, 3),
        ({"process_reward_model": True, "datasets": steps}, 2),
        ({"reward_model": True, "datasets": pairs}, 1),
    ):
        cfg = _config(**keys)
        model = recipe_for(cfg, dist).load_model(load_tokenizer(cfg))
        assert model.score.out_features == wanted == model.config.num_labels
    with pytest.raises(ConfigError, match=re.escape("num_labels: is 2, but a reward model")):
        _config(reward_model=True, num_labels=2, datasets=pairs)


def test_both_heads_train_in_full_under_lora():
    """With `lora_target_linear` the head is a linear layer too: it must be trained whole
    (peft's modules_to_save), not given a LoRA of its own; peft's TOKEN_CLS model would
    otherwise wrap it first and then fail."""
    from payload.distributed import DistInfo
    from payload.model import load_tokenizer
    from payload.trainers import recipe_for

    dist = DistInfo(rank=0, local_rank=0, world_size=1, backend=None, device="cpu")
    lora = {"adapter": "lora", "lora_r": 4, "lora_target_linear": True}
    for keys in (
        {
            "process_reward_model": True,
            "datasets": [{"path": str(STEPS), "type": "stepwise_supervised"}],
        },
        {
            "reward_model": True,
            "datasets": [{"path": str(PAIRS), "type": "bradley_terry.chat_template"}],
        },
    ):
        cfg = _config(**keys, **lora)
        model = recipe_for(cfg, dist).load_model(load_tokenizer(cfg))
        trained = {n for n, p in model.named_parameters() if p.requires_grad and "score" in n}
        assert trained and all(".modules_to_save." in n for n in trained), trained


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"reward_model": True, "process_reward_model": True},
            "process_reward_model: and `reward_model` are two different models",
        ),
        ({"reward_model": True, "rl": "dpo"}, "rl: and `reward_model: true` are two objectives"),
        ({"reward_model": True, "sample_packing": True}, "sample_packing: cannot be used with"),
        ({"num_labels": 2}, "num_labels: sets the outputs of a reward head"),
        ({"center_rewards_coefficient": 0.01}, "center_rewards_coefficient: is a reward-model"),
        (
            {"reward_model": True, "model_type": "AutoModelForCausalLM"},
            "model_type: is `AutoModelForCausalLM`",
        ),
    ],
)
def test_reward_keys_that_cannot_work_together_are_refused(keys, message):
    pairs = [{"path": str(PAIRS), "type": "bradley_terry.chat_template"}]
    with pytest.raises(ConfigError, match=re.escape(message)):
        _config(datasets=pairs, **keys)


def test_row_types_follow_the_objective():
    """stepwise rows need process_reward_model (and only they train one); pairs need
    reward_model and are refused for supervised training with the key to set."""
    steps = {"path": str(STEPS), "type": "stepwise_supervised"}
    pairs = {"path": str(PAIRS), "type": "bradley_terry.chat_template"}
    with pytest.raises(ConfigError, match="set `process_reward_model: true`"):
        _config(datasets=[steps])
    with pytest.raises(ConfigError, match="`alpaca` rows cannot train a process reward model"):
        _config(process_reward_model=True, datasets=[steps, {"path": "a.jsonl", "type": "alpaca"}])
    with pytest.raises(ConfigError, match="set `reward_model: true`"):
        _config(datasets=[pairs])
    with pytest.raises(ConfigError, match="`alpaca` is not a reward format"):
        _config(reward_model=True, datasets=[{"path": "a.jsonl", "type": "alpaca"}])
    assert _config(reward_model=True, datasets=[pairs]).reward_model
    assert _config(process_reward_model=True, datasets=[steps]).process_reward_model


# ---- the pair format


def _pair_text(row: dict, **ds_fields) -> dict:
    from transformers import AutoTokenizer

    from payload.config import DatasetConfig, TrainConfig
    from payload.data.preference import build_preference_fn

    ds = DatasetConfig(path="pairs.jsonl", type="bradley_terry.chat_template", **ds_fields)
    cfg = TrainConfig(reward_model=True)
    return build_preference_fn(ds, cfg, AutoTokenizer.from_pretrained(BASE))(row)


CHAT = "<|im_start|>{}\n{}<|im_end|>\n"


def test_pairs_are_whole_conversations_in_the_chat_template():
    """Axolotl's rows (system, input, chosen, rejected as text) and argilla's (chosen and
    rejected as conversations) give the same two whole conversations."""
    system, user = CHAT.format("system", "Be brief."), CHAT.format("user", "2+2?")
    expected = {
        "chosen": system + user + CHAT.format("assistant", "4"),
        "rejected": system + user + CHAT.format("assistant", "5"),
    }
    row = {"system": "Be brief.", "input": "2+2?", "chosen": "4", "rejected": "5"}
    assert _pair_text(row) == expected

    def talk(answer: str) -> list[dict]:
        return [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": answer}]

    argilla = {"system": "Be brief.", "chosen": talk("4"), "rejected": talk("5")}
    assert _pair_text(argilla) == expected


def test_a_pair_without_a_prompt_is_a_bad_row_naming_the_field():
    from payload.data.core import BadRow

    with pytest.raises(BadRow, match="missing field `question`"):
        _pair_text({"chosen": "4", "rejected": "5"}, field_prompt="question")


@pytest.mark.slow
def test_inference_on_a_reward_model_says_it_writes_no_text(reward_run):
    """A reward model scores text; `launch inference` says so instead of failing inside
    generate (which a sequence-classification model does not have)."""
    result = launch("inference", str(reward_run / "config.yml"), "--prompt", "hi")
    assert result.returncode == 1, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert "is a reward model: it gives one score a conversation" in message, message
    assert "AutoModelForSequenceClassification" in message
