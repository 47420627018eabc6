"""tests/sky_sdk/ run in .venv-sky, the Python with SkyPilot's SDK: SkyPilot pins click<8.2,
and the training stack (huggingface_hub) needs click>=8.4, so they cannot share one
Python. `make test` runs these there; tests/test_skypilot.py holds the SkyPilot tests that
train, in the training Python.

SkyPilot reads its catalogs and its state (the clouds `sky check` enabled) under
SKY_RUNTIME_DIR, fixed when `sky` is first imported: it is set here, before any test
imports it, to a folder of this session holding the stub catalogs (catalogs/). The SDK
is never allowed to start an API server, and AWS's instance metadata is never asked.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

RUNTIME = Path(tempfile.mkdtemp(prefix="ferry-sky-runtime-"))
shutil.copytree(Path(__file__).parent / "catalogs", RUNTIME / ".sky" / "catalogs")
os.environ["SKY_RUNTIME_DIR"] = str(RUNTIME)
os.environ["HOME"] = str(RUNTIME)
os.environ["SKYPILOT_DISABLE_LOCAL_API_SERVER"] = "1"
os.environ["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.pop("SKYPILOT_API_SERVER_ENDPOINT", None)
