"""Helpers shared by the tests: repository paths and a runner for the real `launch` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yml"
ASSETS = ROOT / "examples" / "assets"
DATA = ROOT / "examples" / "data" / "alpaca_tiny.jsonl"
# Two ranks, 24 steps, no periodic checkpoint: the preemption tests' run (the quickstart
# with these keys on top), and the reference they must reproduce.
TWO_RANK_RUN = (
    "max_steps: 24\nnum_epochs: null\nsave_steps: 1000\nlogging_steps: 1\nwarmup_steps: 2\n"
)


# The default tier runs on CPU on every machine: tests/conftest.py hides CUDA devices
# (CUDA_VISIBLE_DEVICES="") so that the pinned CPU losses and the gloo ranks hold on a GPU
# host too. GPU tests hand the host's devices back to their runs with `gpu_env()`.
HOST_CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")


# Recognisable secrets planted in every test's environment (tests/conftest.py): what a
# user has exported. After each test, every file it left (FERRY_HOME, run folders,
# storage) and every `launch` output it captured is scanned for them (`planted_leaks`).
PLANTED = {
    "HF_TOKEN": "hf_ferryPlantedSecret0hf",
    "WANDB_API_KEY": "ferryPlantedSecret1wandb",
    "AWS_SECRET_ACCESS_KEY": "ferryPlantedSecret2aws",  # set by the S3 fixtures
    "MODAL_TOKEN_SECRET": "as-ferryPlantedSecret3modal",  # set by the Modal tests
}
LAUNCH_OUTPUTS: list[str] = []  # stdout and stderr of each `launch` since the test began


def planted_leaks(roots: list[Path], texts: list[str], objects: dict[str, bytes]) -> list[str]:
    """Where any planted secret value appears: files under `roots`, `texts` (captured
    output) and `objects` (storage keys -> bytes). Empty when nothing leaked."""
    needles = {name: value.encode() for name, value in PLANTED.items()}
    found = []

    def check(where: str, data: bytes) -> None:
        found.extend(f"{name} in {where}" for name, needle in needles.items() if needle in data)

    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                try:
                    check(str(path), path.read_bytes())
                except OSError:
                    continue
    for i, text in enumerate(texts):
        check(f"the output of launch call {i + 1}", text.encode())
    for key, data in objects.items():
        check(f"storage object {key}", data)
    return found


def assert_no_planted_leaks(
    roots: list[Path], texts: list[str], objects: dict[str, bytes] | None = None
) -> None:
    leaks = planted_leaks(roots, texts, objects or {})
    assert not leaks, "planted secret values leaked: " + "; ".join(leaks)


def gpu_env() -> dict[str, str | None]:
    """Environment for a subprocess that should see the host's GPUs (None: unset)."""
    return {"CUDA_VISIBLE_DEVICES": HOST_CUDA_VISIBLE_DEVICES}


