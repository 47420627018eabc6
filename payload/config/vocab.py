"""The names and values a config may use, and the checks and helpers of its sections, in
plain Python: the pydantic models (`schema.py`) use them, and so does the compiled form of
those models that `launch validate` runs without building them (`compiled.py`), which is
why nothing here may import pydantic (or torch)."""

from __future__ import annotations

import re
from typing import Any

# Dataset formats the payload implements (`payload.data` registers the code under these
# names; a test keeps the lists in step, since this module must not import the data code).
# A type may carry a loader suffix, Axolotl style: `alpaca_w_system.load_open_orca`.
SUPPORTED_DATASET_TYPES = (
    "alpaca",
    "alpaca_w_system",
    "alpaca_chat",
    "alpaca_instruct",
    "completion",
    "input_output",
    "chat_template",
    "sharegpt",
    "user_defined",
    "pretrain",
    "stepwise_supervised",
)
# The loader suffixes each type takes (`type: alpaca_chat.load_qa`); other types take none.
# A test keeps these in step with the strategies' own tables.
DATASET_TYPE_LOADERS = {
    "alpaca_chat": ("load", "load_concise", "load_qa", "load_camel_ai", "load_no_prompt"),
    "alpaca_w_system": (
        "load",
        "load_chat",
        "load_instruct",
        "load_open_orca",
        "load_open_orca_chatml",
    ),
    "chat_template": ("load", "default"),
}
# Preference formats, read when `rl:` is set; the part before the first dot is the family.
SUPPORTED_PREFERENCE_TYPES = {
    "dpo": (
        "chatml.intel",
        "chatml.argilla_chat",
        "chatml.ultra",
        "llama3.intel",
        "llama3.argilla_chat",
        "llama3.ultra",
        "chat_template.default",
        "chat_template.argilla_chat",
        "passthrough",
        "user_defined",
    ),
    "kto": (
        "chatml.intel",
        "chatml.argilla_chat",
        "chatml.ultra",
        "llama3.intel",
        "llama3.argilla_chat",
        "llama3.ultra",
        "user_defined",
    ),
    "orpo": ("chat_template.argilla",),
    # Not an `rl:` value: the rows of `reward_model: true` (payload.data.bradley_terry).
    "reward": ("bradley_terry.chat_template",),
}
# Objectives that read another's formats: IPO and SimPO train on DPO's pairs.
PREFERENCE_FAMILY = {"ipo": "dpo", "simpo": "dpo"}


def preference_family(rl: str | None) -> str:
    """The key of SUPPORTED_PREFERENCE_TYPES whose formats `rl:` reads ("" without rl)."""
    name = (rl or "").lower()
    return PREFERENCE_FAMILY.get(name, name)


# Names as transformers spells them (its `OptimizerNames` and `SchedulerType`); a test
# keeps these in step with the installed release.
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "ademamix",
    "sgd",
    "adagrad",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "ademamix_8bit",
    "lion_8bit",
    "lion_32bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "lomo",
    "adalomo",
    "grokadamw",
    "schedule_free_radam",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "apollo_adamw",
    "stable_adamw",
)


