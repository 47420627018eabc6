"""Config fuzzing: mutated real configs through validation; any crash is a bug.

    python bench/fuzz_config.py [N] [--seed S] [--cli K]

Starts from the shipped configs (examples/*.yml) and an Axolotl-style config, and
mutates each draw: keys dropped, renamed (typos), values swapped between keys, odd values
(None, huge ints, nan/inf, negatives, empty and 300-character strings, NUL bytes, lone
surrogates, lists where scalars belong, nested mappings, booleans) and long or NUL path
values. Each mutated config goes through `validate_mapping` in-process; K of them (default
20) also go through `launch validate` as YAML files. An outcome is `accepted` (it
validated), `error` (a clean FerryError/ConfigError) or `crash` (anything else: a bug).
Prints the counts, the first example of each crash class, and `RESULT fuzz_config_crashes N`.
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from payload.config import validate_mapping  # noqa: E402
from payload.errors import FerryError  # noqa: E402

EXAMPLES = ROOT / "examples"

# An Axolotl-style config beside the shipped ones: more keys, more nesting.
AXOLOTL_STYLE: dict[str, Any] = {
    "base_model": "assets/tiny-llama",
    "base_model_config": "assets/tiny-llama",
    "tokenizer_config": "assets/tiny-llama",
    "chat_template": "jinja",
    "chat_template_jinja": "templates/chat.jinja",
    "datasets": [
        {
            "path": "data/chat_tiny.jsonl",
            "type": "chat_template",
            "field_messages": "conversations",
            "roles_to_train": ["assistant"],
            "train_on_eos": "turn",
        },
        {"path": "s3://bucket/data/", "type": "alpaca", "data_files": ["train.jsonl"]},
    ],
    "test_datasets": [{"path": "data/alpaca_tiny.jsonl", "type": "alpaca", "split": "train"}],
    "dataset_prepared_path": "prepared",
    "output_dir": "./outputs/lora-out",
    "storage": "s3://bucket/runs",
    "resume_from_checkpoint": "./outputs/lora-out/checkpoint-10",
    "deepspeed": "deepspeed_configs/zero2.json",
    "sequence_len": 1024,
    "sample_packing": True,
    "eval_sample_packing": False,
    "adapter": "qlora",
    "load_in_4bit": True,
    "lora_r": 32,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "v_proj"],
    "gradient_accumulation_steps": 4,
    "micro_batch_size": 2,
    "num_epochs": 1,
    "max_steps": 100,
    "optimizer": "paged_adamw_8bit",
    "lr_scheduler": "cosine",
    "learning_rate": 0.0002,
    "bf16": "auto",
    "tf32": False,
    "gradient_checkpointing": True,
    "flash_attention": True,
    "warmup_ratio": 0.1,
    "evals_per_epoch": 4,
    "saves_per_epoch": 1,
    "weight_decay": 0.0,
    "special_tokens": {"pad_token": "<|end_of_text|>"},
    "fsdp_config": {"reshard_after_forward": True},
    "launch": {
        "gpus": "A100:2",
        "cloud": "modal",
        "secrets": ["hf-token"],
        "env": {"WANDB_PROJECT": "x"},
        "timeout": 3600,
        "image": {"pip": ["einops"]},
    },
}

PATH_KEYS = [
    "base_model",
    "base_model_config",
    "tokenizer_config",
    "chat_template_jinja",
    "deepspeed",
    "resume_from_checkpoint",
    "output_dir",
    "dataset_prepared_path",
    "storage",
]


def seeds() -> list[dict[str, Any]]:
    configs = [yaml.safe_load(p.read_text()) for p in sorted(EXAMPLES.glob("*.yml"))]
    return [*configs, AXOLOTL_STYLE]


def odd_values(rng: random.Random) -> list[Any]:
    return [
        None,
        10**30,
        -(10**30),
        2**63,
        float("nan"),
        float("inf"),
        float("-inf"),
        -1,
        0,
        -0.5,
        "",
        " ",
        "x" * 300,
        "a/" * 200 + "b",
        "/" + "d" * 300 + "/model",
        "./" + "n" * 260 + ".jsonl",
        "bad\x00value",
        "./data/\x00.jsonl",
        "\udcff\udcfe",
        "caf\udce9.jsonl",
        "s3://",
        "s3://bucket/\x00",
        "file://relative",
        "volume://",
        "~" + "u" * 300,
        "/",
        ".",
        "/dev/null",
        "/etc",
        "{{ bad jinja",
        [],
        [1, 2, 3],
        [None],
        [{"a": 1}],
        {},
        {"nested": {"deep": [1, {"x": None}]}},
        True,
        False,
        1.5e308,
        "1e-4",
        rng.randint(-5, 5),
        "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(1, 40))),
    ]


def typo(key: str, rng: random.Random) -> str:
    if not key:
        return "x"
    i = rng.randrange(len(key))
    choice = rng.randrange(4)
    if choice == 0:
        return key[:i] + key[i + 1 :]
    if choice == 1:
        return key[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz_") + key[i:]
    if choice == 2:
        return key.upper()
    return key.replace("_", "-")


def _containers(node: Any) -> list[Any]:
    """Every dict and list inside `node`, itself included."""
    found = [node]
    values = node.values() if isinstance(node, dict) else node
    for v in values:
        if isinstance(v, (dict, list)):
            found.extend(_containers(v))
    return found


def mutate(config: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One to four mutations anywhere in the tree."""
    cfg = copy.deepcopy(config)
    for _ in range(rng.randint(1, 4)):
        nodes = [c for c in _containers(cfg) if c]
        if not nodes:
            cfg[rng.choice(PATH_KEYS)] = rng.choice(odd_values(rng))
            continue
        node = rng.choice(nodes)
        kind = rng.randrange(7)
        if isinstance(node, list):
            i = rng.randrange(len(node))
            if kind == 0:
                del node[i]
            else:
                node[i] = rng.choice(odd_values(rng))
            continue
        key = rng.choice(list(node))
        if kind == 0:
            del node[key]
        elif kind == 1:
            node[typo(str(key), rng)] = node.pop(key)
        elif kind == 2:
            other = rng.choice(list(node))
            node[key], node[other] = node[other], node[key]
        elif kind == 3:
            top = rng.choice(PATH_KEYS)
            cfg[top] = rng.choice(odd_values(rng)[11:30])
        elif kind == 4 and "datasets" in cfg and isinstance(cfg["datasets"], list):
            cfg["datasets"].append({"path": rng.choice(odd_values(rng)), "type": "alpaca"})
        else:
            node[key] = rng.choice(odd_values(rng))
    return cfg


