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
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from executors import Handle, JobSpec, Plan, Resources, RunState, get_executor
from launcher.launch_settings import LaunchSettings
from launcher.registry import Registry, RunRecord, ferry_home
from payload.config import TrainConfig, load_config
from payload.config.loader import is_url
from payload.errors import FerryError
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
    image = settings.image
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


def check_storage(uri: str | None) -> None:
    """Can the run write to its storage? Asked before anything is spent (for S3: the
    credentials and the bucket)."""
    if uri:
        from payload.storage import open_store

        open_store(uri).check()


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
    cfg = validate(source, overrides)
    settings = resolve_launch(launch, cfg, profile)
    name = config_name(source)
    job = job_for(cfg, name, run_id or make_run_id(name), settings)
    return with_default_storage(job, settings.cloud), settings.cloud


def plan(
    source: str | Path,
    overrides: list[str] | None = None,
    *,
    profile: str | Path | None = None,
    **launch: Any,
) -> Plan:
    """What `train` would start, without starting it (the dry run)."""
    job, cloud = prepare(source, overrides, profile=profile, **launch)
    return get_executor(cloud).plan(job)


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


def submit(record: RunRecord, job: JobSpec, backend: str, registry: Registry) -> RunRecord:
    """Submit a recorded job to `backend` (again, for a retry) and record the handle.

    A FerryError from the backend marks the run failed; other errors (a network blip)
    leave it pending for the caller to retry."""
    executor = get_executor(backend)
    with_default_storage(job, backend)
    try:
        handle = executor.submit(job)
    except FerryError as e:
        registry.update(
            record.run_id,
            state=RunState.FAILED.value,
            backend=backend,
            detail=f"submit failed: {e.message}",
            finished_at=time.time(),
        )
        raise
    return registry.update(
        record.run_id,
        state=RunState.RUNNING.value,
        backend=backend,
        handle=handle.to_json(),
        detail=None,
        summary=None,
        started_at=time.time(),
        finished_at=None,
        attempts=record.attempts + 1,
        storage_uri=job.storage_uri,
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


def train(
    source: str | Path,
    overrides: list[str] | None = None,
    *,
    profile: str | Path | None = None,
    registry: Registry | None = None,
    **launch: Any,
) -> RunRecord:
    """Validate, record and submit one run; returns at once (see `wait`).

    Launch settings as in `prepare` (e.g. `cloud="modal", gpus="H100:8", nodes=2`)."""
    registry = registry or Registry()
    job, cloud = prepare(source, overrides, profile=profile, **launch)
    executor = get_executor(cloud)
    executor.check(job)  # before anything is recorded or spent
    executor.preflight(job)  # credentials, quotas: what only a real launch needs
    check_storage(job.storage_uri)
    record = record_for(job, source, executor.name, storage_uri=job.storage_uri)
    job.write()
    registry.add(record)
    try:
        return submit(record, job, executor.name, registry)
    except FerryError:
        raise
    except BaseException as e:
        registry.update(job.run_id, state=RunState.FAILED.value, detail=f"submit failed: {e}")
        raise


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
        changes["finished_at"] = status.finished_at or time.time()
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
    if RunState(record.state).finished:
        return record
    if not record.handle:  # recorded but never submitted (a sweep's queued trial)
        return registry.update(run_id, state=RunState.CANCELLED.value, finished_at=time.time())
    result = get_executor(record.backend).cancel(_handle(record))
    return registry.update(
        run_id,
        state=result.state.value,
        detail=result.detail,
        summary=read_summary(record),
        finished_at=result.finished_at or time.time(),
    )


def resume(run_id: str, registry: Registry | None = None) -> RunRecord:
    """Relaunch a run that stopped (failed, preempted, cancelled) under the same run id, on
    the same backend. With storage it continues from its newest complete checkpoint."""
    registry = registry or Registry()
    record = refresh(registry.get(run_id), registry)
    if record.state == RunState.SUCCEEDED.value:
        raise FerryError(f"{run_id} already succeeded; there is nothing to resume.")
    if not RunState(record.state).finished:
        raise FerryError(
            f"{run_id} is still {record.state}.", hint=f"launch cancel {run_id} first."
        )
    if not record.backend:
        raise FerryError(
            f"{run_id} never started, so there is nothing to resume.",
            hint="A sweep's queued trials run again with `launch sweep retry`.",
        )
    job = job_from_record(record)
    executor = get_executor(record.backend)
    executor.check(job)
    executor.preflight(job)
    check_storage(job.storage_uri)
    return submit(record, job, record.backend, registry)


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


# ---- sweeps (launcher.dispatch and launcher.report hold the machinery)


def sweep_plan(
    source: str | Path,
    sweep_file: str | Path,
    overrides: list[str] | None = None,
    *,
    clouds: list[str] | None = None,
    max_parallel: int = 1,
    max_trials: int | None = None,
    profile: str | Path | None = None,
    **launch: Any,
) -> Any:
    """Expand and validate a sweep without recording or starting anything (the dry run).
    Returns a `launcher.dispatch.SweepPlan`. Launch settings as in `prepare`."""
    from launcher import dispatch
    from launcher.sweeps import DEFAULT_MAX_TRIALS

    return dispatch.plan_sweep(
        source,
        sweep_file,
        overrides,
        backends=clouds,
        max_parallel=max_parallel,
        max_trials=max_trials or DEFAULT_MAX_TRIALS,
        profile=profile,
        **launch,
    )


def sweep(
    source: str | Path,
    sweep_file: str | Path,
    overrides: list[str] | None = None,
    *,
    clouds: list[str] | None = None,
    max_parallel: int = 1,
    max_trials: int | None = None,
    profile: str | Path | None = None,
    detach: bool = False,
    on_event: Callable[[str, RunRecord], None] | None = None,
    registry: Registry | None = None,
    **launch: Any,
) -> Any:
    """Plan, record and run a sweep. Blocks until every trial has ended, unless `detach`
    (then a background dispatcher runs it). Returns the `SweepRecord`."""
    from launcher import dispatch

    registry = registry or Registry()
    plan = sweep_plan(
        source,
        sweep_file,
        overrides,
        clouds=clouds,
        max_parallel=max_parallel,
        max_trials=max_trials,
        profile=profile,
        **launch,
    )
    dispatch.preflight(plan)
    record = dispatch.create(plan, registry)
    if detach:
        return dispatch.detach(record.sweep_id, registry)
    dispatch.dispatch(record.sweep_id, registry, on_event=on_event)
    return registry.get_sweep(record.sweep_id)


def sweep_status(sweep_id: str, registry: Registry | None = None) -> tuple[Any, list[RunRecord]]:
    """The sweep and its trials, unfinished ones refreshed from their backends."""
    registry = registry or Registry()
    record = registry.get_sweep(sweep_id)
    return record, [refresh(t, registry) for t in registry.trials(sweep_id)]


def sweep_report(
    sweep_id: str,
    metric: str | None = None,
    mode: str = "min",
    out_dir: str | Path | None = None,
    registry: Registry | None = None,
) -> tuple[Any, Path, Path | None]:
    """Rank the trials by `metric` and write report.json and report.png to `out_dir`
    (default $FERRY_HOME/sweeps/<id>/). Returns (Report, json path, png path or None)."""
    from launcher import report

    _, trials = sweep_status(sweep_id, registry)
    built = report.build(sweep_id, trials, metric, mode)
    folder = Path(out_dir) if out_dir else ferry_home() / "sweeps" / sweep_id
    data, png = report.write(built, folder)
    return built, data, png


def sweep_retry(
    sweep_id: str,
    failed: bool = True,
    detach: bool = False,
    on_event: Callable[[str, RunRecord], None] | None = None,
    registry: Registry | None = None,
) -> list[RunRecord]:
    """Rerun the sweep's failed trials (and any left pending); returns the trials after."""
    from launcher import dispatch

    registry = registry or Registry()
    queued = dispatch.retry(sweep_id, failed, registry)
    if not queued:
        raise FerryError(f"Sweep {sweep_id} has no failed or pending trials to run.")
    if detach:
        dispatch.detach(sweep_id, registry)
        return registry.trials(sweep_id)
    return dispatch.dispatch(sweep_id, registry, on_event=on_event)


def sweep_cancel(sweep_id: str, registry: Registry | None = None) -> list[RunRecord]:
    from launcher import dispatch

    return dispatch.cancel(sweep_id, registry)


# ---- pull: a run's artifacts and checkpoints, from its storage to here


@dataclass
class PullPlan:
    run_id: str
    store: Any  # payload.storage.Store
    items: list[tuple[str, Path, Any]]  # (prefix in the store, destination, Manifest)

    @property
    def total_bytes(self) -> int:
        return sum(manifest.total_bytes for _, _, manifest in self.items)


def pull_plan(
    run_id: str,
    checkpoint: str | None = None,
    dest: str | Path | None = None,
    registry: Registry | None = None,
) -> PullPlan:
    """What `pull` would download: the final artifacts (default), checkpoint N, the
    `latest` one, or `all` of them. Only complete (manifested) folders are offered."""
    from payload.storage import FINAL, list_checkpoints, open_store
    from payload.storage.sync import read_manifest

    registry = registry or Registry()
    record = registry.get(run_id)
    if not record.storage_uri:
        raise FerryError(f"{run_id} has no storage recorded (it ran before Ferry synced runs).")
    store = open_store(record.storage_uri)
    dest = Path(dest) if dest else Path.cwd() / run_id
    if checkpoint is None:
        manifest = read_manifest(store, FINAL)
        if manifest is None:
            latest = [c for c in list_checkpoints(store) if c.complete]
            hint = (
                f"Its newest checkpoint is {latest[-1].step}: --checkpoint latest."
                if latest
                else None
            )
            raise FerryError(
                f"{run_id} has no final artifacts in {store.uri} (not finished?).", hint=hint
            )
        return PullPlan(run_id, store, [(FINAL, dest, manifest)])
    complete = [c for c in list_checkpoints(store) if c.complete]
    if not complete:
        raise FerryError(f"{run_id} has no complete checkpoint in {store.uri}.")
    if checkpoint == "all":
        chosen = complete
    elif checkpoint == "latest":
        chosen = complete[-1:]
    elif checkpoint.isdigit() and int(checkpoint) in {c.step for c in complete}:
        chosen = [c for c in complete if c.step == int(checkpoint)]
    else:
        steps = ", ".join(str(c.step) for c in complete)
        raise FerryError(
            f"--checkpoint {checkpoint}: {run_id} has complete checkpoints at "
            f"steps {steps} (or use latest / all)."
        )
    items = []
    for c in chosen:
        manifest = read_manifest(store, c.prefix)
        target = (
            dest / "checkpoints" / f"checkpoint-{c.step}"
            if checkpoint == "all"
            else dest / f"checkpoint-{c.step}"
        )
        items.append((c.prefix, target, manifest))
    return PullPlan(run_id, store, items)


def pull(plan: PullPlan, progress: Callable[[int], None] | None = None) -> list[Path]:
    """Download a PullPlan, verifying every file; returns the destinations."""
    from payload.storage import download_folder

    for prefix, target, _ in plan.items:
        download_folder(plan.store, prefix, target, progress=progress)
    return [target for _, target, _ in plan.items]


# ---- preprocess: tokenize into the prepared-dataset cache, without training


@dataclass
class PreprocessResult:
    path: str  # the cache folder
    hit: bool  # it was there already
    default_path: bool  # the config named no dataset_prepared_path
    lines: list[str]  # the data report, as a training run prints it
    rows: dict[str, Any]  # counts: in, kept, train, eval, tokens, skipped per reason...
    rate: str | None = None  # "tokenized N rows in Xs (R rows/s, P processes)"


def preprocess(source: str | Path, overrides: list[str] | None = None) -> PreprocessResult:
    """Validate the config, then tokenize its datasets into the prepared cache
    (`dataset_prepared_path`, else $FERRY_HOME/prepared) on this machine, or find them
    there. The work runs as `python -m payload preprocess` in a subprocess with this
    terminal (the launcher never imports the training stack); raises FerryError."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    import yaml

    cfg = validate(source, overrides)
    with tempfile.TemporaryDirectory(prefix="ferry-preprocess-") as tmp:
        config = Path(tmp) / "config.yml"
        config.write_text(
            yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
        )
        result = Path(tmp) / "result.json"
        env = {**os.environ, "FERRY_HOME": str(ferry_home())}
        command = [sys.executable, "-m", "payload", "preprocess", str(config)]
        done = subprocess.run([*command, "--result", str(result)], env=env)
        data = json.loads(result.read_text()) if result.is_file() else None
    if data is None:
        raise FerryError(f"preprocess failed (exit {done.returncode}); see its messages above.")
    if "error" in data:
        raise FerryError(data["error"], hint=data.get("hint"))
    return PreprocessResult(**data)