def launch_command() -> list[str]:
    script = Path(sys.executable).with_name("launch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "launcher"]


def launch(
    *args: str,
    env: dict[str, str | None] | None = None,
    timeout: float = 300,
    cwd: Path = ROOT,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the real `launch` CLI in a subprocess and capture its output (an `env` value of
    None removes that variable)."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    proc = subprocess.Popen(
        [*launch_command(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,  # no terminal: a prompt is never waited on
        text=True,
        env=full_env,
        cwd=cwd,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The run's supervisor, torchrun and its ranks live in sessions of their own: stop
        # them all, or a hung run outlives its test and loads the machine.
        _kill_tree(proc.pid)
        proc.communicate()
        raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    LAUNCH_OUTPUTS.append(stdout + stderr)
    if check and result.returncode != 0:
        raise AssertionError(
            f"launch {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def _kill_tree(pid: int) -> None:
    import contextlib
    import signal

    from payload.runtime.procs import process_tree

    for child in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def tiny_run(steps: int, **extra) -> dict:
    """A seeded fp32 fine-tune of the tiny Llama on the tiny alpaca rows for `steps`
    steps, logging every step, no checkpoints: the base the distributed tests (FSDP2,
    DeepSpeed, context and tensor parallel, sharded checkpoints) put their keys on."""
    return {
        "base_model": str(ASSETS / "tiny-llama"),
        "datasets": [{"path": str(DATA), "type": "alpaca"}],
        "sequence_len": 128,
        "max_steps": steps,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "seed": 42,
        "logging_steps": 1,
        "save_strategy": "no",
        **extra,
    }


def quickstart_config(tmp_path: Path, extra: str = "", name: str = "quickstart.yml") -> Path:
    """A copy of the quickstart, anywhere, with absolute paths; the keys in `extra` (YAML)
    are set on top, replacing the quickstart's own."""
    import yaml

    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["base_model"] = str(ASSETS / "tiny-llama")
    raw["datasets"][0]["path"] = str(DATA)
    raw.update(yaml.safe_load(extra) or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_folder(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """A checkpoint-like folder: files of the given sizes with reproducible contents."""
    import random

    rng = random.Random(seed)
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    return root


def plan_row(plan_text: str, key: str) -> str | None:
    """The value of one row of a printed plan (`key   value`), whatever the column width."""
    import re

    match = re.search(rf"^{re.escape(key)}\s{{2,}}(.*)$", plan_text, re.M)
    return match.group(1) if match else None


def tiny_config(datasets: list[dict], **extra):
    """A validated config on the bundled tiny model with these datasets and keys."""
    from payload.config import validate_mapping

    raw = {"base_model": str(ASSETS / "tiny-llama"), "learning_rate": 1e-4}
    return validate_mapping({**raw, "datasets": datasets, **extra})


def write_jsonl(path: Path, rows: list) -> str:
    """`rows` as a jsonl file at `path` (folders made); its path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def trained_runs(tokenizer, out) -> list[str]:
    """The trained tokens of a tokenized row as strings, one per run of consecutive
    labelled tokens (a label is always its own token)."""
    from payload.data.core import IGNORE

    found, current = [], []
    for token, label in zip(out["input_ids"], out["labels"], strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            found.append(tokenizer.decode(current))
            current = []
    return found + ([tokenizer.decode(current)] if current else [])


BLOCKER = textwrap.dedent(
    '''
    """Loaded as sitecustomize: any import of a heavy module fails loudly.

    find_spec still answers (so "is the training stack installed?" checks work), but
    actually importing the module raises and leaves a mark on stderr.
    """
    import importlib.abc, importlib.machinery, sys

    BLOCKED = {"torch", "transformers", "peft", "trl", "accelerate", "datasets", "ray",
               "sky", "modal", "boto3", "botocore", "deepspeed", "bitsandbytes", "triton",
               "liger_kernel", "cut_cross_entropy"}

    class _Loader(importlib.abc.Loader):
        def create_module(self, spec):
            sys.stderr.write(f"BLOCKED-IMPORT {spec.name}\\n")
            raise ImportError(f"blocked import: {spec.name}")

        def exec_module(self, module):
            pass

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, _Loader())
            return None

    sys.meta_path.insert(0, _Finder())
    '''
)


def run_probe(code: str, *args: str, timeout: float = 900) -> dict:
    """Run `code` in a fresh Python (a process whose imports, Triton's interpreter say,
    the test process must not share) and return the JSON it prints after `PROBE `."""
    import json

    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))


def train_losses(folder: Path, extra: str, timeout: float = 900) -> tuple[str, list[float]]:
    """`launch train` of the quickstart with `extra` keys, in a FERRY_HOME of its own under
    `folder`: the run's stdout and its per-step losses."""
    import json

    from payload.storage.layout import read_metrics

    folder.mkdir(parents=True, exist_ok=True)
    cfg = quickstart_config(folder, extra)
    env = {"FERRY_HOME": str(folder / "home")}
    done = launch("train", str(cfg), env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    return done.stdout, [r["loss"] for r in read_metrics(run["output_dir"]) if "loss" in r]
