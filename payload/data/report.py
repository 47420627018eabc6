"""What the data pipeline did, for the run's log and summary: `DataReport`, and the
progress of tokenizing (a rich bar on a terminal, one line with the rate otherwise)."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

TRUNCATED = "truncated to sequence_len"


@dataclass
class DataReport:
    """What happened to the rows: kept, skipped per reason (with the first row skipped for
    each), truncated, how long tokenizing took, and whether the prepared cache was used."""

    rows_in: int = 0
    rows_kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> "dataset row N"
    train_rows: int = 0
    eval_rows: int = 0
    tokens: int = 0  # in the kept rows, train and eval
    truncated: int = 0
    truncated_example: str = ""
    notes: list[str] = field(default_factory=list)  # e.g. the tail left after the blocks
    tokenize_s: float = 0.0
    tokenized_rows: int = 0
    processes: int = 1
    cache_path: str | None = None
    cache_hit: bool = False
    streaming: bool = False

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, where)

    def unreadable(self, reason: str, where: str) -> None:
        """A row of a data file that could not be read at all ("<file> line N"): it counts
        as a row in, and as skipped."""
        self.rows_in += 1
        self.skip(reason, where)

    def lines(self) -> list[str]:
        if self.streaming:
            out = ["pretraining_dataset streams: rows are tokenized as training reads them"]
        else:
            out = [
                f"{self.rows_kept} of {self.rows_in} rows kept "
                f"({self.train_rows} train, {self.eval_rows} eval), {self.tokens:,} tokens"
            ]
        for reason, n in self.skipped.most_common():
            out.append(f"skipped {n}: {reason} (first: {self.examples[reason]})")
        if self.truncated:
            out.append(f"{TRUNCATED}: {self.truncated} (first: {self.truncated_example})")
        out += self.notes
        if self.cache_hit:
            out.append(f"loaded from cache {self.cache_path}")
        elif self.tokenized_rows:
            out.append(self.rate_line())
            if self.cache_path:
                out.append(f"saved to cache {self.cache_path}")
        return out

    def rate_line(self) -> str:
        rate = self.tokenized_rows / self.tokenize_s if self.tokenize_s else 0.0
        procs = f"{self.processes} process{'es' if self.processes != 1 else ''}"
        return (
            f"tokenized {self.tokenized_rows:,} rows in {self.tokenize_s:.1f}s "
            f"({rate:,.0f} rows/s, {procs})"
        )

    def summary(self) -> dict[str, Any]:
        """The counts for summary.json."""
        return {
            "in": self.rows_in,
            "kept": self.rows_kept,
            "train": self.train_rows,
            "eval": self.eval_rows,
            "tokens": self.tokens,
            "skipped": dict(self.skipped),
            "skipped_first": {reason: self.examples[reason] for reason in self.skipped},
            "truncated": self.truncated,
            "cache": self.cache_path,
            "cache_hit": self.cache_hit,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "skipped": Counter(known.get("skipped", {}))})


class Progress:
    """Rows tokenized so far: a rich bar with rows/s while stdout is a terminal (and this
    is the main process); otherwise silent until the caller prints the rate line."""

    def __init__(self, total: int, description: str, enabled: bool | None = None):
        self.total = total
        self.started = time.perf_counter()
        if enabled is None:
            enabled = sys.stdout.isatty() and os.environ.get("RANK", "0") == "0"
        self._bar: Any = None
        if enabled and total:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s"),
                TimeElapsedColumn(),
                transient=True,
            )
            self._task = self._bar.add_task(description, total=total, rate="-")
            self._bar.start()
        self.enabled = self._bar is not None

    def advance(self, rows: int) -> None:
        if self._bar is not None:
            task = self._bar.tasks[self._task]
            done = task.completed + rows
            rate = done / max(time.perf_counter() - self.started, 1e-9)
            self._bar.update(self._task, completed=done, rate=f"{rate:,.0f}")

    def close(self) -> float:
        """Stop; the seconds since the start."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        return time.perf_counter() - self.started
