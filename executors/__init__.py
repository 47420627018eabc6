"""Backends that run a JobSpec: one module each, found by name through entry points.

A package can add a backend without editing Ferry by declaring, in its pyproject.toml:

    [project.entry-points."ferry.executors"]
    mycloud = "mypkg.executor:MyCloudExecutor"
"""

from __future__ import annotations

from executors.base import Executor, Handle, JobSpec, Plan, Resources, RunState, Status
from payload.errors import FerryError

GROUP = "ferry.executors"

__all__ = [
    "Executor",
    "Handle",
    "JobSpec",
    "Plan",
    "Resources",
    "RunState",
    "Status",
    "available",
    "get_executor",
]


def _entry_points():
    from importlib.metadata import entry_points

    return entry_points(group=GROUP)


def available() -> list[str]:
    """Names of every registered backend."""
    return sorted({ep.name for ep in _entry_points()})


def get_executor(name: str) -> Executor:
    """The backend registered as `name`; importing its module only now keeps start-up light."""
    found = [ep for ep in _entry_points() if ep.name == name]
    if not found:
        names = ", ".join(available()) or "none (is Ferry installed with pip install -e .?)"
        raise FerryError(f"No backend named {name!r}. Available: {names}.")
    cls = found[0].load()
    executor = cls()
    if not isinstance(executor, Executor):
        raise FerryError(f"Backend {name!r} ({found[0].value}) is not an executors.Executor.")
    return executor
