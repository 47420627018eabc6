"""Sample packing: several rows share one `sequence_len` row, and attention never crosses
from one to another.

Rows are packed into *bins* of at most `sequence_len` tokens and `bin_size` rows, first
fit decreasing (FFD) within each group of `group_size` rows, or next fit in row order
(`sequential`). A batch is `micro_batch_size` bins; `PackedCollator` (payload.data.collator)
turns each bin into one row. A worked example, `sequence_len: 8`, rows A (5 tokens),
B (2), C (3) and D (4):

    FFD, longest first:  A(5) opens bin 0; D(4) does not fit there and opens bin 1;
                         C(3) fills bin 0; B(2) goes to bin 1.
    bin 0 = A C          input_ids     a0 a1 a2 a3 a4 c0 c1 c2
                         position_ids   0  1  2  3  4  0  1  2
                         labels       -100 a1 a2 a3 a4 -100 c1 c2
    bin 1 = D B + pad    input_ids     d0 d1 d2 d3 b0 b1 p  p
                         position_ids   0  1  2  3  0  1  0  1
                         labels       -100 d1 d2 d3 -100 b1 -100 -100

Position ids restart at 0 for every row (and for the padding, which becomes a segment of
its own), so rotary embeddings see each row as if it were alone. The model shifts labels
by one inside its loss (logit t is scored against label t+1), so the -100 on the first
token of C is what removes the one prediction that would cross the boundary: a4
predicting c0. Alone, C's first label is never a target either. The attention mask is
causal within each segment and empty across segments; for bin 0 (query rows, key
columns, 1 = may attend):

         a0 a1 a2 a3 a4 c0 c1 c2
    a0    1  .  .  .  .  .  .  .
    a1    1  1  .  .  .  .  .  .
    a2    1  1  1  .  .  .  .  .
    a3    1  1  1  1  .  .  .  .
    a4    1  1  1  1  1  .  .  .
    c0    .  .  .  .  .  1  .  .
    c1    .  .  .  .  .  1  1  .
    c2    .  .  .  .  .  1  1  1

transformers builds that block-diagonal mask itself from `position_ids` when the batch
has no `attention_mask` and the model no KV cache (masking_utils, for "sdpa" and
"eager"); flash attention reads the same segments as varlen `cu_seqlens`.

Step count. Bins are packed once, when the sampler is built, so the number of batches is
known exactly (no estimate) and is the same on every rank and in every epoch; each epoch
only reshuffles which rows of equal length share a bin, and the order of the bins.
Distributed remainder rule: with `W` ranks, each step takes `W * micro_batch_size` bins.
The `R` bins left over at the end make one more, smaller batch per rank when `R >= W`;
when `R < W` those `R` bins (and so their rows) are skipped in that epoch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from payload.errors import FerryError


@functools.cache
def _low_bits(capacity: int) -> list[int]:
    """`[b]` has bits 0..b set: `present & [b]` keeps the lengths up to b."""
    return [(2 << b) - 1 for b in range(capacity + 1)]


def _ffd_plan(sizes: list[int], counts: list[int], capacity: int, max_rows: int) -> Any:
    """FFD over a histogram of row lengths (`sizes` descending, `counts` rows of each).

    FFD fills bins one at a time: scanning the rows longest first, bin k takes every
    row that still fits when its turn comes. So each bin is built by repeatedly taking
    the longest length that still fits, as many rows of it as fit. A bin that leaves
    every length it used with enough rows for another copy of itself would be built
    again identically, so it is built once with a repeat count: that is what makes this
    fast (1M rows, ~5,000 distinct bins). Returns (repeats, sizes, takes, ends): bin
    shape j takes `takes[i]` rows of `sizes[i]` for i in [ends[j-1], ends[j]).
    """
    count = [0] * (capacity + 1)
    present = 0  # bit s set: rows of length s remain
    for s, c in zip(sizes, counts, strict=True):
        count[s] = c
        present |= 1 << s
    below = _low_bits(capacity)
    repeats: list[int] = []
    used: list[int] = []
    takes: list[int] = []
    ends: list[int] = []
    while present:
        room, rows, start, copies = capacity, 0, len(used), 1 << 62
        s = present.bit_length() - 1
        while True:
            have = count[s]
            k = room // s
            if have < k:
                k = have
            if max_rows - rows < k:
                k = max_rows - rows
            used.append(s)
            takes.append(k)
            if have // k < copies:
                copies = have // k
            room -= k * s
            rows += k
            if rows == max_rows or room == 0:
                break
            s = (present & below[room if room < s else s - 1]).bit_length() - 1
            if s <= 0:
                break
        for i in range(start, len(used)):
            left = count[used[i]] - copies * takes[i]
            count[used[i]] = left
            if not left:
                present ^= 1 << used[i]
        repeats.append(copies)
        ends.append(len(used))
    return repeats, used, takes, ends


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x) - x


def _within_runs(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each count c, concatenated: [2, 3] -> [0, 1, 0, 1, 2]."""
    return np.arange(int(counts.sum())) - np.repeat(_exclusive_cumsum(counts), counts)


