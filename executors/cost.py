"""What a run will cost, said before it starts: the plan's `price` and `cost` rows, and
the check against `launch.max_cost`.

A backend that bills by the machine-hour says its hourly price per node
(`Executor.hourly_price`): SkyPilot from its optimizer's choice, Modal from the small
dated table below. The estimate is that price x nodes x hours, with two kinds of hours:

  - the timeout (`launch.timeout`): the most the run can cost;
  - the expected time: `max_steps` x the time per step measured by an earlier run of
    the same config on the same backend and machines (the registry keeps its summary).

A backend without a price (local, Ray: machines already paid for) has no estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Modal's list prices in USD per hour (modal.com/pricing, billed per second), as of
# MODAL_PRICES_DATE. H100, A100-80GB, L40S, L4 and T4 were checked against a published
# snapshot of that date; the others are the same page's per-second prices x 3600.
MODAL_PRICES_DATE = "2026-05-07"
MODAL_GPU_HOURLY = {
    "B200": 6.25,
    "H200": 4.54,
    "H100": 3.95,
    "A100-80GB": 2.50,
    "A100-40GB": 2.10,
    "A100": 2.10,  # Modal's "A100" is the 40 GB one
    "L40S": 1.95,
    "A10G": 1.10,
    "A10": 1.10,
    "L4": 0.80,
    "T4": 0.59,
}
MODAL_CPU_CORE_HOURLY = 0.0473  # a physical core
MODAL_MEMORY_GIB_HOURLY = 0.0080
MODAL_DEFAULT_CORES = 0.125  # what a function gets without `cpu=`
MODAL_DEFAULT_MEMORY_GIB = 0.125


def modal_hourly(
    accelerator: str | None, gpus: int, cpu: float | None, memory_mb: int | None
) -> float:
    """One Modal container's list price per hour: its GPUs, cores and memory."""
    price = (cpu or MODAL_DEFAULT_CORES) * MODAL_CPU_CORE_HOURLY
    price += ((memory_mb or 0) / 1024 or MODAL_DEFAULT_MEMORY_GIB) * MODAL_MEMORY_GIB_HOURLY
    if accelerator:
        price += MODAL_GPU_HOURLY[accelerator.upper()] * gpus
    return price


@dataclass(frozen=True)
class Estimate:
    per_node_hour: float | None  # None: unknown (`why` says so)
    source: str  # where the price comes from, or why there is none
    nodes: int
    timeout_h: float | None = None
    expected_h: float | None = None
    measured: str | None = None  # the earlier run the expected time comes from

    @property
    def hourly(self) -> float | None:
        return None if self.per_node_hour is None else self.per_node_hour * self.nodes

    @property
    def most(self) -> float | None:
        """The cost if the run goes to its timeout."""
        return (
            None if self.hourly is None or self.timeout_h is None else self.hourly * self.timeout_h
        )

    @property
    def expected(self) -> float | None:
        return (
            None
            if self.hourly is None or self.expected_h is None
            else self.hourly * self.expected_h
        )

    @property
    def checked(self) -> float | None:
        """The figure `launch.max_cost` is held against: the expected cost when an earlier
        run measured the step time, else the timeout's bound."""
        return self.expected if self.expected is not None else self.most

    def rows(self) -> list[tuple[str, str]]:
        if self.per_node_hour is None:
            return [("price", f"unknown: {self.source}")]
        rows = [("price", f"${self.per_node_hour:,.2f}/h per node ({self.source})")]
        parts = []
        if self.expected is not None:
            parts.append(
                f"about ${self.expected:,.2f} expected ({self.nodes} node(s) x "
                f"{self.expected_h:.2f} h: {self.measured})"
            )
        if self.most is not None:
            parts.append(
                f"at most ${self.most:,.2f} ({self.nodes} node(s) x the {self.timeout_h:g} h "
                "timeout)"
            )
        if not parts:
            parts.append(
                f"${self.hourly:,.2f} per hour of the run: no timeout bounds it (set "
                "`launch.timeout`)"
            )
        rows.append(("cost", "; ".join(parts)))
        return rows


def step_time(job: Any, backend: str, registry: Any, source: str) -> tuple[float, str] | None:
    """Seconds per step measured by the newest finished run of the same config (same
    source file) on the same backend and machines, with a description of it."""
    r = job.resources
    try:
        records = registry.list()
    except Exception:  # noqa: BLE001 - no registry yet: nothing measured
        return None
    for record in records:  # newest first
        summary = record.summary or {}
        steps = (summary.get("steps") or 0) - (summary.get("resumed_from_step") or 0)
        same = (
            record.backend == backend
            and record.name == job.name
            and record.source == source
            and (record.resources or {}).get("accelerator") == r.accelerator
            and (record.resources or {}).get("gpus_per_node") == r.gpus_per_node
            and (record.resources or {}).get("nodes") == r.nodes
        )
        if same and steps > 0 and summary.get("wall_s"):
            seconds = float(summary["wall_s"]) / steps
            return seconds, f"{seconds:.2f} s/step measured by run {record.run_id}"
    return None


def estimate(executor: Any, job: Any, registry: Any = None, source: str = "") -> Estimate | None:
    """The run's cost estimate, or None when the backend has no price at all."""
    price = executor.hourly_price(job)
    if price is None:
        return None
    r = job.resources
    limit = executor.timeout_s(job)  # Modal's own 24 h when none is set
    timeout_h = limit / 3600 if limit else None
    if isinstance(price, str):
        return Estimate(None, price, r.nodes, timeout_h)
    per_node, origin = price
    expected_h = measured = None
    max_steps = job.config.get("max_steps")
    if max_steps and registry is not None:
        found = step_time(job, executor.name, registry, source)
        if found:
            seconds, measured = found
            expected_h = int(max_steps) * seconds / 3600
            if timeout_h is not None:
                expected_h = min(expected_h, timeout_h)
    return Estimate(per_node, origin, r.nodes, timeout_h, expected_h, measured)


def over_limit(est: Estimate | None, max_cost: float | None) -> str | None:
    """Why this launch needs a yes under `max_cost` (None: it does not)."""
    if not max_cost or est is None:
        return None
    if est.per_node_hour is None:
        return (
            f"launch.max_cost is ${max_cost:,.2f}, but this run's price is unknown ({est.source})"
        )
    figure = est.checked
    if figure is None:
        return (
            f"launch.max_cost is ${max_cost:,.2f}, but nothing bounds this run's cost "
            f"(${est.hourly:,.2f} per hour, no timeout): set `launch.timeout`"
        )
    if figure > max_cost:
        what = "expected" if est.expected is not None else "at most (to its timeout)"
        return (
            f"this run's estimated cost, ${figure:,.2f} {what}, is above launch.max_cost "
            f"${max_cost:,.2f}"
        )
    return None
