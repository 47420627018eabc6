"""Seconds to expand and validate a 10,000-trial sweep of the quickstart, against the
same number of plain config validations measured in the same run.

    python bench/sweep_expand.py

Sweep side: `launcher.api.sweep_plan` on a learning_rate x lora_r x seed x warmup_steps
grid (10 values each): expansion, each trial's values applied to the base config, full
validation (keys, values, rules, files), each trial's JobSpec and the local backend's
checks; nothing is written. It looks files up inside `paths.memoized()` (each path once).

Baseline: 10,000 `validate_mapping` calls on the base config, also inside
`paths.memoized()`, so both sides pay for file lookups the same way. The baseline does
less (no expansion, no JobSpec, no backend check): the ratio is what those cost on top
of validation, and it is above 1 by construction.

Both sides run in this process after the imports; each is timed twice, alternating, and
the best of the two counts.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GRID = {
    "learning_rate": [round(1e-4 * (i + 1), 6) for i in range(10)],
    "lora_r": [4 * (i + 1) for i in range(10)],
    "seed": list(range(10)),
    "warmup_steps": list(range(10)),
}


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _list(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from launcher import api
    from payload.config import paths, validate_mapping
    from payload.config.loader import read_raw

    config = ROOT / "examples" / "quickstart.yml"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FERRY_HOME"] = tmp
        grid = Path(tmp) / "grid.yml"
        grid.write_text(yaml.safe_dump(GRID))
        raw = read_raw(config)

        def sweep() -> None:
            plan = api.sweep_plan(config, grid, max_trials=10_000)
            assert len(plan.jobs) == 10_000

        def plain() -> None:
            with paths.memoized():  # the same memo the sweep validates under
                for _ in range(10_000):
                    validate_mapping(dict(raw), "bench", base_dir=config.parent)

        sweeps, plains = [], []
        for _ in range(2):
            sweeps.append(timed(sweep))
            plains.append(timed(plain))
        sweep_s, baseline_s = min(sweeps), min(plains)

    print(f"10,000 trials expanded and validated: {sweep_s:.2f} s  (runs: {_list(sweeps)})")
    print(f"10,000 plain validations, same memo:  {baseline_s:.2f} s  (runs: {_list(plains)})")
    print(f"RESULT sweep_expand_10k_s {sweep_s:.3f} s")
    print(f"RESULT sweep_expand_vs_plain_validation {sweep_s / baseline_s:.2f} x")


if __name__ == "__main__":
    main()
