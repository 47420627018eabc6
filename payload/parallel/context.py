"""Context parallel: the ranks of one cp group split each (packed) sequence of their shared
batch, and attention stays exact across the split.

Three parts, each where the HF Trainer already has a seam:

- The batch (`ContextSplit`, a collator wrapper). The ranks of a cp group get the same
  batch (the loaders deal batches by data-parallel rank: payload.parallel.mesh.data_shard),
  collate it whole, and each keeps its contiguous `1/cp` of the sequence: input_ids,
  labels, the 2-D attention_mask, and position_ids, which stay the full sequence's (rotary
  embeddings see each token where it is). The sequence is first padded to a multiple of cp
  (labels -100 there). Labels are shifted on the whole sequence, before the split
  (`shift_labels`: the token a position predicts may sit on the next rank). The attention
  mask for this rank's queries against every key is built here too, on the whole
  sequence: causal, within each packed sample (a sample starts where the position ids do
  not continue by one, as transformers reads them), keys that are padding masked.
  Splitting in the collator, before the Trainer sees the batch, is what makes the Trainer
  count the loss's tokens right (below). No load balancing: with a contiguous split the
  last rank's queries see the most keys (a zigzag split would even that out).
- The attention (`ContextAttention`, registered with transformers' AttentionInterface as
  `ferry_cp`). Each layer all-gathers K and V (one collective for both) over the cp group
  with an autograd-correct gather: its backward sums every rank's gradient for the
  gathered K and V (all_reduce, as gloo has no reduce_scatter) and keeps this rank's
  slice. Then transformers' own sdpa function runs on the local queries against all the
  keys, with the mask. On GPU this is the same torch path (nccl); ring-flash-attn is not
  wired in (`ring_attn_func`, `heads_k_stride` are refused by the rules).
- The loss and the gradients, with no code of their own: each rank's loss sums over its
  own label tokens and divides by the batch's tokens over all ranks (the Trainer's
  `num_items_in_batch`, counted from `shift_labels` and summed over the world, where each
  token sits on exactly one rank) times the world size; DDP (or FSDP2 over dp_shard x cp)
  then averages the gradients over the world. So each parameter's gradient is the sum of
  every rank's part, divided by the batch's tokens: the full-sequence mean's, as one
  process with the whole batch computes it. The logged loss (the mean of the ranks') is
  that mean too.
- The eval loss (`ContextParallelMixin`). The Trainer weighs each eval batch by its rows:
  it gathers `loss.repeat(batch)` from every process and, on the last batch, keeps the
  first `remainder` entries (accelerate's count of real rows, from batch x data-parallel
  size once the loader deals by data-parallel rank). A rank's loss alone means nothing (its
  own tokens over the whole world's count, times the world size), so each rank reports the
  world's mean of them: the step's token mean over all its rows, as one process computes
  it on the same rows. The last batch's filler rows (accelerate repeats the first rows to
  fill it) get labels -100 first, and the gather keeps one rank per data-parallel replica,
  in replica order, so the `remainder` entries kept are the real rows'.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from payload.config.rules import context_parallel_size
from payload.config.schema import TrainConfig
from payload.distributed import DistInfo
from payload.parallel.mesh import coordinates

log = logging.getLogger("ferry.train")

ATTENTION = "ferry_cp"  # the name the attention function is registered under
MASK_KEY = "cp_attention_mask"  # the batch key (a model kwarg) carrying this rank's mask
IGNORE = -100


@dataclass(frozen=True)
class ContextSplit:
    """A collator that collates the whole batch with `collator`, then keeps this rank's
    part of the sequence (see the module docstring). `pad_id` fills input_ids where the
    sequence is padded to a multiple of `size`."""

    collator: Any
    rank: int
    size: int
    pad_id: int

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        return split_batch(self.collator(features), self.rank, self.size, self.pad_id)


def split_batch(batch: dict[str, Any], rank: int, size: int, pad_id: int) -> dict[str, Any]:
    """This rank's part of a collated causal-LM batch (input_ids, labels, optional
    attention_mask and position_ids), with `shift_labels` and MASK_KEY added."""
    import torch
    import torch.nn.functional as F

    ids = batch["input_ids"]
    n = ids.shape[1]
    pad = -n % size
    valid = batch.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(n, device=ids.device).expand_as(ids)
    labels = batch["labels"]
    if pad:
        ids = F.pad(ids, (0, pad), value=pad_id)
        labels = F.pad(labels, (0, pad), value=IGNORE)
        valid = F.pad(valid, (0, pad), value=False)
        positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, pad + 1)], dim=1)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    mask = _mask(positions, valid)
    part = slice(rank * (n + pad) // size, (rank + 1) * (n + pad) // size)
    out = {k: v for k, v in batch.items() if k not in ("attention_mask", "position_ids")}
    out.update(
        input_ids=ids[:, part],
        labels=labels[:, part],
        shift_labels=shifted[:, part],
        position_ids=positions[:, part],
        **{MASK_KEY: mask[:, :, part]},
    )
    if "attention_mask" in batch:
        out["attention_mask"] = valid[:, part].to(batch["attention_mask"].dtype)
    return out


def _mask(positions: Any, valid: Any) -> Any:
    """(batch, 1, query, key) booleans, True where a query may attend to a key: causal,
    within its packed sample, never to padding; every query sees at least itself (a
    padding query's output is never scored, and a row with no key would be NaN)."""
    import torch

    n = positions.shape[1]
    starts = torch.diff(positions, dim=1, prepend=positions[:, :1] - 1) != 1
    sample = starts.cumsum(dim=1)
    causal = torch.ones(n, n, dtype=torch.bool, device=positions.device).tril()
    same = sample[:, :, None] == sample[:, None, :]
    allowed = causal & same & valid[:, None, :]
    allowed |= torch.eye(n, dtype=torch.bool, device=positions.device)
    return allowed[:, None]


def _gather_function() -> Any:
    """The autograd Function gathering a tensor's sequence dimension (-2) over a group."""
    import torch
    import torch.distributed as torch_dist

    class GatherSequence(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, local: Any, group: Any) -> Any:
            ctx.group, ctx.length = group, local.shape[-2]
            ctx.rank = torch_dist.get_rank(group)
            parts = [torch.empty_like(local) for _ in range(torch_dist.get_world_size(group))]
            torch_dist.all_gather(parts, local.contiguous(), group=group)
            return torch.cat(parts, dim=-2)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            # Every rank's queries used this rank's keys: their gradients add up.
            grad = grad.contiguous()
            torch_dist.all_reduce(grad, group=ctx.group)
            start = ctx.rank * ctx.length
            return grad[..., start : start + ctx.length, :], None

    return GatherSequence


class ContextAttention:
    """The `ferry_cp` attention: this rank's queries against the whole sequence's keys
    and values, gathered over `group` (see the module docstring)."""

    def __init__(self, group: Any):
        self.group = group
        self.gather = _gather_function()

    def __call__(
        self, module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
    ) -> tuple[Any, None]:
        import torch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        mask = kwargs.pop(MASK_KEY, None)
        if mask is None:
            raise RuntimeError(f"{ATTENTION} attention needs the batch's {MASK_KEY}")
        both = self.gather.apply(torch.stack([key, value]), self.group)
        return sdpa_attention_forward(module, query, both[0], both[1], mask, **kwargs)


def enable(model: Any, dist: DistInfo) -> None:
    """Make `model` attend with `ferry_cp` over the mesh's cp group."""
    from transformers import AttentionInterface

    cp = dist.mesh["cp"]
    group = cp.get_group()
    AttentionInterface.register(ATTENTION, ContextAttention(group))
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = hf.config._attn_implementation
    hf.set_attn_implementation(ATTENTION)
    if dist.is_main:
        print(
            f"context parallel: each sequence split over {cp.size()} ranks "
            f"(contiguous parts, no load balancing); attention: K/V all-gathered, then torch "
            f"sdpa (in place of {before}; ring-flash-attn is not used)",
            flush=True,
        )


def splitter(cfg: TrainConfig, rank: int, world: int, pad_id: int | None) -> Any:
    """A function wrapping a collator in this rank's `ContextSplit`, or None without
    context parallel."""
    size = context_parallel_size(cfg)
    if size == 1 or world == 1:
        return None
    where = coordinates(cfg, rank, world)

    def wrap(collator: Any) -> ContextSplit:
        return ContextSplit(collator, where["cp"], size, pad_id if pad_id is not None else 0)

    return wrap


class ContextParallelMixin:
    """What the HF Trainer needs when ranks share a batch (context or tensor parallel
    groups): its collator wrapped in this rank's `ContextSplit`, its loaders dealing batches
    by data-parallel rank (accelerate deals them over every process), and an exact eval
    loss (see the module docstring). Sits under payload.trainers.settings.SettingsMixin,
    which calls `split_context`; a packed loader deals its own (payload.trainers.packed)."""

    args: Any
    accelerator: Any
    data_collator: Any
    processing_class: Any
    gather_function: Any
    data_rank: tuple[int, int] = (0, 1)  # (rank, size) among the data-parallel replicas

    def split_context(self, cfg: TrainConfig) -> None:
        from payload.parallel.mesh import data_shard

        rank, world = self.args.process_index, self.args.world_size
        self.data_rank = data_shard(cfg, rank, world)
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        wrap = splitter(cfg, rank, world, pad_id)
        if wrap is not None and self.data_collator is not None:
            self.data_collator = wrap(self.data_collator)

    @property
    def _shares_batches(self) -> bool:
        return self.data_rank[1] != self.args.world_size

    def get_train_dataloader(self) -> Any:
        return self._deal_by_data_rank(super().get_train_dataloader())  # type: ignore[misc]

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        return self._deal_by_data_rank(super().get_eval_dataloader(eval_dataset))  # type: ignore[misc]

    def _deal_by_data_rank(self, loader: Any) -> Any:
        """`loader` with accelerate's shard wrapper dealing over the data-parallel ranks."""
        rank, size = self.data_rank
        shard = getattr(loader, "batch_sampler", None)
        if size != self.args.world_size and getattr(shard, "num_processes", 1) > 1:
            shard.num_processes, shard.process_index = size, rank
        return loader

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        # The Trainer sets gather_function back to gather_for_metrics after every loop.
        if self._shares_batches:
            self.gather_function = self._gather_replicas
        return super().evaluation_loop(*args, **kwargs)  # type: ignore[misc]

    def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if not self._shares_batches:
            return super().prediction_step(model, inputs, *args, **kwargs)  # type: ignore[misc]
        inputs = self._drop_filler(inputs)
        loss, logits, labels = super().prediction_step(model, inputs, *args, **kwargs)  # type: ignore[misc]
        if loss is not None:
            loss = self.accelerator.reduce(loss, reduction="mean")
        return loss, logits, labels

    def _drop_filler(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """`inputs` with labels -100 on the rows accelerate repeated to fill the last batch:
        in data-parallel order, the rows from the `remainder`th on."""
        state = self.accelerator.gradient_state
        if not state.end_of_dataloader or state.remainder <= 0 or "labels" not in inputs:
            return inputs
        rows = inputs["labels"].shape[0]
        real = state.remainder - self.data_rank[0] * rows  # this replica's real rows
        if real >= rows:
            return inputs
        out = dict(inputs)
        for key in ("labels", "shift_labels"):
            if key in out:
                out[key] = out[key].clone()
                out[key][max(real, 0) :] = IGNORE
        return out

    def _gather_replicas(self, data: Any) -> Any:
        """gather_for_metrics over the data-parallel replicas: every process's `data`, of
        which the first rank of each replica is kept (a replica's ranks report the same
        rows; the mesh lays replicas out in contiguous blocks of ranks), truncated on the
        last batch to its real rows."""
        from accelerate.utils import recursively_apply

        state = self.accelerator.gradient_state
        world, replicas = self.args.world_size, self.data_rank[1]

        def keep(tensor: Any) -> Any:
            parts = tensor.reshape(world, -1, *tensor.shape[1:])[:: world // replicas]
            kept = parts.flatten(0, 1)
            if state.end_of_dataloader and state.remainder > 0:
                kept = kept[: state.remainder]
            return kept

        return recursively_apply(keep, self.accelerator.gather(data))
