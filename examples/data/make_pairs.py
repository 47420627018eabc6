"""Write `pairs_rule.jsonl` and `steps_rule.jsonl`: reward-model data generated for Ferry.

`pairs_rule.jsonl` (`type: bradley_terry.chat_template`): the user asks for a word of a
kind (an animal, a fruit, a colour, a tool); the chosen answer names one of that kind, the
rejected answer one of another kind. A reward model that learns the rule scores the
chosen answer higher.

`steps_rule.jsonl` (`type: stepwise_supervised`): the prompt asks for four fruits; each
step names a word, and its label says whether the word is a fruit. A process reward model
that learns which words are fruits labels the steps.

The output is deterministic: run `python examples/data/make_pairs.py` and the files are
the same.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRS = 64
STEP_ROWS = 48

KINDS = {
    "animal": ["tiger", "rabbit", "horse", "eagle", "zebra", "mouse", "camel", "otter"],
    "fruit": ["apple", "lemon", "mango", "grape", "peach", "melon", "cherry", "banana"],
    "colour": ["red", "blue", "green", "yellow", "purple", "violet", "white", "black"],
    "tool": ["hammer", "saw", "drill", "wrench", "chisel", "shovel", "rake", "needle"],
}
ARTICLE = {"animal": "an animal", "fruit": "a fruit", "colour": "a colour", "tool": "a tool"}


def pairs(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(PAIRS):
        kind = rng.choice(list(KINDS))
        other = rng.choice([k for k in KINDS if k != kind])
        rows.append(
            {
                "input": f"Name {ARTICLE[kind]}.",
                "chosen": rng.choice(KINDS[kind]).capitalize() + ".",
                "rejected": rng.choice(KINDS[other]).capitalize() + ".",
            }
        )
    return rows


def steps(rng: random.Random) -> list[dict]:
    fruits = KINDS["fruit"]
    others = [word for kind, words in KINDS.items() if kind != "fruit" for word in words]
    rows = []
    for _ in range(STEP_ROWS):
        labels = [rng.random() < 0.5 for _ in range(4)]
        completions = [rng.choice(fruits if right else others) for right in labels]
        rows.append({"prompt": "Name four fruits.", "completions": completions, "labels": labels})
    return rows


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write("pairs_rule.jsonl", pairs(random.Random(7)))
    write("steps_rule.jsonl", steps(random.Random(11)))
