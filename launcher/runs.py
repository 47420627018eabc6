"""One run's life on the launcher side: a config and its launch settings become a
JobSpec, the JobSpec a registry record, the record a submission, and the backend's
answers state changes. `launcher.api` (one run) and `launcher.dispatch` (a sweep's
trials) both go through here; neither imports the other's machinery.

Submitting is idempotent by run id: before a submit, the backend is asked whether a
submission of this run is already live (`Executor.find`), and a failed submit is tried
again only when the backend says nothing was started (`NotStarted`) or, after any
other error, `find` finds nothing. Every state change is a compare-and-set on the state
read before it (`Registry.transition`).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from executors import Handle, JobSpec, Resources, RunState, get_executor
from executors.base import NotStarted
from launcher.launch_settings import LaunchSettings
from launcher.registry import Registry, RunRecord, ferry_home
from payload.config import TrainConfig, load_config
from payload.config.loader import is_url
from payload.errors import FerryError
from payload.storage.layout import read_summary as read_output_summary

UNFINISHED = (RunState.PENDING.value, RunState.RUNNING.value)
RESUMABLE = (RunState.FAILED.value, RunState.CANCELLED.value, RunState.PREEMPTED.value)
SUBMIT_BACKOFF_S = 2.0  # doubled after each failed attempt


def config_name(source: str | Path) -> str:
    """A run-id-safe name from the config's file name: `ex/Quick Start.yml` -> `quick-start`."""
    stem = Path(str(source).split("?")[0]).stem.lower()
    name = re.sub(r"[^a-z0-9]+", "-", stem).strip("-")
    return (name or "run")[:40]


