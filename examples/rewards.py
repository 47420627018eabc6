"""Reward functions and a prompt transform for examples/grpo.yml (GRPO on the tiny model).

TRL calls each reward function with keyword arguments: `prompts`, `completions` (text, or
chat messages for chat prompts), `completion_ids` (token ids), and every other column of
the rows; it wants one float per completion.
"""

# A token the untrained tiny model already samples now and then after a chat prompt (the
# newline, about 8% of its tokens), so that from the first step some completions of a
# group score above others: a reward no completion ever earns teaches nothing.
TARGET_TOKEN_ID = 204


def target_token(prompts, completions, completion_ids, **kwargs):
    """The fraction of each completion's tokens that are TARGET_TOKEN_ID."""
    return [ids.count(TARGET_TOKEN_ID) / max(len(ids), 1) for ids in completion_ids]


def short(prompts, completions, completion_ids, **kwargs):
    """1 for an empty completion, falling to 0 at 16 tokens: a second, weighted reward."""
    return [max(0.0, 1.0 - len(ids) / 16) for ids in completion_ids]


def question_prompt(row):
    """A row {"question": ...} as a chat prompt: `type: rewards.question_prompt`."""
    return {"prompt": [{"role": "user", "content": row["question"]}]}