OVERRIDE_KEYS = ["lora_r", "datasets.0.path", "datasets.9.type", "launch.gpus", "a..b", ".", ""]


def other_input(rng: random.Random) -> dict[str, Any]:
    """A config with `--set` overrides, or a sweep grid and a trial of it (returned as the
    mapping to validate); raises FerryError for a clean refusal."""
    from launcher.sweeps import expand
    from payload.config.overrides import apply_overrides, with_values

    base = rng.choice(seeds())
    values = ["1", "[1, 2", "{a: 1}", "x" * 300, "a\x00b", "\udcff", "null", ""]
    if rng.random() < 0.5:
        sets = [
            f"{rng.choice(OVERRIDE_KEYS + PATH_KEYS)}{rng.choice(['=', '', '=='])}"
            f"{rng.choice(values)}"
            for _ in range(rng.randint(1, 3))
        ]
        return apply_overrides(base, sets)
    grid = {rng.choice(OVERRIDE_KEYS + PATH_KEYS + ["_"]): rng.choice(odd_values(rng))}
    grid.update({"learning_rate": [1e-4, rng.choice(odd_values(rng))]})
    trials, _ = expand(grid, max_trials=64)
    return with_values(base, rng.choice(trials).values)


def outcome(cfg: Any) -> tuple[str, str]:
    """("accepted" | "error" | "crash", the crash's class and last frame)."""
    try:
        if callable(cfg):
            cfg = cfg()
        validate_mapping(cfg, "fuzz", base_dir=EXAMPLES, warn=lambda _: None)
    except FerryError:
        return "error", ""
    except Exception as e:  # noqa: BLE001 - any other exception is what we count
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        return "crash", f"{type(e).__name__}: {str(e)[:80]} at {where}"
    return "accepted", ""


def _yaml_safe(value: Any) -> bool:
    """Lone surrogates cannot be written to a UTF-8 file; nan compares unequal."""
    try:
        yaml.safe_dump(value).encode("utf-8")
    except (UnicodeEncodeError, yaml.YAMLError):
        return False
    return True


def cli_outcome(cfg: dict[str, Any], folder: Path, i: int) -> tuple[str, str]:
    path = folder / f"fuzz_{i}.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    script = Path(sys.executable).with_name("launch")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "launcher"]
    proc = subprocess.run(
        [*cmd, "validate", str(path)], capture_output=True, text=True, cwd=EXAMPLES, check=False
    )
    if "Traceback" in proc.stderr or proc.returncode not in (0, 1):
        return "crash", proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
    return ("accepted" if proc.returncode == 0 else "error"), ""


def run(n: int, seed: int, cli: int) -> dict[str, Any]:
    rng = random.Random(seed)
    bases = seeds()
    counts: collections.Counter[str] = collections.Counter()
    classes: dict[str, int] = collections.Counter()
    cli_counts: collections.Counter[str] = collections.Counter()
    cli_every = max(1, n // cli) if cli else 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            if rng.random() < 0.1:  # --set overrides and sweep grids, one in ten
                result, crash = outcome(functools.partial(other_input, rng))
                cfg = {}
            else:
                cfg = mutate(rng.choice(bases), rng)
                result, crash = outcome(cfg)
            counts[result] += 1
            if crash:
                classes[crash] += 1
            if cfg and cli_every and i % cli_every == 0 and _yaml_safe(cfg):
                result, crash = cli_outcome(cfg, Path(tmp), i)
                cli_counts[result] += 1
                if crash:
                    classes[f"CLI: {crash}"] += 1
    return {
        "counts": counts,
        "cli": cli_counts,
        "classes": classes,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="?", default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cli", type=int, default=20, help="how many also go through the CLI")
    args = parser.parse_args()
    result = run(args.n, args.seed, args.cli)
    counts, cli = result["counts"], result["cli"]
    print(f"{args.n} configs in {result['seconds']:.1f}s (seed {args.seed})")
    print(
        f"in-process: {counts['error']} clean errors, {counts['accepted']} accepted, "
        f"{counts['crash']} crashes"
    )
    print(
        f"CLI sample: {cli['error']} clean errors, {cli['accepted']} accepted, "
        f"{cli['crash']} crashes"
    )
    for crash, count in sorted(result["classes"].items(), key=lambda kv: -kv[1]):
        print(f"  {count:5d}  {crash}")
    crashes = counts["crash"] + cli["crash"]
    print(f"RESULT fuzz_config_crashes {crashes}")
    print(f"RESULT fuzz_config_seconds {result['seconds']:.1f}")


if __name__ == "__main__":
    main()