def make_run_id(name: str, now: datetime | None = None) -> str:
    """`<config-name>-<yyyymmdd-hhmmss>-<4 hex>`."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


def job_for(
    cfg: TrainConfig,
    name: str,
    run_id: str,
    settings: LaunchSettings | None = None,
    runs_root: Path | None = None,
) -> JobSpec:
    """The JobSpec of a validated config and its launch settings: its own run folder
    under `runs_root` (default $FERRY_HOME/runs), its output folder there unless the
    config names one, its own storage prefix `<storage>/<run id>`, and its image.

    Storage and launch settings travel outside the config it runs (FERRY_STORAGE_URI,
    the backend's resources), so those keys are dropped from it.
    """
    from images import default_spec

    settings = settings or resolve_launch({}, cfg)
    run_dir = (runs_root or ferry_home() / "runs") / run_id
    config = cfg.model_dump(mode="json", exclude_defaults=True)
    config.setdefault("output_dir", str(run_dir / "output"))
    config.pop("storage", None)
    config.pop("launch", None)
    image = dict(settings.image or {})
    if cfg.deepspeed:  # the run imports DeepSpeed: its image needs the layer, asked or not
        image["extras"] = [*(image.get("extras") or ()), "deepspeed"]
    return JobSpec(
        run_id=run_id,
        name=name,
        config=config,
        resources=settings.resources,
        run_dir=run_dir,
        image=default_spec().with_overrides(**image) if image else default_spec(),
        storage_uri=f"{settings.storage.rstrip('/')}/{run_id}" if settings.storage else None,
        env=dict(settings.env),
        secrets=list(settings.secrets),
        volumes=list(settings.volumes),
        options={k: dict(v) for k, v in settings.options.items()},
    )


def resolve_launch(flags: dict[str, Any], cfg: TrainConfig, profile: Any = None) -> LaunchSettings:
    """Flags > the config's `launch:` > the profile > defaults (see launch_settings)."""
    from launcher.launch_settings import resolve

    return resolve(check_flags(flags), cfg.launch, profile, cfg.storage)


def check_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Validate the CLI's launch flags like the config's `launch:` keys, naming the flag."""
    from pydantic import ValidationError

    from payload.config.schema import LaunchConfig

    given = {k: v for k, v in flags.items() if v not in (None, [], {})}
    try:
        checked = LaunchConfig.model_validate(given)
    except ValidationError as e:
        lines = [
            f"--{str(err['loc'][0]).replace('_', '-')}: " + err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        ]
        raise FerryError("Bad launch flag:\n" + "\n".join(f"  - {line}" for line in lines)) from e
    if given.get("storage"):
        check_storage_option(given["storage"])
    return checked.model_dump(exclude_none=True, exclude_defaults=True)


def check_storage_option(storage: str | None) -> None:
    """A --storage value must be a storage URI Ferry can use."""
    from payload.storage import check_uri

    if storage and (problem := check_uri(storage)):
        raise FerryError(f"--storage: {problem}.")


def with_default_storage(job: JobSpec, backend: str) -> JobSpec:
    """Give a job with no storage the backend's default (the local backend: a folder
    under $FERRY_HOME; Modal: a volume)."""
    if job.storage_uri is None:
        base = get_executor(backend).default_storage(ferry_home())
        if base:
            job.storage_uri = f"{base.rstrip('/')}/{job.run_id}"
    return job


def check_storage(uri: str | None) -> str | None:
    """Can the run write to its storage? A small object is written there and deleted,
    before anything is spent. Returns whose credentials that used."""
    if not uri:
        return None
    from payload.storage import open_store

    return open_store(uri).check()


def start(record: RunRecord, job: JobSpec, backend: str, registry: Registry) -> RunRecord:
    """Check a recorded, pending run's storage, then submit it; a failure of either is
    recorded on the run (its state says why) and raised."""
    import logging

    from payload.storage import StorageCheckError

    log = logging.getLogger("ferry.launch")
    other_credentials = bool(job.secrets) and backend != "local"  # the run gets its own
    try:
        used = check_storage(job.storage_uri)
    except StorageCheckError as e:
        if not (e.credentials_problem and other_credentials):
            _fail(record, backend, f"storage check failed: {e.message}", registry)
            raise
        log.warning(
            "%s The run uses the secret(s) %s instead; make sure those may write there.",
            e.message,
            ", ".join(job.secrets),
        )
    except FerryError as e:
        _fail(record, backend, f"storage check failed: {e.message}", registry)
        raise
    else:
        if used and other_credentials:
            log.warning(
                "storage %s: write checked with %s; the run uses the secret(s) %s, "
                "which must be able to write there too.",
                job.storage_uri,
                used,
                ", ".join(job.secrets),
            )
        elif used:
            log.info("storage %s: write checked with %s", job.storage_uri, used)
    return submit(record, job, backend, registry)


def prepare(
    source: str | Path,
    overrides: list[str] | None = None,
    *,
    run_id: str | None = None,
    profile: str | Path | None = None,
    **launch: Any,
) -> tuple[JobSpec, str]:
    """Validate the config, merge its launch settings, and turn it into a JobSpec;
    nothing is written or started. Returns (job, backend name).

    `launch` takes the CLI's launch flags by their config names: cloud, gpus, nodes,
    cpu, memory, timeout, retries, region, spot, secrets, env, storage."""
    cfg = load_config(source, overrides)
    settings = resolve_launch(launch, cfg, profile)
    name = config_name(source)
    job = job_for(cfg, name, run_id or make_run_id(name), settings)
    return with_default_storage(job, settings.cloud), settings.cloud


def record_for(job: JobSpec, source: str | Path, backend: str = "", **extra: Any) -> RunRecord:
    """A registry row for a job not yet submitted."""
    now = time.time()
    return RunRecord(
        run_id=job.run_id,
        name=job.name,
        source=str(source) if is_url(source) else str(Path(source).resolve()),
        backend=backend,
        state=RunState.PENDING.value,
        created_at=now,
        updated_at=now,
        run_dir=str(job.run_dir),
        output_dir=job.config.get("output_dir"),
        resources=asdict(job.resources),
        **extra,
    )


def job_from_record(record: RunRecord) -> JobSpec:
    """Rebuild a recorded run's JobSpec from its run folder (to dispatch or relaunch it)."""
    try:
        return JobSpec.read(
            Path(record.run_dir),
            run_id=record.run_id,
            name=record.name,
            resources=Resources(**record.resources),
            storage_uri=record.storage_uri,
        )
    except OSError as e:
        raise FerryError(f"{record.run_id}: its run folder lost its job files ({e}).") from e


def _fail(record: RunRecord, backend: str, detail: str, registry: Registry) -> RunRecord:
    return registry.transition(
        record.run_id,
        RunState.FAILED.value,
        expect=(RunState.PENDING.value,),
        backend=backend,
        detail=detail,
        finished_at=time.time(),
    ) or registry.get(record.run_id)


