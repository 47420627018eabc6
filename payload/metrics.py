"""`metrics.jsonl` and the progress lines a run prints, from the trainer's logs.

One JSON object per line, written by the main process only:
- training:  {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s",
              "tokens_seen", "elapsed_s"}
- evaluation: {"step", "epoch", "eval_loss", ...}
- the end:   {"step", "train_runtime", "train_loss", ...}
`tokens_per_s` counts non-padding input tokens over all processes since the previous log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from payload.storage.layout import METRICS_FILE, read_metrics

# Objective metrics shown on each step line, when the trainer logs them: (key, label).
PROGRESS = (
    ("reward", "reward"),  # GRPO: mean reward of the step's completions
    ("rewards/margins", "margin"),  # DPO/IPO/SimPO/KTO/ORPO: chosen minus rejected reward
    ("rewards/accuracies", "acc"),  # share of pairs with chosen above rejected
    ("accuracy", "acc"),  # reward model: pairs ranked right
)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsCallback(TrainerCallback):
    """Appends each log to metrics.jsonl and prints one progress line per log."""

    def __init__(self, output_dir: str | Path, is_main: bool):
        self.path = Path(output_dir) / METRICS_FILE
        self.is_main = is_main
        self.start = time.monotonic()
        self.last_time = self.start
        self.last_tokens = 0
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run keeps the records up to the step it resumes from; a fresh run
        # starts the file again.
        kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= state.global_step]
        with self.path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in (kept if state.global_step else []))
        self.start = self.last_time = time.monotonic()
        self.last_tokens = state.num_input_tokens_seen or 0
        self.first_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.is_main or not logs:
            return
        now = time.monotonic()
        record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        # transformers 5 repeats run totals on every step log; keep them for the final one.
        noise = {"epoch", "num_input_tokens_seen"}
        if "loss" in logs:
            noise |= {"train_runtime", "train_tokens_per_second"}
        record.update({k: v for k, v in logs.items() if k not in noise})
        if "loss" in logs:
            tokens = state.num_input_tokens_seen or 0
            elapsed = now - self.last_time
            record["tokens_per_s"] = (
                round((tokens - self.last_tokens) / elapsed, 1) if elapsed > 0 else None
            )
            record["tokens_seen"] = tokens
            self.last_time, self.last_tokens = now, tokens
        record["elapsed_s"] = round(now - self.start, 3)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._print(record, state, now)

    def _print(self, record: dict[str, Any], state, now: float) -> None:
        step, total = state.global_step, state.max_steps
        done = step - self.first_step
        eta = (now - self.start) / done * (total - step) if done else 0.0
        head = f"[step {step}/{total}]"
        if "loss" in record:
            tps = record.get("tokens_per_s")
            parts = [
                f"loss {record['loss']:.4f}",
                # What tells an objective's progress where the loss does not (GRPO's loss
                # sits near 0 while its reward climbs; DPO's margin and accuracy).
                *(f"{label} {record[key]:.4f}" for key, label in PROGRESS if key in record),
                f"lr {record.get('learning_rate', 0):.2e}",
                f"{tps:,.0f} tok/s" if tps else "- tok/s",
                f"epoch {record['epoch']:.2f}",
                f"eta {_fmt_eta(eta)}",
            ]
            print(f"{head} " + " | ".join(parts), flush=True)
        elif "eval_loss" in record:
            print(f"{head} eval_loss {record['eval_loss']:.4f}", flush=True)
