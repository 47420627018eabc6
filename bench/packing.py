"""How well and how fast sample packing packs: 1M row lengths drawn from a lognormal
(median 403 tokens, clipped to 1..4096), packed into sequence_len 4096 with the default
group size (100,000 rows) and bin size (200 rows).

    python bench/packing.py [--rows 1000000] [--repeats 5]

Efficiency is the lower bound ceil(tokens / sequence_len) over the bins used (1.0 is
optimal), next to two token-level figures: tokens / (bins * sequence_len) for packing,
and tokens / padded tokens for plain batches of `--micro-batch` rows in random order,
each padded to its longest row (what training without packing computes on). The time is
the best of `--repeats` builds of the sampler (the packing itself plus the bin index),
so other work on a shared machine inflates it less; the median is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from payload.data.packing import MultipackBatchSampler, _ffd_bins, pack_groups

SEQUENCE_LEN = 4096


def lognormal_lengths(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(6.0, 1.0, rows), 1, SEQUENCE_LEN).astype(np.int64)


def timed(fn, repeats: int) -> tuple[float, float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), out


def _group(task: tuple[np.ndarray, int, int]) -> object:
    return _ffd_bins(*task)


def pooled_groups(lengths: np.ndarray, processes: int, group_size: int = 100_000) -> object:
    """The same per-group FFD as `pack_groups`, with the groups spread over a fork pool."""
    import multiprocessing

    tasks = [
        (lengths[i : i + group_size], SEQUENCE_LEN, 200) for i in range(0, len(lengths), group_size)
    ]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return pool.map(_group, tasks)


def padded_efficiency(lengths: np.ndarray, micro_batch: int, seed: int = 0) -> float:
    order = np.random.default_rng(seed).permutation(len(lengths))
    cut = len(order) // micro_batch * micro_batch
    batches = lengths[order[:cut]].reshape(-1, micro_batch)
    return float(batches.sum()) / float(batches.max(axis=1).sum() * micro_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    lengths = lognormal_lengths(args.rows)
    tokens = int(lengths.sum())
    print(
        f"{args.rows:,} rows, {tokens:,} tokens, median {int(np.median(lengths))}, "
        f"mean {lengths.mean():.0f}, longest {lengths.max()}, sequence_len {SEQUENCE_LEN}"
    )

    def build(sequential: bool = False) -> MultipackBatchSampler:
        return MultipackBatchSampler(lengths, SEQUENCE_LEN, args.micro_batch, sequential=sequential)

    best, median, sampler = timed(build, args.repeats)
    bound = sampler.lower_bound_bins
    vs_bound = bound / sampler.num_bins
    epoch_best, _, _ = timed(lambda: sampler.epoch_bins(1), args.repeats)
    _, _, sequential = timed(lambda: build(sequential=True), 1)
    padded = padded_efficiency(lengths, args.micro_batch)
    serial, _, _ = timed(lambda: pack_groups(lengths, SEQUENCE_LEN, 200, 100_000), args.repeats)
    processes = min(os.cpu_count() or 1, 8)
    pooled, _, _ = timed(lambda: pooled_groups(lengths, processes), args.repeats)

    print(f"lower bound:  {bound:,} bins")
    print(
        f"FFD:          {sampler.num_bins:,} bins, {vs_bound:.5f} of the bound, "
        f"{sampler.efficiency:.2%} of bin tokens are real"
    )
    print(
        f"next fit:     {sequential.num_bins:,} bins, {bound / sequential.num_bins:.5f} of the "
        f"bound, {sequential.efficiency:.2%} real (sample_packing_sequentially)"
    )
    print(
        f"padding:      {padded:.2%} of padded tokens are real (batches of {args.micro_batch}, "
        f"each padded to its longest row); packing computes on "
        f"{sampler.efficiency / padded:.2f}x fewer tokens per real token"
    )
    print(f"pack time:    best {best:.3f} s, median {median:.3f} s of {args.repeats}")
    print(f"epoch reshuffle: {epoch_best:.3f} s (best of {args.repeats})")
    print(
        f"groups alone:    {serial:.3f} s in this process, {pooled:.3f} s over a pool of "
        f"{processes} (best of {args.repeats} each)"
    )
    print(f"RESULT packing_efficiency {vs_bound:.5f}")
    print(f"RESULT packing_seconds_1m {best * 1_000_000 / args.rows:.3f} s")


if __name__ == "__main__":
    main()