def submit(
    record: RunRecord,
    job: JobSpec,
    backend: str,
    registry: Registry,
    *,
    retries: int = 0,
    on_retry: Callable[[RunRecord], None] | None = None,
) -> RunRecord:
    """Start a pending run on `backend` (its first attempt, a resume or a sweep's retry)
    and record the handle. Tries again up to `retries` times, with backoff, when the
    backend started nothing; a FerryError fails the run at once (never retried). If the
    run was cancelled meanwhile, what was started is cancelled too."""
    executor = get_executor(backend)
    with_default_storage(job, backend)
    delay = SUBMIT_BACKOFF_S
    for attempt in range(retries + 1):
        try:
            handle = executor.find(job) or executor.submit(job)
            return _started(record, job, backend, handle, registry)
        except NotStarted as e:
            reason = e.message
            if attempt == retries:
                _fail(record, backend, f"submit failed: {reason}", registry)
                raise
        except FerryError as e:
            _fail(record, backend, f"submit failed: {e.message}", registry)
            raise
        except Exception as e:  # noqa: BLE001 - maybe passing; `find` says what was started
            reason = repr(e)
            if attempt == retries:
                _fail(
                    record, backend, f"submit failed {retries + 1} times; last: {reason}", registry
                )
                raise FerryError(
                    f"Could not submit {record.run_id} to {backend}: {reason}",
                    hint=f"`launch status {record.run_id}` shows what was recorded.",
                ) from e
        record = registry.update(record.run_id, detail=f"submit retry {attempt + 1}: {reason}")
        if on_retry:
            on_retry(record)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _started(
    record: RunRecord, job: JobSpec, backend: str, handle: Handle, registry: Registry
) -> RunRecord:
    started = registry.transition(
        record.run_id,
        RunState.RUNNING.value,
        expect=(RunState.PENDING.value,),
        backend=backend,
        handle=handle.to_json(),
        detail=None,
        summary=None,
        started_at=time.time(),
        finished_at=None,
        attempts=record.attempts + 1,
        storage_uri=job.storage_uri,
    )
    if started is not None:
        return started
    now = registry.get(record.run_id)
    if now.state == RunState.RUNNING.value and now.handle == handle.to_json():
        return now  # an earlier attempt recorded this very submission
    get_executor(backend).cancel(handle)  # cancelled while it was submitted: stop it
    return registry.get(record.run_id)


def claim(run_id: str, registry: Registry, expect: tuple[str, ...] = RESUMABLE) -> RunRecord:
    """Move a stopped run back to pending before it is submitted again; only one of two
    concurrent resumes gets it."""
    claimed = registry.transition(
        run_id, RunState.PENDING.value, expect=expect, detail=None, summary=None
    )
    if claimed is None:
        state = registry.get(run_id).state
        raise FerryError(f"{run_id} is {state} now; it cannot be started again from there.")
    return claimed


def handle_of(record: RunRecord) -> Handle:
    assert record.handle, f"{record.run_id} has no handle"
    return Handle.from_json(record.handle)


def refresh(record: RunRecord, registry: Registry) -> RunRecord:
    """Ask the backend how an unfinished run is doing and record the answer."""
    if RunState(record.state).finished or not record.handle:
        return record
    handle = handle_of(record)
    status = get_executor(record.backend).status(handle)
    if handle.to_json() != record.handle:  # the backend learnt more (SkyPilot's job id)
        record = registry.update(record.run_id, handle=handle.to_json())
    if status.state.value == record.state and status.detail == record.detail:
        return record
    changes: dict[str, Any] = {"detail": status.detail}
    if status.state.finished:
        changes["summary"] = read_summary(record)
        changes["finished_at"] = status.finished_at or time.time()
    updated = registry.transition(
        record.run_id, status.state.value, expect=(record.state,), **changes
    )
    return updated or registry.get(record.run_id)


def read_summary(record: RunRecord) -> dict[str, Any] | None:
    """The payload's summary.json: from the run's output when it is on this machine,
    else from the final artifacts in its storage (a remote run's). None: not there (the
    run did not finish, or the storage did not answer)."""
    found = read_output_summary(record.output_dir) if record.output_dir else None
    if found is not None or not record.storage_uri:
        return found
    import json

    from payload.storage import FINAL, open_store
    from payload.storage.layout import SUMMARY_FILE

    try:
        data = open_store(record.storage_uri).read_bytes(f"{FINAL}/{SUMMARY_FILE}")
        summary = json.loads(data) if data else None
    except Exception:  # noqa: BLE001 - a summary is a nicety; the state is already known
        return None
    return summary if isinstance(summary, dict) else None


def cancel(run_id: str, registry: Registry) -> RunRecord:
    """Stop a run: its backend stops it (the ranks save first), or, if it was only
    queued, it never starts."""
    record = registry.get(run_id)
    if RunState(record.state).finished:
        return record
    if not record.handle:  # recorded but not submitted (a sweep's queued trial)
        cancelled = registry.transition(
            run_id,
            RunState.CANCELLED.value,
            expect=(RunState.PENDING.value,),
            finished_at=time.time(),
        )
        # Not pending any more: it was submitted (or ended) meanwhile; cancel that.
        return cancelled or cancel(run_id, registry)
    result = get_executor(record.backend).cancel(handle_of(record))
    done = registry.transition(
        run_id,
        result.state.value,
        expect=UNFINISHED,
        detail=result.detail,
        summary=read_summary(record),
        finished_at=result.finished_at or time.time(),
    )
    return done or registry.get(run_id)
