"""Write `prefs_rule.jsonl`: preference rows generated for Ferry, where the chosen answer
follows a rule a tiny model can learn.

Each prompt asks to pick one of two words, a colour and a thing, in either order ("pick:
stone or red?"); the chosen answer is always the colour, the rejected one the thing.
Every row carries the pair in the shapes the preference formats read, so one file serves
every objective:

    question, chosen, rejected         dpo / ipo / simpo (`chatml.intel`)
    completion, label                  kto (`chatml.intel`): even rows the chosen answer
                                       (desirable), odd rows the rejected one
    chosen_messages, rejected_messages orpo (`chat_template.argilla`, with field_chosen /
                                       field_rejected naming these columns)

Deterministic: run `python examples/data/make_prefs.py` and the file is the same.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = 64
COLOURS = ["red", "blue", "green", "pink", "gold"]
THINGS = ["stone", "cloud", "lamp", "river", "cat", "dog"]


def rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(ROWS):
        first, second = rng.choice(COLOURS), rng.choice(THINGS)
        pair = (first, second) if rng.random() < 0.5 else (second, first)
        question = f"pick: {pair[0]} or {pair[1]}?"
        user = {"role": "user", "content": question}
        desirable = i % 2 == 0
        out.append(
            {
                "question": question,
                "chosen": first,
                "rejected": second,
                "completion": first if desirable else second,
                "label": desirable,
                "chosen_messages": [user, {"role": "assistant", "content": first}],
                "rejected_messages": [user, {"role": "assistant", "content": second}],
            }
        )
    return out


def main() -> None:
    path = HERE / "prefs_rule.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows()))
    print(f"wrote {ROWS} rows to {path}")


if __name__ == "__main__":
    main()
