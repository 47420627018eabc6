"""Folders to stores and back, made safe by completion manifests.

A folder in a store (a checkpoint, a run's final artifacts) is complete only once its
manifest, `ferry-manifest.json`, exists: relative paths, sizes and sha256 of every file,
plus the step, run id and time. The manifest is always written last, so a reader never
takes a half-uploaded folder for a whole one, and every download is checked against it.

Uploads are incremental: a file whose size and sha256 already match what the store
holds (per its manifest, or the checksum stored with the object) is not sent again.
Local checksums are cached beside the folder in `.ferry-sums.json`, keyed by size and
modification time, so re-syncing an unchanged folder reads no file contents at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

from payload.errors import FerryError
from payload.storage.stores import Store, sha256_file, walk_files

MANIFEST = "ferry-manifest.json"
SUMS_CACHE = ".ferry-sums.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
PARALLEL_FILES = 4

Progress = Callable[[int], None]  # called with each chunk of bytes moved


@dataclass
class FileEntry:
    path: str
    size: int
    sha256: str


R = TypeVar("R", bound="FileRecord")


class FileRecord:
    """A JSON record that lists files (a manifest, a node's part of a checkpoint): its
    `files` are FileEntry, the other fields plain values."""

    KIND: ClassVar[str] = "record"  # what an error calls it

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()  # type: ignore[call-overload]

    @classmethod
    def from_json(cls: type[R], data: bytes, where: str) -> R:
        try:
            raw = json.loads(data)
            files = [FileEntry(**f) for f in raw.pop("files")]
            return cls(files=files, **raw)  # type: ignore[call-arg]
        except (ValueError, TypeError, KeyError) as e:
            raise FerryError(f"{where}: the {cls.KIND} is unreadable ({e}).") from e


@dataclass
class Manifest(FileRecord):
    KIND: ClassVar[str] = "manifest"

    files: list[FileEntry]
    run_id: str | None = None
    step: int | None = None
    created_at: float = field(default_factory=time.time)
    version: int = 1

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def same_contents(self, other: Manifest | None) -> bool:
        return other is not None and (self.files, self.step, self.run_id) == (
            other.files,
            other.step,
            other.run_id,
        )


@dataclass
class Transfer:
    """What an upload or download did."""

    files_sent: int = 0
    files_skipped: int = 0
    bytes_sent: int = 0
    manifest_written: bool = False


def build_manifest(
    folder: Path, run_id: str | None = None, step: int | None = None, exclude: tuple[str, ...] = ()
) -> Manifest:
    """The manifest of a local folder; checksums come from the cache where size and
    mtime still match."""
    cache_path = folder / SUMS_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    found = []
    for rel, path in walk_files(folder, exclude=(SUMS_CACHE, MANIFEST, *exclude)):
        stat = path.stat()
        known = cache.get(rel)
        stamp = [stat.st_size, stat.st_mtime_ns]
        found.append((rel, path, stamp, known[2] if known and known[:2] == stamp else None))
    # hashlib lets go of the GIL on large buffers: new files hash in parallel.
    with ThreadPoolExecutor(max_workers=PARALLEL_FILES) as pool:
        digests = list(pool.map(lambda f: f[3] or sha256_file(f[1]), found))
    files, fresh = [], {}
    for (rel, _, stamp, _), digest in zip(found, digests, strict=True):
        fresh[rel] = [*stamp, digest]
        files.append(FileEntry(rel, stamp[0], digest))
    if fresh != cache:
        # In a read-only folder the checksums are simply recomputed next time.
        with contextlib.suppress(OSError):
            cache_path.write_text(json.dumps(fresh))
    return Manifest(files=files, run_id=run_id, step=step)


def read_manifest(store: Store, prefix: str) -> Manifest | None:
    data = store.read_bytes(f"{prefix}/{MANIFEST}")
    return Manifest.from_json(data, store.child(prefix)) if data is not None else None


def upload_folder(
    folder: Path,
    store: Store,
    prefix: str,
    *,
    run_id: str | None = None,
    step: int | None = None,
    exclude: tuple[str, ...] = (),
    progress: Progress | None = None,
) -> Transfer:
    """Copy `folder` to `prefix` in `store`, sending only what differs, then write the
    manifest (last) and commit."""
    manifest = build_manifest(folder, run_id, step, exclude)
    remote = read_manifest(store, prefix)
    if manifest.same_contents(remote):
        return Transfer(files_skipped=len(manifest.files))
    result = send_files(folder, manifest.files, store, prefix, remote, progress)
    store.write_bytes(f"{prefix}/{MANIFEST}", manifest.to_json())  # last: now it is complete
    store.commit()
    result.manifest_written = True
    return result


def send_files(
    folder: Path,
    files: list[FileEntry],
    store: Store,
    prefix: str,
    remote: Manifest | None = None,
    progress: Progress | None = None,
) -> Transfer:
    """Put the `files` of `folder` under `prefix`, all but those the store already holds
    with the same size and sha256 (per the `remote` manifest, or the object's checksum)."""
    listed = store.list(prefix)
    known = {f.path: f for f in remote.files} if remote else {}
    result = Transfer()
    todo = []
    for entry in files:
        key = f"{prefix}/{entry.path}"
        if listed.get(key) == entry.size:
            have = known.get(entry.path)
            digest = have.sha256 if have and have.size == entry.size else store.checksum(key)
            if digest == entry.sha256:
                result.files_skipped += 1
                continue
        todo.append(entry)

    store.put_files(
        [(folder / e.path, f"{prefix}/{e.path}", e.sha256) for e in todo], progress=progress
    )
    result.files_sent = len(todo)
    result.bytes_sent = sum(e.size for e in todo)
    return result


def safe_destination(dest: Path, rel: str) -> Path:
    """Where `rel` lands under `dest`; refuses anything that could escape it."""
    parts = rel.split("/")  # as written: a manifest of ours never holds "", "." or ".."
    if (
        not rel
        or "\\" in rel
        or re.match(r"^[A-Za-z]:", rel)
        or any(p in ("..", ".", "") for p in parts)
    ):
        raise FerryError(
            f"Refusing remote file {rel!r}: its path would leave the destination {dest}."
        )
    root = dest.resolve()
    target = dest.joinpath(*parts)
    # An existing symlink on the way could point anywhere: refuse rather than follow it.
    probe = dest
    for part in parts:
        probe = probe / part
        if probe.is_symlink():
            raise FerryError(f"Refusing to write {rel!r}: {probe} is a symlink.")
    if not str(target.resolve()).startswith(str(root) + os.sep):
        raise FerryError(f"Refusing remote file {rel!r}: it resolves outside {dest}.")
    return target


def download_folder(
    store: Store, prefix: str, dest: Path, progress: Progress | None = None
) -> Manifest:
    """Copy a complete folder from the store into `dest`, verifying every file against
    the manifest. Every path is checked before anything is written."""
    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise FerryError(
            f"{store.child(prefix)} has no {MANIFEST}: it is missing or was never completed."
        )
    dest.mkdir(parents=True, exist_ok=True)
    targets = [(entry, safe_destination(dest, entry.path)) for entry in manifest.files]

    def intact(entry: FileEntry, target: Path) -> bool:
        return (
            target.is_file()
            and target.stat().st_size == entry.size
            and sha256_file(target) == entry.sha256
        )

    todo = []
    for entry, target in targets:
        if intact(entry, target):  # already here (an earlier, interrupted pull)
            if progress:
                progress(entry.size)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        todo.append((entry, target, target.with_name(f".{target.name}.ferry-partial")))
    store.get_files([(f"{prefix}/{entry.path}", partial) for entry, _, partial in todo])
    for entry, target, partial in todo:
        size, digest = partial.stat().st_size, sha256_file(partial)
        if (size, digest) != (entry.size, entry.sha256):
            for _, _, leftover in todo:
                leftover.unlink(missing_ok=True)
            raise FerryError(
                f"{store.child(prefix)}/{entry.path} failed verification: expected "
                f"{entry.size} bytes sha256 {entry.sha256[:12]}..., got {size} bytes "
                f"sha256 {digest[:12]}...."
            )
        os.replace(partial, target)  # only a verified file takes the real name
        if progress:
            progress(entry.size)
    return manifest


# ---- checkpoints of a run


@dataclass(frozen=True)
class Checkpoint:
    step: int
    prefix: str  # checkpoints/checkpoint-<step>
    complete: bool


def list_checkpoints(store: Store) -> list[Checkpoint]:
    """The run's checkpoints in the store, oldest first; complete = has a manifest."""
    seen: dict[str, bool] = {}
    for key in store.list(CHECKPOINTS):
        parts = key.split("/")
        if len(parts) >= 3 and CHECKPOINT_DIR.match(parts[1]):
            seen[parts[1]] = seen.get(parts[1], False) or parts[-1] == MANIFEST
    found = [
        Checkpoint(int(CHECKPOINT_DIR.match(name).group(1)), f"{CHECKPOINTS}/{name}", complete)
        for name, complete in seen.items()
    ]
    return sorted(found, key=lambda c: c.step)


def latest_complete_checkpoint(store: Store) -> Checkpoint | None:
    complete = [c for c in list_checkpoints(store) if c.complete]
    return complete[-1] if complete else None


def upload_checkpoint(
    folder: Path,
    store: Store,
    step: int,
    run_id: str | None = None,
    keep: int | None = None,
    progress: Progress | None = None,
) -> Transfer:
    """Upload one `checkpoint-<step>` folder, then apply retention."""
    result = upload_folder(
        folder,
        store,
        f"{CHECKPOINTS}/checkpoint-{step}",
        run_id=run_id,
        step=step,
        progress=progress,
    )
    if keep:
        apply_retention(store, keep)
    return result


def apply_retention(store: Store, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older
    than the newest complete one (left by crashed uploads). Returns the steps deleted."""
    checkpoints = list_checkpoints(store)
    complete = [c for c in checkpoints if c.complete]
    if not complete:
        return []
    kept = {c.step for c in complete[-keep:]}
    newest = complete[-1].step
    doomed = [c for c in checkpoints if c.step not in kept and (c.complete or c.step < newest)]
    for checkpoint in doomed:
        # The manifest goes first: a folder half-deleted is then merely incomplete.
        store.delete(f"{checkpoint.prefix}/{MANIFEST}")
        store.delete_prefix(checkpoint.prefix)
    if doomed:
        store.commit()
    return [c.step for c in doomed]
