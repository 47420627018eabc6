"""The chat + packing example as a user runs it, through the real CLI: ShareGPT rows go
through the chatml template into the prepared cache, training loads that cache, packs
several conversations per row, and the loss falls. A failure here means one of the data
pieces (chat masks, cache, packing sampler or collator) broke where they meet."""

from __future__ import annotations

import json
import re

import pytest
from helpers import ROOT, launch

EXAMPLE = ROOT / "examples" / "chat_packing.yml"


@pytest.mark.slow
def test_chat_example_preprocesses_then_trains_packed_from_the_cache(tmp_path, ferry_home):
    prepared = tmp_path / "prepared"
    settings = ["--set", f"dataset_prepared_path={prepared}", "--set", "num_epochs=2"]
    first = launch("preprocess", str(EXAMPLE), *settings, "--json", check=True)
    built = json.loads(first.stdout)
    assert built["hit"] is False
    assert built["rows"]["kept"] == 240 and not built["rows"]["skipped"]

    run = launch("train", str(EXAMPLE), *settings, timeout=600, check=True)
    log = run.stdout + run.stderr
    assert f"loaded from cache {prepared}" in log
    packed = re.search(r"packed (\d+) train rows into (\d+) sequences .* (\d+) batches", log)
    assert packed, log
    rows, bins, batches = map(int, packed.groups())
    assert rows == 216 and bins < rows / 2  # 240 - 10% eval; several chats per row
    assert batches == -(-bins // 2)  # micro_batch_size 2, one process

    summary_path = next((ferry_home / "runs").glob("*/output/summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["final_loss"] < 0.8 * summary["first_loss"], summary
    # The step count is exact: two epochs of the sampler's batches.
    assert summary["steps"] == 2 * batches
