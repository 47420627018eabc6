"""Checks of a user-defined `type:` mapping: Axolotl's user-defined SFT format, and the
user-defined DPO and KTO preference formats.

They live with the config, not the data code, so `launch validate` reports a bad mapping
before anything is tokenized; the data code (`payload.data.sft.UserDefined`,
`payload.data.preference.UserDefined`) runs the same checks when it builds a dataset.
"""

from __future__ import annotations

import difflib
import string
from dataclasses import dataclass

from payload.errors import Problem


@dataclass(frozen=True)
class MappingSpec:
    """What a user-defined mapping may hold: `formats` maps each format key to the
    placeholders it may use and the one it must use (or None); `required` keys must be set."""

    keys: tuple[str, ...]
    formats: dict[str, tuple[frozenset[str], str | None]]
    required: tuple[str, ...] = ()
    nonempty: bool = False  # every value must be non-empty text


def _formats(**parts: tuple[tuple[str, ...], str | None]) -> dict:
    return {key: (frozenset(allowed), must) for key, (allowed, must) in parts.items()}


SFT = MappingSpec(
    keys=(
        "system_prompt",
        "system_format",
        "field_system",
        "field_instruction",
        "field_input",
        "field_output",
        "format",
        "no_input_format",
        "field",
    ),
    formats=_formats(
        format=(("instruction", "input"), "instruction"),
        no_input_format=(("instruction",), None),
        system_format=(("system",), None),
    ),
    required=("format",),
)
# The parts of each preference family's output: a format key `<part>_format` each (using
# {<part>}, and {system} in the prompt), a column key `field_<part>` each, and the extra
# columns it reads.
PREFERENCE_PARTS = {
    "dpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion"),
}
PREFERENCE_EXTRA_FIELDS = {"dpo": ("system",), "kto": ("system", "label")}
PREFERENCE = {
    family: MappingSpec(
        keys=(
            *(f"field_{p}" for p in (*parts, *PREFERENCE_EXTRA_FIELDS[family])),
            *(f"{p}_format" for p in parts),
        ),
        formats={
            f"{p}_format": (frozenset({p, "system"} if p == "prompt" else {p}), p) for p in parts
        },
        nonempty=True,
    )
    for family, parts in PREFERENCE_PARTS.items()
}


def placeholders(fmt: str) -> set[str]:
    """The {names} a format string uses; ValueError when it is not one."""
    return {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}


def mapping_problems(mapping: dict, spec: MappingSpec) -> list[Problem]:
    """Everything wrong with a user-defined `type:` mapping, each naming its key."""
    problems = []
    for key, value in mapping.items():
        if key not in spec.keys:
            close = difflib.get_close_matches(str(key), spec.keys, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"known: {', '.join(spec.keys)}"
            problems.append(Problem(f"type.{key}", f"is not a key of this format; {hint}"))
        elif value is not None and not isinstance(value, str):
            problems.append(Problem(f"type.{key}", f"must be text, not {type(value).__name__}"))
        elif spec.nonempty and not (value or "").strip():
            problems.append(Problem(f"type.{key}", "is empty"))
    for key in spec.required:
        if not mapping.get(key):
            problems.append(Problem(f"type.{key}", "is required"))
    for key, (allowed, must) in spec.formats.items():
        value = mapping.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        try:
            used = placeholders(value)
        except ValueError as e:
            problems.append(
                Problem(f"type.{key}", f"is not a format string ({e}); write {{{{ and }}}}")
            )
            continue
        words = ", ".join("{" + a + "}" for a in sorted(allowed))
        for name in sorted(used - allowed):
            problems.append(Problem(f"type.{key}", f"uses {{{name}}}; it may use only {words}"))
        if must and must not in used:
            problems.append(Problem(f"type.{key}", f"has no {{{must}}}"))
    return problems


def user_defined_problems(mapping: dict, rl: str | None = None) -> list[Problem]:
    """The problems of an SFT mapping, or of a preference one when `rl` names a family
    with a user-defined format."""
    family = (rl or "").lower()
    return mapping_problems(mapping, PREFERENCE.get(family, SFT) if family else SFT)
