"""How fast `launch` answers: median wall time of `launch --help` and of
`launch validate examples/quickstart.yml`, each against bare interpreter start-up
(`python -c pass`) measured in the same run.

    python bench/cli_startup.py [--runs 21]

Bytecode caching is left on (PYTHONDONTWRITEBYTECODE is removed for the children) and
two warm-up runs come first, so the figure is what a user sees on the second call, not
the one-off cost of compiling Ferry's modules.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch_command() -> list[str]:
    script = Path(sys.executable).with_name("launch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "launcher"]


def median_wall(cmd: list[str], runs: int, env: dict[str, str]) -> float:
    for _ in range(2):
        subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, check=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("FERRY_HOME", str(ROOT / ".ferry-bench"))

    python = median_wall([sys.executable, "-c", "pass"], args.runs, env)
    help_s = median_wall([*launch_command(), "--help"], args.runs, env)
    validate_s = median_wall(
        [*launch_command(), "validate", "examples/quickstart.yml"], args.runs, env
    )

    print(f"python -c pass (baseline): {python:.3f} s")
    print(f"launch --help:             {help_s:.3f} s ({help_s / python:.1f}x baseline)")
    print(f"launch validate:           {validate_s:.3f} s ({validate_s / python:.1f}x baseline)")
    print(f"RESULT cli_help_s {help_s:.3f} s")
    print(f"RESULT cli_validate_s {validate_s:.3f} s")
    print(f"RESULT cli_help_vs_python {help_s / python:.2f} x")
    print(f"RESULT cli_validate_vs_python {validate_s / python:.2f} x")


if __name__ == "__main__":
    main()
