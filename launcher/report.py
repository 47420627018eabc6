"""A sweep's answer: its trials ranked by a metric, and a plot of how they trained.

Metrics come from each trial's `metrics.jsonl` (read through `payload.storage`), so the
report does not care which backend ran a trial. matplotlib is imported only to draw the
PNG, and only if installed (`pip install 'ferry[report]'`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.registry import RunRecord
from launcher.sweeps import format_value
from payload.errors import FerryError
from payload.storage.layout import read_metrics


@dataclass
class Row:
    record: RunRecord
    final: float | None  # the metric's last logged value
    best: float | None  # its best value over the run
    steps: int
    wall_s: float | None
    curve: list[tuple[int, float]] = field(repr=False)  # (step, training loss)

    @property
    def index(self) -> int:
        return (self.record.trial or {}).get("index", 0)

    @property
    def values(self) -> dict[str, Any]:
        return (self.record.trial or {}).get("values", {})


@dataclass
class Report:
    sweep_id: str
    metric: str
    mode: str  # "min" or "max": which end is best
    varied: list[str]  # the keys whose values differ between trials, in sweep order
    rows: list[Row]  # ranked, best first; trials without the metric last

    @property
    def best(self) -> Row | None:
        return self.rows[0] if self.rows and self.rows[0].final is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep_id": self.sweep_id,
            "metric": self.metric,
            "mode": self.mode,
            "varied": self.varied,
            "trials": [
                {
                    "trial": row.index,
                    "run_id": row.record.run_id,
                    "name": (row.record.trial or {}).get("name"),
                    "values": row.values,
                    "state": row.record.state,
                    "backend": row.record.backend,
                    f"final_{self.metric}": row.final,
                    f"best_{self.metric}": row.best,
                    "steps": row.steps,
                    "wall_s": row.wall_s,
                }
                for row in self.rows
            ],
        }


def build(sweep_id: str, trials: list[RunRecord], metric: str | None, mode: str = "min") -> Report:
    """Rank the trials by `metric` (default: eval_loss if any trial evaluated, else loss)."""
    if mode not in ("min", "max"):
        raise FerryError(f"--mode must be min or max, got {mode!r}.")
    logs = {t.run_id: run_metrics(t) for t in trials}
    if metric is None:
        evaluated = any("eval_loss" in r for records in logs.values() for r in records)
        metric = "eval_loss" if evaluated else "loss"
    rows = []
    for trial in trials:
        records = logs[trial.run_id]
        series = [r[metric] for r in records if isinstance(r.get(metric), (int, float))]
        pick = min if mode == "min" else max
        wall = None
        if trial.started_at and trial.finished_at:
            wall = trial.finished_at - trial.started_at
        rows.append(
            Row(
                record=trial,
                final=series[-1] if series else None,
                best=pick(series) if series else None,
                steps=max((r.get("step", 0) for r in records), default=0),
                wall_s=wall,
                curve=[(r["step"], r["loss"]) for r in records if "loss" in r],
            )
        )
    if not any(row.final is not None for row in rows) and trials:
        names = sorted({k for records in logs.values() for r in records for k in r})
        raise FerryError(
            f"No trial of {sweep_id} logged `{metric}`.",
            hint=f"Metrics logged: {', '.join(names) or 'none yet'}.",
        )
    sign = 1 if mode == "min" else -1
    rows.sort(key=lambda r: (r.final is None, sign * (r.final or 0.0), r.index))
    return Report(sweep_id, metric, mode, varied_keys(trials), rows)


def run_metrics(trial: RunRecord) -> list[dict[str, Any]]:
    """A run's metrics.jsonl: from its output folder when that is on this machine, else
    from its storage (where a remote backend's runs keep it)."""
    if trial.output_dir and Path(trial.output_dir).is_dir():
        return read_metrics(trial.output_dir)
    if trial.storage_uri:
        from payload.storage import open_store
        from payload.storage.layout import METRICS_FILE

        data = open_store(trial.storage_uri).read_bytes(METRICS_FILE)
        if data:
            return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    return []


def varied_keys(trials: list[RunRecord]) -> list[str]:
    keys: list[str] = []
    for trial in trials:
        for key in (trial.trial or {}).get("values", {}):
            if key not in keys:
                keys.append(key)
    return [
        k
        for k in keys
        if len(
            {json.dumps((t.trial or {}).get("values", {}).get(k), sort_keys=True) for t in trials}
        )
        > 1
    ]


def write(report: Report, out_dir: Path) -> tuple[Path, Path | None]:
    """Write report.json and, if matplotlib is installed, report.png. Returns both paths
    (the PNG's is None without matplotlib)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "report.json"
    data.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    try:
        import matplotlib
    except ImportError:
        return data, None
    matplotlib.use("Agg")  # headless: no display needed
    png = out_dir / "report.png"
    _plot(report, png)
    return data, png


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _plot(report: Report, path: Path) -> None:
    import matplotlib.pyplot as plt

    panels = 1 + len(report.varied)
    fig, axes = plt.subplots(1, panels, figsize=(6 + 4 * (panels - 1), 4.5), squeeze=False)
    curves = axes[0][0]
    for row in sorted(report.rows, key=lambda r: r.index):
        if row.curve:
            steps, losses = zip(*row.curve, strict=True)
            label = f"t{row.index} {(row.record.trial or {}).get('name', '')}"
            width = 2.5 if row is report.best else 1.2
            curves.plot(steps, losses, label=label, linewidth=width)
    curves.set_title("training loss")
    curves.set_xlabel("step")
    curves.set_ylabel("loss")
    if len(report.rows) <= 12:
        curves.legend(fontsize=7)
    ranked = [r for r in report.rows if r.final is not None]
    for ax, key in zip(axes[0][1:], report.varied, strict=True):
        xs = [r.values.get(key) for r in ranked]
        ys = [r.final for r in ranked]
        if _numeric(xs):
            position = float
            spread = all(x > 0 for x in xs) and max(xs) / min(xs) >= 10
            if spread or (key.endswith("learning_rate") and all(x > 0 for x in xs)):
                ax.set_xscale("log")
                ax.minorticks_off()
            distinct = sorted(set(xs))
            if len(distinct) <= 8:  # label the values tried, not a generic scale
                ax.set_xticks(distinct, [format_value(float(v)) for v in distinct], fontsize=8)
        else:  # categories, in the order they first appear
            labels = list(dict.fromkeys(format_value(x) for x in xs))
            position = lambda x, labels=labels: labels.index(format_value(x))  # noqa: E731
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.scatter([position(x) for x in xs], ys)
        if report.best is not None:
            best = report.best
            ax.scatter(
                [position(best.values.get(key))],
                [best.final],
                marker="*",
                s=200,
                color="red",
                zorder=3,
            )
        ax.set_title(f"final {report.metric} vs {key}")
        ax.set_xlabel(key)
        ax.set_ylabel(report.metric)
    fig.suptitle(f"sweep {report.sweep_id}: {len(report.rows)} trials, best marked")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt_metric(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"
