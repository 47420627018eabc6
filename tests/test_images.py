"""The image spec and its renderings: the checked-in Dockerfile is current, and every
backend's image carries the same pinned versions."""

from __future__ import annotations

import re
import shlex

import pytest

from images import EXTRAS, ImageSpec, default_spec
from images.render import dockerfile, modal_image, ray_runtime_env, sky_task_image
from images.spec import DOCKERFILE, LOCK_FILE, read_lock


def _pins(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", text))


def test_checked_in_dockerfile_is_current():
    """Stale means the spec or the lock changed: run `python -m images render`."""
    assert DOCKERFILE.read_text() == dockerfile(default_spec())


def test_lock_pins_every_package_once_and_not_torch():
    lines = read_lock(LOCK_FILE)
    names = [line.split("==")[0] for line in lines]
    assert all("==" in line for line in lines) and len(names) == len(set(names))
    assert "torch" not in names and {"transformers", "peft", "trl", "boto3"} <= set(names)


def test_every_rendering_carries_the_same_pins(monkeypatch):
    """The Dockerfile, the modal.Image (its real build calls, recorded on the way through),
    SkyPilot's setup and Ray's runtime_env install exactly the same versions."""
    import modal

    spec = default_spec().with_overrides(extras=["deepspeed"], pip=["einops==0.8.1"])
    installed: list[str] = []
    original = modal.Image.pip_install

    def recording(self, *packages, **kwargs):  # type: ignore[no-untyped-def]
        installed.extend(
            p for group in packages for p in ([group] if isinstance(group, str) else group)
        )
        return original(self, *packages, **kwargs)

    monkeypatch.setattr(modal.Image, "pip_install", recording)
    image = modal_image(spec)
    assert isinstance(image, modal.Image)

    from_docker = _pins(dockerfile(spec))
    from_modal = set(installed)
    from_sky = _pins(sky_task_image(spec)["setup"])
    from_ray = set(ray_runtime_env(spec)["pip"]["packages"])
    expected = {f"{k}=={v}" for k, v in spec.pins.items()} | {"einops==0.8.1"}
    assert from_docker == from_modal == from_sky == from_ray == expected
    assert "deepspeed==" + spec.pins["deepspeed"] in expected


def test_the_tag_covers_the_payload_source_the_image_ships(tmp_path, monkeypatch):
    """The Dockerfile copies payload/ and the Modal image adds it: an edit there is a new
    image, so a new tag. Bytecode caches are not shipped and do not count."""
    import shutil

    from images import spec as image_spec

    copy = tmp_path / "payload"
    shutil.copytree(image_spec.PAYLOAD, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(image_spec, "PAYLOAD", copy)
    image_spec.payload_digest.cache_clear()
    try:
        before = default_spec().tag
        (copy / "__pycache__").mkdir(exist_ok=True)
        (copy / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
        image_spec.payload_digest.cache_clear()
        assert default_spec().tag == before
        train = copy / "train.py"
        train.write_text(train.read_text() + "\n# an edit\n")
        image_spec.payload_digest.cache_clear()
        assert default_spec().tag != before
    finally:
        image_spec.payload_digest.cache_clear()


def test_the_tag_is_the_spec_content_hash():
    base = default_spec()
    assert base.tag == f"ferry:{base.digest}" and len(base.digest) == 12
    assert base.with_overrides().tag == base.tag
    changed = base.with_overrides(apt=["ffmpeg"])
    assert changed.tag != base.tag and "ffmpeg" in changed.apt
    assert base.with_overrides(base="pytorch/pytorch:latest").tag != base.tag


def test_user_overrides_reach_every_rendering():
    spec = default_spec().with_overrides(
        base="nvcr.io/nvidia/pytorch:25.01-py3", apt=["ffmpeg"], commands=["echo hi"]
    )
    text = dockerfile(spec)
    assert text.splitlines()[2] == "FROM nvcr.io/nvidia/pytorch:25.01-py3"
    assert "ffmpeg" in text and "RUN echo hi" in text
    assert "echo hi" in sky_task_image(spec)["setup"]
    assert (
        sky_task_image(spec, registry="ghcr.io/acme")["image_id"]
        == f"docker:ghcr.io/acme/{spec.tag}"
    )


def test_unknown_extra_is_refused():
    from payload.errors import FerryError

    with pytest.raises(FerryError, match="flash unknown"):
        default_spec().with_overrides(extras=["flash"])
    assert set(EXTRAS) == {"flash-attn", "deepspeed", "vllm"}


def test_dockerfile_installs_torch_from_its_cuda_index_first():
    spec = ImageSpec(locked=("numpy==2.4.6",))
    runs = [line for line in dockerfile(spec).splitlines() if line.startswith("RUN python -m pip")]
    assert shlex.split(runs[0])[-3:] == ["--index-url", spec.torch_index, spec.torch]
    assert runs[1].endswith("numpy==2.4.6")
