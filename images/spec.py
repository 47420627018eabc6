"""The runtime image, described once. Every backend's image is rendered from this spec
(`images.render`): the checked-in Dockerfile, a `modal.Image`, SkyPilot's docker image
and setup, and a Ray runtime_env. The image tag hashes the spec and the payload source
the image ships, so a change to either (a pinned version, an apt package, a user's extra
pip line, an edit under payload/) is a new tag.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAYLOAD = HERE.parent / "payload"  # the source every image ships
LOCK_FILE = HERE / "requirements.lock"
DOCKERFILE = HERE / "Dockerfile"
REPOSITORY = "ferry"  # image name; the tag is the spec's hash

# Optional layers a config can ask for (launch.image.extras), each pinned.
EXTRAS = {
    "flash-attn": ["flash-attn==2.8.3"],
    # The version the CPU tests run (pyproject.toml's `deepspeed` extra): keep them alike.
    "deepspeed": ["deepspeed==0.19.0"],
    # GRPO generation with `trl.use_vllm` (its own torch pin may differ from the image's).
    "vllm": ["vllm==0.33.0"],
}


@dataclass(frozen=True)
class ImageSpec:
    """Everything that decides what is in the image."""

    base: str = "nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04"
    python: str = "3.11"
    torch: str = "torch==2.13.0"
    torch_index: str = "https://download.pytorch.org/whl/cu128"
    apt: tuple[str, ...] = ("git", "curl", "ca-certificates", "build-essential")
    locked: tuple[str, ...] = ()  # `name==version` lines of requirements.lock
    extras: tuple[str, ...] = ()  # keys of EXTRAS
    pip: tuple[str, ...] = ()  # a user's extra packages
    commands: tuple[str, ...] = ()  # a user's extra build commands
    env: tuple[tuple[str, str], ...] = (
        ("PYTHONUNBUFFERED", "1"),
        ("HF_HOME", "/cache/hf"),
        ("HF_HUB_ENABLE_HF_TRANSFER", "0"),
        ("TOKENIZERS_PARALLELISM", "false"),
    )
    workdir: str = "/ferry"

    @property
    def pip_layers(self) -> list[list[str]]:
        """The pip installs after torch, in order: the lock, the extras, the user's."""
        layers = [list(self.locked)]
        extras = [pin for name in self.extras for pin in EXTRAS[name]]
        if extras:
            layers.append(extras)
        if self.pip:
            layers.append(list(self.pip))
        return layers

    @property
    def pins(self) -> dict[str, str]:
        """Package -> version for everything pinned with ==, torch included."""
        pins = {}
        for line in (self.torch, *self.locked, *(p for n in self.extras for p in EXTRAS[n])):
            name, sep, version = line.partition("==")
            if sep:
                pins[name.strip().lower()] = version.strip()
        return pins

    @property
    def digest(self) -> str:
        """The spec's content and the payload source's, hashed together."""
        text = json.dumps(asdict(self), sort_keys=True) + payload_digest(PAYLOAD)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def tag(self) -> str:
        return f"{REPOSITORY}:{self.digest}"

    def with_overrides(
        self,
        base: str | None = None,
        pip: list[str] | None = None,
        apt: list[str] | None = None,
        commands: list[str] | None = None,
        extras: list[str] | None = None,
    ) -> ImageSpec:
        """This spec with a config's `launch.image` applied."""
        unknown = sorted(set(extras or ()) - set(EXTRAS))
        if unknown:
            from payload.errors import FerryError

            raise FerryError(
                f"launch.image.extras: {', '.join(unknown)} unknown; "
                f"available: {', '.join(EXTRAS)}."
            )
        return replace(
            self,
            base=base or self.base,
            pip=self.pip + tuple(pip or ()),
            apt=self.apt + tuple(a for a in apt or () if a not in self.apt),
            commands=self.commands + tuple(commands or ()),
            extras=tuple(dict.fromkeys((*self.extras, *(extras or ())))),
        )


@functools.cache
def payload_digest(root: Path) -> str:
    """sha256 over every file the image copies from `root` (paths and contents; bytecode
    caches left out). Once per process: a sweep plans many jobs with one payload."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def read_lock(path: Path = LOCK_FILE) -> tuple[str, ...]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return tuple(line for line in lines if line)


@functools.cache
def default_spec() -> ImageSpec:
    """The image every backend runs unless a config adds to it (immutable: cached)."""
    return ImageSpec(locked=read_lock())
