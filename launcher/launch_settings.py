"""Launch settings: where a run goes and what it asks for, from three places.

    flags (--gpus, --nodes, ...)  >  the config's `launch:`  >  a --profile file  >  defaults

A profile is a small YAML file of launch settings shared by many configs. It may also be
an Axolotl cloud YAML (`axolotl train cfg.yml --cloud cloud.yml`): its keys are mapped
to Ferry's, or refused by name with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from executors.base import Resources
from payload.config.loader import parse_yaml, read_text
from payload.config.schema import LaunchConfig
from payload.errors import ConfigError, FerryError, Problem

# Axolotl cloud-YAML keys Ferry does not take, and why.
AXOLOTL_REFUSED = {
    "env": "(a list of names) copies values from your laptop's environment into the job, "
    "where they end up in logs and images; put secrets in a named secret and list it under "
    "`secrets:`",
    "branch": "picks an Axolotl git branch to install; Ferry's image carries its own payload",
    "docker_tag": "picks an Axolotl image; set `image: {base: ...}` to change Ferry's base",
    "timeout_preprocess": "Ferry preprocesses inside the training job; set `timeout`",
    "memory_preprocess": "Ferry preprocesses inside the training job; set `memory`",
    "image_build": "builds an image from a local Dockerfile; use `image:` (base, pip, apt, "
    "commands) so every backend gets the same image",
}


def from_axolotl(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Map an Axolotl cloud YAML onto launch settings (Ferry's own keys pass through)."""
    problems: list[Problem] = []
    out: dict[str, Any] = {}
    gpu, count = raw.get("gpu"), raw.get("gpu_count")
    for key, value in raw.items():
        if key == "env" and isinstance(value, dict):
            out[key] = value  # Ferry's own `env:` (KEY: value), not Axolotl's list of names
        elif key in AXOLOTL_REFUSED:
            if value not in (None, [], {}, ""):
                problems.append(Problem(key, f"is not taken by Ferry: it {AXOLOTL_REFUSED[key]}."))
        elif key == "provider":
            out["cloud"] = value
        elif key in ("gpu", "gpu_count"):
            continue
        elif key == "dockerfile_commands":
            # A string or a number is left for LaunchConfig to refuse by name.
            commands = value if isinstance(value, (str, int, float)) else list(value or [])
            out.setdefault("image", {})["commands"] = commands
        elif key == "image":
            out.setdefault("image", {})["base"] = value
        else:
            out[key] = value
    if gpu is not None or count is not None:
        name = str(gpu).upper() if gpu else None
        out.setdefault("gpus", f"{name}:{count or 1}" if name else str(count))
    if problems:
        raise ConfigError(source, problems)
    return out


def load_profile(path: str | Path) -> LaunchConfig:
    raw = parse_yaml(read_text(path), str(path))
    mapped = from_axolotl(raw, str(path))
    try:
        return LaunchConfig.model_validate(mapped)
    except ValidationError as e:
        problems = [
            Problem(".".join(str(p) for p in err["loc"]), err["msg"].removeprefix("Value error, "))
            for err in e.errors()
        ]
        raise ConfigError(str(path), problems) from e


@dataclass
class LaunchSettings:
    """The merged result, ready for a JobSpec."""

    cloud: str = "local"
    resources: Resources = field(default_factory=Resources)
    secrets: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    volumes: list[dict[str, str]] = field(default_factory=list)
    image: dict[str, Any] = field(default_factory=dict)
    storage: str | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"ray": {...}}


BACKEND_SECTIONS = ("ray", "sky")  # backend settings, merged key by key across the layers


def resolve(
    flags: dict[str, Any],
    config: LaunchConfig | None,
    profile: LaunchConfig | str | Path | None = None,
    config_storage: str | None = None,
) -> LaunchSettings:
    """Merge launch settings: flags > config > profile > defaults.

    `flags` holds the CLI's values (None: not given); `secrets` and `env` from all three
    places add up, flags last. `profile` is a path or an already loaded profile."""
    layers: list[dict[str, Any]] = []
    if profile is not None:
        loaded = profile if isinstance(profile, LaunchConfig) else load_profile(profile)
        layers.append(loaded.model_dump(exclude_none=True))
    if config is not None:
        layers.append(config.model_dump(exclude_none=True))
    layers.append({k: v for k, v in flags.items() if v not in (None, [], {})})
    if config is not None and config.storage and config_storage:
        raise FerryError("Set storage once: `storage:` and `launch.storage` are both set.")

    merged: dict[str, Any] = {}
    secrets: list[str] = []
    env: dict[str, str] = {}
    volumes: list[dict[str, str]] = []
    options: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section in BACKEND_SECTIONS:
            options.setdefault(section, {}).update(layer.pop(section, None) or {})
        if layer.get("managed") is not None:  # `launch.managed`, --managed: SkyPilot's
            options.setdefault("sky", {})["managed"] = layer.pop("managed")
        secrets += [s for s in layer.pop("secrets", []) if s not in secrets]
        env.update(layer.pop("env", {}))
        volumes += [v for v in layer.pop("volumes", []) if v not in volumes]
        merged.update(layer)
    for name in secrets:
        if not name or "=" in name or " " in name:
            raise FerryError(
                f"Secret {name!r}: give the name of a secret the backend stores, not a value."
            )

    listed = (options.get("sky") or {}).get("accelerators")
    if listed and merged.get("gpus") is None:
        # SkyPilot's acceptable accelerators, one count for all: that many processes per node
        counts = {str(a).rpartition(":")[2] if ":" in str(a) else "1" for a in listed}
        if len(counts) == 1 and counts <= {str(n) for n in range(1, 65)}:
            merged["gpus"] = counts.pop()
    resources = Resources.from_gpus(
        merged.get("gpus"),
        nodes=int(merged.get("nodes", 1)),
        spot=merged.get("spot"),
        region=merged.get("region"),
        timeout_s=merged.get("timeout"),
        cpu=merged.get("cpu"),
        memory_mb=merged.get("memory"),
        retries=merged.get("retries"),
        max_cost=merged.get("max_cost"),
        **({"stop_grace_s": merged["stop_grace"]} if merged.get("stop_grace") is not None else {}),
    )
    return LaunchSettings(
        cloud=merged.get("cloud") or "local",
        resources=resources,
        secrets=secrets,
        env=env,
        volumes=volumes,
        image=merged.get("image") or {},
        storage=merged.get("storage") or config_storage,
        options={k: v for k, v in options.items() if v},
    )
