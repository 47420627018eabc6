"""How fast `launch preprocess` tokenizes: against the tokenizer alone, and against Axolotl.

Writes ROWS alpaca-style rows (default 100,000, each distinct) as jsonl into a temp
folder, and one config for them: `type: alpaca`, the bundled tiny tokenizer and model
config, `sequence_len: 1024`, `sample_packing: true`, 2 dataset processes. Then:

1. Ferry, cold: `launch preprocess CFG --json` in a new process, with a fresh prepared
   folder, FERRY_HOME, HF datasets cache and TMPDIR (all empty, in the temp folder).
   The clock is wall time around the whole command (start-up, reading the jsonl,
   hashing, tokenizing in its worker processes, saving). Ferry also reports its own
   tokenizing time in its rate line: rows in memory to tokenized dataset.
2. Ferry, the same command again: a cache hit (wall time).
3. The tokenizer floor, in this process: the same rows, read before the clock starts,
   rendered before the clock starts into the texts Ferry tokenizes for them (the prompt,
   `payload.data.sft.ALPACA.render(instruction, input, None)`, and the output, as two
   texts, since Ferry tokenizes them as two segments), and the same tokenizer, loaded
   before the clock as Ferry loads it. The clock covers forking a pool of P processes (P
   being the processes Ferry reported using; TOKENIZERS_PARALLELISM=false, as Ferry sets
   for its workers), each calling the fast tokenizer's `__call__` (add_special_tokens=False,
   as Ferry calls it) on its contiguous share of the rows, 1000 rows a batch (one call
   for the prompts, one for the outputs), keeping only a token count, and the pool
   closing. Nothing is read, written or saved. Best of 3 runs: the floor is a lower
   bound, so its best time is the stricter baseline.
4. With `--axolotl PATH` (an `axolotl` executable, see `make axolotl-env`): `axolotl
   preprocess` on the same jsonl with the same tokenizer and model config, the same
   sequence_len and sample_packing, and `dataset_num_proc: 2`, in a new process, cold: its
   prepared folder, output_dir, HF datasets cache and TMPDIR (where datasets keeps the
   temporary cache of its tokenized rows) are fresh and empty in the temp folder, and the
   command runs there. Offline: HF_HUB_OFFLINE=1, and AXOLOTL_DO_NOT_TRACK=1, without
   which its telemetry retries an unreachable host and adds seconds that are not
   preprocessing. The clock is wall time around the whole command, like Ferry's in 1.
   Its rows and tokens are counted from the prepared dataset it saved; its log is
   kept in the temp folder, and its tail printed if it fails.

    python bench/preprocess.py [--rows 100000] [--axolotl .venv-axolotl/bin/axolotl]

`preprocess_vs_tokenizer_floor` is the floor's seconds over Ferry's own tokenizing
seconds (goal >= 0.8). Ferry calls the Rust encoder beneath the tokenizer directly, skipping
the offsets and conversions `__call__` makes, so it can beat that floor; the stricter
`preprocess_vs_rust_encoder_floor` sets it against step 3 done with the Rust encoder's
`encode_batch_fast` instead of `__call__` (ids only), the least any tokenizing can do;
`preprocess_end_to_end_vs_tokenizer_floor` is the floor's seconds
over the whole cold `launch preprocess` command. `preprocess_vs_axolotl` is Axolotl's
wall time over Ferry's (both cold, whole commands; goal >= 2).

Sanity checks stop the run: Ferry must keep every row and the floor tokenize every row,
and the floor's token count plus a bos and an eos per row must equal the tokens Ferry
saved. Axolotl's rows and tokens are printed beside Ferry's, with any rows it dropped.
Besides tokenizing, Axolotl's preprocess filters over-long and untrained rows, adds a
position_ids column for packing and prints a decoded sample; Ferry applies its length and
bad-row rules while tokenizing and packs later, when training.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "examples" / "assets"
SEED_ROWS = ROOT / "examples" / "data" / "alpaca_tiny.jsonl"
SEQUENCE_LEN = 1024
PROCESSES = 2
BATCH = 1000
FLOOR_RUNS = 3
# Ferry's rate line: "tokenized N rows in Xs (R rows/s, P processes)".
RATE = re.compile(r"tokenized ([\d,]+) rows in [\d.]+s \(([\d,]+) rows/s, (\d+) process")

# The texts and tokenizer the floor's forked workers read (set before the fork; a cache
# of this process's inputs, not state anything else changes).
_FLOOR: dict[str, Any] = {}


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


def fresh(*folders: Path) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)


def launch_preprocess(config: Path, env: dict[str, str]) -> tuple[float, dict]:
    """Wall seconds of `launch preprocess CFG --json` in a new process, and its output."""
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


def _floor_share(bounds: tuple[int, int]) -> tuple[int, int]:
    """(rows, tokens) of one worker's contiguous share, BATCH rows a call: the
    tokenizer's `__call__`, or with _FLOOR["rust"] its Rust encoder's
    `encode_batch_fast` (ids only, no offsets, no Python conversion of the results)."""
    tokenizer, prompts, outputs = _FLOOR["tokenizer"], _FLOOR["prompts"], _FLOOR["outputs"]
    rust = tokenizer.backend_tokenizer if _FLOOR["rust"] else None
    start, stop = bounds
    tokens = 0
    for a in range(start, stop, BATCH):
        b = min(a + BATCH, stop)
        for texts in (prompts[a:b], outputs[a:b]):
            if rust is not None:
                encoded = rust.encode_batch_fast(texts, add_special_tokens=False)
                tokens += sum(len(e) for e in encoded)
            else:
                tokens += sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    return stop - start, tokens


def tokenizer_floor(
    config: Path, data: Path, num_proc: int, rust: bool = False
) -> tuple[list[float], int, int]:
    """(seconds of each run, rows, tokens): the fast tokenizer alone on the texts Ferry
    tokenizes, over `num_proc` forked processes (see the module docstring); with `rust`,
    its Rust encoder alone."""
    from payload.config import load_config
    from payload.data.sft import ALPACA
    from payload.model import load_tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    _FLOOR["tokenizer"] = load_tokenizer(load_config(str(config)))
    _FLOOR["prompts"] = [ALPACA.render(r["instruction"], r.get("input", ""), None) for r in rows]
    _FLOOR["outputs"] = [r["output"] for r in rows]
    _FLOOR["rust"] = rust
    step = -(-len(rows) // num_proc)
    shares = [(i, min(i + step, len(rows))) for i in range(0, len(rows), step)]
    times = []
    for _ in range(FLOOR_RUNS):
        started = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            counts = pool.map(_floor_share, shares)
        times.append(time.perf_counter() - started)
    return times, sum(c[0] for c in counts), sum(c[1] for c in counts)


def axolotl_preprocess(axolotl: Path, data: Path, work: Path) -> tuple[float, int, int]:
    """(wall seconds, rows, tokens) of a cold `axolotl preprocess` (see the docstring)."""
    fresh(work)
    config = work / "axolotl.yml"
    config.write_text(
        f"base_model: {ASSETS / 'tiny-llama'}\n"
        f"tokenizer_config: {ASSETS / 'tiny-tokenizer'}\n"
        f"datasets:\n  - path: {data}\n    ds_type: json\n    type: alpaca\n"
        f"dataset_prepared_path: {work / 'prepared'}\n"
        f"output_dir: {work / 'out'}\n"
        f"sequence_len: {SEQUENCE_LEN}\nsample_packing: true\n"
        f"dataset_num_proc: {PROCESSES}\n"
        "micro_batch_size: 1\ngradient_accumulation_steps: 1\nnum_epochs: 1\n"
        "learning_rate: 1.0e-4\n"
    )
    fresh(work / "hf", work / "tmp")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "HF_DATASETS_CACHE": str(work / "hf"),
        "TMPDIR": str(work / "tmp"),
    }
    log = work / "axolotl.log"
    with log.open("w") as out:
        started = time.perf_counter()
        done = subprocess.run(
            [str(axolotl.absolute()), "preprocess", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
            check=False,
        )
        elapsed = time.perf_counter() - started
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        sys.exit(f"axolotl preprocess failed (exit {done.returncode}); log tail:\n{text[-4000:]}")
    for line in text.splitlines():
        if "Dropped" in line or "dropped" in line:
            print(f"axolotl: {line.strip()}")
    rows, tokens = prepared_counts(work / "prepared")
    return elapsed, rows, tokens


def prepared_counts(prepared: Path) -> tuple[int, int]:
    """(rows, tokens) in the Arrow files of a `save_to_disk` folder under `prepared`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    files = sorted(prepared.glob("*/data-*.arrow"))
    if not files:
        sys.exit(f"axolotl preprocess saved no dataset under {prepared}")
    rows = tokens = 0
    for file in files:
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_stream(source).read_all()
        rows += table.num_rows
        tokens += int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)
    return rows, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--axolotl", type=Path, help="an `axolotl` executable to compare with")
    args = parser.parse_args()
    if args.axolotl and not args.axolotl.exists():
        sys.exit(f"--axolotl {args.axolotl}: no such file (make axolotl-env makes one)")
    sys.path.insert(0, str(ROOT))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
        folder = Path(tmp)
        data = folder / "rows.jsonl"
        write_rows(data, args.rows)
        ferry = folder / "ferry"
        fresh(ferry / "home", ferry / "hf", ferry / "tmp")
        config = folder / "bench.yml"
        config.write_text(
            f"base_model: {ASSETS / 'tiny-llama'}\n"
            f"tokenizer_config: {ASSETS / 'tiny-tokenizer'}\n"
            f"datasets:\n  - path: {data}\n    type: alpaca\n"
            f"dataset_prepared_path: {ferry / 'prepared'}\n"
            f"sequence_len: {SEQUENCE_LEN}\nsample_packing: true\n"
            f"dataset_processes: {PROCESSES}\nlearning_rate: 1.0e-4\n"
        )
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "FERRY_HOME": str(ferry / "home"),
            "HF_DATASETS_CACHE": str(ferry / "hf"),
            "TMPDIR": str(ferry / "tmp"),
        }
        cold_s, cold = launch_preprocess(config, env)
        hit_s, hit = launch_preprocess(config, env)
        assert not cold["hit"] and hit["hit"], (cold, hit)
        axolotl = (
            axolotl_preprocess(args.axolotl, data, folder / "axolotl") if args.axolotl else None
        )
        os.environ["HF_HUB_OFFLINE"] = "1"
        found = RATE.search(cold["rate"] or "")
        if not found:
            sys.exit(f"cannot read Ferry's rate line: {cold['rate']!r}")
        procs = int(found[3])
        floor_runs, floor_rows, floor_tokens = tokenizer_floor(config, data, procs)
        rust_runs, rust_rows, rust_tokens = tokenizer_floor(config, data, procs, rust=True)
    floor_s, rust_s = min(floor_runs), min(rust_runs)

    rows, kept, tokens = cold["rows"]["in"], cold["rows"]["kept"], cold["rows"]["tokens"]
    # Ferry's tokenizing seconds from its rate, which has more digits than its "in Xs".
    tokenize_s = int(found[1].replace(",", "")) / int(found[2].replace(",", ""))
    problems = []
    if rows != args.rows or kept != args.rows:
        problems.append(f"Ferry kept {kept} of {rows} rows in, of {args.rows} written")
    if floor_rows != args.rows or rust_rows != args.rows:
        problems.append(f"the floors tokenized {floor_rows}, {rust_rows} rows of {args.rows}")
    if rust_tokens != floor_tokens:
        problems.append(f"the Rust floor made {rust_tokens:,} tokens, __call__ {floor_tokens:,}")
    if floor_tokens + 2 * args.rows != tokens:
        problems.append(
            f"the floor's {floor_tokens:,} tokens + bos and eos per row "
            f"= {floor_tokens + 2 * args.rows:,}, but Ferry saved {tokens:,} tokens"
        )
    if problems:
        sys.exit("sanity check failed: " + "; ".join(problems))

    # Timings on a shared machine mean little while something else uses its cores.
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(cold["rate"])
    print(f"ferry: {kept:,} of {rows:,} rows, {tokens:,} tokens")
    runs = ", ".join(f"{t:.2f}" for t in floor_runs)
    print(f"tokenizer floor over {procs} processes: {runs} s, {floor_tokens:,} tokens")
    runs = ", ".join(f"{t:.2f}" for t in rust_runs)
    print(f"Rust encoder floor over {procs} processes: {runs} s")
    print(f"RESULT preprocess_rows_per_s {rows / cold_s:.0f} rows/s (end to end, {cold_s:.1f} s)")
    print(f"RESULT preprocess_tokens_per_s {tokens / cold_s:.0f} tokens/s (end to end)")
    print(f"RESULT preprocess_tokenize_rows_per_s {rows / tokenize_s:.0f} rows/s")
    print(f"RESULT preprocess_tokenize_s {tokenize_s:.2f} s")
    print(f"RESULT tokenizer_floor_s {floor_s:.2f} s")
    print(f"RESULT preprocess_vs_tokenizer_floor {floor_s / tokenize_s:.2f} x")
    print(f"RESULT preprocess_end_to_end_vs_tokenizer_floor {floor_s / cold_s:.2f} x")
    print(f"RESULT rust_encoder_floor_s {rust_s:.2f} s")
    print(f"RESULT preprocess_vs_rust_encoder_floor {rust_s / tokenize_s:.2f} x")
    print(f"RESULT preprocess_cache_hit_s {hit_s:.2f} s")
    if axolotl:
        axolotl_s, axolotl_rows, axolotl_tokens = axolotl
        print(f"axolotl: {axolotl_rows:,} of {args.rows:,} rows, {axolotl_tokens:,} tokens")
        if axolotl_rows != args.rows:
            print(f"axolotl dropped {args.rows - axolotl_rows:,} rows")
        print(f"RESULT preprocess_s {cold_s:.1f} s")
        print(f"RESULT axolotl_preprocess_s {axolotl_s:.1f} s")
        print(f"RESULT preprocess_vs_axolotl {axolotl_s / cold_s:.2f} x")


if __name__ == "__main__":
    main()
