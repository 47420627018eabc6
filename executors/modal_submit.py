"""The Modal submit, in a child process: `python -m executors.modal_submit RUN_DIR`.

Launching on Modal creates what costs money (an app, a function call, GPUs). A call
that overruns its deadline in a thread would be abandoned yet still able to create
them; a child process is killed instead. The child connects, builds the app from the
run folder, spawns the call, and writes `modal-handle.json` the moment the call exists;
the parent waits with two deadlines:

- CONNECT_TIMEOUT_S for Modal's first answer (no route, a proxy that hangs, an outage):
  the child is killed, nothing was created, and the submit says so (`NotStarted`, so a
  sweep may try again later);
- SUBMIT_TIMEOUT_S for the rest (the first launch builds the image): past it the child is
  killed, and an app it may have started is looked up by its name, `ferry-<run id>`, and
  stopped before anything else happens. If that cannot be done, the submit fails without
  "nothing was started", so it is not tried again on its own.

A Ctrl-C while it waits stops the child too, and then the call it made (or its app).
The child's output (Modal's build log) goes to this terminal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from executors.base import Handle, JobSpec, NotStarted
from executors.modal import (
    API_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    HANDLE_FILE,
    SUBMIT_TIMEOUT_S,
    job_from_fields,
    job_spec_fields,
    unreachable,
)
from payload.errors import FerryError
from payload.storage.stores import modal_silent

SPEC_FILE = "modal-submit.json"  # what the child needs to rebuild the JobSpec
ERROR_FILE = "modal-submit-error.json"  # {"kind": "unreachable" | "error", "message"}
CONNECTED_FILE = "modal-connected"  # the child heard from Modal's API


def submit(executor: Any, job: JobSpec, connect_s: float = CONNECT_TIMEOUT_S) -> Handle:
    run_dir = job.run_dir
    for stale in (HANDLE_FILE, ERROR_FILE, CONNECTED_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    (run_dir / SPEC_FILE).write_text(json.dumps(job_spec_fields(job)))
    child = subprocess.Popen(
        [sys.executable, "-m", "executors.modal_submit", str(run_dir)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # killed as a group, never by the user's Ctrl-C alone
    )
    started = time.monotonic()
    overran = None
    handle_file = run_dir / HANDLE_FILE
    try:
        while child.poll() is None:
            connected = (run_dir / CONNECTED_FILE).exists()
            limit = SUBMIT_TIMEOUT_S if connected else connect_s
            if time.monotonic() - started > limit:
                overran = "connect" if not connected else "submit"
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        _kill(child)
        _undo(executor, job, handle_file)
        raise
    finally:
        _kill(child)
    if handle_file.exists():  # the call exists: it is this run, whatever came after
        return Handle(executor.name, job.run_id, json.loads(handle_file.read_text()))
    if overran == "connect":
        raise unreachable("the launch", connect_s)
    if overran == "submit":
        what = f"Modal did not finish launching {job.run_id} within {SUBMIT_TIMEOUT_S:.0f} s"
        try:
            stopped = stop_apps(f"ferry-{job.run_id}")
        except FerryError as e:
            raise FerryError(
                f"{what}, and its app may still be running: {e.message}",
                hint=f"Look for app ferry-{job.run_id} in `modal app list` and stop it.",
            ) from e
        raise NotStarted(
            f"{what}; "
            + (f"stopped the app it had started ({', '.join(stopped)})." if stopped else "")
        )
    try:
        error = json.loads((run_dir / ERROR_FILE).read_text())
    except (OSError, ValueError):
        error = {"kind": "error", "message": f"the launch exited with code {child.returncode}"}
    if error["kind"] == "unreachable":
        raise unreachable("the launch", connect_s)
    raise FerryError(f"Modal refused the launch of {job.run_id}: {error['message']}")


def _kill(child: subprocess.Popen) -> None:  # type: ignore[type-arg]
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _undo(executor: Any, job: JobSpec, handle_file: Path) -> None:
    """After a Ctrl-C: cancel the call the child made, or stop the app it started."""
    try:
        if handle_file.exists():
            handle = Handle(executor.name, job.run_id, json.loads(handle_file.read_text()))
            executor.cancel(handle)
        else:
            stop_apps(f"ferry-{job.run_id}")
    except FerryError as e:
        print(f"could not stop what the launch had started: {e.message}", file=sys.stderr)


def stop_apps(name: str) -> list[str]:
    """Stop every live app called `name` (a launch killed half-way); their ids."""
    listing = _modal_cli("app", "list", "--json")
    live = [
        app["App ID"]
        for app in json.loads(listing or "[]")
        if app.get("Description") == name and not str(app.get("State", "")).startswith("stop")
    ]
    for app_id in live:
        _modal_cli("app", "stop", app_id)
    return live


def _modal_cli(*args: str) -> str:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "modal", *args],
            capture_output=True,
            text=True,
            timeout=API_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        raise modal_silent(f"`modal {' '.join(args)}`", API_TIMEOUT_S) from e
    if done.returncode != 0:
        raise FerryError(f"`modal {' '.join(args)}` failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # readers see nothing or the whole record


def main(run_dir: Path) -> int:
    import modal

    from executors.modal import ModalExecutor

    try:
        job = job_from_fields(run_dir, json.loads((run_dir / SPEC_FILE).read_text()))
        client = modal.Client.from_env()
        client.hello()
    except modal.exception.ConnectionError as e:
        _write(run_dir / ERROR_FILE, {"kind": "unreachable", "message": str(e)})
        return 3
    except Exception as e:  # noqa: BLE001 - told to the parent, which reports it
        _write(run_dir / ERROR_FILE, {"kind": "error", "message": f"{type(e).__name__}: {e}"})
        return 1
    (run_dir / CONNECTED_FILE).touch()
    try:
        app, function, job_json = ModalExecutor().build(job)
        with modal.enable_output(), app.run(detach=True, client=client):
            call = function.spawn(job_json)
            _write(run_dir / HANDLE_FILE, {"app_id": app.app_id, "call_id": call.object_id})
    except Exception as e:  # noqa: BLE001 - told to the parent, which reports it
        if not (run_dir / HANDLE_FILE).exists():
            _write(run_dir / ERROR_FILE, {"kind": "error", "message": f"{type(e).__name__}: {e}"})
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
