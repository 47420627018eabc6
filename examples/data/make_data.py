"""Write `alpaca_tiny.jsonl` and `chat_tiny.jsonl`: small tasks, generated for Ferry.

Every answer follows from its instruction and input by a simple rule (add, reverse, sort,
spell, ...), so even a tiny model's loss falls visibly within a couple of epochs. The
output is deterministic: run `python examples/data/make_data.py` and the file is the same.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS_PER_TASK = 32

WORDS = [
    "river",
    "lamp",
    "stone",
    "cloud",
    "apple",
    "garden",
    "window",
    "pencil",
    "rocket",
    "forest",
    "candle",
    "mirror",
    "ladder",
    "bridge",
    "planet",
    "butter",
    "castle",
    "dragon",
    "engine",
    "feather",
    "guitar",
    "harbor",
    "island",
    "jacket",
    "kettle",
    "lemon",
    "magnet",
    "needle",
    "orange",
    "pepper",
    "quilt",
    "rabbit",
    "saddle",
    "tiger",
    "umbrella",
    "valley",
    "wagon",
    "yellow",
    "zebra",
    "basket",
    "circle",
    "desert",
    "eagle",
    "falcon",
    "ginger",
    "hammer",
    "igloo",
    "jungle",
    "kitten",
]
OPPOSITES = [
    ("hot", "cold"),
    ("up", "down"),
    ("early", "late"),
    ("open", "closed"),
    ("full", "empty"),
    ("light", "dark"),
    ("fast", "slow"),
    ("big", "small"),
    ("happy", "sad"),
    ("wet", "dry"),
    ("young", "old"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("near", "far"),
    ("rich", "poor"),
    ("thick", "thin"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _add(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return {
        "instruction": "Add the two numbers.",
        "input": f"{a} and {b}",
        "output": f"{a} + {b} = {a + b}.",
    }


def _reverse(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return {
        "instruction": "Reverse the order of these words.",
        "input": " ".join(words),
        "output": " ".join(reversed(words)),
    }


def _celsius(rng: random.Random) -> dict[str, str]:
    c = rng.randrange(-20, 45, 5)
    return {
        "instruction": "Convert the temperature from Celsius to Fahrenheit.",
        "input": f"{c} C",
        "output": f"{c} C is {c * 9 // 5 + 32} F.",
    }


def _upper(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    return {
        "instruction": "Write the word in capital letters.",
        "input": word,
        "output": word.upper(),
    }


def _count(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 7))
    return {
        "instruction": "Count the words.",
        "input": " ".join(words),
        "output": f"There are {len(words)} words.",
    }


def _next_day(rng: random.Random) -> dict[str, str]:
    i = rng.randrange(len(DAYS))
    return {
        "instruction": f"Which day comes after {DAYS[i]}?",
        "input": "",
        "output": f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}.",
    }


def _opposite(rng: random.Random) -> dict[str, str]:
    a, b = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    return {
        "instruction": "Give the opposite of the word.",
        "input": a,
        "output": f"The opposite of {a} is {b}.",
    }


def _sort(rng: random.Random) -> dict[str, str]:
    numbers = rng.sample(range(1, 60), rng.randint(3, 6))
    return {
        "instruction": "Sort the numbers from smallest to largest.",
        "input": ", ".join(map(str, numbers)),
        "output": ", ".join(map(str, sorted(numbers))),
    }


def _larger(rng: random.Random) -> dict[str, str]:
    a, b = rng.sample(range(1, 100), 2)
    return {
        "instruction": "Which number is larger?",
        "input": f"{a} or {b}",
        "output": f"{max(a, b)} is larger than {min(a, b)}.",
    }


def _spell(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    return {
        "instruction": "Spell the word letter by letter.",
        "input": word,
        "output": "-".join(word),
    }


TASKS = [_add, _reverse, _celsius, _upper, _count, _next_day, _opposite, _sort, _larger, _spell]


def rows(seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = [task(rng) for task in TASKS for _ in range(ROWS_PER_TASK)]
    rng.shuffle(out)
    return out


SYSTEM = "You are a careful assistant. Answer in one short sentence."


def chats(seed: int = 1) -> list[dict]:
    """The same tasks as conversations of one to four exchanges, in ShareGPT form
    (`conversations` of {from, value}); every other one opens with a system message.
    Their lengths differ a lot, which is what sample packing is for."""
    rng = random.Random(seed)
    out = []
    for i in range(CHATS):
        turns = []
        if i % 2 == 0:
            turns.append({"from": "system", "value": SYSTEM})
        for _ in range(rng.choice([1, 1, 2, 4])):
            task = rng.choice(TASKS)(rng)
            question = f"{task['instruction']} {task['input']}".strip()
            turns.append({"from": "human", "value": question})
            turns.append({"from": "gpt", "value": task["output"]})
        out.append({"conversations": turns})
    return out


CHATS = 240


def _write(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"wrote {path} ({len(records)} rows)")


def main() -> None:
    _write(HERE / "alpaca_tiny.jsonl", rows())
    _write(HERE / "chat_tiny.jsonl", chats())


if __name__ == "__main__":
    main()
