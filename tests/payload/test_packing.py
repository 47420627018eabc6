"""Sample packing: the sampler's bins and batches, the collator's rows, the exact
equivalence of a packed batch with its rows run one by one (and that the check would
catch a leak), and real runs: 2 ranks in step, and the batches of packed training with
fixed shapes and an unpacked eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import ASSETS, DATA, launch, quickstart_config

from payload.config import FerryError, validate_mapping
from payload.data.collator import IGNORE, PackedCollator
from payload.data.packing import MultipackBatchSampler, pack_ffd

# ---- the sampler


def lognormal(n: int, cap: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(4.5, 1.0, n), 1, cap).astype(np.int64)


def reference_ffd(lengths: list[int], cap: int, max_rows: int) -> list[int]:
    """First fit decreasing as the textbook states it: each row, longest first (ties in
    row order), into the first open bin with room."""
    room: list[int] = []
    rows: list[int] = []
    out = [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b in range(len(room)):
            if room[b] >= lengths[i] and rows[b] < max_rows:
                room[b] -= lengths[i]
                rows[b] += 1
                out[i] = b
                break
        else:
            room.append(cap - lengths[i])
            rows.append(1)
            out[i] = len(room) - 1
    return out


def test_fast_ffd_is_exactly_first_fit_decreasing():
    """The histogram FFD must place every row where the textbook algorithm does; a
    difference means a shortcut in it (repeated bin shapes, slot dealing) is wrong."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        cap, max_rows = int(rng.integers(1, 64)), int(rng.integers(1, 10))
        lengths = rng.integers(1, cap + 1, int(rng.integers(1, 300)))
        assert pack_ffd(lengths, cap, max_rows).tolist() == reference_ffd(
            lengths.tolist(), cap, max_rows
        )


def all_batches(lengths, world_size, epoch=0, **kw):
    """Each rank's batches for one epoch."""
    out = []
    for rank in range(world_size):
        s = MultipackBatchSampler(lengths, world_size=world_size, rank=rank, **kw)
        s.set_epoch(epoch)
        out.append((s, list(s)))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("micro_batch_size", [1, 3])
@pytest.mark.parametrize("sequential", [False, True])
def test_every_rank_gets_the_same_batches_count_and_each_row_once(
    world_size, micro_batch_size, sequential
):
    """A rank with a different number of batches hangs DDP at the end of the epoch; a
    row seen twice or lost (beyond the documented remainder) biases training."""
    lengths = lognormal(997, 256)
    kw = dict(sequence_len=256, micro_batch_size=micro_batch_size, bin_size=5, group_size=300)
    for epoch in (0, 1):
        ranks = all_batches(lengths, world_size, epoch, sequential=sequential, **kw)
        counts = {len(batches) for _, batches in ranks}
        assert counts == {len(ranks[0][0])}, counts
        bins = [b for _, batches in ranks for batch in batches for b in batch]
        assert all(1 <= len(batch) <= micro_batch_size for _, bs in ranks for batch in bs)
        assert all(lengths[b].sum() <= 256 and 1 <= len(b) <= 5 for b in bins)
        seen = [i for b in bins for i in b]
        assert len(seen) == len(set(seen))
        sampler = ranks[0][0]
        assert sampler.dropped_bins < world_size
        assert len(bins) == sampler.num_bins - sampler.dropped_bins
        # The remainder rule: only the last `dropped_bins` bins of the epoch are skipped.
        skipped = [i for b in sampler.epoch_bins()[len(bins) :] for i in b]
        assert sorted(seen + skipped) == list(range(len(lengths)))


