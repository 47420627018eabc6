"""Seconds to expand and validate a 10,000-trial sweep of the quickstart, against the
same number of plain config validations measured in the same run.

    python bench/sweep_expand.py

The grid is learning_rate x lora_r x seed x warmup_steps (10 values each). Expansion,
applying each trial's values to the base config, full validation (keys, values, rules,
files) and building each trial's JobSpec are all counted; nothing is written.
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


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from launcher import api
    from payload.config import validate_mapping
    from payload.config.loader import read_raw

    config = ROOT / "examples" / "quickstart.yml"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FERRY_HOME"] = tmp
        grid = Path(tmp) / "grid.yml"
        grid.write_text(yaml.safe_dump(GRID))

        start = time.perf_counter()
        plan = api.sweep_plan(config, grid, max_trials=10_000)
        sweep_s = time.perf_counter() - start
        assert len(plan.jobs) == 10_000

        raw = read_raw(config)
        start = time.perf_counter()
        for _ in range(10_000):
            validate_mapping(dict(raw), "bench", base_dir=config.parent)
        baseline_s = time.perf_counter() - start

    print(f"10,000 trials expanded and validated: {sweep_s:.2f} s")
    print(f"10,000 plain validations (baseline):  {baseline_s:.2f} s")
    print(f"RESULT sweep_expand_10k_s {sweep_s:.3f} s")
    print(f"RESULT sweep_expand_vs_plain_validation {sweep_s / baseline_s:.2f} x")


if __name__ == "__main__":
    main()
