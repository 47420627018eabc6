"""The layout of a run's `output_dir`, shared by the payload that writes it and the
launcher that reads it.

    output_dir/
      metrics.jsonl        one JSON record per log (payload.metrics)
      summary.json         written once training ends: steps, losses, rows, where things are
      config.yml           the resolved config the run trained with
      checkpoint-<step>/   HF Trainer checkpoints
      adapter_model.safetensors | model.safetensors, plus the tokenizer: the final artifact
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yml"


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every record in output_dir/metrics.jsonl (none if the file is missing)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summary(output_dir: str | Path) -> dict[str, Any] | None:
    """output_dir/summary.json, or None if the run has not written it."""
    path = Path(output_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None
