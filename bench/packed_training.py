"""Training throughput with and without sample packing: real (non-padding) tokens per
second of the tiny Llama on CPU, over the same rows, packed vs padded.

    python bench/packed_training.py [--rows 768] [--repeats 3] [--threads 1]

The rows are random tokens with long-tailed lengths (lognormal, median 32, clipped to
4..256; sequence_len 256), the kind of mix where padding each batch to its longest row
wastes most of the compute. One epoch over all rows is one timed run: forward, backward
and an AdamW step per batch, from the same initial weights.
- padded: batches of `--batch` rows in a seeded random order, padded to the longest row
  with an attention mask (the HF Trainer's DataCollatorForSeq2Seq, as Ferry's unpacked
  path uses it);
- packed: MultipackBatchSampler bins of sequence_len tokens, `--packed-batch` per batch,
  through PackedCollator (no attention mask, position ids per row).
Runs alternate, padded then packed, and the best of `--repeats` counts, so load from
other work on a shared machine shows up less. torch uses one thread by default: on a
busy 2-core machine two threads made each step ~10x slower (OpenMP threads spinning
against other processes), which would measure the machine, not the batches.

Same loss: before training, the whole set's loss (sum of token losses / target tokens)
is computed both ways with the initial weights; they must agree to 1e-5 (float32), or the
packed batches are not computing the same thing and the speed-up means nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from payload.data.collator import PackedCollator
from payload.data.packing import MultipackBatchSampler

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "examples" / "assets"
SEQUENCE_LEN = 256


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(32), 1.0, n), 4, SEQUENCE_LEN).astype(int)
    rows = []
    for length in lengths:
        ids = rng.integers(4, 1024, length).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def padded_batches(rows: list[dict], batch: int, tokenizer) -> list[dict]:
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    order = np.random.default_rng(0).permutation(len(rows))
    return [
        dict(collate([rows[i] for i in order[at : at + batch]]))
        for at in range(0, len(rows), batch)
    ]


def packed_batches(rows: list[dict], batch: int, pad_id: int) -> tuple[list[dict], float]:
    sampler = MultipackBatchSampler([len(r["input_ids"]) for r in rows], SEQUENCE_LEN, batch)
    collate = PackedCollator(pad_id, SEQUENCE_LEN)
    epoch = list(sampler)
    assert sorted(i for bins in epoch for b in bins for i in b) == list(range(len(rows)))
    return [collate([[rows[i] for i in b] for b in bins]) for bins in epoch], sampler.efficiency


def dataset_loss(model, batches: list[dict]) -> float:
    """Sum of token losses over the set / target tokens, with the weights as they are."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b, num_items_in_batch=n).loss) * n
            count += n
    return total / count


def train_epoch(model, batches: list[dict]) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for b in batches:
        model(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=768)
    parser.add_argument("--batch", type=int, default=8, help="rows per padded batch")
    parser.add_argument("--packed-batch", type=int, default=2, help="bins per packed batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokenizer.pad_token_id = pad_id
    base = AutoModelForCausalLM.from_pretrained(
        ASSETS / "tiny-llama", dtype=torch.float32, attn_implementation="sdpa"
    )
    base.config.use_cache = False
    initial = {k: v.clone() for k, v in base.state_dict().items()}

    rows = make_rows(args.rows)
    padded = padded_batches(rows, args.batch, tokenizer)
    packed, efficiency = packed_batches(rows, args.packed_batch, pad_id)
    tokens = sum(len(r["input_ids"]) for r in rows)
    assert sum(int(b["attention_mask"].sum()) for b in padded) == tokens
    padded_shape = sum(b["input_ids"].numel() for b in padded)
    packed_shape = sum(b["input_ids"].numel() for b in packed)
    print(
        f"{len(rows)} rows, {tokens:,} tokens; padded: {len(padded)} batches, "
        f"{tokens / padded_shape:.1%} real; packed: {len(packed)} batches, "
        f"{tokens / packed_shape:.1%} real (bins {efficiency:.1%} full)"
    )

    loss_padded, loss_packed = dataset_loss(base, padded), dataset_loss(base, packed)
    print(f"initial loss over the set: padded {loss_padded:.6f}, packed {loss_packed:.6f}")
    assert abs(loss_packed - loss_padded) <= 1e-5 * loss_padded, "packed loss differs"

    times: dict[str, list[float]] = {"padded": [], "packed": []}
    final: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, batches in (("padded", padded), ("packed", packed)):
            base.load_state_dict(initial)
            times[name].append(train_epoch(base, batches))
            final[name] = dataset_loss(base, padded)
    rate = {name: tokens / min(t) for name, t in times.items()}
    for name in ("padded", "packed"):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(
            f"{name}: {rate[name]:,.0f} real tokens/s (epoch {runs} s); "
            f"loss after the epoch {final[name]:.4f}"
        )
    print(f"RESULT packed_vs_padded_speedup {rate['packed'] / rate['padded']:.2f} x")


if __name__ == "__main__":
    main()