def test_sequential_packing_keeps_row_order():
    lengths = lognormal(500, 128)
    for world_size in (1, 2, 3):
        ranks = all_batches(
            lengths, world_size, sequence_len=128, micro_batch_size=2, sequential=True
        )
        steps = zip(*(batches for _, batches in ranks), strict=True)
        order = [i for step in steps for batch in step for b in batch for i in b]
        assert order == sorted(order)
        sampler = ranks[0][0]
        bins = sampler.epoch_bins()
        assert [i for b in bins for i in b] == list(range(500))
        for b, after in zip(bins, bins[1:], strict=False):  # next fit: full or next too long
            assert len(b) == 200 or lengths[b].sum() + lengths[after[0]] > 128


def test_shuffling_is_deterministic_per_seed_and_epoch():
    lengths = lognormal(2000, 256)

    def batches(seed, epoch):
        s = MultipackBatchSampler(lengths, 256, 4, seed=seed, world_size=2, rank=1)
        s.set_epoch(epoch)
        return list(s)

    assert batches(7, 0) == batches(7, 0)
    assert batches(7, 0) != batches(8, 0)
    assert batches(7, 0) != batches(7, 1)
    assert len(batches(7, 0)) == len(batches(7, 1))  # epochs differ, the count does not


def test_ffd_is_within_one_percent_of_the_lower_bound():
    """ceil(tokens / sequence_len) bins is the least any packing can use."""
    lengths = lognormal(50_000, 2048, seed=3)
    sampler = MultipackBatchSampler(lengths, 2048, 8)
    bound = math.ceil(lengths.sum() / 2048)
    assert sampler.lower_bound_bins == bound
    assert bound / sampler.num_bins >= 0.99
    assert sampler.efficiency == pytest.approx(lengths.sum() / (sampler.num_bins * 2048))


def test_unusable_lengths_and_too_few_bins_are_explained():
    with pytest.raises(FerryError, match="row 1 has 300 tokens"):
        MultipackBatchSampler([10, 300], 256, 1)
    with pytest.raises(FerryError, match="fewer than the 4 ranks"):
        MultipackBatchSampler([200, 200, 200], 256, 1, world_size=4)


# ---- the collator


def rows_of(*lengths: int, start: int = 10) -> list[dict]:
    out = []
    for n in lengths:
        ids = list(range(start, start + n))
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": ids})
        start += n
    return out


def test_collator_builds_the_docstring_example():
    """payload.data.packing's worked example, bin 1 = D(4) B(2) padded to 8."""
    d, b = rows_of(4, 2)
    batch = PackedCollator(0, 8, pad_to_sequence_len=True)([[d, b]])
    assert "attention_mask" not in batch  # a mask would turn the packed-mask path off
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14, 15, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 11, 12, 13, IGNORE, 15, IGNORE, IGNORE]]


def test_collator_pads_to_the_longest_bin_or_flattens():
    bins = [rows_of(3, 2), rows_of(4)]
    batch = PackedCollator(0, 16)(bins)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    flat = PackedCollator(0, 16, flatten=True, micro_batch_size=2)(bins)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    fixed = PackedCollator(0, 16, flatten=True, micro_batch_size=2, pad_to_sequence_len=True)
    assert fixed(bins)["input_ids"].shape == (1, 32)


# ---- packed == one by one


