"""`python -m images render | lock | tag`: maintain the runtime image.

- render: write images/Dockerfile from the spec (a test fails if it is stale).
- lock:   re-resolve the `train`, `s3` and `trackers` extras and write images/requirements.lock
          (needs the package index; torch is pinned in the spec, not here).
- tag:    print the image tag the current spec makes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from images.render import dockerfile
from images.spec import DOCKERFILE, LOCK_FILE, ImageSpec, default_spec

ROOT = Path(__file__).resolve().parents[1]
# Installed with torch or by the image itself, never locked separately.
NOT_LOCKED = ("torch", "ferry", "setuptools", "pip", "triton")


def lock() -> None:
    spec = ImageSpec()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--report",
                str(report),
                spec.torch,
                f"{ROOT}[train,s3,trackers]",
            ],
            check=True,
        )
        installs = json.loads(report.read_text())["install"]
    pins = sorted(
        f"{item['metadata']['name'].lower()}=={item['metadata']['version']}"
        for item in installs
        if item["metadata"]["name"].lower() not in NOT_LOCKED
        and not item["metadata"]["name"].lower().startswith("nvidia-")
    )
    header = "# Pinned by `python -m images lock`: the train, s3 and trackers extras, resolved.\n"
    LOCK_FILE.write_text(header + "\n".join(pins) + "\n")
    print(f"wrote {LOCK_FILE} ({len(pins)} packages)")


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "render"
    if command == "render":
        DOCKERFILE.write_text(dockerfile(default_spec()))
        print(f"wrote {DOCKERFILE} ({default_spec().tag})")
    elif command == "lock":
        lock()
    elif command == "tag":
        print(default_spec().tag)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
