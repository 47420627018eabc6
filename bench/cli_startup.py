"""How fast `launch` answers: median wall time of `launch --help` and of
`launch validate examples/quickstart.yml`, against two baselines measured in the same run.

    python bench/cli_startup.py [--runs 21]

What each command does (every one is a new process of this interpreter):

- `python -c pass`: interpreter start-up and nothing else.
- `python -c "import typer, yaml, pydantic, rich"` (the imports baseline): start-up plus
  the top-level modules of the four libraries the CLI is built on. `import pydantic`
  alone is lazy: it loads pydantic-core but not `BaseModel` (pydantic.main and its
  schema generator), which the first model class imports; that part is on validate's
  side, as is the `importlib.metadata` scan pydantic makes for plugins when it builds
  the first model. rich is imported here but not by `launch validate`.
- `launch --help`: start-up, typer and Ferry's CLI module, building the command group,
  printing the help.
- `launch validate examples/quickstart.yml`: start-up, typer, yaml, pydantic-core,
  Ferry's config modules, TrainConfig's compiled schema read from its cache file
  (payload.config.compiled; the first warm-up run builds it), reading and validating the
  config (keys, values, cross-key rules, the files it names), two printed lines.
- The same with the cache file removed before each run (`cli_validate_cold_s`): what the
  first validate after installing or changing Ferry costs, pydantic's model machinery
  and the models built, then compiled and written.

- `python -c "<the imports>; from pydantic import BaseModel; import importlib.metadata"`
  (the model-imports baseline): the imports baseline plus what pydantic loads for its
  first model class (pydantic.main and its schema machinery, and importlib.metadata for
  its plugin scan), so that what validate adds to it is Ferry's own work: its modules,
  building its models, the CLI, reading and checking the config.

`cli_validate_vs_imports` is validate's time over the imports baseline's (1.0 would mean
Ferry and pydantic's model building cost nothing);
`cli_validate_vs_imports_with_pydantic_models` the same against the model-imports baseline.

Bytecode caching is left on (PYTHONDONTWRITEBYTECODE is removed for the children) and
every command gets two warm-up runs, so the figure is what a user sees on the second
call, not the one-off cost of compiling modules. Runs are interleaved (one of each
command per round), so a change in the machine's load during the run moves every
median alike and leaves the ratios fair.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = "import typer, yaml, pydantic, rich"
# The same, with pydantic's model machinery loaded as a first model class loads it.
MODEL_IMPORTS = IMPORTS + "; from pydantic import BaseModel; import importlib.metadata"


def launch_command() -> list[str]:
    script = Path(sys.executable).with_name("launch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "launcher"]


def median_walls(
    cmds: dict[str, list[str]], runs: int, env: dict[str, str], cold: dict[str, Path]
) -> dict[str, float]:
    """Median wall seconds of each command: two warm-up runs each, then `runs` rounds.
    A command named in `cold` runs with that folder as FERRY_HOME, its cache removed first
    (outside the timing)."""

    def once(name: str, cmd: list[str]) -> float:
        run_env = env
        if name in cold:
            shutil.rmtree(cold[name] / "cache", ignore_errors=True)
            run_env = {**env, "FERRY_HOME": str(cold[name])}
        start = time.perf_counter()
        subprocess.run(cmd, env=run_env, cwd=ROOT, capture_output=True, check=True)
        return time.perf_counter() - start

    for name, cmd in cmds.items():
        for _ in range(2):
            once(name, cmd)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(runs):
        for name, cmd in cmds.items():
            times[name].append(once(name, cmd))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("FERRY_HOME", str(ROOT / ".ferry-bench"))

    medians = median_walls(
        {
            "python": [sys.executable, "-c", "pass"],
            "imports": [sys.executable, "-c", IMPORTS],
            "model_imports": [sys.executable, "-c", MODEL_IMPORTS],
            "help": [*launch_command(), "--help"],
            "validate": [*launch_command(), "validate", "examples/quickstart.yml"],
            "validate_cold": [*launch_command(), "validate", "examples/quickstart.yml"],
        },
        args.runs,
        env,
        cold={"validate_cold": Path(env["FERRY_HOME"]) / "cold"},
    )
    python, imports = medians["python"], medians["imports"]
    help_s, validate_s = medians["help"], medians["validate"]

    print(f"python -c pass (baseline): {python:.3f} s")
    print(f"python -c '{IMPORTS}': {imports:.3f} s ({imports / python:.1f}x baseline)")
    print(f"launch --help:             {help_s:.3f} s ({help_s / python:.1f}x baseline)")
    print(
        f"launch validate:           {validate_s:.3f} s ({validate_s / python:.1f}x baseline, "
        f"{validate_s / imports:.2f}x the imports)"
    )
    print(f"RESULT cli_help_s {help_s:.3f} s")
    print(f"RESULT cli_validate_s {validate_s:.3f} s")
    print(f"RESULT cli_help_vs_python {help_s / python:.2f} x")
    print(f"RESULT cli_validate_vs_python {validate_s / python:.2f} x")
    print(f"RESULT cli_validate_vs_imports {validate_s / imports:.2f} x")
    model_imports = medians["model_imports"]
    print(f"RESULT imports_with_pydantic_models_s {model_imports:.3f} s")
    print(f"RESULT cli_validate_vs_imports_with_pydantic_models {validate_s / model_imports:.2f} x")
    print(f"RESULT cli_validate_cold_s {medians['validate_cold']:.3f} s")


if __name__ == "__main__":
    main()
