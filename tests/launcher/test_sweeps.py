"""Sweep expansion: Axolotl's grid semantics, Ferry's extra checks, stable order."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import quickstart_config

from launcher import api
from launcher.sweeps import expand, format_value
from payload.config.overrides import with_values
from payload.errors import FerryError


def names(spec: dict, **kwargs) -> list[str]:
    trials, _ = expand(spec, **kwargs)
    return [t.name for t in trials]


def test_product_of_three_by_two_gives_six_in_file_order():
    trials, warnings = expand({"learning_rate": [1e-4, 2e-4, 3e-4], "lora_r": [8, 16]})
    assert [t.index for t in trials] == list(range(6))
    assert [t.name for t in trials] == [
        "lr=1e-4,r=8",
        "lr=1e-4,r=16",
        "lr=2e-4,r=8",
        "lr=2e-4,r=16",
        "lr=3e-4,r=8",
        "lr=3e-4,r=16",
    ]
    assert trials[3].values == {"learning_rate": 2e-4, "lora_r": 16}
    assert warnings == []


PAIRS = [
    {"adapter": "lora", "load_in_8bit": True},
    {"adapter": "qlora", "load_in_4bit": True},
    {"adapter": "lora", "lora_r": 32},
    {"adapter": None},
]


def test_four_pairs_times_two_gives_eight_and_pairs_stay_together():
    trials, _ = expand({"learning_rate": [1e-4, 2e-4], "_": PAIRS})
    assert len(trials) == 8
    for trial in trials:
        paired = {k: v for k, v in trial.values.items() if k != "learning_rate"}
        assert paired in PAIRS, paired  # never a mix of two pairs
    assert [t.values["learning_rate"] for t in trials] == [1e-4] * 4 + [2e-4] * 4


def test_a_paired_value_wins_over_a_product_value():
    trials, warnings = expand({"lora_r": [8, 16], "_": [{"lora_r": 64}, {"adapter": "lora"}]})
    # (8, r=64) and (16, r=64) are the same trial once the pair wins: it runs once.
    assert [t.values for t in trials] == [
        {"lora_r": 64},
        {"lora_r": 8, "adapter": "lora"},
        {"lora_r": 16, "adapter": "lora"},
    ]
    assert len(warnings) == 1


def test_dotted_keys_reach_nested_settings():
    trials, _ = expand(
        {
            "datasets.0.type": ["alpaca", "completion"],
            "fsdp_config.reshard_after_forward": [True, False],
        }
    )
    assert trials[1].values == {
        "datasets.0.type": "alpaca",
        "fsdp_config.reshard_after_forward": False,
    }
    assert trials[1].name == "type=alpaca,reshard_after_forward=false"


def test_list_values_are_written_as_lists_of_lists():
    trials, _ = expand({"lora_target_modules": [["q_proj", "v_proj"], ["o_proj"]]})
    assert [t.values["lora_target_modules"] for t in trials] == [["q_proj", "v_proj"], ["o_proj"]]
    assert trials[0].name == "lora_target_modules=[q_proj+v_proj]"


def test_duplicate_trials_are_collapsed_with_a_warning():
    trials, warnings = expand({"lora_r": [8, 16, 8], "_": [{"seed": 1}, {"seed": 1}]})
    assert [t.values for t in trials] == [{"lora_r": 8, "seed": 1}, {"lora_r": 16, "seed": 1}]
    assert len(warnings) == 2
    assert "t0 (r=8) appears 4 times" in warnings[0] and "t1 (r=16) appears 2" in warnings[1]


def test_only_keys_that_vary_name_a_trial():
    assert names({"lora_r": [8], "learning_rate": [1e-4, 2e-4]}) == ["lr=1e-4", "lr=2e-4"]


def test_short_names_fall_back_to_full_keys_when_they_collide():
    got = names({"warmup_steps": [1, 2], "warmup_ratio": [0.1, 0.2]})
    assert got[0] == "warmup_steps=1,warmup_ratio=0.1"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"learning_rate": 1e-4}, "sweep key `learning_rate`: needs a list of values, got 0.0001"),
        ({"adapter": "lora"}, "sweep key `adapter`: needs a list of values, got the string 'lora'"),
        ({"lora_r": []}, "sweep key `lora_r`: has an empty list"),
        (
            {"lerning_rate": [1]},
            "sweep key `lerning_rate`: `lerning_rate` is not a config key; "
            "did you mean `learning_rate`?",
        ),
        ({"lora_embedding_kernel": [True]}, "`lora_embedding_kernel` is not supported yet"),
        ({"_": {"adapter": "lora"}}, "sweep key `_`: needs a non-empty list of mappings"),
        ({"_": ["lora"]}, "sweep key `_[0]`: needs a mapping"),
        ({"_": [{"lerning_rate": 1}]}, "sweep key `lerning_rate`"),
    ],
)
def test_malformed_sweeps_name_the_key(spec, words):
    with pytest.raises(FerryError) as info:
        expand(spec)
    assert words in str(info.value)


def test_a_nested_typo_expands_and_the_sweep_plan_refuses_it_naming_the_key(tmp_path):
    """Expansion checks only a dotted key's first part (`datasets` is a config key), so
    `datasets.0.tpye` makes a trial that sets `tpye` inside the first dataset; the
    typo is caught when the trial's config is validated, before anything is launched,
    by the key as the user would write it, with a did-you-mean."""
    trials, warnings = expand({"datasets.0.tpye": ["alpaca"]})
    assert [(t.index, t.values, t.name) for t in trials] == [
        (0, {"datasets.0.tpye": "alpaca"}, "base")
    ]
    assert warnings == []
    base = {"datasets": [{"path": "a.jsonl", "type": "completion"}], "lora_r": 8}
    assert with_values(base, trials[0].values) == {
        "datasets": [{"path": "a.jsonl", "type": "completion", "tpye": "alpaca"}],
        "lora_r": 8,
    }

    sweep = tmp_path / "grid.yml"
    sweep.write_text("datasets.0.tpye: [alpaca]\n")
    with pytest.raises(FerryError) as info:
        api.sweep_plan(quickstart_config(tmp_path), sweep)
    assert str(info.value) == (
        "1 of 1 trials are invalid; nothing was launched:\n"
        "  - t0 (base): datasets[0].tpye: unknown key; did you mean `type`?"
    )


def test_max_trials_guard():
    spec = {"seed": list(range(20)), "lora_r": list(range(1, 21))}
    with pytest.raises(FerryError, match="400 trials, more than --max-trials 256") as info:
        expand(spec)
    assert "--max-trials 400" in info.value.hint
    assert len(expand(spec, max_trials=400)[0]) == 400


def test_order_is_the_same_in_every_process():
    """Set iteration and hashing vary between processes; trial order must not."""
    code = (
        "import json; from launcher.sweeps import expand; "
        "t, _ = expand({'seed': [3, 1, 2], '_': [{'adapter': 'lora'}, {'adapter': None}], "
        "'learning_rate': [0.1, 0.01]}); print(json.dumps([x.values for x in t]))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
        ).stdout
        for seed in (0, 1, 2)
    }
    assert len(outputs) == 1
    assert json.loads(outputs.pop())[:2] == [
        {"seed": 3, "learning_rate": 0.1, "adapter": "lora"},
        {"seed": 3, "learning_rate": 0.1, "adapter": None},
    ]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (2e-4, "2e-4"),
        (1.5e-5, "1.5e-5"),
        (0.05, "0.05"),
        (3.0, "3"),
        (True, "true"),
        (None, "null"),
        (16, "16"),
        (["q", "v"], "[q+v]"),
        (2e6, "2e6"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text
