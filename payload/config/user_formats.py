"""Checks of a user-defined `type:` mapping (Axolotl's user-defined SFT format).

It lives with the config, not the data code, so `launch validate` reports a bad mapping
before anything is tokenized; `payload.data.sft.UserDefined` runs the same checks.
"""

from __future__ import annotations

import difflib
import string

from payload.errors import Problem

USER_DEFINED_KEYS = (
    "system_prompt",
    "system_format",
    "field_system",
    "field_instruction",
    "field_input",
    "field_output",
    "format",
    "no_input_format",
    "field",
)
_PLACEHOLDERS = {
    "format": {"instruction", "input"},
    "no_input_format": {"instruction"},
    "system_format": {"system"},
}


def user_defined_problems(spec: dict) -> list[Problem]:
    """Everything wrong with a user-defined `type:` mapping, each naming its key."""
    problems = []
    for key, value in spec.items():
        if key not in USER_DEFINED_KEYS:
            close = difflib.get_close_matches(str(key), USER_DEFINED_KEYS, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append(Problem(f"type.{key}", f"is not a user-defined format key{hint}"))
        elif value is not None and not isinstance(value, str):
            problems.append(Problem(f"type.{key}", f"must be text, not {type(value).__name__}"))
    if not spec.get("format"):
        problems.append(Problem("type.format", "is required: the prompt, with {instruction}"))
    for key, allowed in _PLACEHOLDERS.items():
        value = spec.get(key)
        if not isinstance(value, str):
            continue
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as e:
            problems.append(Problem(f"type.{key}", f"is not a valid format string ({e})"))
            continue
        for name in sorted(used - allowed):
            words = ", ".join("{" + a + "}" for a in sorted(allowed))
            problems.append(Problem(f"type.{key}", f"uses {{{name}}}; it may use only {words}"))
        if key == "format" and "instruction" not in used:
            problems.append(Problem("type.format", "has no {instruction}"))
    return problems
