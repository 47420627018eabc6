"""Turn a batch of packed bins into model inputs (see payload.data.packing for the worked
example of position ids, labels and the mask they imply)."""

from __future__ import annotations

from typing import Any

import numpy as np

from payload.data.core import IGNORE


class PackedCollator:
    """A batch of bins (each a list of tokenized rows) -> `input_ids`, `labels` and
    `position_ids`, one row per bin.

    There is deliberately no `attention_mask`: transformers derives the block-diagonal
    mask from `position_ids` only when the mask is absent (with a mask, even one that is
    all ones over the real tokens, rows would attend to each other). Padding goes at the
    end of each row, with label -100 and position ids of its own segment (0, 1, ...), so
    no real token can attend to it. Rows pad to the longest bin in the batch, or to
    `sequence_len` with `pad_to_sequence_len`.

    `flatten` puts the whole batch in a single row instead (flash attention: its varlen
    path reads segments from `position_ids` only for a batch of one row); with
    `pad_to_sequence_len` that row is padded to `micro_batch_size * sequence_len`.

    Without an `attention_mask`, the trainer counts non-padding tokens as those that are
    not `pad_token_id`; where the pad token is also the eos token (Ferry's fallback),
    the tokens-per-second figure leaves out each row's eos.
    """

    def __init__(
        self,
        pad_token_id: int,
        sequence_len: int,
        *,
        pad_to_sequence_len: bool = False,
        flatten: bool = False,
        micro_batch_size: int = 1,
    ):
        self.pad_token_id = pad_token_id
        self.sequence_len = sequence_len
        self.pad_to_sequence_len = pad_to_sequence_len
        self.flatten = flatten
        self.micro_batch_size = micro_batch_size

    def __call__(self, bins: list[list[dict[str, Any]]]) -> dict[str, Any]:
        import torch

        packed = [self._concatenate(rows) for rows in bins]
        if self.flatten:
            packed = [tuple(np.concatenate(parts) for parts in zip(*packed, strict=True))]
            width = self.micro_batch_size * self.sequence_len
        else:
            width = self.sequence_len
        if not self.pad_to_sequence_len:
            width = max(len(ids) for ids, _, _ in packed)
        shape = (len(packed), width)
        input_ids = np.full(shape, self.pad_token_id, dtype=np.int64)
        labels = np.full(shape, IGNORE, dtype=np.int64)
        position_ids = np.tile(np.arange(width, dtype=np.int64), (len(packed), 1))
        for i, (ids, lab, pos) in enumerate(packed):
            n = len(ids)
            if n > width:
                raise ValueError(f"a packed row of {n} tokens exceeds its width {width}")
            input_ids[i, :n], labels[i, :n], position_ids[i, :n] = ids, lab, pos
            position_ids[i, n:] -= n  # the padding is a segment of its own
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
        }

    @staticmethod
    def _concatenate(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = [np.asarray(r["input_ids"], dtype=np.int64) for r in rows]
        labels = [np.array(r.get("labels", r["input_ids"]), dtype=np.int64) for r in rows]
        for lab in labels:
            # The loss scores logit t against label t+1, so this label is the target of
            # the previous row's last token: the one prediction that crosses rows.
            lab[0] = IGNORE
        positions = [np.arange(len(x), dtype=np.int64) for x in ids]
        return np.concatenate(ids), np.concatenate(labels), np.concatenate(positions)
