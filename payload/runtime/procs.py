"""Processes by pid: is a recorded one still ours, every descendant of one, and stopping
a whole tree with a grace period. The local supervisor, the launcher and the remote
wrapper all stop runs this way. Standard library only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

_PROC = Path("/proc")
# What clouds (SIGTERM) and Modal (SIGINT) send before they take a machine back: for a
# training run, "save a checkpoint and stop".
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# pydantic looks for its own plugins (validation tracing hooks) by reading every installed
# distribution's entry points when the first model is built: ~27 ms of `launch validate`
# in a virtualenv of 230 packages, for hooks Ferry's config models have no use for.
# `launch` turns the scan off for itself; the processes it starts get the user's
# environment back (a pydantic plugin of theirs keeps working in a local run).
PYDANTIC_PLUGINS = "PYDANTIC_DISABLE_PLUGINS"
_set_here = False  # this process set it, not the user


def skip_pydantic_plugin_scan() -> None:
    """Turn pydantic's plugin scan off in this process, unless the user set the variable."""
    global _set_here
    if PYDANTIC_PLUGINS not in os.environ:
        os.environ[PYDANTIC_PLUGINS] = "__all__"
        _set_here = True


def child_environ() -> dict[str, str]:
    """This process's environment as a process it starts should see it: without what
    skip_pydantic_plugin_scan added."""
    env = dict(os.environ)
    if _set_here:
        env.pop(PYDANTIC_PLUGINS, None)
    return env


def alive_with(pid: int, marker: str) -> bool:
    """Is `pid` running a command whose line contains `marker` (a run folder, a sweep id)?
    The marker tells our process from an unrelated one that got a recycled pid. Without
    /proc (macOS) only "some process has this pid" can be known."""
    cmdline = _PROC / str(pid) / "cmdline"
    if _PROC.is_dir():
        try:
            return marker in cmdline.read_bytes().decode(errors="replace") and running(pid)
        except OSError:
            return False
    return running(pid)


def running(pid: int) -> bool:
    """Still running: not gone, and not a zombie waiting to be reaped."""
    stat = _PROC / str(pid) / "stat"
    if _PROC.is_dir():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants. torchrun starts each rank in a session of its own,
    so a process group alone does not reach them."""
    children: dict[int, list[int]] = {}
    if _PROC.is_dir():
        for entry in _PROC.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    else:  # macOS and other Unixes
        listing = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True)
        for line in listing.stdout.splitlines():
            child, parent = map(int, line.split())
            children.setdefault(parent, []).append(child)
    tree, stack = [pid], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            tree.append(child)
            stack.append(child)
    return tree


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pids: list[int], seconds: float) -> bool:
    """Wait up to `seconds` for every pid to stop running; True if they all did."""
    deadline = time.monotonic() + seconds
    while any(running(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_tree(pid: int, grace_s: float, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Send `sig` to `pid` and every descendant, give them `grace_s` to finish (a run
    saves and uploads a checkpoint in that time), then SIGKILL what is left. True if
    everything stopped within the grace period."""
    tree = process_tree(pid)
    signal_all(tree, sig)
    if wait_gone(tree, grace_s):
        return True
    # What is left (a rank stuck in a collective, a child it started) goes now; ranks
    # started since the first look are found again.
    left = [p for p in {*process_tree(pid), *tree} if running(p)]
    signal_all(left, signal.SIGKILL)
    wait_gone(left, 5)
    return False


def group_members(pgid: int) -> list[int]:
    """The running processes (zombies aside) of process group `pgid`. Without /proc,
    only whether the group still has any process can be known: [pgid] or []."""
    if not _PROC.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def stop_group(leader: int, grace_s: float) -> bool:
    """Stop the process group that `leader` leads (a child started in a session of its
    own) together with every descendant of the leader, in the group or not: SIGTERM,
    `grace_s` to exit, then SIGKILL for what is left. The group reaches processes whose
    parent already exited (orphans leave the tree, not the group); the tree reaches those
    that made a group of their own. True if everything stopped within the grace period."""
    tree = process_tree(leader)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, signal.SIGTERM)
    signal_all(tree, signal.SIGTERM)

    def left() -> list[int]:
        return [p for p in {*group_members(leader), *tree, *process_tree(leader)} if running(p)]

    deadline = time.monotonic() + grace_s
    while left():
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    else:
        return True
    remaining = left()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, signal.SIGKILL)
    signal_all(remaining, signal.SIGKILL)
    wait_gone(remaining, 5)
    return False
