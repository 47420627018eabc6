"""One ImageSpec, four renderings: a Dockerfile, a `modal.Image`, SkyPilot's image and
setup, and a Ray runtime_env. Each carries the same pinned versions; a test checks it.

The payload goes in as source: copied into the Docker image, added as local Python
source to the Modal image (so an edit ships without an image rebuild), installed by
SkyPilot's setup from the synced workdir, and shipped as a py_module to Ray.
"""

from __future__ import annotations

import shlex
from typing import Any

from images.spec import PAYLOAD, ImageSpec


def _pip(packages: list[str], index: str | None = None) -> str:
    options = f" --index-url {index}" if index else ""
    return (
        "python -m pip install --no-cache-dir"
        + options
        + " "
        + " ".join(shlex.quote(p) for p in packages)
    )


def build_steps(spec: ImageSpec) -> list[tuple[str, str]]:
    """The image's layers as (kind, what), for plans and for every rendering."""
    steps = [("base", spec.base), ("python", spec.python)]
    if spec.apt:
        steps.append(("apt", " ".join(spec.apt)))
    steps.append(("pip", f"{spec.torch} (index {spec.torch_index})"))
    for layer in spec.pip_layers:
        what = f"{len(layer)} pinned packages" if len(layer) > 6 else " ".join(layer)
        steps.append(("pip", what))
    steps.extend(("run", command) for command in spec.commands)
    steps.append(("env", " ".join(f"{k}={v}" for k, v in spec.env)))
    steps.append(("source", f"payload/ -> {spec.workdir}/payload"))
    return steps


def dockerfile(spec: ImageSpec) -> str:
    """The Dockerfile, checked in at images/Dockerfile (`python -m images render`)."""
    lines = [
        "# Rendered from images/spec.py by `python -m images render`; do not edit by hand.",
        "# The tag (`python -m images tag`) hashes the spec and the payload/ it copies.",
        f"FROM {spec.base}",
        "ENV DEBIAN_FRONTEND=noninteractive",
        "RUN apt-get update && apt-get install -y --no-install-recommends "
        + " ".join(sorted({*spec.apt, "software-properties-common"}))
        + f" && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update"
        f" && apt-get install -y --no-install-recommends python{spec.python}"
        f" python{spec.python}-dev python{spec.python}-venv"
        " && rm -rf /var/lib/apt/lists/*",
        f"RUN python{spec.python} -m venv /opt/venv",
        'ENV PATH="/opt/venv/bin:$PATH"',
        f"RUN {_pip([spec.torch], spec.torch_index)}",
    ]
    lines += [f"RUN {_pip(layer)}" for layer in spec.pip_layers if layer]
    lines += [f"RUN {command}" for command in spec.commands]
    lines += [f"ENV {k}={v}" for k, v in spec.env]
    lines += [
        f"WORKDIR {spec.workdir}",
        f"COPY payload {spec.workdir}/payload",
        f'ENV PYTHONPATH="{spec.workdir}"',
        'CMD ["python", "-m", "payload", "--help"]',
    ]
    return "\n".join(lines) + "\n"


def modal_image(spec: ImageSpec) -> Any:
    """The `modal.Image`: registry base, the pinned pip layers, then payload as source."""
    import modal

    image = modal.Image.from_registry(spec.base, add_python=spec.python)
    if spec.apt:
        image = image.apt_install(*spec.apt)
    image = image.pip_install(spec.torch, index_url=spec.torch_index)
    for layer in spec.pip_layers:
        if layer:
            image = image.pip_install(*layer)
    if spec.commands:
        image = image.run_commands(*spec.commands)
    image = image.env(dict(spec.env))
    # Last, and not copied into a layer: editing the payload needs no image rebuild.
    return image.add_local_python_source("payload")


def sky_task_image(spec: ImageSpec, registry: str | None = None) -> dict[str, Any]:
    """SkyPilot's view: run inside the pushed image when a registry is given, else set
    the same environment up on the VM's own image."""
    # SkyPilot's stock images have no python3.11 and an externally managed system Python;
    # SkyPilot installs uv on every node (~/.local/bin/uv), which fetches the Python the
    # pins need. Any failed step fails the setup.
    setup = [
        "set -euo pipefail",
        'UV="$(command -v uv || echo ~/.local/bin/uv)"',
        f'"$UV" venv --seed --python {spec.python} ~/ferry-venv',
        "source ~/ferry-venv/bin/activate",
        _pip([spec.torch], spec.torch_index),
        *(_pip(layer) for layer in spec.pip_layers if layer),
        *spec.commands,
    ]
    rendered: dict[str, Any] = {
        "envs": dict(spec.env),
        "setup": "\n".join(setup),
    }
    if registry:
        rendered["image_id"] = f"docker:{registry.rstrip('/')}/{spec.tag}"
    return rendered


def ray_runtime_env(spec: ImageSpec) -> dict[str, Any]:
    """A Ray runtime_env with the same pins; torch comes from its CUDA index."""
    packages = [spec.torch, *(p for layer in spec.pip_layers for p in layer)]
    return {
        "pip": {
            "packages": packages,
            "pip_install_options": ["--extra-index-url", spec.torch_index],
        },
        "env_vars": dict(spec.env),
        "py_modules": [str(PAYLOAD)],
    }
