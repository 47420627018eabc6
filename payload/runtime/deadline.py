"""A call with a deadline, for calls that read or retry by themselves (a cloud API that
retries a dead connection for a minute, a storage transfer that may hang). The call
runs in a daemon thread; past the deadline the caller gets an error at once and the
thread is left to die with the process. Never use it for a call that creates something
that costs money: a late answer would create it anyway (Modal's submit runs in a child
process that is killed instead, see executors.modal)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


_THREAD_PREFIX = "deadline: "


def abandoned() -> bool:
    """Is a call this process gave up on still running? (A program about to exit then
    leaves with os._exit: the interpreter's teardown would wait on it, or print the
    library's complaints about being cut off.)"""
    return any(t.name.startswith(_THREAD_PREFIX) and t.is_alive() for t in threading.enumerate())


class DeadlineExceeded(Exception):  # noqa: N818 - named for what happened
    """The call did not return in time."""


def call_within(fn: Callable[[], T], seconds: float, what: str = "the call") -> T:
    """`fn()`, or DeadlineExceeded after `seconds`; `fn`'s own exceptions pass through."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller below
            box["error"] = e

    worker = threading.Thread(target=call, name=f"{_THREAD_PREFIX}{what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise DeadlineExceeded(f"{what} did not finish within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")  # type: ignore[return-value]


class Meter:
    """Counts bytes as a transfer moves them, and when the last ones moved: a transfer
    is judged by its progress, not by its total time. Called from the transfer's
    threads (it is a storage `progress` callback)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.last = time.monotonic()

    def __call__(self, moved: int) -> None:
        with self._lock:
            self.bytes += moved
            self.last = time.monotonic()

    def restart(self) -> None:
        """Count idleness from now (a new piece of work begins)."""
        with self._lock:
            self.last = time.monotonic()

    def idle_s(self) -> float:
        return time.monotonic() - self.last
