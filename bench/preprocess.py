"""How fast `launch preprocess` tokenizes, against a batched multi-process `datasets.map`.

Writes ROWS alpaca-style rows (default 100,000, each distinct) as jsonl into a temp
folder, then:
1. `launch preprocess` on them with a fresh cache, the bundled tiny tokenizer and model
   config, in a new process: end-to-end wall time (start-up, reading, hashing,
   tokenizing, saving) and the tokenizing time it reports (its `datasets.map` alone);
2. the same command again: a cache hit;
3. the baseline, in this process: the same rows, already loaded, through the same alpaca
   strategy and the same tokenizer with `datasets.map(batched=True, batch_size=1000,
   num_proc=P, keep_in_memory=True)`, P being the processes Ferry reported using, and
   TOKENIZERS_PARALLELISM=false as Ferry sets it for worker processes. Each batch calls
   the strategy once per row, which is what a batched map of a per-row strategy does.
   Timed like Ferry's tokenizing figure: the map call, nothing else.

    python bench/preprocess.py [--rows 100000]

`preprocess_vs_batched_map` compares the two map-only rates (like for like);
`preprocess_end_to_end_vs_batched_map` sets the whole `launch preprocess` command against
the baseline's map alone, so it is the conservative one.
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


def batched_map(config: Path, num_proc: int) -> float:
    """Seconds for `datasets.map`, batched over `num_proc` processes, of the same rows
    through the same strategy (see the module docstring)."""
    import datasets

    from payload.config import load_config
    from payload.data.core import build_strategy
    from payload.model import load_tokenizer

    datasets.disable_progress_bars()
    cfg = load_config(str(config))
    strategy = build_strategy(cfg.datasets[0], cfg, load_tokenizer(cfg))
    rows = datasets.load_dataset("json", data_files=cfg.datasets[0].path, split="train")
    names = rows.column_names

    def batch(columns: dict) -> dict:
        out: dict[str, list] = {}
        for j in range(len(columns[names[0]])):
            for key, value in strategy({n: columns[n][j] for n in names}).items():
                out.setdefault(key, []).append(value)
        return out

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    started = time.perf_counter()
    rows.map(
        batch,
        batched=True,
        batch_size=1000,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=names,
        keep_in_memory=True,
        load_from_cache_file=False,
    )
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
        # "tokenized N rows in Xs (R rows/s, P processes)"
        procs = int(cold["rate"].split(", ")[-1].split()[0])
        plain_s = batched_map(config, procs)
    rows, tokens = cold["rows"]["in"], cold["rows"]["tokens"]
    tokenize_rate = float(cold["rate"].split("(")[1].split(" rows/s")[0].replace(",", ""))
    plain_rate = rows / plain_s
    print(cold["rate"])
    print(f"batched datasets.map over {procs} processes: {plain_s:.1f} s")
    print(f"RESULT preprocess_rows_per_s {rows / cold_s:.0f} rows/s (end to end, {cold_s:.1f} s)")
    print(f"RESULT preprocess_tokens_per_s {tokens / cold_s:.0f} tokens/s (end to end)")
    print(f"RESULT preprocess_tokenize_rows_per_s {tokenize_rate:.0f} rows/s")
    print(f"RESULT batched_map_rows_per_s {plain_rate:.0f} rows/s ({plain_s:.1f} s)")
    print(f"RESULT preprocess_vs_batched_map {tokenize_rate / plain_rate:.2f} x")
    print(f"RESULT preprocess_end_to_end_vs_batched_map {plain_s / cold_s:.2f} x")
    print(f"RESULT preprocess_cache_hit_s {hit_s:.2f} s")


if __name__ == "__main__":
    main()
