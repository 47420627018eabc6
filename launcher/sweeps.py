"""Sweep files: a grid of config values expanded into trials, Axolotl's way and stricter.

    learning_rate: [1.0e-4, 2.0e-4]       # a product key: one trial per value...
    lora_r: [8, 16]                       # ...crossed with every other product key
    _:                                    # paired values vary together
      - {adapter: lora, load_in_8bit: true}
      - {adapter: qlora, load_in_4bit: true}

gives 2 x 2 x 2 = 8 trials. Within a trial a paired value wins over a product value of
the same key. Keys may be dotted (`datasets.0.type`, `fsdp_config.reshard_after_forward`);
a value that is itself a list is written as a list of lists (`[[q_proj, v_proj], [all]]`).
Trials come out in a fixed order: the product in the file's key order, the last key
varying fastest, each product point crossed with the pairs in their order.
"""

from __future__ import annotations

import difflib
import itertools
import json
from dataclasses import dataclass
from typing import Any

from payload.config import TrainConfig
from payload.config.axolotl_keys import TOP_LEVEL as AXOLOTL_KEYS
from payload.errors import FerryError

PAIRED = "_"
DEFAULT_MAX_TRIALS = 256
_MISSING = "<not set>"

# Short names for keys that sweeps usually vary, for trial names like `lr=2e-4,r=16`.
SHORT = {
    "learning_rate": "lr",
    "micro_batch_size": "mbs",
    "gradient_accumulation_steps": "gas",
    "num_epochs": "epochs",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "weight_decay": "wd",
    "warmup_steps": "warmup",
    "warmup_ratio": "warmup",
    "sequence_len": "seq",
    "max_steps": "steps",
    "lr_scheduler": "sched",
}


@dataclass(frozen=True)
class Trial:
    """One point of the grid: the values it sets (dotted key -> value) and its name."""

    index: int
    values: dict[str, Any]
    name: str


def _problem(key: str, message: str) -> FerryError:
    return FerryError(f"sweep key `{key}`: {message}")


def _check_key(key: str) -> None:
    """The first part of a dotted key must be a config key; anything else is a typo."""
    from payload.config.loader import _names

    names = _names(TrainConfig)  # field names and the other names they accept
    head = key.split(".", 1)[0]
    if head in names:
        return
    if head in AXOLOTL_KEYS:
        raise _problem(key, f"`{head}` is not supported yet by Ferry.")
    close = difflib.get_close_matches(head, sorted(names), n=1, cutoff=0.6)
    hint = f"; did you mean `{close[0]}`?" if close else "."
    raise _problem(key, f"`{head}` is not a config key{hint}")


def _values(key: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        raise _problem(key, f"needs a list of values, got the string {value!r}; write [{value!r}].")
    if not isinstance(value, list):
        raise _problem(key, f"needs a list of values, got {value!r}; write [{value!r}].")
    if not value:
        raise _problem(key, "has an empty list: it would make zero trials.")
    return value


def _pairs(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _problem(PAIRED, "needs a non-empty list of mappings whose values vary together.")
    for i, pair in enumerate(value):
        if not isinstance(pair, dict) or not pair:
            raise _problem(f"{PAIRED}[{i}]", f"needs a mapping of key: value, got {pair!r}.")
        for key in pair:
            _check_key(str(key))
    return [{str(k): v for k, v in pair.items()} for pair in value]


def _canonical(value: Any) -> Any:
    """A hashable form of a value in which equal values are equal (mappings in any key
    order), to find repeated trials and keys that never vary."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _canonical(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", tuple(_canonical(v) for v in value))
    return (type(value).__name__, value)


def expand(
    spec: dict[str, Any], max_trials: int = DEFAULT_MAX_TRIALS
) -> tuple[list[Trial], list[str]]:
    """Expand a sweep mapping into trials. Returns (trials, warnings).

    Raises FerryError naming the key for a malformed sweep, and when the grid holds more
    than `max_trials` trials.
    """
    if not isinstance(spec, dict) or not spec:
        raise FerryError("A sweep file must map config keys to lists of values.")
    product_keys: list[str] = []
    product_values: list[list[Any]] = []
    pairs: list[dict[str, Any]] = [{}]
    for raw_key, value in spec.items():
        key = str(raw_key)
        if key == PAIRED:
            pairs = _pairs(value)
            continue
        _check_key(key)
        product_keys.append(key)
        product_values.append(_values(key, value))

    total = len(pairs)
    for values in product_values:
        total *= len(values)
    if total > max_trials:
        raise FerryError(
            f"The sweep makes {total} trials, more than --max-trials {max_trials}.",
            hint=f"Raise the guard with --max-trials {total} if that many is intended.",
        )

    combos: list[dict[str, Any]] = []
    first_seen: dict[str, int] = {}
    repeats: dict[int, int] = {}
    for point in itertools.product(*product_values):
        for pair in pairs:
            values = dict(zip(product_keys, point, strict=True))
            values.update(pair)  # a paired value wins over a product value
            canonical = _canonical(values)
            if canonical in first_seen:
                repeats[first_seen[canonical]] = repeats.get(first_seen[canonical], 1) + 1
                continue
            first_seen[canonical] = len(combos)
            combos.append(values)

    paired_keys = {k for pair in pairs for k in pair}
    keys = list(dict.fromkeys([*product_keys, *(k for pair in pairs for k in pair)]))

    def distinct(key: str) -> int:
        if key not in paired_keys:  # only the product sets it: its own list decides
            return len({_canonical(v) for v in product_values[product_keys.index(key)]})
        return len({_canonical(c.get(key, _MISSING)) for c in combos})

    varied = [k for k in keys if distinct(k) > 1]
    short = _short_names(varied)
    trials = [Trial(i, values, _name(values, varied, short)) for i, values in enumerate(combos)]
    warnings = [
        f"trial t{index} ({trials[index].name}) appears {count} times in the grid; it runs once."
        for index, count in repeats.items()
    ]
    return trials, warnings


def _short_names(keys: list[str]) -> dict[str, str]:
    """`learning_rate` -> `lr`, `datasets.0.type` -> `type`; the full key when two collide."""
    short = {k: SHORT.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    counts: dict[str, int] = {}
    for name in short.values():
        counts[name] = counts.get(name, 0) + 1
    return {k: (v if counts[v] == 1 else k) for k, v in short.items()}


def format_value(value: Any) -> str:
    """Compact, readable values for names and tables: 2e-4, 0.05, true, [q_proj+v_proj]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)  # nan, inf, -inf: no mantissa to trim
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            mantissa, exponent = f"{value:.3e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + "+".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def _name(values: dict[str, Any], varied: list[str], short: dict[str, str]) -> str:
    parts = [f"{short[k]}={format_value(values[k])}" for k in varied if k in values]
    return ",".join(parts) or "base"
