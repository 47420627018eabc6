"""Everything `launch` does, as Python functions (the CLI is a thin layer over these).

from launcher import api
record = api.train("examples/quickstart.yml", ["num_epochs=1"])
record = api.wait(record.run_id)
print(record.state, record.summary["final_loss"])
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from executors import Handle, JobSpec, Plan, Resources, RunState, get_executor
from launcher.registry import Registry, RunRecord, ferry_home
from payload.config import TrainConfig, load_config
from payload.config.loader import is_url
from payload.storage.layout import read_summary as read_output_summary


def validate(source: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Load and validate a config; raises ConfigError listing every problem."""
    return load_config(source, overrides)


def config_name(source: str | Path) -> str:
    """A run-id-safe name from the config's file name: `ex/Quick Start.yml` -> `quick-start`."""
    stem = Path(str(source).split("?")[0]).stem.lower()
    name = re.sub(r"[^a-z0-9]+", "-", stem).strip("-")
    return (name or "run")[:40]


def make_run_id(name: str, now: datetime | None = None) -> str:
    """`<config-name>-<yyyymmdd-hhmmss>-<4 hex>`."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


def prepare(
    source: str | Path,
    overrides: list[str] | None = None,
    *,
    gpus: str | int | None = None,
    run_id: str | None = None,
) -> JobSpec:
    """Validate the config and turn it into a JobSpec; nothing is written or started."""
    cfg = validate(source, overrides)
    name = config_name(source)
    run_id = run_id or make_run_id(name)
    run_dir = ferry_home() / "runs" / run_id
    if not cfg.output_dir:
        cfg = cfg.model_copy(update={"output_dir": str(run_dir / "output")})
    config = cfg.model_dump(mode="json", exclude_defaults=True)
    return JobSpec(
        run_id=run_id,
        name=name,
        config=config,
        resources=Resources.from_gpus(gpus),
        run_dir=run_dir,
    )


def plan(
    source: str | Path,
    overrides: list[str] | None = None,
    *,
    cloud: str = "local",
    gpus: str | int | None = None,
) -> Plan:
    """What `train` would start, without starting it (the dry run)."""
    job = prepare(source, overrides, gpus=gpus)
    return get_executor(cloud).plan(job)


def train(
    source: str | Path,
    overrides: list[str] | None = None,
    *,
    cloud: str = "local",
    gpus: str | int | None = None,
    registry: Registry | None = None,
) -> RunRecord:
    """Validate, record and submit one run; returns at once (see `wait`)."""
    registry = registry or Registry()
    job = prepare(source, overrides, gpus=gpus)
    executor = get_executor(cloud)
    executor.check(job)  # before anything is recorded or spent
    now = time.time()
    record = RunRecord(
        run_id=job.run_id,
        name=job.name,
        source=source if is_url(source) else str(Path(source).resolve()),
        backend=executor.name,
        state=RunState.PENDING.value,
        created_at=now,
        updated_at=now,
        run_dir=str(job.run_dir),
        output_dir=job.config.get("output_dir"),
        resources=asdict(job.resources),
    )
    registry.add(record)
    try:
        handle = executor.submit(job)
    except BaseException as e:
        registry.update(job.run_id, state=RunState.FAILED.value, detail=f"submit failed: {e}")
        raise
    return registry.update(job.run_id, state=RunState.RUNNING.value, handle=handle.to_json())


def _handle(record: RunRecord) -> Handle:
    assert record.handle, f"{record.run_id} has no handle"
    return Handle.from_json(record.handle)


def refresh(record: RunRecord, registry: Registry) -> RunRecord:
    """Ask the backend how an unfinished run is doing and record the answer."""
    if RunState(record.state).finished or not record.handle:
        return record
    status = get_executor(record.backend).status(_handle(record))
    if status.state.value == record.state and status.detail == record.detail:
        return record
    changes: dict[str, Any] = {"state": status.state.value, "detail": status.detail}
    if status.state.finished:
        changes["summary"] = read_summary(record)
    return registry.update(record.run_id, **changes)


def read_summary(record: RunRecord) -> dict[str, Any] | None:
    """The payload's summary.json, when the run's output is on this machine."""
    return read_output_summary(record.output_dir) if record.output_dir else None


def status(run_id: str, registry: Registry | None = None) -> RunRecord:
    registry = registry or Registry()
    return refresh(registry.get(run_id), registry)


def runs(limit: int | None = None, registry: Registry | None = None) -> list[RunRecord]:
    """Recent runs, newest first, each refreshed from its backend if unfinished."""
    registry = registry or Registry()
    return [refresh(r, registry) for r in registry.list(limit=limit)]


def logs(run_id: str, follow: bool = False, registry: Registry | None = None) -> Iterator[str]:
    registry = registry or Registry()
    record = registry.get(run_id)
    if not record.handle:
        return iter([f"{run_id} never started: {record.detail or 'no handle recorded'}\n"])
    return get_executor(record.backend).logs(_handle(record), follow=follow)


def cancel(run_id: str, registry: Registry | None = None) -> RunRecord:
    """Stop a run (SIGTERM, then SIGKILL after a grace period on the local backend)."""
    registry = registry or Registry()
    record = registry.get(run_id)
    if RunState(record.state).finished or not record.handle:
        return record
    result = get_executor(record.backend).cancel(_handle(record))
    return registry.update(
        run_id, state=result.state.value, detail=result.detail, summary=read_summary(record)
    )


def wait(
    run_id: str,
    poll_s: float = 0.5,
    timeout_s: float | None = None,
    registry: Registry | None = None,
    on_poll: Callable[[RunRecord], None] | None = None,
) -> RunRecord:
    """Block until the run finishes (or `timeout_s` passes); return its record."""
    registry = registry or Registry()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        record = refresh(registry.get(run_id), registry)
        if on_poll:
            on_poll(record)
        if RunState(record.state).finished:
            return record
        if deadline is not None and time.monotonic() > deadline:
            return record
        time.sleep(poll_s)
