"""Chat templates by name, and which one applies to a dataset.

A template is Jinja source rendered by `tokenizer.apply_chat_template`. Users name one
with `chat_template:` (top level, or per dataset, which wins):

- a built-in name (`BUILTIN_TEMPLATES`: chatml, llama3, gemma, phi_3);
- `tokenizer_default`: the tokenizer's own template;
- `tokenizer_default_fallback_<name>`: the tokenizer's own, else the built-in `<name>`;
- `jinja`: the source in `chat_template_jinja` (inline, or a path to a .jinja file);
- Jinja source itself.

Nothing set anywhere means `tokenizer_default`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from payload.config.schema import DatasetConfig, TrainConfig
from payload.errors import FerryError

TOKENIZER_DEFAULT = "tokenizer_default"
FALLBACK_PREFIX = "tokenizer_default_fallback_"
JINJA = "jinja"

# The rendered text of each is what the model family was trained on; only the Jinja
# spelling is ours. `content` is a string in every one of them.
BUILTIN_TEMPLATES: dict[str, str] = {
    # <|im_start|>role\ncontent<|im_end|>\n
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # <bos><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> (content trimmed)
    "llama3": (
        "{% for message in messages %}"
        "{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    # <bos><start_of_turn>user\ncontent<end_of_turn>\n; the assistant is `model`, no system
    # role, and user/assistant must alternate.
    "gemma": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}"
        "{% endif %}"
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate "
        "user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    # <bos><|user|>\ncontent<|end|>\n<|assistant|>\ncontent<|end|>\n (the user turn opens
    # the assistant's, so there is no separate generation prompt).
    "phi_3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' + '<|assistant|>\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + '<|end|>\\n' }}"
        "{% endif %}"
        "{% endfor %}"
    ),
}

# The token each built-in closes a turn with.
BUILTIN_EOT = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "gemma": "<end_of_turn>",
    "phi_3": "<|end|>",
}
# Markers recognised in any template source, most specific first.
_KNOWN_EOT = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


# Axolotl's names for the templates of vision-language (and some newer text) families.
# Ferry does not keep copies of them: the model's own template (its processor's or
# tokenizer's, as the model ships it) is the family's.
OWN_TEMPLATES = (
    "qwen2_vl",
    "qwen3_5",
    "gemma3",
    "gemma3n",
    "gemma4",
    "llama3_2_vision",
    "llama4",
    "pixtral",
    "llava",
    "mistral_v7_tekken",
    "mistral_v3_tekken",
)


def resolve_template(
    cfg: TrainConfig, ds: DatasetConfig | None = None, tokenizer: Any = None
) -> str:
    """The Jinja source that applies to `ds` (or, with no dataset, to the whole run).

    The dataset's `chat_template` wins over the top-level one, which wins over the
    tokenizer's own. Raises FerryError naming the key for an unknown name, a missing
    `chat_template_jinja`, or a tokenizer without a template.
    """
    if ds is not None and ds.chat_template:
        key = f"`chat_template` of dataset {ds.path}"
        choice = ds.chat_template
        jinja = ds.chat_template_jinja or cfg.chat_template_jinja
    else:
        key, choice, jinja = "`chat_template`", cfg.chat_template, cfg.chat_template_jinja
    if choice is None:
        choice = JINJA if jinja else TOKENIZER_DEFAULT
    return template_source(choice, jinja=jinja, tokenizer=tokenizer, key=key)


def template_source(
    choice: str, *, jinja: str | None = None, tokenizer: Any = None, key: str = "`chat_template`"
) -> str:
    """Jinja source for one `chat_template:` value (see the module docstring)."""
    if choice == JINJA:
        if not jinja:
            raise FerryError(f"{key}: `jinja` needs the template in `chat_template_jinja`.")
        if not any(c in jinja for c in "{}\n") and Path(jinja).is_file():
            return Path(jinja).read_text(encoding="utf-8")
        return jinja
    if choice == TOKENIZER_DEFAULT or choice.startswith(FALLBACK_PREFIX):
        own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if isinstance(own, str) and own:
            return own
        if choice == TOKENIZER_DEFAULT:
            raise FerryError(
                f"{key}: the tokenizer has no chat template of its own (`{TOKENIZER_DEFAULT}`).",
                hint=f"Name one instead: {', '.join(BUILTIN_TEMPLATES)}, or `jinja`.",
            )
        choice = choice[len(FALLBACK_PREFIX) :]
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice]
    if choice in OWN_TEMPLATES:
        own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if isinstance(own, str) and own:
            return own
        raise FerryError(
            f"{key}: `{choice}` is the model family's own template, which Ferry reads from "
            "the model's processor or tokenizer; this one has no chat template.",
            hint="Use a model folder that ships its template, or give one with "
            "`chat_template: jinja` and `chat_template_jinja`.",
        )
    if "{%" in choice or "{{" in choice:
        return choice
    close = difflib.get_close_matches(choice, [*BUILTIN_TEMPLATES, TOKENIZER_DEFAULT], n=1)
    raise FerryError(
        f"{key}: `{choice}` is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}, "
        f"{TOKENIZER_DEFAULT}, {JINJA}) nor a Jinja template.",
        hint=f"Did you mean `{close[0]}`?" if close else None,
    )


def eot_token_for(template: str) -> str | None:
    """The token that ends a turn in a built-in (by name) or in Jinja source that uses a
    known marker (<|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>); None when unknown, in
    which case callers fall back to the tokenizer's eos token."""
    if template in BUILTIN_EOT:
        return BUILTIN_EOT[template]
    for name, source in BUILTIN_TEMPLATES.items():
        if template == source:
            return BUILTIN_EOT[name]
    return next((marker for marker in _KNOWN_EOT if marker in template), None)
