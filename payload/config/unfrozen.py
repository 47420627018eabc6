"""`unfrozen_parameters` patterns, read as Axolotl reads them (light: no torch).

A pattern is a regular expression matched from the start of a parameter's name
(`re.match`), in which a dot is a literal dot unless it is followed by `+` (so
`model.layers.1[0-9]+.mlp` means the layers 10-19). It may end in a row range,
`[start:end]`, `[start:]`, `[:end]` or `[index]`: then only those rows (the first
dimension: tokens of an embedding, outputs of a linear layer) train.
"""

from __future__ import annotations

import re

_RANGE = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")


def parse_pattern(pattern: str) -> tuple[re.Pattern[str], tuple[int, int | None] | None]:
    """(compiled name regex, row range or None); raises re.error or ValueError."""
    rows: tuple[int, int | None] | None = None
    found = _RANGE.match(pattern)
    if found:
        pattern, start, end = found.groups()
        if end is None:  # [index]
            if not start:
                raise ValueError("an empty row range `[]`")
            rows = (int(start), int(start) + 1)
        else:
            rows = (int(start or 0), int(end) if end else None)
            if rows[1] is not None and rows[1] <= rows[0]:
                raise ValueError(f"the row range [{start}:{end}] is empty")
    return re.compile(re.sub(r"\.(?!\+)", r"\\.", pattern)), rows


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` cannot be used, or None."""
    try:
        parse_pattern(pattern)
    except (re.error, ValueError) as e:
        return str(e)
    return None
