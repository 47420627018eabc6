"""Supervisor of one local run: `python -m executors.supervise RUN_DIR -- CMD...`.

It leads the run's process group, runs CMD (torchrun) as its child, and when CMD ends
records the exit in RUN_DIR/exit.json, so a detached run's outcome survives the terminal
that launched it. A SIGTERM/SIGINT/SIGHUP it receives is passed on to CMD (torchrun then
stops its workers) and it still records the exit. Standard library only: it starts fast
and never imports torch itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_FILE = "exit.json"


def write_exit(run_dir: Path, code: int, signalled: int | None) -> None:
    record = {"exit_code": code, "signal": signalled, "finished_at": time.time()}
    tmp = run_dir / (EXIT_FILE + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, run_dir / EXIT_FILE)  # atomic: readers never see half a file


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m executors.supervise RUN_DIR -- CMD...", file=sys.stderr)
        return 2
    run_dir, cmd = Path(argv[0]), argv[2:]
    child = subprocess.Popen(cmd)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    write_exit(run_dir, code, received[0] if received else None)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
