"""Running a sweep: plan every trial, record them, and keep up to K running per backend.

    plan = plan_sweep("cfg.yml", "grid.yml", ["max_steps=100"], backends=["local"])
    sweep = create(plan)                   # trials recorded as pending; nothing runs yet
    dispatch(sweep.sweep_id)               # runs them all, K at a time per backend

The dispatcher is a loop over the registry: it refreshes running trials, and as a backend
frees capacity it submits the next pending trial there. A trial that fails does not stop
the others. A submit the backend says started nothing (a network error) is retried with
backoff; a FerryError fails that trial with its message (launcher.runs.submit). Before
each submit it reads the sweep and the trial again, so a `launch sweep cancel` from
another shell stops it before it starts anything more.
`python -m launcher.dispatch SWEEP_ID` runs the same loop detached from the terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executors import JobSpec, RunState, get_executor
from launcher import runs
from launcher.launch_settings import load_profile, resolve
from launcher.registry import Registry, RunRecord, SweepRecord, ferry_home
from launcher.sweeps import DEFAULT_MAX_TRIALS, Trial, expand
from payload.config import ConfigError, paths, validate_mapping
from payload.config.loader import is_url, parse_yaml, read_raw, read_text
from payload.config.overrides import with_values
from payload.errors import FerryError
from payload.runtime.procs import alive_with

SUBMIT_RETRIES = 3  # after a submit that started nothing (runs.submit backs off)
INVALID_SHOWN = 20  # invalid trials listed in full before "and N more"

Event = Callable[[str, RunRecord], None]  # ("submitted" | "finished" | "retrying", trial)


@dataclass
class SweepPlan:
    sweep_id: str
    name: str
    source: str
    sweep_file: str
    spec: dict[str, Any]
    trials: list[Trial]
    jobs: list[JobSpec]
    backends: list[str]
    max_parallel: int
    warnings: list[str]

    def backend_for(self, index: int) -> str:
        """Where a trial would start if every backend had room: round robin."""
        return self.backends[index % len(self.backends)]


def plan_sweep(
    source: str | Path,
    sweep_file: str | Path,
    overrides: list[str] | None = None,
    *,
    backends: list[str] | None = None,
    max_parallel: int = 1,
    max_trials: int = DEFAULT_MAX_TRIALS,
    profile: str | Path | None = None,
    **launch: Any,
) -> SweepPlan:
    """Expand the grid and validate every trial; raise listing every invalid trial.

    Launch settings come as in `api.prepare` (flags > each trial's `launch:` > profile);
    trials run on `backends` (default: the base config's backend). Nothing is written:
    this is also the dry run.
    """
    if max_parallel < 1:
        raise FerryError(f"--max-parallel must be at least 1, got {max_parallel}.")
    flags = runs.check_flags(launch)
    loaded_profile = load_profile(profile) if profile else None
    spec = parse_yaml(read_text(sweep_file), str(sweep_file))
    trials, warnings = expand(spec, max_trials=max_trials)
    base = read_raw(source, overrides)
    base_dir = None if is_url(source) else Path(source).expanduser().resolve().parent
    name = runs.config_name(source)
    sweep_id = runs.make_run_id(name)
    trial_warnings: dict[str, tuple[str, int]] = {}  # key -> (first message, trials)

    def collect(message: str) -> None:
        # Trials mostly warn alike ("num_epochs: ignored ..."): say it once per key.
        text = message.split(": ", 1)[1]
        key = text.split(":", 1)[0]
        first, count = trial_warnings.get(key, (text, 0))
        trial_warnings[key] = (first, count + 1)

    runs_root = ferry_home() / "runs"
    backends = list(dict.fromkeys(backends or []))
    executors = {b: get_executor(b) for b in backends}
    jobs: list[JobSpec] = []
    invalid: list[str] = []
    invalid_trials: set[int] = set()
    settings_seen: dict[tuple[str | None, str | None], Any] = {}
    with paths.memoized():  # every trial names the same files: look each up once
        for trial in trials:
            raw = with_values(base, trial.values)
            label = f"t{trial.index} ({trial.name})"
            try:
                cfg = validate_mapping(raw, label, base_dir=base_dir, warn=collect)
            except ConfigError as e:
                invalid.extend(f"{label}: {p}" for p in e.problems)
                invalid_trials.add(trial.index)
                continue
            run_id = f"{sweep_id}-t{trial.index}"
            if cfg.output_dir:  # a shared output_dir from the base config: one folder per trial
                cfg = cfg.model_copy(update={"output_dir": str(Path(cfg.output_dir) / run_id)})
            # Most grids leave launch settings alone: resolve each distinct one once.
            key = (cfg.launch.model_dump_json() if cfg.launch else None, cfg.storage)
            if key not in settings_seen:
                settings_seen[key] = resolve(flags, cfg.launch, loaded_profile, cfg.storage)
            settings = settings_seen[key]
            if not backends:
                backends = [settings.cloud]
                executors = {backends[0]: get_executor(backends[0])}
            for key in ("wandb_run_id", "comet_experiment_key"):
                if getattr(cfg, key):
                    invalid.append(
                        f"{label}: {key}: would put every trial into one tracker run; leave "
                        "it unset (each trial's tracker run is named by its own run id)"
                    )
                    invalid_trials.add(trial.index)
            job = runs.job_for(cfg, name, run_id, settings, runs_root)
            job.env["FERRY_SWEEP_ID"] = sweep_id  # trackers group the trials by it
            jobs.append(job)
            for backend, executor in executors.items():
                for problem in executor.problems(job):
                    invalid.append(f"{label}: {backend}: {problem}")
                    invalid_trials.add(trial.index)
    if invalid:
        shown = invalid[:INVALID_SHOWN]
        more = f"\n  ... and {len(invalid) - len(shown)} more" if len(invalid) > len(shown) else ""
        raise FerryError(
            f"{len(invalid_trials)} of {len(trials)} trials are invalid; nothing was launched:\n"
            + "\n".join(f"  - {p}" for p in shown)
            + more
        )
    warnings.extend(
        first if count == 1 else f"{first} ({count} trials)"
        for first, count in trial_warnings.values()
    )
    return SweepPlan(
        sweep_id=sweep_id,
        name=name,
        source=str(source) if is_url(source) else str(Path(source).resolve()),
        sweep_file=str(Path(sweep_file).resolve()),
        spec=spec,
        trials=trials,
        jobs=jobs,
        backends=backends,
        max_parallel=max_parallel,
        warnings=warnings,
    )


def preflight(plan: SweepPlan) -> None:
    """What only a real sweep needs, before it is recorded: each backend's credentials,
    and a probe write to every storage the trials may sync to (a trial without its own
    goes to its backend's default). Once per backend and per storage, not per trial."""
    roots: set[str] = set()
    for backend in plan.backends:
        executor = get_executor(backend)
        executor.preflight(plan.jobs[0])
        default = executor.default_storage(ferry_home())
        for job in plan.jobs:
            uri = job.storage_uri.rsplit("/", 1)[0] if job.storage_uri else default
            if uri:
                roots.add(uri.rstrip("/"))
    for root in sorted(roots):
        runs.check_storage(root)


def create(plan: SweepPlan, registry: Registry | None = None) -> SweepRecord:
    """Record the sweep and its trials (pending) and write each trial's resolved config."""
    registry = registry or Registry()
    now = time.time()
    sweep = SweepRecord(
        sweep_id=plan.sweep_id,
        name=plan.name,
        source=plan.source,
        sweep_file=plan.sweep_file,
        spec=plan.spec,
        backends=plan.backends,
        max_parallel=plan.max_parallel,
        state="running",
        created_at=now,
        updated_at=now,
    )
    records = []
    for trial, job in zip(plan.trials, plan.jobs, strict=True):
        job.write()
        trial_info = {"index": trial.index, "name": trial.name, "values": trial.values}
        records.append(
            runs.record_for(
                job,
                plan.source,
                sweep_id=plan.sweep_id,
                trial=trial_info,
                storage_uri=job.storage_uri,  # --storage: each trial's own folder there
            )
        )
    registry.add_sweep(sweep)
    registry.add_many(records)
    return sweep


def _submit(
    record: RunRecord, backend: str, registry: Registry, on_event: Event | None
) -> RunRecord:
    """Submit one trial; its failure is recorded on the trial, not raised."""
    try:
        return runs.submit(
            record,
            runs.job_from_record(record),
            backend,
            registry,
            retries=SUBMIT_RETRIES,
            on_retry=(lambda r: on_event("retrying", r)) if on_event else None,
        )
    except FerryError:
        return registry.get(record.run_id)  # recorded as failed, with the reason


def dispatch(
    sweep_id: str,
    registry: Registry | None = None,
    poll_s: float = 1.0,
    on_event: Event | None = None,
    stop: threading.Event | None = None,
) -> list[RunRecord]:
    """Run the sweep's pending trials, at most `max_parallel` at a time per backend, until
    none is pending or running, or the sweep is cancelled. `stop` (set by a signal
    handler) ends the loop between submits, never inside one: a submit in flight is
    recorded, or cancelled if its trial was. Returns the trials."""
    stop = stop or threading.Event()
    registry = registry or Registry()
    sweep = registry.get_sweep(sweep_id)
    trials = registry.trials(sweep_id)
    queue = [t.run_id for t in trials if t.state == RunState.PENDING.value]
    running = {t.run_id: t for t in trials if t.state == RunState.RUNNING.value}
    try:
        while (queue or running) and not stop.is_set():
            for run_id in list(running):
                record = runs.refresh(registry.get(run_id), registry)
                if RunState(record.state).finished:
                    del running[run_id]
                    if on_event:
                        on_event("finished", record)
            for backend in sweep.backends:
                busy = sum(1 for r in running.values() if r.backend == backend)
                while queue and busy < sweep.max_parallel:
                    if stop.is_set() or registry.get_sweep(sweep_id).state == "cancelled":
                        queue.clear()  # cancelled elsewhere: start nothing more
                        break
                    record = registry.get(queue.pop(0))
                    if record.state != RunState.PENDING.value:
                        continue  # cancelled on its own meanwhile
                    record = _submit(record, backend, registry, on_event)
                    if record.state == RunState.RUNNING.value:
                        running[record.run_id] = record
                        busy += 1
                    if on_event:
                        started = record.state == RunState.RUNNING.value
                        on_event("submitted" if started else "finished", record)
            if queue or running:
                stop.wait(poll_s)
    except KeyboardInterrupt:
        cancel(sweep_id, registry)
        raise
    if not stop.is_set():  # stopped early: what is left stays queued for `sweep retry`
        registry.transition_sweep(sweep_id, "finished", expect=("running",))
    return registry.trials(sweep_id)


def cancel(sweep_id: str, registry: Registry | None = None) -> list[RunRecord]:
    """Stop the sweep: its dispatcher, its running trials, and the trials still queued."""
    registry = registry or Registry()
    registry.transition_sweep(sweep_id, "cancelled", expect=("running",))
    sweep = registry.get_sweep(sweep_id)
    if sweep.dispatcher and sweep.dispatcher.get("pid") != os.getpid():
        _stop_dispatcher(sweep.dispatcher)
    for record in registry.trials(sweep_id):
        if not RunState(record.state).finished:
            runs.cancel(record.run_id, registry)
    return registry.trials(sweep_id)


def retry(sweep_id: str, failed: bool, registry: Registry | None = None) -> list[RunRecord]:
    """Queue the failed and preempted trials again (with `failed`); trials still pending
    (a dispatcher that stopped early) stay queued. Returns the trials now pending. Trials that
    succeeded are never rerun."""
    registry = registry or Registry()
    sweep = registry.get_sweep(sweep_id)
    if dispatcher_alive(sweep):
        raise FerryError(
            f"Sweep {sweep_id} is still being dispatched (pid {sweep.dispatcher['pid']}); "
            "retry it once it ends, or cancel it first."
        )
    again = (RunState.FAILED.value, RunState.PREEMPTED.value)
    for record in registry.trials(sweep_id):
        if failed and record.state in again:
            runs.claim(record.run_id, registry, again)
    registry.transition_sweep(
        sweep_id, "running", expect=("running", "finished", "cancelled"), dispatcher=None
    )
    return [t for t in registry.trials(sweep_id) if t.state == RunState.PENDING.value]


def detach(sweep_id: str, registry: Registry | None = None) -> SweepRecord:
    """Run `dispatch` in a background process that outlives this terminal."""
    registry = registry or Registry()
    folder = ferry_home() / "sweeps" / sweep_id
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "dispatch.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "launcher.dispatch", sweep_id],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return registry.update_sweep(sweep_id, dispatcher={"pid": process.pid, "log": str(log)})


def dispatcher_alive(sweep: SweepRecord) -> bool:
    pid = (sweep.dispatcher or {}).get("pid")
    if not pid:
        return False
    return alive_with(pid, sweep.sweep_id)


def _stop_dispatcher(dispatcher: dict[str, Any]) -> None:
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(dispatcher["pid"], signal.SIGTERM)


def _main(argv: list[str]) -> int:
    import signal

    sweep_id = argv[0]
    # SIGTERM (from `launch sweep cancel`) ends the loop at its next safe point; cancel()
    # does the rest.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def log(kind: str, record: RunRecord) -> None:
        trial = record.trial or {}
        print(
            f"{time.strftime('%H:%M:%S')} t{trial.get('index')} {kind}: {record.state} "
            f"{record.detail or ''}",
            flush=True,
        )

    dispatch(sweep_id, on_event=log, stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
