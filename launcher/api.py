"""Everything `launch` does, as Python functions (the CLI is a thin layer over these).

from launcher import api
record = api.train("examples/quickstart.yml", ["num_epochs=1"])
record = api.wait(record.run_id)
print(record.state, record.summary["final_loss"])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from payload.errors import FerryError

if TYPE_CHECKING:
    from executors import Plan
    from launcher.registry import Registry, RunRecord
    from payload.config import TrainConfig

# `launch validate` imports this module and needs only the config code. The run
# machinery (launcher.runs, executors, the registry and the storage code beneath them,
# ~15 ms of imports) is imported by the functions that use it, and these names, part of
# the API, come from launcher.runs on first use (`__getattr__`).
_FROM_RUNS = frozenset(
    {
        "check_flags",
        "check_storage",
        "config_name",
        "job_for",
        "job_from_record",
        "make_run_id",
        "prepare",
        "read_summary",
        "record_for",
        "refresh",
        "resolve_launch",
        "submit",
        "with_default_storage",
    }
)


def __getattr__(name: str) -> Any:
    if name in _FROM_RUNS:
        from launcher import runs as _runs

        return getattr(_runs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _registry(registry: Registry | None) -> Registry:
    """`registry`, else the one under $FERRY_HOME."""
    from launcher.registry import Registry

    return registry or Registry()


def validate(
    source: str | Path, overrides: list[str] | None = None, *, compiled: bool = False
) -> TrainConfig:
    """Load and validate a config; raises ConfigError listing every problem.

    `compiled`: check it without building pydantic's models (payload.config.compiled),
    the same checks ~90 ms sooner, and return the config as light records that read as
    a TrainConfig does but are not one (`launch validate` prints two lines from it)."""
    from payload.config import load_config

    return load_config(source, overrides, compiled=compiled)


def plan(
    source: str | Path,
    overrides: list[str] | None = None,
    *,
    profile: str | Path | None = None,
    **launch: Any,
) -> Plan:
    """What `train` would start, without starting it (the dry run)."""
    from executors import get_executor
    from launcher import runs as _runs

    job, cloud = _runs.prepare(source, overrides, profile=profile, **launch)
    executor = get_executor(cloud)
    plan = executor.plan(job)
    est = _estimate(executor, job, source, None)
    if est is not None:
        plan.rows.extend(est.rows())
        if job.resources.max_cost:
            plan.rows.append(
                ("max cost", f"${job.resources.max_cost:,.2f}: a launch above it asks first")
            )
    return plan


def _estimate(executor: Any, job: Any, source: str | Path, registry: Registry | None) -> Any:
    """The run's cost estimate (executors.cost), with the step time an earlier run of
    the same config measured, if the registry has one."""
    from executors.cost import estimate

    try:
        registry = _registry(registry)
    except Exception:  # noqa: BLE001 - no registry: no measured step time
        registry = None
    from payload.config.loader import is_url

    known = str(source) if is_url(source) else str(Path(source).resolve())  # as recorded
    return estimate(executor, job, registry, known)


def check_cost(
    executor: Any,
    job: Any,
    source: str | Path,
    registry: Registry | None,
    confirm: Callable[[str], bool] | None,
) -> None:
    """Stop a launch whose estimated cost is above `launch.max_cost` unless `confirm`
    says yes (the CLI asks at a terminal; --yes says yes; no terminal: refused)."""
    from executors.cost import over_limit

    limit = job.resources.max_cost
    if not limit:
        return
    est = _estimate(executor, job, source, registry)
    why = over_limit(est, limit)
    if why is None:
        return
    if est is not None and est.per_node_hour is None:
        # No price, often for a reason the preflight states better (SkyPilot missing, no
        # cloud enabled): that next step first, not a --yes that would still fail.
        executor.preflight(job)
    _confirm_or_refuse(why, confirm, "or lower the timeout")


def _confirm_or_refuse(why: str, confirm: Callable[[str], bool] | None, other: str) -> None:
    """A launch above `launch.max_cost` goes on only with a yes (`confirm`)."""
    if confirm is not None and confirm(why):
        return
    raise FerryError(
        f"Not launched: {why}.",
        hint=f"Pass --yes to launch anyway, raise `launch.max_cost`, {other}.",
    )


def train(
    source: str | Path,
    overrides: list[str] | None = None,
    *,
    profile: str | Path | None = None,
    registry: Registry | None = None,
    confirm: Callable[[str], bool] | None = None,
    **launch: Any,
) -> RunRecord:
    """Validate, record and submit one run; returns at once (see `wait`).

    Launch settings as in `prepare` (e.g. `cloud="modal", gpus="H100:8", nodes=2`).
    Its storage is checked (a probe object written and deleted) once it is recorded; a
    check or submit that fails is recorded as failed, with the reason, and raised."""
    from executors import RunState, get_executor
    from launcher import runs as _runs

    registry = _registry(registry)
    job, cloud = _runs.prepare(source, overrides, profile=profile, **launch)
    executor = get_executor(cloud)
    executor.check(job)  # before anything is recorded or spent
    check_cost(executor, job, source, registry, confirm)  # `launch.max_cost`
    executor.preflight(job)  # credentials, quotas: what only a real launch needs
    record = _runs.record_for(job, source, executor.name, storage_uri=job.storage_uri)
    job.write()
    registry.add(record)
    try:
        return _runs.start(record, job, executor.name, registry)
    except KeyboardInterrupt:
        registry.transition(
            job.run_id,
            RunState.FAILED.value,
            expect=(RunState.PENDING.value,),
            detail="submit interrupted",
            finished_at=time.time(),
        )
        raise


def status(run_id: str, registry: Registry | None = None) -> RunRecord:
    from launcher.runs import refresh

    registry = _registry(registry)
    return refresh(registry.get(run_id), registry)


def runs(limit: int | None = None, registry: Registry | None = None) -> list[RunRecord]:
    """Recent runs, newest first, each refreshed from its backend if unfinished."""
    from launcher.runs import refresh

    registry = _registry(registry)
    return [refresh(r, registry) for r in registry.list(limit=limit)]


def logs(run_id: str, follow: bool = False, registry: Registry | None = None) -> Iterator[str]:
    from executors import get_executor
    from launcher import runs as _runs

    registry = _registry(registry)
    record = registry.get(run_id)
    if not record.handle:
        return iter([f"{run_id} never started: {record.detail or 'no handle recorded'}\n"])
    return get_executor(record.backend).logs(_runs.handle_of(record), follow=follow)


def cancel(run_id: str, registry: Registry | None = None) -> RunRecord:
    """Stop a run. Its ranks save and upload a checkpoint first (within the run's stop
    grace period); on the local backend whatever is left after it is killed."""
    from launcher import runs as _runs

    return _runs.cancel(run_id, _registry(registry))


def resume(
    run_id: str,
    registry: Registry | None = None,
    confirm: Callable[[str], bool] | None = None,
) -> RunRecord:
    """Relaunch a run that stopped (preempted, failed, cancelled) under the same run id, on
    the same backend. With storage it continues from its newest complete checkpoint.
    `launch.max_cost` is held as at its first launch (`confirm` as in `train`)."""
    from executors import RunState, get_executor
    from launcher import runs as _runs

    registry = _registry(registry)
    record = _runs.refresh(registry.get(run_id), registry)
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
    job = _runs.job_from_record(record)
    executor = get_executor(record.backend)
    executor.check(job)
    check_cost(executor, job, record.source, registry, confirm)  # `launch.max_cost`
    executor.preflight(job)
    return _runs.start(_runs.claim(run_id, registry), job, record.backend, registry)


def wait(
    run_id: str,
    poll_s: float = 0.5,
    timeout_s: float | None = None,
    registry: Registry | None = None,
    on_poll: Callable[[RunRecord], None] | None = None,
) -> RunRecord:
    """Block until the run finishes (or `timeout_s` passes); return its record."""
    from executors import RunState
    from launcher.runs import refresh

    registry = _registry(registry)
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


def sweep_cost(plan: Any, registry: Registry | None = None) -> tuple[float | None, str]:
    """The sweep's estimated cost, every trial on the backend it would start on, and how
    it was reached ("" when no trial is priced); None when a trial's price or bound is
    unknown (the text says which)."""
    from executors import get_executor

    total, estimates, seen = 0.0, [], {}
    for index, job in enumerate(plan.jobs):
        backend = plan.backend_for(plan.trials[index].index)
        # Trials mostly share their machines: price each kind once (SkyPilot's optimizer).
        key = (backend, repr(job.resources), repr(job.options), job.config.get("max_steps"))
        if key not in seen:
            seen[key] = _estimate(get_executor(backend), job, plan.source, registry)
        est = seen[key]
        label = f"t{plan.trials[index].index} on {backend}"
        if est is None:  # an unpriced backend (local, Ray): nothing to bill here
            continue
        if est.per_node_hour is None:
            return None, f"{label}: the price is unknown ({est.source})"
        if est.checked is None:
            return None, f"{label}: nothing bounds its cost (no `launch.timeout`)"
        total += est.checked
        estimates.append(est)
    if not estimates:
        return 0.0, ""  # no trial runs on a priced backend
    bound = "expected" if all(e.expected is not None for e in estimates) else "at most"
    return total, f"${total:,.2f} {bound} for {len(estimates)} priced trial(s)"


def check_sweep_cost(
    plan: Any, registry: Registry | None, confirm: Callable[[str], bool] | None
) -> None:
    """A sweep is held to `launch.max_cost` as a whole: the sum of its trials' estimates
    (one command should not spend more than the limit a single run may)."""
    limits = [j.resources.max_cost for j in plan.jobs if j.resources.max_cost]
    if not limits:
        return
    limit = min(limits)
    total, how = sweep_cost(plan, registry)
    if total is None:
        why = f"launch.max_cost is ${limit:,.2f}, but this sweep's cost is unknown: {how}"
    elif total > limit:
        why = f"this sweep's estimated cost, {how}, is above launch.max_cost ${limit:,.2f}"
    else:
        return
    _confirm_or_refuse(why, confirm, "or run fewer trials")


def sweep_start(
    plan: Any,
    detach: bool = False,
    registry: Registry | None = None,
    confirm: Callable[[str], bool] | None = None,
) -> Any:
    """Check the sweep's cost against `launch.max_cost` and its backends (credentials),
    record the sweep and its trials, and, with `detach`, hand it to a background
    dispatcher. Returns the `SweepRecord`."""
    from launcher import dispatch

    registry = _registry(registry)
    check_sweep_cost(plan, registry, confirm)
    dispatch.preflight(plan)
    record = dispatch.create(plan, registry)
    if detach:
        return dispatch.detach(record.sweep_id, registry)
    return record


def sweep_dispatch(
    sweep_id: str,
    on_event: Callable[[str, RunRecord], None] | None = None,
    registry: Registry | None = None,
) -> list[RunRecord]:
    """Run a recorded sweep's queued trials here, K at a time per backend, until every
    trial has ended or the sweep is cancelled (also from another shell). Ctrl-C cancels
    the sweep. Returns the trials."""
    from launcher import dispatch

    return dispatch.dispatch(sweep_id, _registry(registry), on_event=on_event)


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
    confirm: Callable[[str], bool] | None = None,
    **launch: Any,
) -> Any:
    """Plan, record and run a sweep. Blocks until every trial has ended, unless `detach`
    (then a background dispatcher runs it). Returns the `SweepRecord`."""
    registry = _registry(registry)
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
    record = sweep_start(plan, detach, registry, confirm)
    if not detach:
        sweep_dispatch(record.sweep_id, on_event, registry)
    return registry.get_sweep(record.sweep_id)


def sweep_status(sweep_id: str, registry: Registry | None = None) -> tuple[Any, list[RunRecord]]:
    """The sweep and its trials, unfinished ones refreshed from their backends."""
    from launcher.runs import refresh

    registry = _registry(registry)
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
    from launcher.registry import ferry_home

    _, trials = sweep_status(sweep_id, registry)
    built = report.build(sweep_id, trials, metric, mode)
    folder = Path(out_dir) if out_dir else ferry_home() / "sweeps" / sweep_id
    data, png = report.write(built, folder)
    return built, data, png


def sweep_requeue(sweep_id: str, failed: bool = True, registry: Registry | None = None) -> list:
    """Queue the sweep's failed and preempted trials again (with `failed`); trials still
    pending stay queued. Returns the queued trials; raises if there are none."""
    from launcher import dispatch

    queued = dispatch.retry(sweep_id, failed, _registry(registry))
    if not queued:
        raise FerryError(
            f"Sweep {sweep_id} has nothing to run"
            + ("." if failed else "; pass --failed to rerun its failed trials.")
        )
    return queued


def sweep_detach(sweep_id: str, registry: Registry | None = None) -> Any:
    """Dispatch a recorded sweep in a background process that outlives this terminal."""
    from launcher import dispatch

    return dispatch.detach(sweep_id, _registry(registry))


def sweep_retry(
    sweep_id: str,
    failed: bool = True,
    detach: bool = False,
    on_event: Callable[[str, RunRecord], None] | None = None,
    registry: Registry | None = None,
) -> list[RunRecord]:
    """Rerun the sweep's failed trials (and any left pending); returns the trials after."""
    registry = _registry(registry)
    sweep_requeue(sweep_id, failed, registry)
    if detach:
        sweep_detach(sweep_id, registry)
        return registry.trials(sweep_id)
    return sweep_dispatch(sweep_id, on_event, registry)


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

    registry = _registry(registry)
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
    path: str | None  # the cache folder (None: image chats, checked and not cached)
    hit: bool  # it was there already
    default_path: bool  # the config named no dataset_prepared_path
    lines: list[str]  # the data report, as a training run prints it
    rows: dict[str, Any]  # counts: in, kept, train, eval, tokens, skipped per reason...
    rate: str | None = None  # "tokenized N rows in Xs (R rows/s, P processes)"


