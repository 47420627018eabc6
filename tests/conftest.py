"""Shared fixtures: a private FERRY_HOME per test, GPU-test skipping, and one quickstart
run shared by every test that only needs to look at its results."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import QUICKSTART, ROOT, launch

os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_collection_modifyitems(config, items):
    from executors.local import local_gpu_count

    if local_gpu_count():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def ferry_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own registry and run folders."""
    home = tmp_path / "ferry-home"
    monkeypatch.setenv("FERRY_HOME", str(home))
    return home


@dataclass
class QuickstartRun:
    result: subprocess.CompletedProcess[str]
    home: Path
    record: dict
    output_dir: Path


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> QuickstartRun:
    """`launch train examples/quickstart.yml`, once per session, exactly as the README says."""
    home = tmp_path_factory.mktemp("quickstart-home")
    env = {"FERRY_HOME": str(home)}
    result = launch("train", str(QUICKSTART.relative_to(ROOT)), env=env, timeout=600, check=True)
    runs = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    assert len(runs) == 1, runs
    return QuickstartRun(result, home, runs[0], Path(runs[0]["output_dir"]))
