"""`launch evaluate`: the trained model's loss and perplexity on the config's eval set.

The eval set is built as training builds it (`payload.data.build.build_datasets`, the
same tokenizer and seed): `test_datasets`, or the `val_set_size` rows held out of the
training data, which are the same rows training held out.

Loss: the cross-entropy of each trained token (label not -100) given the tokens before
it, in nats, averaged over all the set's trained tokens (token-weighted: a long row
counts by its tokens, not as one row). Perplexity: exp of that mean. Rows are scored
one row per sequence, never packed together. (The `eval_loss` the trainer logs during
training is a mean over batches of each batch's own token mean; with rows of different
lengths the two differ slightly.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from payload.data.core import IGNORE
from payload.errors import FerryError
from payload.posttrain import loading
from payload.posttrain.target import Target

DEFAULT_BATCH = 8


@dataclass
class Evaluation:
    eval_loss: float  # mean nats per trained token
    perplexity: float  # exp(eval_loss)
    rows: int
    tokens: int  # trained tokens scored
    source: str  # which keys the set came from
    weighting: str = "token"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(target: Target) -> Evaluation:
    import torch

    from payload.data.build import build_datasets
    from payload.model import load_tokenizer
    from payload.trainers import objective

    cfg = target.cfg
    if objective(cfg) == "vision":
        raise FerryError(
            f"{target.name} is a vision-language run; launch evaluate does not read image "
            "chats yet.",
            hint="Its eval loss on val_set_size / test_datasets rows is logged during training "
            "(eval_loss in metrics.jsonl and summary.json).",
        )
    if (name := objective(cfg)) != "sft":
        raise FerryError(
            f"{target.name} trains the `{name}` objective; launch evaluate measures a language "
            "model's loss on supervised rows (no `rl:`, reward_model or process_reward_model)."
        )
    if not (cfg.test_datasets or cfg.val_set_size):
        raise FerryError(
            f"{target.name} has no eval set: set `test_datasets` (rows to evaluate on) or "
            "`val_set_size` (a share of the training rows held out) in its config."
        )
    loading.quiet()
    import datasets

    datasets.disable_progress_bars()
    # The tokenizer training built the rows with (the config's), so the ids are the same.
    _, eval_set, _ = build_datasets(cfg, load_tokenizer(cfg), progress=False)
    if eval_set is None or len(eval_set) == 0:  # a stream, or every row skipped
        raise FerryError(f"{target.name}: the eval set has no rows to score.")
    tok = loading.tokenizer(target)
    model = loading.trained_model(target, tok)
    batch = cfg.eval_batch_size or cfg.micro_batch_size or DEFAULT_BATCH
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(eval_set), batch):
            rows = eval_set.select(range(start, min(start + batch, len(eval_set))))
            nll, n = _batch_nll(model, rows["input_ids"], rows["labels"], tok.pad_token_id)
            total += nll
            count += n
    if count == 0:
        raise FerryError(f"{target.name}: the eval rows have no trained tokens to score.")
    loss = total / count
    source = "test_datasets" if cfg.test_datasets else f"val_set_size {cfg.val_set_size}"
    return Evaluation(loss, math.exp(loss), len(eval_set), count, source)


def _batch_nll(model: Any, ids: list, labels: list, pad_id: int) -> tuple[float, int]:
    """Summed cross-entropy (nats) of the batch's trained tokens, and their count. Rows
    are padded on the right; padding is neither attended to nor scored."""
    import torch
    import torch.nn.functional as F

    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    target = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (row, lab) in enumerate(zip(ids, labels, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        target[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(row)] = 1
    device = model.device
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    # Position t predicts token t + 1.
    logits, target = logits[:, :-1].float(), target[:, 1:].to(device)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return nll.item(), int((target != IGNORE).sum())