class PayloadTraceback(Exception):
    """The traceback of an exception raised in a payload subprocess, as its text."""


def preprocess(source: str | Path, overrides: list[str] | None = None) -> PreprocessResult:
    """Validate the config, then tokenize its datasets into the prepared cache
    (`dataset_prepared_path`, else $FERRY_HOME/prepared) on this machine, or find them
    there. The work runs as `python -m payload preprocess` in a subprocess with this
    terminal (the launcher never imports the training stack); raises FerryError."""
    import json
    import subprocess
    import sys
    import tempfile

    import yaml

    from launcher.registry import ferry_home

    cfg = validate(source, overrides)
    with tempfile.TemporaryDirectory(prefix="ferry-preprocess-") as tmp:
        config = Path(tmp) / "config.yml"
        config.write_text(
            yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
        )
        result = Path(tmp) / "result.json"
        from payload.runtime.procs import child_environ

        env = {**child_environ(), "FERRY_HOME": str(ferry_home())}
        command = [sys.executable, "-m", "payload", "preprocess", str(config)]
        done = subprocess.run([*command, "--result", str(result)], env=env)
        data = json.loads(result.read_text()) if result.is_file() else None
    if data is None:
        raise FerryError(f"preprocess failed (exit {done.returncode}); see its messages above.")
    if "crash" in data:  # a bug in the payload: the CLI's crash log gets its traceback
        raise RuntimeError(f"python -m payload preprocess: {data['crash']}") from PayloadTraceback(
            data["traceback"]
        )
    if "error" in data:
        raise FerryError(data["error"], hint=data.get("hint"))
    return PreprocessResult(**data)