# Accelerators by the names users write; each backend says which it offers.
ACCELERATORS = (
    "T4",
    "L4",
    "A10G",
    "A10",
    "L40S",
    "A100",
    "A100-40GB",
    "A100-80GB",
    "H100",
    "H200",
    "B200",
)
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?)?\s*$", re.IGNORECASE)
_GPUS = re.compile(r"^(\d+|[A-Za-z][A-Za-z0-9-]*(:\d+)?)$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)


def parse_memory_mb(value: str | int | float) -> int:
    """`64GB`, `64GiB`, `512MB`, or a number of MiB -> MiB."""
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    return _scaled(value, _MEMORY, units, "M", "a memory size like 64GB or 512MB")


def parse_duration_s(value: str | int | float) -> int:
    """`24h`, `90m`, `3600s`, `2d`, or a number of seconds -> seconds."""
    units = {"S": 1, "M": 60, "H": 3600, "D": 86400}
    return _scaled(value, _DURATION, units, "S", "a duration like 90m, 24h or 3600")


def _scaled(
    value: str | int | float,
    pattern: re.Pattern[str],
    units: dict[str, float],
    default: str,
    what: str,
) -> int:
    """A plain number as it is; else NUMBER[UNIT] read by `pattern` and scaled by the
    unit's first letter (`default` without one)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = pattern.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not {what}")
    unit = (match.group(2) or default)[0].upper()
    return int(float(match.group(1)) * units[unit])


# SkyPilot 0.14's clouds (sky.utils.registry.CLOUD_REGISTRY) and their aliases; a test
# in SkyPilot's virtualenv keeps the list in step, since validation never imports it.
SKY_CLOUDS = (
    "aws", "azure", "cudo", "digitalocean", "do", "fluidstack", "gcp", "hyperbolic", "ibm",
    "k8s", "kubernetes", "lambda", "mithril", "nebius", "oci", "paperspace",
    "primeintellect", "runpod", "scp", "seeweb", "shadeform", "slurm", "ssh", "vast",
    "verda", "vsphere", "yotta",
)  # fmt: skip
# An accelerator as Ferry gives it to SkyPilot: NAME or NAME:COUNT, one process per GPU.
_SKY_ACCELERATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*(:[1-9][0-9]*)?")
# sky.skylet.constants.CLUSTER_NAME_VALID_REGEX
_SKY_CLUSTER = re.compile(r"[a-zA-Z]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?")


# ---- checks of single values, each a field validator of a model in schema.py (by name
# there); a ValueError's message becomes the problem the user reads.


def sky_infra(value: str | None) -> str | None:
    """`launch.sky.infra`: cloud[/region[/zone]], the cloud one SkyPilot knows."""
    if value is None:
        return None
    cloud = value.split("/")[0].strip().lower()
    if cloud in SKY_CLOUDS or cloud == "*":
        return value
    import difflib

    close = difflib.get_close_matches(cloud, SKY_CLOUDS, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"{cloud!r} is not a cloud SkyPilot knows (cloud[/region[/zone]], one of "
        f"{', '.join(SKY_CLOUDS)}).{hint}"
    )


def sky_accelerators(value: list[str] | None) -> list[str] | None:
    """`launch.sky.accelerators`: NAME or NAME:COUNT entries, stripped."""
    if value is None:
        return None
    if not value:
        raise ValueError("an empty list: name at least one accelerator, e.g. [H100:8]")
    bad = [a for a in value if not _SKY_ACCELERATOR.fullmatch(str(a).strip())]
    if bad:
        raise ValueError(
            f"{', '.join(map(repr, bad))}: each entry is NAME or NAME:COUNT with a "
            "positive count (H100:8, A100-80GB:8, L4)"
        )
    return [str(a).strip() for a in value]


def sky_cluster(value: str | None) -> str | None:
    """`launch.sky.cluster`: a cluster name SkyPilot accepts."""
    if value is not None and not _SKY_CLUSTER.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a name SkyPilot accepts for a cluster: a letter first, "
            "then letters, digits, '-', '_' or '.', ending in a letter or digit"
        )
    return value


def launch_gpus(value: Any) -> Any:
    """`launch.gpus` (before type checks): a count or ACCELERATOR:COUNT, as text."""
    if value is None:
        return None
    text = str(value).strip()
    if not _GPUS.match(text) or text.split(":")[-1] == "0":
        raise ValueError(f"{value!r} is not a count (2) or ACCELERATOR:COUNT (H100:8)")
    return text


def memory_mb(value: Any) -> Any:
    """`launch.memory` (before type checks): MiB from 64GB, 512MB or a number."""
    return None if value is None else parse_memory_mb(value)


def duration_s(value: Any) -> Any:
    """`launch.timeout`, `launch.stop_grace` (before type checks): seconds from 24h, 90m."""
    return None if value is None else parse_duration_s(value)


def env_without_secrets(value: dict[str, str]) -> dict[str, str]:
    """`launch.env`: no variable whose name says it holds a credential."""
    from payload.runtime.job import secret_like

    named = sorted(name for name in value if secret_like(name))
    if named:
        raise ValueError(
            f"would carry a credential in plain text ({', '.join(named)}); pass it as a "
            "secret by name instead (secrets: [NAME], --secret NAME)"
        )
    return value


# ---- helpers of the validated sections: bases of the models and of their compiled records


class DatasetHelpers:
    __slots__ = ()

    @property
    def type_name(self) -> str:
        """The strategy's registered name: `user_defined` for a mapping, else the part
        before a loader suffix (`alpaca_w_system.load_open_orca` -> `alpaca_w_system`)."""
        kind = self.type  # type: ignore[attr-defined]
        if isinstance(kind, dict):
            return "user_defined"
        return (kind or "").split(".", 1)[0]


class TrainHelpers:
    __slots__ = ()

    @property
    def effective_lora_alpha(self) -> int:
        alpha = self.lora_alpha  # type: ignore[attr-defined]
        return alpha if alpha is not None else 2 * self.lora_r  # type: ignore[attr-defined]