def _ffd_bins(lengths: np.ndarray, capacity: int, max_rows: int) -> Any:
    """FFD as (slots, bin_slots, sizes): `slots` are the row positions longest first
    (stable), `bin_slots` the slot indices bin after bin, `sizes` the rows per bin."""
    if len(lengths) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    # Radix sort on 16 bits (~10x faster than timsort on int64) when lengths allow it.
    key = capacity - lengths
    slots = np.argsort(key.astype(np.uint16) if capacity < 2**16 else key, kind="stable")
    sizes_u, counts = np.unique(lengths, return_counts=True)
    repeats, used, takes, ends = _ffd_plan(
        sizes_u[::-1].tolist(), counts[::-1].tolist(), capacity, max_rows
    )
    copies = np.asarray(repeats, dtype=np.int64)
    used_a, take = np.asarray(used, dtype=np.int64), np.asarray(takes, dtype=np.int64)
    per_shape = np.diff(ends, prepend=0)  # entries (lengths used) per bin shape
    shape = np.repeat(np.arange(len(ends)), per_shape)
    # Slots of one length are handed out in the order the bins were opened, and slots
    # are ordered longest first: so entry i's first slot is the number of slots taken by
    # the entries before it in (length descending, entry) order.
    by_length = np.argsort(-used_a, kind="stable")
    base = np.empty_like(used_a)
    base[by_length] = _exclusive_cumsum((copies[shape] * take)[by_length])
    # One triple per (bin shape, copy, entry), in bin order; each covers `take` slots.
    per_triple_shape = copies * per_shape
    t_shape = np.repeat(np.arange(len(ends)), per_triple_shape)
    local = _within_runs(per_triple_shape)
    copy = local // per_shape[t_shape]
    entry = np.asarray(ends)[t_shape] - per_shape[t_shape] + local % per_shape[t_shape]
    t_take = take[entry]
    owner = np.repeat(np.arange(len(entry)), t_take)
    bin_slots = (base[entry] + copy * t_take)[owner] + _within_runs(t_take)
    rows_per_shape = np.add.reduceat(take, np.asarray(ends) - per_shape)
    return slots, bin_slots, np.repeat(rows_per_shape, copies)


def pack_ffd(lengths: np.ndarray, capacity: int, max_rows: int) -> np.ndarray:
    """The bin of each row under first fit decreasing (bins numbered as FFD opens them).
    Among rows of equal length, earlier rows go to earlier bins."""
    lengths = np.asarray(lengths, dtype=np.int64)
    slots, bin_slots, sizes = _ffd_bins(lengths, capacity, max_rows)
    bins = np.empty(len(lengths), dtype=np.int64)
    bins[slots[bin_slots]] = np.repeat(np.arange(len(sizes)), sizes)
    return bins


def pack_sequential(lengths: np.ndarray, capacity: int, max_rows: int) -> np.ndarray:
    """Rows per bin under next fit in row order: a bin closes when the next row does not
    fit, so bins hold consecutive rows and keep their order."""
    sizes: list[int] = []
    room = rows = 0
    for n in np.asarray(lengths).tolist():
        if rows and (n > room or rows == max_rows):
            sizes.append(rows)
            rows = 0
        if not rows:
            room = capacity
        room -= n
        rows += 1
    if rows:
        sizes.append(rows)
    return np.asarray(sizes, dtype=np.int64)


def pack_groups(lengths: np.ndarray, capacity: int, max_rows: int, group_size: int) -> Any:
    """`_ffd_bins` on each run of `group_size` rows, joined: (slots, bin_slots, sizes)
    over all rows, bins numbered group after group.

    The groups are packed one after another in this process: at ~30 ms per 100,000 rows,
    a process pool was slower on the 2-core machine bench/packing.py ran on (0.41-0.54 s
    against 0.27-0.34 s for 1M rows), and forking a trainer that already holds torch and
    gloo threads is a hazard.
    """
    parts = [
        _ffd_bins(lengths[i : i + group_size], capacity, max_rows)
        for i in range(0, len(lengths), group_size)
    ]
    if not parts:
        return _ffd_bins(lengths, capacity, max_rows)
    offsets = np.arange(len(parts)) * group_size
    slots = np.concatenate([p[0] + o for p, o in zip(parts, offsets, strict=True)])
    bin_slots = np.concatenate([p[1] + o for p, o in zip(parts, offsets, strict=True)])
    return slots, bin_slots, np.concatenate([p[2] for p in parts])