# ---- after training (payload/posttrain). Each takes a run id (its artifacts are pulled
# from storage if they are not here) or a config path (its output_dir holds the model).


def target(spec: Any, registry: Registry | None = None) -> Any:
    """The run or config `spec` names: its config and its trained model's folder
    (`payload.posttrain.target.Target`; one given is returned as it is)."""
    from payload.posttrain import target as targets

    if isinstance(spec, targets.Target):
        return spec
    if targets.looks_like_config(spec):
        return targets.from_config(spec)
    return targets.from_run(status(spec, registry))


def merge_lora(spec: Any, dest: str | Path | None = None) -> Any:
    """Merge the trained LoRA adapter into its base (de-quantized for QLoRA) and save one
    plain model with its tokenizer; returns where (`payload.posttrain.merge.Merged`)."""
    from payload.posttrain.merge import merge

    return merge(target(spec), dest)


def merge_sharded(spec: Any, checkpoint: int | None = None, dest: str | Path | None = None) -> Any:
    """Turn a sharded (DCP) checkpoint of an FSDP2 run, checkpoint-`checkpoint` or the
    newest, into a save_pretrained model (or peft adapter) folder; returns where
    (`payload.posttrain.sharded.MergedSharded`)."""
    from payload.posttrain import sharded
    from payload.posttrain.target import looks_like_config

    if isinstance(spec, (str, Path)) and looks_like_config(str(spec)):
        folder = sharded.from_config(str(spec), checkpoint)
    else:
        folder = sharded.from_run(status(spec), checkpoint)
    return sharded.merge(folder, dest)


def generator(spec: Any, sampling: Any = None) -> Any:
    """A loaded `payload.posttrain.inference.Generator` for the trained model:
    `.complete(prompt)` returns the completion's text and tokens. `sampling` is a
    `payload.posttrain.inference.Sampling` (default: greedy, 128 new tokens)."""
    from payload.posttrain.inference import Generator, Sampling

    sampling = sampling or Sampling()
    sampling.check()
    return Generator(target(spec), sampling)


def evaluate(spec: Any) -> Any:
    """Eval loss and perplexity of the trained model on the config's eval set."""
    from payload.posttrain.evaluate import evaluate as run_eval

    return run_eval(target(spec))


def quantize(spec: Any, dest: str | Path | None = None) -> Any:
    """torchao post-training quantization of the trained model (merged first if it is an
    adapter), saved and loadable with from_pretrained."""
    from payload.posttrain.quantize import quantize as run_quantize

    return run_quantize(target(spec), dest)
