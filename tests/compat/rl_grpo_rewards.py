"""Reward functions and the prompt transform of tests/compat/rl_grpo.yml, in the shape of
Axolotl's GRPO examples (a factory taking `cfg`, returning the row function and the
`datasets.map` arguments)."""

import re


def gsm8k_transform(cfg, *args, **kwargs):
    def transform_fn(example, tokenizer=None):
        answer = example["answer"].split("####")[-1].strip()
        return {
            "prompt": [
                {"role": "system", "content": "Think, then give the answer after ####."},
                {"role": "user", "content": example["question"]},
            ],
            "answer": answer,
        }

    return transform_fn, {"remove_columns": ["question"]}


def correctness(prompts, completions, answer, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    found = [re.search(r"####\s*(-?[\d,.]+)", t) for t in texts]
    return [1.0 if m and m.group(1) == a else 0.0 for m, a in zip(found, answer, strict=True)]


def has_format(prompts, completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [0.5 if "####" in t else 0.0 for t in texts]
