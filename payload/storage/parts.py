"""A checkpoint written by several nodes: each node uploads its own files, rank 0 writes
the manifest once every node's are in.

On a multi-node job each node has a disk of its own. The ranks of node k write their
share of a checkpoint there (their `rng_state_<rank>.pth`, their DeepSpeed or DCP
shards); only the whole set is a checkpoint. So, after every save:

1. the first process of each node uploads the files its node's checkpoint folder holds
   into `checkpoints/checkpoint-<step>/` (those the store already holds with the same
   size and sha256 are skipped: on one shared disk, every node holds every file), then
   writes its part record, `.parts/node-<k>.json`: those files with sizes and sha256, or
   the error that stopped its upload;
2. rank 0 (node 0), after its own part, waits for every node's part of this attempt,
   merges them (a path two nodes hold must have the same sha256 in both, else the
   checkpoint is refused naming the file), checks that every file is in the store with
   its size, and only then writes the manifest: the union. Until then the checkpoint is
   incomplete, and a relaunch never resumes from it.

The wait is bounded by progress, as every transfer is (payload.runtime.deadline): it
gives up when neither a new part nor a new byte under the checkpoint's prefix appeared
for `timeout_s` (the run's ddp_timeout), naming the nodes it still waits for. A part
names the attempt it belongs to (an id rank 0 chose and gave every node), so a part
left by a dead attempt's node is never taken for this one's.

A single-node job writes no parts: its one node's folder is the whole checkpoint, and
it is uploaded as before (payload.storage.sync.upload_checkpoint).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from payload.errors import TransferError
from payload.storage.stores import Store
from payload.storage.sync import (
    MANIFEST,
    FileEntry,
    FileRecord,
    Manifest,
    Progress,
    Transfer,
    build_manifest,
    send_files,
)

PARTS = ".parts"  # inside a checkpoint's prefix: one record per node
POLL_S = 1.0  # how often rank 0 looks for the other nodes' parts


@dataclass
class Part(FileRecord):
    """What one node uploaded of a checkpoint, or why it could not (`error`)."""

    KIND: ClassVar[str] = "part record"

    node: int
    attempt: str
    files: list[FileEntry] = field(default_factory=list)
    error: str | None = None


def part_key(prefix: str, node: int) -> str:
    return f"{prefix}/{PARTS}/node-{node}.json"


def upload_part(
    folder: Path,
    store: Store,
    prefix: str,
    node: int,
    attempt: str,
    progress: Progress | None = None,
) -> Transfer:
    """Upload node `node`'s files of a checkpoint (`folder`) to `prefix`, then its part
    record. If the upload fails, the record says why (best effort) and the error is
    raised: rank 0 stops waiting for this node at once."""
    try:
        files = build_manifest(folder).files
        result = send_files(folder, files, store, prefix, progress=progress)
        store.write_bytes(part_key(prefix, node), Part(node, attempt, files).to_json())
        store.commit()
    except Exception as e:
        try:
            failed = Part(node, attempt, error=f"{type(e).__name__}: {e}")
            store.write_bytes(part_key(prefix, node), failed.to_json())
            store.commit()
        except Exception:  # noqa: BLE001, S110 - the store is failing: rank 0's wait names the node
            pass
        raise
    return result


def merge_parts(parts: list[Part], where: str) -> list[FileEntry]:
    """The union of the nodes' files, by path. A path two nodes both hold must be the
    same file in both (a shared disk, or a file every node writes alike); different
    contents would make the checkpoint depend on which upload landed last."""
    merged: dict[str, tuple[int, FileEntry]] = {}
    for part in sorted(parts, key=lambda p: p.node):
        for entry in part.files:
            seen = merged.get(entry.path)
            if seen is None:
                merged[entry.path] = (part.node, entry)
            elif (seen[1].size, seen[1].sha256) != (entry.size, entry.sha256):
                raise TransferError(
                    f"{where}/{entry.path} differs between nodes: node {seen[0]} has "
                    f"{seen[1].size} bytes sha256 {seen[1].sha256[:12]}..., node {part.node} "
                    f"{entry.size} bytes sha256 {entry.sha256[:12]}.... Every node must "
                    "write the same contents to a checkpoint file they share; the checkpoint "
                    "is left incomplete."
                )
    return [entry for _, (_, entry) in sorted(merged.items())]


def complete_from_parts(
    store: Store,
    prefix: str,
    nodes: int,
    attempt: str,
    *,
    run_id: str | None,
    step: int | None,
    timeout_s: float,
    progress: Progress | None = None,
    poll_s: float = POLL_S,
) -> Manifest:
    """Rank 0: wait for every node's part of `attempt`, merge them, check each file is in
    the store with its size, and write the manifest (last). Raises, naming the node, if
    a node reported a failure or its part did not come within `timeout_s` of the last
    progress; the checkpoint then stays incomplete."""
    where = store.child(prefix)
    parts: dict[int, Part] = {}
    seen_bytes, last = 0, time.monotonic()
    while True:
        store.refresh()
        for node in range(nodes):
            if node in parts:
                continue
            data = store.read_bytes(part_key(prefix, node))
            part = Part.from_json(data, where) if data is not None else None
            if part is None or part.attempt != attempt:  # none yet, or a dead attempt's
                continue
            if part.error:
                raise TransferError(
                    f"{where} is incomplete: node {node} could not upload its files: {part.error}"
                )
            parts[node], last = part, time.monotonic()
        if len(parts) == nodes:
            break
        here = sum(size for key, size in store.list(prefix).items() if f"/{PARTS}/" not in key)
        if here > seen_bytes:  # another node's files are arriving
            if progress:
                progress(here - seen_bytes)
            seen_bytes, last = here, time.monotonic()
        if time.monotonic() - last > timeout_s:
            missing = ", ".join(str(n) for n in range(nodes) if n not in parts)
            raise TransferError(
                f"{where} is incomplete: node(s) {missing} did not upload their part of it "
                f"(nothing new arrived for {timeout_s:g} s, the run's ddp_timeout). The "
                "newest complete checkpoint before it is what a relaunch resumes from."
            )
        time.sleep(poll_s)
    files = merge_parts(list(parts.values()), where)
    listed = store.list(prefix)
    wrong = [f.path for f in files if listed.get(f"{prefix}/{f.path}") != f.size]
    if wrong:
        raise TransferError(
            f"{where} is incomplete: {len(wrong)} file(s) the nodes reported are missing or "
            f"of another size in the store: {', '.join(wrong[:5])}."
        )
    manifest = Manifest(files=files, run_id=run_id, step=step)
    store.write_bytes(f"{prefix}/{MANIFEST}", manifest.to_json())  # last: now it is complete
    store.commit()
    return manifest