class MultipackBatchSampler:
    """Batches of packed bins for one rank: each item it yields is a list of
    `micro_batch_size` bins (fewer in an epoch's last batch), each bin a list of row
    indices. The module docstring has the packing, the step count and the remainder rule.

    `shuffle` (training) shuffles the rows before they are cut into groups, which rows
    of equal length share a bin, and the bin order, all from `seed` and the epoch set
    by `set_epoch`. Without it (evaluation, or `sequential`) bins keep their order.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        sequence_len: int,
        micro_batch_size: int,
        *,
        bin_size: int = 200,
        group_size: int = 100_000,
        sequential: bool = False,
        shuffle: bool = True,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) and (lengths.min() < 1 or lengths.max() > sequence_len):
            bad = int(np.flatnonzero((lengths < 1) | (lengths > sequence_len))[0])
            raise FerryError(
                f"sample_packing: row {bad} has {lengths[bad]} tokens; every row needs 1 to "
                f"sequence_len ({sequence_len})."
            )
        self.lengths = lengths
        self.sequence_len = sequence_len
        self.micro_batch_size = micro_batch_size
        self.world_size, self.rank = world_size, rank
        self.seed, self.epoch = seed, 0
        self.shuffle = shuffle and not sequential
        if sequential:
            self._slot_rows = np.arange(len(lengths))
            self._bin_slots = self._slot_rows
            sizes = pack_sequential(lengths, sequence_len, bin_size)
        else:
            rows = np.arange(len(lengths))
            if self.shuffle:
                rows = np.random.default_rng(seed).permutation(len(lengths))
            slots, self._bin_slots, sizes = pack_groups(
                lengths[rows], sequence_len, bin_size, group_size
            )
            self._slot_rows = rows[slots]
            # Slots of one length in one group are interchangeable: a class each.
            slot_lengths = lengths[self._slot_rows]
            group = slots // group_size
            change = (np.diff(slot_lengths) != 0) | (np.diff(group) != 0)
            self._tie_class = np.concatenate([[0], np.cumsum(change)])
        # Bin b holds the rows `_slot_rows[_bin_slots[_starts[b]:_starts[b + 1]]]`.
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.num_bins = len(sizes)
        per_step = world_size * micro_batch_size
        full, left = divmod(self.num_bins, per_step)
        self.dropped_bins = left if left < world_size else 0
        self.batches = full + (1 if left >= world_size else 0)
        if self.batches == 0:
            raise FerryError(
                f"sample_packing: the {len(lengths)} rows fill {self.num_bins} packed sequences, "
                f"fewer than the {world_size} ranks need for one batch each."
            )

    @property
    def efficiency(self) -> float:
        """Tokens over the tokens the bins could hold: tokens / (bins * sequence_len)."""
        return float(self.lengths.sum()) / (self.num_bins * self.sequence_len)

    @property
    def lower_bound_bins(self) -> int:
        """The fewest bins any packing could use: ceil(tokens / sequence_len)."""
        return math.ceil(int(self.lengths.sum()) / self.sequence_len)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows bin after bin, the order the steps take the bins in) for one epoch."""
        if not self.shuffle:
            return self._slot_rows[self._bin_slots], np.arange(self.num_bins)
        rng = np.random.default_rng([self.seed, epoch])
        # FFD put rows of one length into interchangeable slots: deal them anew.
        deal = np.argsort(self._tie_class + rng.random(len(self._tie_class)))
        rows = self._slot_rows[deal][self._bin_slots]
        return rows, rng.permutation(self.num_bins)

    def epoch_bins(self, epoch: int | None = None) -> list[np.ndarray]:
        """Every bin of an epoch (all ranks), in the order the steps take them."""
        rows, order = self._epoch(self.epoch if epoch is None else epoch)
        return [rows[self._starts[b] : self._starts[b + 1]] for b in order]

    def __iter__(self) -> Iterator[list[list[int]]]:
        rows, order = self._epoch(self.epoch)
        starts = self._starts

        def take(bins: np.ndarray) -> list[list[int]]:
            return [rows[starts[b] : starts[b + 1]].tolist() for b in bins]

        mbs, rank = self.micro_batch_size, self.rank
        per_step = self.world_size * mbs
        full = self.num_bins // per_step
        for step in range(full):
            first = step * per_step + rank * mbs
            yield take(order[first : first + mbs])
        if self.batches > full:
            tail = order[full * per_step :]
            yield take(np.array_split(tail, self.world_size)[rank])
