"""How `launch` prints: errors as one red paragraph, runs as tables, next steps spelled out.

rich is imported on first use, not here: importing it costs ~40 ms, and `launch validate`
prints two plain lines.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from payload.errors import FerryError

if TYPE_CHECKING:
    # For annotations only: importing executors (and the storage code beneath it) here
    # would add ~10 ms to `launch validate`, which prints none of them.
    from rich.console import Console

    from executors import Plan
    from launcher.registry import RunRecord
    from payload.config import TrainConfig

STATE_STYLE = {
    "pending": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
    "preempted": "yellow",
}


@cache
def out() -> Console:
    from rich.console import Console

    # Piped output (scripts, CI logs) gets a wide page so that nothing, run ids least of
    # all, is cut to fit 80 columns.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


@cache
def err() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def error(e: FerryError) -> None:
    err().print(f"[bold red]error:[/] {escape(e.message)}")
    if e.hint:
        err().print(escape(e.hint))


def crash(doing: str, e: BaseException, log: Path | None) -> None:
    """An unexpected exception (a bug in Ferry) as one red paragraph: what was being
    done, the exception, and where its traceback is."""
    where = f"The traceback is in {log}" if log else "No crash log could be written"
    err().print(
        f"[bold red]error:[/] {escape(doing)} failed with {escape(type(e).__name__)}: "
        f"{escape(str(e))}\nThis is a bug in Ferry. {escape(where)}; please include it "
        "in a bug report (--debug or FERRY_DEBUG=1 prints it here)."
    )


def warning(message: str) -> None:
    err().print(f"[yellow]warning:[/] {escape(message)}")


def note(message: str) -> None:
    """A side remark (goes to stderr, away from a command's output)."""
    err().print(escape(message))


def say(message: str) -> None:
    """A command's own result, on stdout."""
    out().print(escape(message))


def confirm(question: str, yes: bool) -> None:
    """Ask on a terminal; without one, refuse unless --yes was given."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise FerryError(f"{question} Not asking without a terminal: pass --yes.")
    import typer

    if not typer.confirm(question, default=False):
        raise typer.Exit(1)


def validated(source: str, cfg: TrainConfig) -> None:
    import typer  # already loaded by the CLI; its styling is enough for two lines

    kind = f"{cfg.adapter} r={cfg.lora_r}" if cfg.adapter else "full fine-tune"
    data = ", ".join(f"{ds.type} {ds.path.rsplit('/', 1)[-1]}" for ds in cfg.datasets)
    length = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.num_epochs:g} epochs"
    typer.echo(typer.style("ok", fg="green") + f" {source} is valid")
    typer.echo(
        f"   {cfg.base_model} | {kind} | {data} | {length} | "
        f"lr {cfg.learning_rate:g} | batch {cfg.micro_batch_size}x{cfg.gradient_accumulation_steps}"
    )
    from payload.config.trackers import active

    for tracker in active(cfg):
        typer.echo(f"   reports to {tracker.describe()}")


def plan(p: Plan) -> None:
    out().print(f"[bold]dry run[/]: nothing was started\n{escape(p.text())}")


def _next_steps(run_id: str) -> str:
    return f"launch logs {run_id} -f | launch status {run_id} | launch cancel {run_id}"


def submitted(record: RunRecord, detach: bool) -> None:
    again = f", attempt {record.attempts}" if record.attempts > 1 else ""
    out().print(f"[bold]run[/] {record.run_id} ({record.backend}{again}) submitted")
    if record.storage_uri:
        out().print(f"   storage: {escape(record.storage_uri)}")
    if detach:
        out().print(f"   next: {_next_steps(record.run_id)}")


def log_line(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _loss(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("final_loss") is None:
        return "-"
    return f"{summary['final_loss']:.4f}"


def finished(record: RunRecord) -> None:
    style = STATE_STYLE.get(record.state, "white")
    took = _duration(record.updated_at - record.created_at)
    out().print(f"\n[bold {style}]{record.state}[/] {record.run_id} in {took}")
    if record.detail:
        out().print(f"   {escape(record.detail)}")
    s = record.summary or {}
    if s.get("final_loss") is not None:
        first, final = s["first_loss"], s["final_loss"]
        # A policy-gradient loss (GRPO) starts at 0: no relative change to show.
        change = f", {(final - first) / first:+.0%}" if first else ""
        out().print(f"   final loss  {final:.4f} (first {first:.4f}{change})")
    if progress := s.get("progress"):  # the objective's own measure: GRPO's reward, ...
        name = f"final {progress['metric']}".ljust(11)
        out().print(f"   {name} {progress['final']:.4f} (first {progress['first']:.4f})")
    if record.output_dir and Path(record.output_dir).exists():
        out().print(f"   artifacts   {escape(record.output_dir)}")
    if record.storage_uri:
        out().print(f"   storage     {escape(record.storage_uri)}")
    out().print(f"   logs        {escape(record.run_dir)}/train.log")
    nxt = [f"launch status {record.run_id}", f"launch logs {record.run_id}"]
    if record.state == "succeeded" and record.storage_uri:
        nxt.append(f"launch pull {record.run_id}")
    if record.state in ("failed", "cancelled", "preempted"):
        nxt.append(f"launch resume {record.run_id}")
    out().print("   next        " + " | ".join(nxt))


def cancelled(record: RunRecord) -> None:
    style = STATE_STYLE.get(record.state, "white")
    out().print(f"[{style}]{record.state}[/] {record.run_id}")


def _resources(res: dict[str, Any]) -> str:
    """`2`, `H100:8`, `2 nodes x H100:8`."""
    per_node = str(res.get("gpus_per_node", 1))
    if res.get("accelerator"):
        per_node = f"{res['accelerator']}:{per_node}"
    nodes = res.get("nodes", 1)
    return per_node if nodes == 1 else f"{nodes} nodes x {per_node}"


def runs_table(records: list[RunRecord]) -> None:
    if not records:
        out().print("No runs yet. Start one with: launch train examples/quickstart.yml")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("RUN ID", no_wrap=True, min_width=max(len(r.run_id) for r in records))
    for column in ("STATE", "BACKEND", "RESOURCES", "STARTED", "DURATION", "LOSS"):
        table.add_column(column, no_wrap=True)
    now = time.time()
    for r in records:
        end = r.updated_at if r.state not in ("pending", "running") else now
        table.add_row(
            r.run_id,
            f"[{STATE_STYLE.get(r.state, 'white')}]{r.state}[/]",
            r.backend,
            _resources(r.resources),
            datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M"),
            _duration(end - r.created_at),
            _loss(r.summary),
        )
    out().print(table)


def run_details(r: RunRecord) -> None:
    rows = [
        ("run id", r.run_id),
        ("state", f"[{STATE_STYLE.get(r.state, 'white')}]{r.state}[/]"),
        ("backend", r.backend),
        ("config", escape(r.source)),
        ("started", datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M:%S")),
        ("updated", datetime.fromtimestamp(r.updated_at).strftime("%Y-%m-%d %H:%M:%S")),
        ("run folder", escape(r.run_dir)),
        ("output", escape(r.output_dir or "-")),
    ]
    if r.detail:
        rows.append(("detail", escape(r.detail)))
    for key, value in (r.summary or {}).items():
        if key in (
            "first_loss",
            "final_loss",
            "final_eval_loss",
            "steps",
            "tokens_per_s",
            "wall_s",
        ):
            rows.append((key.replace("_", " "), escape(str(value))))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        out().print(f"{key.ljust(width)}  {value}")


# ---- sweeps


def _trial_label(record: RunRecord) -> str:
    trial = record.trial or {}
    return f"t{trial.get('index')} ({trial.get('name')})"


def sweep_dry_run(plan: Any, cost: tuple[float | None, str] = (0.0, "")) -> None:
    """The trials and each one's plan; `cost` is `api.sweep_cost`'s (total, how)."""
    from rich.table import Table

    out().print(
        f"[bold]dry run[/]: sweep {plan.sweep_id} would run {len(plan.trials)} trials, "
        f"at most {plan.max_parallel} at a time on each of: {', '.join(plan.backends)}"
    )
    total, how = cost
    if how:
        out().print(f"cost: {escape(how)}" if total is not None else f"cost unknown: {escape(how)}")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("TRIAL", "NAME", "RUN ID", "BACKEND"):
        table.add_column(column, no_wrap=True)
    for trial, job in zip(plan.trials, plan.jobs, strict=True):
        table.add_row(
            f"t{trial.index}", escape(trial.name), job.run_id, plan.backend_for(trial.index)
        )
    out().print(table)
    from executors import get_executor

    for trial, job in zip(plan.trials, plan.jobs, strict=True):
        backend = plan.backend_for(trial.index)
        out().print(f"\n[bold]t{trial.index}[/] {escape(trial.name)}")
        out().print(escape(get_executor(backend).plan(job).text()))


def sweep_started(sweep: Any, trials: int, detach: bool) -> None:
    out().print(
        f"[bold]sweep[/] {sweep.sweep_id}: {trials} trials, at most {sweep.max_parallel} "
        f"at a time on {', '.join(sweep.backends)}"
    )
    if detach:
        out().print(
            f"   next: launch sweep status {sweep.sweep_id} --watch | "
            f"launch sweep report {sweep.sweep_id} | launch sweep cancel {sweep.sweep_id}"
        )


def sweep_event(kind: str, record: RunRecord) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    label = escape(_trial_label(record))
    if kind == "submitted":
        out().print(f"{stamp} {label} started on {record.backend}: {record.run_id}")
    elif kind == "retrying":
        out().print(f"{stamp} {label} [yellow]{escape(record.detail or 'retrying')}[/]")
    else:
        style = STATE_STYLE.get(record.state, "white")
        loss = _loss(record.summary)
        extra = f" loss {loss}" if loss != "-" else ""
        reason = (
            f": {escape(record.detail)}" if record.detail and record.state != "succeeded" else ""
        )
        out().print(f"{stamp} {label} [{style}]{record.state}[/]{extra}{reason}")


def sweep_summary(sweep: Any, trials: list[RunRecord]) -> None:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    out().print(f"\n[bold]sweep {sweep.sweep_id}[/] ({sweep.state}): {len(trials)} trials, {parts}")
    failed = [t for t in trials if t.state == "failed"]
    for t in failed:
        out().print(f"   [red]failed[/] {escape(_trial_label(t))}: {escape(t.detail or '?')}")
    nxt = [f"launch sweep report {sweep.sweep_id}", f"launch sweep status {sweep.sweep_id}"]
    if failed:
        nxt.append(f"launch sweep retry {sweep.sweep_id} --failed")
    out().print("   next: " + " | ".join(nxt))


def sweep_trials_table(trials: list[RunRecord]) -> Any:
    from rich.table import Table

    from payload.storage.layout import read_metrics

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("TRIAL", "NAME", "STATE", "BACKEND", "STEP", "LOSS", "DURATION"):
        table.add_column(column, no_wrap=column != "NAME")
    now = time.time()
    for t in trials:
        records = read_metrics(t.output_dir) if t.output_dir else []
        losses = [r for r in records if "loss" in r]
        end = t.finished_at or now
        table.add_row(
            f"t{(t.trial or {}).get('index')}",
            escape((t.trial or {}).get("name", "")),
            f"[{STATE_STYLE.get(t.state, 'white')}]{t.state}[/]",
            t.backend or "-",
            str(losses[-1]["step"]) if losses else "-",
            f"{losses[-1]['loss']:.4f}" if losses else "-",
            _duration(end - t.started_at) if t.started_at else "-",
        )
    return table


def sweep_status(sweep_id: str, watch: bool) -> None:
    from launcher import api
    from launcher.dispatch import dispatcher_alive

    def render() -> Any:
        from rich.console import Group
        from rich.text import Text

        sweep, trials = api.sweep_status(sweep_id)
        head = f"sweep {sweep.sweep_id} ({sweep.state}), {len(trials)} trials"
        if sweep.state == "running" and sweep.dispatcher and not dispatcher_alive(sweep):
            head += " - its dispatcher has stopped; `launch sweep retry` resumes it"
        return sweep, Group(Text(head, style="bold"), sweep_trials_table(trials))

    sweep, view = render()
    if not watch or sweep.state != "running":
        out().print(view)
        return
    from rich.live import Live

    with Live(view, console=out(), refresh_per_second=1) as live:
        while sweep.state == "running":
            time.sleep(2)
            sweep, view = render()
            live.update(view)


def sweep_report(report: Any, data: Path, png: Path | None) -> None:
    from rich.table import Table

    from launcher.report import fmt_metric
    from launcher.sweeps import format_value

    table = Table(
        box=None,
        header_style="bold",
        pad_edge=False,
        title=f"sweep {report.sweep_id} by {report.metric} ({report.mode})",
        title_justify="left",
    )
    table.add_column("", no_wrap=True)
    table.add_column("TRIAL", no_wrap=True)
    for key in report.varied:
        table.add_column(key.upper(), no_wrap=True)
    for column in (f"FINAL {report.metric.upper()}", "BEST", "STEPS", "WALL", "BACKEND", "STATE"):
        table.add_column(column, no_wrap=True)
    for row in report.rows:
        table.add_row(
            "*" if row is report.best else "",
            f"t{row.index}",
            *(escape(format_value(row.values.get(k))) for k in report.varied),
            fmt_metric(row.final),
            fmt_metric(row.best),
            str(row.steps),
            _duration(row.wall_s) if row.wall_s is not None else "-",
            row.record.backend or "-",
            row.record.state,
        )
    out().print(table)
    if report.best is not None:
        out().print(
            f"best: t{report.best.index} ({escape(report.best.record.trial['name'])}) "
            f"{report.metric} {fmt_metric(report.best.final)}, "
            f"output {escape(report.best.record.output_dir or '-')}"
        )
    out().print(f"report: {escape(str(data))}")
    if png:
        out().print(f"plot:   {escape(str(png))}")
    else:
        warning("no plot: matplotlib is not installed (pip install 'ferry[report]').")


def pulled(plan: Any, pull: Any) -> None:
    """Download with a progress bar (bytes, rate, ETA), then say where everything went."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err(),
    ) as bar:
        task = bar.add_task(f"pull {plan.run_id}", total=plan.total_bytes)
        targets = pull(plan, progress=lambda n: bar.advance(task, n))
    for (prefix, _, manifest), target in zip(plan.items, targets, strict=True):
        out().print(
            f"[green]ok[/] {escape(plan.store.child(prefix))} -> {escape(str(target))} "
            f"({len(manifest.files)} files, {manifest.total_bytes:,} bytes, verified)"
        )
