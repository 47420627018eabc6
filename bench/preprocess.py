"""How fast `launch preprocess` tokenizes, against a plain `datasets.map`.

Writes ROWS alpaca-style rows (default 100,000, each distinct) as jsonl into a temp
folder, then:
1. `launch preprocess` on them with a fresh cache, the bundled tiny tokenizer and model
   config: end-to-end wall time (start-up, reading, hashing, tokenizing, saving) and the
   tokenizing rate it reports;
2. the same command again: a cache hit;
3. the baseline, in this process: the same rows through the same strategy with a plain
   single-process `datasets.map`, one row per call.

    python bench/preprocess.py [--rows 100000]

Ends with `RESULT` lines; `preprocess_vs_plain_map` compares the tokenizing rates.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "examples" / "assets"
SEED_ROWS = ROOT / "examples" / "data" / "alpaca_tiny.jsonl"


def write_rows(path: Path, count: int) -> None:
    rng = random.Random(0)
    seeds = [json.loads(line) for line in SEED_ROWS.read_text().splitlines()]
    words = " ".join(r["output"] for r in seeds).split()
    with path.open("w") as f:
        for i in range(count):
            row = dict(seeds[i % len(seeds)])
            row["instruction"] += f" (case {i})"
            row["output"] += " " + " ".join(rng.choices(words, k=rng.randint(5, 60)))
            f.write(json.dumps(row) + "\n")


def launch_preprocess(config: Path, env: dict[str, str]) -> tuple[float, dict]:
    launch = Path(sys.executable).with_name("launch")
    command = [str(launch)] if launch.exists() else [sys.executable, "-m", "launcher"]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "preprocess", str(config), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"launch preprocess failed:\n{done.stdout}\n{done.stderr}")
    return elapsed, json.loads(done.stdout)


def plain_map(config: Path) -> float:
    """Seconds for a single-process, one-row-per-call `datasets.map` of the same rows."""
    import datasets

    from payload.config import load_config
    from payload.data.core import build_strategy
    from payload.model import load_tokenizer

    datasets.disable_progress_bars()
    cfg = load_config(str(config))
    strategy = build_strategy(cfg.datasets[0], cfg, load_tokenizer(cfg))
    rows = datasets.load_dataset("json", data_files=cfg.datasets[0].path, split="train")
    started = time.perf_counter()
    rows.map(strategy, remove_columns=rows.column_names, keep_in_memory=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
        folder = Path(tmp)
        data = folder / "rows.jsonl"
        write_rows(data, args.rows)
        config = folder / "bench.yml"
        config.write_text(
            f"base_model: {ASSETS / 'tiny-llama'}\n"
            f"tokenizer_config: {ASSETS / 'tiny-tokenizer'}\n"
            f"datasets:\n  - path: {data}\n    type: alpaca\n"
            f"dataset_prepared_path: {folder / 'prepared'}\n"
            "sequence_len: 512\nlearning_rate: 1.0e-4\n"
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "FERRY_HOME": str(folder / "home")}
        cold_s, cold = launch_preprocess(config, env)
        hit_s, hit = launch_preprocess(config, env)
        assert not cold["hit"] and hit["hit"], (cold, hit)
        os.environ["HF_HUB_OFFLINE"] = "1"
        plain_s = plain_map(config)
    rows, tokens = cold["rows"]["in"], cold["rows"]["tokens"]
    # "tokenized N rows in Xs (R rows/s, P processes)"
    tokenize_rate = float(cold["rate"].split("(")[1].split(" rows/s")[0].replace(",", ""))
    plain_rate = rows / plain_s
    print(cold["rate"])
    print(f"RESULT preprocess_rows_per_s {rows / cold_s:.0f} rows/s (end to end, {cold_s:.1f} s)")
    print(f"RESULT preprocess_tokens_per_s {tokens / cold_s:.0f} tokens/s (end to end)")
    print(f"RESULT preprocess_tokenize_rows_per_s {tokenize_rate:.0f} rows/s")
    print(f"RESULT plain_map_rows_per_s {plain_rate:.0f} rows/s ({plain_s:.1f} s)")
    print(f"RESULT preprocess_vs_plain_map {tokenize_rate / plain_rate:.2f} x")
    print(f"RESULT preprocess_end_to_end_vs_plain_map {plain_s / cold_s:.2f} x")
    print(f"RESULT preprocess_cache_hit_s {hit_s:.2f} s")


if __name__ == "__main__":
    main()
