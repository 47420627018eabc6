"""Asking the operating system about a process by pid, for the supervisors and dispatchers
Ferry starts in the background and finds again later from a recorded pid."""

from __future__ import annotations

import os
from pathlib import Path


def alive_with(pid: int, marker: str) -> bool:
    """Is `pid` running a command whose line contains `marker` (a run folder, a sweep id)?
    The marker tells our process from an unrelated one that got a recycled pid. Without
    /proc (macOS) only "some process has this pid" can be known."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.parent.parent.is_dir():
        try:
            return marker in cmdline.read_bytes().decode(errors="replace")
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
