"""The one top-level handler: an unexpected exception is a bug in Ferry, reported as one
paragraph with a crash log (exit 2), in the CLI and inside a run's ranks; config warnings
are printed once per command.

The crashes come from test hooks that exist only for this (FERRY_TEST_CRASH=<command> in
launcher/cli.py, FERRY_TEST_CRASH_RANK=<rank> in payload/__main__.py): nothing else in
the real CLI or payload is replaced.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import PLANTED, QUICKSTART, launch, quickstart_config

CRASH = "RuntimeError: FERRY_TEST_CRASH=validate: a crash for the tests"


def _crash_log(stderr: str) -> Path:
    match = re.search(r"The traceback is in (\S+\.log);", stderr)
    assert match, f"no crash log named in:\n{stderr}"
    return Path(match.group(1))


def test_unexpected_exception_is_one_paragraph_with_a_crash_log(ferry_home):
    """An exception that is not a FerryError: exit 2, one paragraph naming the command,
    the exception and a crash log under FERRY_HOME that holds the traceback. A failure
    means a crash shows a raw traceback, exits like a user error, or loses its trace."""
    done = launch("validate", str(QUICKSTART), env={"FERRY_TEST_CRASH": "validate"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"error: launch validate {QUICKSTART} failed with {CRASH}" in done.stderr
    assert "This is a bug in Ferry." in done.stderr
    log = _crash_log(done.stderr)
    assert log.parent == ferry_home / "logs"
    assert log.name.startswith("crash-")
    text = log.read_text()
    assert text.startswith(f"launch validate {QUICKSTART}\n")
    assert "Traceback (most recent call last)" in text
    assert CRASH in text


@pytest.mark.parametrize("how", ["--debug", "FERRY_DEBUG=1"])
def test_debug_prints_the_crash_traceback(how):
    """With --debug or FERRY_DEBUG=1 the traceback reaches the screen too, and the
    paragraph and exit code stay. A failure means --debug no longer helps with a bug."""
    args = ["--debug"] if how == "--debug" else []
    env = {"FERRY_TEST_CRASH": "validate", "FERRY_DEBUG": "1" if how != "--debug" else None}
    done = launch(*args, "validate", str(QUICKSTART), env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert f"error: launch validate {QUICKSTART} failed with {CRASH}" in done.stderr


def test_crash_log_falls_back_to_the_temp_folder(tmp_path):
    """A FERRY_HOME that cannot be written (here: below a file) still gets a crash log,
    in the system's temp folder. A failure means the handler itself fails there."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"FERRY_TEST_CRASH": "runs", "FERRY_HOME": str(blocker / "home"), "TMPDIR": str(temp)}
    done = launch("runs", env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "error: launch runs failed with RuntimeError: FERRY_TEST_CRASH=runs" in done.stderr
    log = _crash_log(done.stderr)
    assert log.parent == temp
    assert "Traceback (most recent call last)" in log.read_text()


def test_crash_log_hides_secret_arguments():
    """The crash log holds argv, but a KEY=VALUE whose key names a credential keeps its
    key only, and the paragraph stops at the first option. A failure means a secret
    typed on the command line lands in a file or on the screen."""
    secret = PLANTED["HF_TOKEN"]
    done = launch(
        "train",
        str(QUICKSTART),
        "--env",
        f"HF_TOKEN={secret}",
        f"--env=WANDB_API_KEY={PLANTED['WANDB_API_KEY']}=x",
        "--env",
        "TOKENIZERS_PARALLELISM=false",
        env={"FERRY_TEST_CRASH": "train"},
    )
    assert done.returncode == 2, done.stderr
    assert f"error: launch train {QUICKSTART} failed with RuntimeError" in done.stderr
    text = _crash_log(done.stderr).read_text()
    assert "'HF_TOKEN=***'" in text and "'--env=WANDB_API_KEY=***'" in text
    assert "'TOKENIZERS_PARALLELISM=false'" in text
    assert secret not in text + done.stderr


def test_a_crash_in_the_payloads_preprocess_is_a_bug_with_its_traceback_logged(ferry_home):
    """`launch preprocess` runs the payload in a subprocess: its unexpected exception is
    reported like the CLI's own (exit 2, one paragraph, the payload's traceback in the
    crash log), not as a raw traceback with exit 1."""
    done = launch("preprocess", str(QUICKSTART), env={"FERRY_TEST_CRASH": "payload-preprocess"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "python -m payload preprocess: RuntimeError: FERRY_TEST_CRASH=payload-preprocess" in (
        done.stderr
    )
    text = _crash_log(done.stderr).read_text()
    assert "payload/__main__.py" in text and "PayloadTraceback" in text


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([b"status", b"\xff"], "The argument '\\xff' is not UTF-8 text."),
        ([b"runs", b"--bogus"], "No such option: --bogus"),
        ([b"status", b"x" * 5000], "No run 'xxxx"),
        ([b"validate", b"-"], "does not exist"),
    ],
)
def test_odd_arguments_are_user_errors_without_a_traceback(argv, words):
    """Arguments no user means (bytes that are not UTF-8, an unknown option, a 5,000
    character run id, `-` as a file): exit 1 and a message, never a traceback or the
    "bug" exit 2 (click's own usage errors exit 2 unless Ferry maps them)."""
    import subprocess

    from helpers import launch_command

    done = subprocess.run(
        [*(c.encode() for c in launch_command()), *argv], capture_output=True, timeout=60
    )
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 1, err
    assert "Traceback" not in err and words in err


def test_user_errors_still_exit_1():
    """A FerryError is the user's to fix: exit 1, no "bug" paragraph, no crash log."""
    done = launch("validate", "no-such-config.yml")
    assert done.returncode == 1
    assert "error: Config file no-such-config.yml does not exist." in done.stderr
    assert "bug in Ferry" not in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_rank_crash_is_named_in_launch_status(tmp_path):
    """Rank 1 of a real 2-process torchrun run raises (FERRY_TEST_CRASH_RANK=1, after its
    config is loaded): the run fails, and `launch status` and the end-of-run summary
    name the rank and the exception, with no traceback. A failure means a crashed rank
    shows as a bare exit code, or as another rank's message."""
    config = quickstart_config(tmp_path)
    done = launch(
        "train",
        str(config),
        "--gpus",
        "2",
        "--stop-grace",
        "5s",
        env={"FERRY_TEST_CRASH_RANK": "1"},
        timeout=240,
    )
    detail = "rank 1: RuntimeError: FERRY_TEST_CRASH_RANK=1: a crash for the tests"
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"\n   {detail}\n" in done.stdout  # the end-of-run summary
    run_id = re.search(r"^run (\S+) \(local\) submitted", done.stdout, re.M).group(1)
    status = launch("status", run_id, check=True)
    assert re.search(r"^state\s+failed$", status.stdout, re.M), status.stdout
    assert re.search(rf"^detail\s+{re.escape(detail)}$", status.stdout, re.M), status.stdout
    assert "Traceback" not in status.stdout + status.stderr
    record = json.loads(launch("status", run_id, "--json", check=True).stdout)
    assert (record["state"], record["detail"]) == ("failed", detail)
    # What remote backends report too (FERRY_ERROR_FILE; Modal returns it as the detail).
    recorded = json.loads((Path(record["run_dir"]) / "error.json").read_text())
    assert recorded["error"] == detail


@pytest.mark.slow
def test_a_config_warning_is_printed_once_by_launch_train(tmp_path):
    """`launch train` validates the config and warns; the payload then loads the same
    config and must not warn again (the local backend streams its log). The run's rank 0
    crashes on purpose right after loading its config (FERRY_TEST_CRASH_RANK=0), so the
    test needs no training. A failure means a warning is printed twice or not at all."""
    config = quickstart_config(tmp_path, "sample_packing: true\nsample_packing_eff_est: 0.9\n")
    done = launch("train", str(config), env={"FERRY_TEST_CRASH_RANK": "0"}, timeout=240)
    output = done.stdout + done.stderr
    assert "rank 0: RuntimeError: FERRY_TEST_CRASH_RANK=0" in output  # the payload got there
    warning = "sample_packing_eff_est: is ignored: rows are packed before training"
    assert output.count(warning) == 1, output
    assert f"warning: {config}: {warning}" in done.stderr