def sample_rows(seed: int = 0) -> list[dict]:
    """Random rows, most trained on every token, one with a masked prompt."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (7, 3, 12, 1, 5, 9, 2):
        ids = torch.randint(4, 1024, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": list(ids)})
    rows[2]["labels"][:5] = [IGNORE] * 5
    return rows


def loss_and_grads(model, batches, num_items):
    """Sum of the batches' losses, each a sum of token losses / num_items, and the
    parameter gradients: the HF Trainer's loss with num_items_in_batch."""
    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = model(**batch, num_items_in_batch=num_items).loss
        loss.backward()
        total += loss.item()
    return total, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_trains_exactly_like_its_rows_one_by_one(attention):
    """Loss and gradients of two packed rows equal those of the 7 samples run alone.
    A difference means attention or the loss crossed from one sample to the next.

    Tolerance: float32 (eps 1.2e-7); the two runs multiply matrices of different shapes,
    so sums are ordered differently. Measured differences are ~2e-7 on the loss (~7)
    and ~1e-7 on gradients (up to ~0.2); the bounds below (1e-5 relative on the loss,
    5e-6 + 1e-4 relative on each gradient) leave 50-300x of room. A leak moves the loss
    by ~9e-4 (12x the bound) and gradients by ~0.2 (40,000x), asserted below."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        ASSETS / "tiny-llama", dtype=torch.float32, attn_implementation=attention
    )
    model.config.use_cache = False  # as the training path sets it
    rows = sample_rows()
    # Targets the model scores: every label but each row's first (nothing predicts it).
    num_items = sum(sum(x != IGNORE for x in r["labels"][1:]) for r in rows)
    alone = [
        {"input_ids": torch.tensor([r["input_ids"]]), "labels": torch.tensor([r["labels"]])}
        for r in rows
    ]
    reference, reference_grads = loss_and_grads(model, alone, num_items)

    packed = PackedCollator(3, 64)([rows[:3], rows[3:]])
    loss, grads = loss_and_grads(model, [packed], num_items)
    tolerance = 1e-5 * reference
    assert loss == pytest.approx(reference, abs=tolerance)
    for g, r in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=5e-6)

    # The test is sensitive: each known way of leaking moves the loss over 10x outside
    # the tolerance above and the gradients by ~0.2, so the assertions above would fail.
    def assert_leaks(batch):
        leaked, leaked_grads = loss_and_grads(model, [batch], num_items)
        assert abs(leaked - reference) > 10 * tolerance
        pairs = zip(leaked_grads, reference_grads, strict=True)
        worst = max((g - r).abs().max().item() for g, r in pairs)
        assert worst > 1e-2

    model.config.use_cache = True  # a KV cache turns off the position_ids-derived mask
    assert_leaks(packed)
    model.config.use_cache = False
    assert_leaks({**packed, "attention_mask": torch.ones_like(packed["input_ids"])})

    # Labels: -100 on each sample's first token is exactly what removes the prediction
    # across the boundary (the model shifts labels itself). Leaving it scores the last
    # token of a sample against the next sample's first; masking the last token instead
    # (the rule for pre-shifted labels) drops a real target and keeps the crossing one.
    real = packed["input_ids"] != 3  # not padding
    starts = (packed["position_ids"] == 0) & real
    kept = packed["labels"].clone()
    kept[starts] = packed["input_ids"][starts]
    crossed, _ = loss_and_grads(model, [{**packed, "labels": kept}], num_items)
    assert abs(crossed - reference) > 10 * tolerance
    last = kept.clone()
    last[torch.roll(starts, -1, dims=1) & real] = IGNORE
    shifted, _ = loss_and_grads(model, [{**packed, "labels": last}], num_items)
    assert abs(shifted - reference) > 10 * tolerance


# ---- real runs, against rows and counts worked out here

# The Stanford Alpaca prompt (Axolotl's text), written out so that the expected rows do
# not come from payload.data.sft.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")


def alpaca_rows(tokenizer) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each row of the bundled alpaca data, built from the prompt
    above: <bos> prompt (masked) output <eos> (trained)."""

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    for line in DATA.read_text().splitlines():
        row = json.loads(line)
        if row.get("input", "").strip():
            prompt = ALPACA_PROMPT.format(instruction=row["instruction"], input=row["input"])
        else:
            prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])
        prompt_ids, output_ids = enc(prompt), enc(row["output"])
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        ids = [bos, *prompt_ids, *output_ids, eos]
        out.append((ids, [IGNORE] * (1 + len(prompt_ids)) + output_ids + [eos]))
    return out


