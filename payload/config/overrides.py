"""`--set key=value` overrides: dotted keys into nested mappings and lists, typed values."""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from payload.errors import FerryError

# PyYAML follows YAML 1.1, where `1e-4` is a string; users mean a number.
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_value(text: str) -> Any:
    """Turn the text after `=` into a typed value: numbers, booleans, null, [lists], {maps}."""
    if _FLOAT.match(text.strip()):
        number = float(text)
        return int(number) if re.fullmatch(r"[-+]?\d+", text.strip()) else number
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_override(item: str) -> tuple[str, Any]:
    """`lora.r=16` -> ("lora.r", 16)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise FerryError(
            f"--set {item!r} is not of the form key=value.",
            hint="Example: --set learning_rate=2e-4 --set datasets.0.path=data.jsonl",
        )
    return key.strip(), parse_value(value)


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.0.c` in place, creating mappings on the way; list indices must exist
    (or be the next free index, which appends)."""
    parts = key.split(".")
    node: Any = config
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise FerryError(
                    f"--set {key}: `{where}` needs a list index from 0 to {len(node)}, "
                    f"got {part!r}."
                )
            index = int(part)
            if index == len(node):
                node.append({} if not last else value)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise FerryError(
                f"--set {key}: `{'.'.join(parts[:depth])}` holds {node!r}, "
                "which has no keys to set."
            )


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `config` with each `key=value` applied in order (later wins)."""
    result = copy.deepcopy(config)
    for item in overrides:
        key, value = split_override(item)
        set_dotted(result, key, value)
    return result


def with_values(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`config` with each dotted key in `values` set, copying only the containers on the
    way to each key: the rest is shared with `config`, which is left as it was. Cheap
    enough to build thousands of sweep trials from one base config."""
    result = dict(config)
    for key, value in values.items():
        node: Any = result
        for part in key.split(".")[:-1]:
            index: Any = int(part) if isinstance(node, list) and part.isdigit() else part
            try:
                child = node[index]
            except (KeyError, IndexError, TypeError):
                break  # set_dotted creates what is missing, or reports the bad path
            if not isinstance(child, (dict, list)):
                break
            node[index] = node = copy.copy(child)
        set_dotted(result, key, copy.deepcopy(value))
    return result
