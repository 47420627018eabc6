"""The HF Trainer with sample packing: its train (and eval) batches come from
`MultipackBatchSampler` through `PackedCollator` instead of one row per example.

`packing_setup(cfg, ...)` builds the samplers once, before the trainer, because the
training arguments need the exact number of batches per epoch (save and eval intervals
are counted in steps). The trainer only wires them into its dataloaders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from payload.config.schema import TrainConfig
from payload.data.collator import PackedCollator
from payload.data.packing import MultipackBatchSampler
from payload.distributed import DistInfo
from payload.errors import FerryError
from payload.parallel.context import splitter
from payload.parallel.mesh import data_shard
from payload.trainers.settings import FerryTrainer


def row_lengths(dataset: Any) -> np.ndarray:
    """Tokens per row (`input_ids`), read column-wise from a `datasets.Dataset` in
    chunks so a large set is never copied whole into Python lists."""
    try:
        import pyarrow.compute as pc

        chunks = dataset.with_format("arrow").iter(batch_size=65_536)
        parts = [pc.list_value_length(chunk["input_ids"]).to_numpy() for chunk in chunks]
    except AttributeError:  # not a datasets.Dataset: a list of rows, say
        parts = [np.asarray([len(row["input_ids"]) for row in dataset])]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class PackedRows:
    """A dataset view whose items are bins: `view[[3, 7]]` is `[row 3, row 7]`, so a
    DataLoader driven by `MultipackBatchSampler` hands the collator a list of bins."""

    def __init__(self, dataset: Any, sampler: MultipackBatchSampler):
        self.dataset, self.sampler = dataset, sampler

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        # accelerate's DataLoaderShard forwards the epoch here, also after a resume
        # re-wraps the batch sampler; the sampler is what needs it.
        self.sampler.set_epoch(epoch)

    def __getitem__(self, rows: list[int]) -> list[dict[str, Any]]:
        return self.__getitems__([rows])[0]

    def __getitems__(self, bins: list[list[int]]) -> list[list[dict[str, Any]]]:
        flat = [i for b in bins for i in b]
        columns = self.dataset[flat]  # one batched read for the whole batch
        names = list(columns)
        values = zip(*columns.values(), strict=True)
        rows = [dict(zip(names, row, strict=True)) for row in values]
        out, at = [], 0
        for b in bins:
            out.append(rows[at : at + len(b)])
            at += len(b)
        return out


@dataclass
class Packing:
    train: MultipackBatchSampler
    eval: MultipackBatchSampler | None
    collator: Any  # a PackedCollator (in a ContextSplit with context parallel)
    eval_collator: Any  # the same, for eval_batch_size bins

    def lines(self) -> list[str]:
        s = self.train
        out = [
            f"packed {len(s.lengths)} train rows into {s.num_bins} sequences of "
            f"{s.sequence_len} tokens (efficiency {s.efficiency:.1%}; the fewest possible "
            f"is {s.lower_bound_bins}), {len(s)} batches per rank per epoch"
        ]
        if s.dropped_bins:
            out.append(
                f"{s.dropped_bins} packed sequence(s) left over per epoch (fewer than one per "
                "rank) are skipped in that epoch"
            )
        return out


def _sampler(
    cfg: TrainConfig, dataset: Any, dist: DistInfo, *, shuffle: bool, batch: int
) -> MultipackBatchSampler:
    return MultipackBatchSampler(
        row_lengths(dataset),
        cfg.sequence_len,
        batch,
        bin_size=cfg.sample_packing_bin_size,
        group_size=cfg.sample_packing_group_size,
        sequential=cfg.sample_packing_sequentially,
        shuffle=shuffle,
        # Dealt over the data-parallel replicas: a context-parallel group shares a batch.
        world_size=data_shard(cfg, dist.rank, dist.world_size)[1],
        rank=data_shard(cfg, dist.rank, dist.world_size)[0],
        seed=cfg.seed,
    )


def packing_setup(
    cfg: TrainConfig,
    tokenizer: Any,
    train_set: Any,
    eval_set: Any,
    dist: DistInfo,
    attention: str | None,
) -> Packing:
    """Samplers for the train set (and the eval set, with `eval_sample_packing`, which
    defaults to `sample_packing`) and the collator for `attention`; the main process
    prints what the packing did."""
    if not hasattr(train_set, "__len__"):
        raise FerryError(
            "sample_packing needs the whole train set up front (to pack it and count the "
            "steps); it does not work with a streamed dataset."
        )
    eval_packed = cfg.eval_sample_packing if cfg.eval_sample_packing is not None else True
    eval_batch = cfg.eval_batch_size or cfg.micro_batch_size

    split = splitter(cfg, dist.rank, dist.world_size, tokenizer.pad_token_id)

    def collator(batch: int) -> Any:
        whole = PackedCollator(
            tokenizer.pad_token_id,
            cfg.sequence_len,
            pad_to_sequence_len=bool(cfg.pad_to_sequence_len),
            flatten="flash" in (attention or ""),
            micro_batch_size=batch,
        )
        # Context parallel: this rank's part of each packed sequence.
        return split(whole) if split else whole

    packing = Packing(
        train=_sampler(cfg, train_set, dist, shuffle=True, batch=cfg.micro_batch_size),
        eval=_sampler(cfg, eval_set, dist, shuffle=False, batch=eval_batch)
        if eval_set is not None and eval_packed
        else None,
        collator=collator(cfg.micro_batch_size),
        eval_collator=collator(eval_batch),
    )
    if dist.is_main:
        for line in packing.lines():
            print(f"data: {line}", flush=True)
        # sample_packing_eff_est is ignored: the config check says so, once; the line
        # above gives the measured efficiency.
    return packing


class PackedTrainer(FerryTrainer):
    """A FerryTrainer whose train (and, with `packing.eval`, eval) loader yields packed
    batches. Everything else is the HF Trainer's, including the collator it was given,
    which an unpacked eval set keeps using."""

    def __init__(self, *args: Any, packing: Packing, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.packing = packing
        # With a KV cache, transformers stops reading segments from position_ids and
        # rows silently attend to each other (tests/payload/test_packing.py shows it).
        self.model.config.use_cache = False

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        if self.packing.eval is None:
            return super().evaluate(*args, **kwargs)
        # accelerate cannot size a batch of bins, so at each gather it notes that the
        # caller must drop any repeated rows itself. The sampler repeats none: say nothing.
        quiet = logging.getLogger("accelerate.accelerator")
        level = quiet.level
        quiet.setLevel(max(level, logging.WARNING))
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            quiet.setLevel(level)

    def get_train_dataloader(self) -> Any:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return self._packed_loader(self.train_dataset, self.packing.train, self.packing.collator)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        other = eval_dataset is not None and eval_dataset is not self.eval_dataset
        if self.packing.eval is None or other:
            return super().get_eval_dataloader(eval_dataset)
        return self._packed_loader(self.eval_dataset, self.packing.eval, self.packing.eval_collator)

    def _packed_loader(self, dataset: Any, sampler: MultipackBatchSampler, collator: Any) -> Any:
        from torch.utils.data import DataLoader

        loader = DataLoader(
            PackedRows(dataset, sampler),
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        prepared = self.accelerator.prepare(loader)
        # The sampler already gives each rank its own batches; accelerate's shard wrapper
        # would deal them out over the ranks a second time and lose all but 1/world of
        # them. Make it a pass-through, as the Trainer does for its own rank-aware
        # BatchRebalanceSampler.
        shard = getattr(prepared, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0
        return prepared