def held_out(rows: int, val_set_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row numbers under `val_set_size`: datasets' seeded split, which picks
    rows by their count and the seed alone, so it can be applied to row numbers here."""
    import datasets

    numbers = datasets.Dataset.from_dict({"row": list(range(rows))})
    split = numbers.train_test_split(test_size=val_set_size, seed=seed, shuffle=True)
    return split["train"]["row"], split["test"]["row"]


def batches_per_rank(bins: int, world_size: int, micro_batch_size: int) -> tuple[int, int]:
    """(batches per rank, bins skipped) by the rule payload.data.packing documents: each
    step takes world_size * micro_batch_size bins; the R left over make one more batch per
    rank when R >= world_size, else they are skipped."""
    full, left = divmod(bins, world_size * micro_batch_size)
    return (full + 1, 0) if left >= world_size else (full, left)


@pytest.mark.slow
def test_two_gloo_ranks_train_packed_in_step(tmp_path, ferry_home, tiny_tokenizer):
    """`launch train --gpus 2` with sample_packing on CPU: each rank must take exactly the
    steps that first fit decreasing and the documented split give for these rows,
    computed here from their lengths. A rank with a different count hangs DDP or trains
    on less data; a different count on both means the packing or the split changed.

    Only rank 0 prints and writes metrics. Rank 1's count is read from the checkpoint
    the Trainer saves at the end of training: each rank writes its `rng_state_<rank>.pth`
    into `checkpoint-<its own global step>`. And `tokens_seen` (non-padding tokens,
    summed over both ranks at every step) must be every train token exactly once."""
    from payload.storage.layout import read_metrics, read_summary

    extra = (
        "sample_packing: true\nnum_epochs: 1\nval_set_size: 0.1\nsave_steps: 100\n"
        "sequence_len: 256\nmicro_batch_size: 8\ngradient_accumulation_steps: 1\nseed: 42\n"
        "logging_steps: 1\nddp_timeout: 90\n"  # a rank left waiting fails in 90 s, not 30 min
    )
    config = quickstart_config(tmp_path, extra)
    result = launch("train", str(config), "--gpus", "2", timeout=400, check=True)
    assert "2 x cpu (gloo)" in result.stdout
    out = Path(json.loads(launch("runs", "--json", check=True).stdout)[0]["output_dir"])

    rows = alpaca_rows(tiny_tokenizer)
    train, _ = held_out(len(rows), 0.1, seed=42)
    lengths = [len(rows[i][0]) for i in train]
    bins = max(reference_ffd(lengths, 256, 200)) + 1  # 200: the default bin_size
    batches, skipped = batches_per_rank(bins, world_size=2, micro_batch_size=8)
    assert skipped == 0  # so every train row is trained once in the epoch
    assert f"into {bins} sequences of 256 tokens" in result.stdout
    assert f"{batches} batches per rank per epoch" in result.stdout
    assert read_summary(out)["steps"] == batches  # rank 0: one epoch, no accumulation
    checkpoints = [p.name for p in out.glob("checkpoint-*")]
    assert checkpoints == [f"checkpoint-{batches}"], checkpoints
    rank_files = sorted(p.name for p in (out / checkpoints[0]).glob("rng_state_*.pth"))
    assert rank_files == ["rng_state_0.pth", "rng_state_1.pth"]
    records = read_metrics(out)
    trained = [r for r in records if "loss" in r]
    assert trained[-1]["step"] == batches
    assert trained[-1]["tokens_seen"] == sum(lengths)
    assert [r for r in records if "eval_loss" in r]


def test_the_training_path_turns_the_kv_cache_off():
    """With the cache on, packed rows attend to each other (see above); the model the
    training path loads for a packed run must come without it."""
    from payload.model import load_model, load_tokenizer

    cfg = validate_mapping(
        {
            "base_model": str(ASSETS / "tiny-llama"),
            "datasets": [{"path": str(DATA), "type": "alpaca"}],
            "learning_rate": 1e-4,
            "sample_packing": True,
        }
    )
    assert load_model(cfg, load_tokenizer(cfg)).config.use_cache is False


def test_the_trainer_loader_follows_the_sampler_epoch_also_after_a_resume(tmp_path):
    """The packed loader must yield the sampler's batches for the epoch the Trainer sets,
    also when a resume re-wraps it to skip batches already trained; otherwise a resumed
    run trains on a different order than the run it continues."""
    import datasets
    from accelerate import skip_first_batches
    from transformers import AutoModelForCausalLM, TrainingArguments

    from payload.distributed import DistInfo
    from payload.model import load_tokenizer
    from payload.trainers.packed import PackedTrainer, packing_setup

    lengths = lognormal(200, 128)
    rows = [{"input_ids": list(range(4, 4 + n)), "labels": list(range(4, 4 + n))} for n in lengths]
    train = datasets.Dataset.from_list(rows)
    cfg = validate_mapping(
        {
            "base_model": str(ASSETS / "tiny-llama"),
            "datasets": [{"path": str(DATA), "type": "alpaca"}],
            "learning_rate": 1e-4,
            "sample_packing": True,
            "sequence_len": 128,
            "micro_batch_size": 2,
        }
    )
    tokenizer = load_tokenizer(cfg)  # as training loads it: the bundled tiny tokenizer
    assert tokenizer.pad_token_id not in {i for r in rows for i in r["input_ids"]}
    packing = packing_setup(cfg, tokenizer, train, None, DistInfo(0, 0, 1, None, "cpu"), "sdpa")
    trainer = PackedTrainer(
        model=AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama"),
        args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
        train_dataset=train,
        packing=packing,
    )
    loader = trainer.get_train_dataloader()
    assert len(loader) == len(packing.train)

    def seen(batches):
        return [b["input_ids"].tolist() for b in batches]

    packing.train.set_epoch(1)
    expected = [packing.collator(train_bins(train, bins)) for bins in packing.train]
    loader.set_epoch(1)
    first = next(iter(loader))
    assert "attention_mask" not in first
    assert first["input_ids"].tolist() == expected[0]["input_ids"].tolist()
    packing.train.set_epoch(0)  # a fresh process starts at epoch 0
    resumed = skip_first_batches(loader, 3)
    resumed.set_epoch(1)
    assert seen(resumed) == seen(expected[3:])


def train_bins(dataset, bins):
    return [[dataset[i] for i in b] for b in bins]


def test_pad_to_sequence_len_without_packing_pads_every_batch_to_it():
    from payload.model import load_tokenizer
    from payload.trainers.settings import unpacked_collator

    base = {
        "base_model": str(ASSETS / "tiny-llama"),
        "datasets": [{"path": str(DATA), "type": "alpaca"}],
        "learning_rate": 1e-4,
        "sequence_len": 64,
    }
    rows = rows_of(5, 9)
    for extra, width in (({}, 9), ({"pad_to_sequence_len": True}, 64)):
        cfg = validate_mapping({**base, **extra})
        batch = unpacked_collator(cfg, load_tokenizer(cfg))(rows)
        assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
        assert int(batch["attention_mask"].sum()) == 14


# `python -m payload train ARGS` (the training entry every backend runs) in this process,
# with HF's Trainer.training_step and prediction_step wrapped to write down each batch
# they are given before running it as usual: `python -c RECORD_BATCHES OUT.json ARGS`.
RECORD_BATCHES = """
import json, sys
from transformers import Trainer

seen = {"train": [], "eval": []}

def recording(kind, step):
    def wrapper(self, model, inputs, *args, **kwargs):
        seen[kind].append({k: v.tolist() for k, v in inputs.items()})
        return step(self, model, inputs, *args, **kwargs)
    return wrapper

Trainer.training_step = recording("train", Trainer.training_step)
Trainer.prediction_step = recording("eval", Trainer.prediction_step)
from payload.__main__ import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""


@pytest.mark.slow
def test_packed_training_with_fixed_shapes_and_an_unpacked_eval(tmp_path, tiny_tokenizer):
    """One process, `pad_to_sequence_len` on packed rows and `eval_sample_packing: false`.
    Every training batch must be (micro_batch_size, sequence_len) and packed: several
    whole rows per sequence, position ids restarting at each, the padding a segment of
    its own, no attention mask. Every eval batch must be plain: one whole row per
    sequence, padded to sequence_len, with an attention mask. The batches are the ones
    the real run trained and evaluated on (RECORD_BATCHES); the rows they must consist of
    are built here from the literal prompt."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    from payload.storage.layout import read_metrics

    extra = (
        "sample_packing: true\npad_to_sequence_len: true\neval_sample_packing: false\n"
        "val_set_size: 0.1\nmax_steps: 4\nnum_epochs: null\neval_steps: 4\nsave_steps: 4\n"
        "sample_packing_eff_est: 0.9\nsequence_len: 256\nmicro_batch_size: 8\nseed: 42\n"
    )
    out, recorded = tmp_path / "out", tmp_path / "batches.json"
    args = ["train", str(quickstart_config(tmp_path, extra)), "--set", f"output_dir={out}"]
    result = subprocess.run(
        [sys.executable, "-c", RECORD_BATCHES, str(recorded), *args],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Run by hand (no launcher to have warned already), the payload warns, once.
    warning = "sample_packing_eff_est: is ignored: rows are packed before training"
    assert (result.stdout + result.stderr).count(warning) == 1
    records = read_metrics(out)
    assert [r["step"] for r in records if "eval_loss" in r] == [4]
    assert max(r["step"] for r in records) == 4
    seen = json.loads(recorded.read_text())

    rows = alpaca_rows(tiny_tokenizer)
    labels_of = {tuple(ids): labels for ids, labels in rows}
    pad = tiny_tokenizer.pad_token_id
    _, eval_rows = held_out(len(rows), 0.1, seed=42)

    assert len(seen["train"]) == 4  # max_steps, no accumulation
    for batch in seen["train"]:
        assert sorted(batch) == ["input_ids", "labels", "position_ids"]  # no mask: packed
        assert len(batch["input_ids"]) == 8  # micro_batch_size bins
        columns = batch["input_ids"], batch["labels"], batch["position_ids"]
        for ids, labels, positions in zip(*columns, strict=True):
            assert len(ids) == len(labels) == len(positions) == 256  # sequence_len
            starts = [k for k, p in enumerate(positions) if p == 0] + [256]
            packed = 0
            for a, b in zip(starts, starts[1:], strict=False):
                assert positions[a:b] == list(range(b - a))
                if ids[a] == pad:  # the padding, last and a segment of its own
                    assert b == 256 and ids[a:] == [pad] * (b - a)
                    assert labels[a:] == [IGNORE] * (b - a)
                    continue
                assert labels[a:b] == labels_of[tuple(ids[a:b])]  # one whole row
                packed += 1
            assert packed >= 2, ids
    assert len(seen["eval"]) == 4  # 32 rows, 8 per batch
    evaluated = []
    for batch in seen["eval"]:
        assert sorted(batch) == ["attention_mask", "input_ids", "labels"]  # plain rows
        assert len(batch["input_ids"]) == 8
        columns = batch["input_ids"], batch["attention_mask"], batch["labels"]
        for ids, mask, labels in zip(*columns, strict=True):
            n = sum(mask)
            assert len(ids) == len(labels) == 256  # padded to sequence_len
            assert mask == [1] * n + [0] * (256 - n)
            assert ids[n:] == [pad] * (256 - n) and labels[n:] == [IGNORE] * (256 - n)
            assert labels[:n] == labels_of[tuple(ids[:n])]  # one whole row
            evaluated.append(ids[:n])
    assert sorted(evaluated) == sorted(rows[i][0] for i in eval_rows)
