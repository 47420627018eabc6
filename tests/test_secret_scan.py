"""The after-test secret scan (tests/conftest.py `no_planted_secret_leaks`) is known to
work: a probe that leaks planted values on purpose, into a run's log, into captured
output and into a storage object, fails under it, naming the secret and where."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT


def test_the_scan_fails_a_test_that_leaks_a_planted_secret():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/secret_leak_probe.py",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "3 errors" in out and "4 passed" in out, out
    assert "planted secret values leaked: HF_TOKEN in " in out
    assert "leaky/train.log" in out
    assert "WANDB_API_KEY in the output of launch call 1" in out
    assert "AWS_SECRET_ACCESS_KEY in storage object s3://" in out and "runs/r/config.yml" in out
