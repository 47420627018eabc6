"""A call with a deadline, for calls that read or retry by themselves (a cloud API that
retries a dead connection for a minute, a storage transfer that may hang). The call
runs in a daemon thread; past the deadline the caller gets an error at once and the
thread is left to die with the process. Never use it for a call that creates something
that costs money: a late answer would create it anyway (Modal's submit runs in a child
process that is killed instead, see executors.modal)."""

from __future__ import annotations

import threading
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
