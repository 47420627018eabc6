"""payload.storage against a real S3 server (moto on 127.0.0.1) and local folders:
uploads, incremental re-uploads, verified downloads, retention, manifests, safe paths."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
from helpers import make_folder

from payload.errors import FerryError
from payload.storage import (
    MANIFEST,
    apply_retention,
    download_folder,
    latest_complete_checkpoint,
    list_checkpoints,
    open_store,
    upload_checkpoint,
    upload_folder,
)
from payload.storage.stores import check_uri

CHECKPOINT = {
    "model.safetensors": 300_000,
    "optimizer.pt": 150_000,
    "trainer_state.json": 900,
    "nested/rng_state.pth": 1_000,
}


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/remote/run-1")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/runs/run-1")


class RequestCounter:
    """Counts the HTTP requests boto3 really sends, by operation."""

    def __init__(self, client):
        self.calls: list[str] = []
        client.meta.events.register("before-send.s3.*", self._count)

    def _count(self, request, **_):
        self.calls.append(request.method)

    def writes(self) -> int:
        return sum(1 for method in self.calls if method in ("PUT", "POST", "DELETE"))


def test_upload_then_unchanged_reupload_sends_nothing(store, tmp_path):
    folder = make_folder(tmp_path / "ckpt", CHECKPOINT)
    first = upload_folder(folder, store, "checkpoints/checkpoint-5", run_id="run-1", step=5)
    assert first.files_sent == 4 and first.bytes_sent == sum(CHECKPOINT.values())
    assert store.list("checkpoints")[f"checkpoints/checkpoint-5/{MANIFEST}"] > 0

    counter = RequestCounter(store.client) if hasattr(store, "client") else None
    again = upload_folder(folder, store, "checkpoints/checkpoint-5", run_id="run-1", step=5)
    assert (again.files_sent, again.bytes_sent, again.files_skipped) == (0, 0, 4)
    assert not again.manifest_written
    if counter:
        assert counter.writes() == 0, counter.calls  # not one PUT, POST or DELETE went out


def test_reupload_sends_only_what_changed(store, tmp_path):
    folder = make_folder(tmp_path / "ckpt", CHECKPOINT)
    upload_folder(folder, store, "final")
    (folder / "trainer_state.json").write_text('{"changed": true}')
    (folder / "extra.txt").write_text("new file")
    result = upload_folder(folder, store, "final")
    assert result.files_sent == 2 and result.files_skipped == 3
    assert result.bytes_sent == len('{"changed": true}') + len("new file")


def test_interrupted_upload_resumes_from_what_arrived(store, tmp_path):
    """Files that reached the store before a crash (no manifest yet) are not resent: the
    checksum stored with each object proves them."""
    folder = make_folder(tmp_path / "ckpt", CHECKPOINT)
    for rel in ("model.safetensors", "optimizer.pt"):
        from payload.storage.stores import sha256_file

        store.put_file(folder / rel, f"final/{rel}", sha256_file(folder / rel))
    result = upload_folder(folder, store, "final")
    assert result.files_skipped == 2 and result.files_sent == 2


def test_download_verifies_every_file(store, tmp_path):
    folder = make_folder(tmp_path / "ckpt", CHECKPOINT)
    upload_folder(folder, store, "final", run_id="run-1")
    dest = tmp_path / "pulled"
    moved = []
    manifest = download_folder(store, "final", dest, progress=moved.append)
    assert sum(moved) == sum(CHECKPOINT.values()) and manifest.run_id == "run-1"
    for rel in CHECKPOINT:
        assert (dest / rel).read_bytes() == (folder / rel).read_bytes()
    assert not list(dest.rglob("*.ferry-partial"))

    # Corrupt the remote copy behind the manifest's back: the download must refuse it.
    tampered = tmp_path / "tampered"
    tampered.write_bytes(b"x" * CHECKPOINT["optimizer.pt"])
    store.put_file(tampered, "final/optimizer.pt", "0" * 64)
    with pytest.raises(FerryError, match="optimizer.pt failed verification"):
        download_folder(store, "final", tmp_path / "again")
    assert not (tmp_path / "again" / "optimizer.pt").exists()


def test_a_folder_without_manifest_is_incomplete_and_never_chosen(store, tmp_path):
    for step in (2, 4):
        upload_checkpoint(make_folder(tmp_path / f"c{step}", CHECKPOINT, step), store, step)
    # checkpoint 6 crashed mid-upload: data but no manifest
    partial = make_folder(tmp_path / "c6", {"model.safetensors": 1000})
    store.put_file(
        partial / "model.safetensors", "checkpoints/checkpoint-6/model.safetensors", "unknown"
    )
    assert [(c.step, c.complete) for c in list_checkpoints(store)] == [
        (2, True),
        (4, True),
        (6, False),
    ]
    assert latest_complete_checkpoint(store).step == 4
    with pytest.raises(FerryError, match="no ferry-manifest.json"):
        download_folder(store, "checkpoints/checkpoint-6", tmp_path / "d")


def test_retention_keeps_the_newest_complete_checkpoints(store, tmp_path):
    for step in (1, 2, 3, 4):
        upload_checkpoint(
            make_folder(tmp_path / f"c{step}", {"w.bin": 2000}, step), store, step, keep=2
        )
    assert [c.step for c in list_checkpoints(store)] == [3, 4]
    # An incomplete checkpoint older than the newest complete one is garbage; a newer one
    # may be an upload in flight and stays.
    store.write_bytes("checkpoints/checkpoint-2/w.bin", b"half")
    store.write_bytes("checkpoints/checkpoint-9/w.bin", b"in flight")
    assert apply_retention(store, 2) == [2]
    assert [c.step for c in list_checkpoints(store)] == [3, 4, 9]


def test_local_checksums_are_cached_until_a_file_changes(tmp_path):
    from payload.storage.sync import SUMS_CACHE, build_manifest

    folder = make_folder(tmp_path / "f", {"a.bin": 5000})
    first = build_manifest(folder)
    cache = json.loads((folder / SUMS_CACHE).read_text())
    cache["a.bin"][2] = "f" * 64  # a cached sum is trusted while size and mtime match...
    (folder / SUMS_CACHE).write_text(json.dumps(cache))
    assert build_manifest(folder).files[0].sha256 == "f" * 64
    stat = (folder / "a.bin").stat()
    os.utime(folder / "a.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert build_manifest(folder).files[0].sha256 == first.files[0].sha256  # ...not after


@pytest.mark.parametrize(
    "evil",
    ["../escape.txt", "a/../../escape.txt", "/etc/evil", "..\\escape.txt", "C:evil", "./x"],
)
def test_download_refuses_paths_that_leave_the_destination(store, tmp_path, evil):
    """A crafted manifest must not make a pull write anywhere but its destination."""
    from payload.storage import Manifest
    from payload.storage.sync import FileEntry

    store.write_bytes("final/ok.txt", b"fine")
    manifest = Manifest([FileEntry("ok.txt", 4, "x"), FileEntry(evil, 4, "x")])
    store.write_bytes(f"final/{MANIFEST}", manifest.to_json())
    dest = tmp_path / "dest"
    with pytest.raises(FerryError, match="Refusing"):
        download_folder(store, "final", dest)
    assert not (tmp_path / "escape.txt").exists()
    assert not any(p.is_file() for p in dest.rglob("*"))  # nothing written, not even ok.txt


def test_download_refuses_to_follow_a_symlink_in_the_destination(tmp_path):
    store = open_store(f"file://{tmp_path}/remote")
    upload_folder(make_folder(tmp_path / "src", {"sub/w.bin": 10}), store, "final")
    dest = tmp_path / "dest"
    dest.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (dest / "sub").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FerryError, match="is a symlink"):
        download_folder(store, "final", dest)
    assert not list((tmp_path / "elsewhere").iterdir())


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("s3://bucket/p", None),
        ("file:///abs", None),
        ("volume://runs/x", None),
        ("file://relative/x", "absolute path"),
        ("s3:///nobucket", "names no bucket"),
        ("gs://b/p", "should start with"),
    ],
)
def test_storage_uri_check(uri, problem):
    found = check_uri(uri)
    assert (found is None) if problem is None else (problem in found)


def test_volume_store_inside_modal_is_its_mount(tmp_path, monkeypatch):
    """Inside a Modal container a volume is a mounted folder; FERRY_VOLUME_MOUNTS says
    where. (The SDK path used from a laptop: the next test.)"""
    monkeypatch.setenv("FERRY_VOLUME_MOUNTS", f"ferry-runs={tmp_path / 'mnt'}")
    store = open_store("volume://ferry-runs/run-7")
    upload_checkpoint(make_folder(tmp_path / "c", {"w.bin": 100}), store, 3)
    assert (tmp_path / "mnt" / "run-7" / "checkpoints" / "checkpoint-3" / MANIFEST).is_file()
    assert latest_complete_checkpoint(store).step == 3


class RemoteVolume:
    """Stands in for Modal's servers behind `modal.Volume`: each method is one of the
    volume's remote operations (one RPC, or an RPC and its block transfers), kept in a
    dict. It behaves as the installed SDK documents: paths are absolute in the volume,
    `read_file` and `remove_file` raise FileNotFoundError for a missing path, while
    `listdir` passes the server's NOT_FOUND through as `modal.exception.NotFoundError`.
    Its signatures are checked against the SDK's in the test."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.calls: list[str] = []

    def listdir(self, path, *, recursive=False):
        from modal.exception import NotFoundError
        from modal.volume import FileEntry, FileEntryType

        self.calls.append("listdir")
        root = path.strip("/")
        found = {k: v for k, v in self.files.items() if not root or k.startswith(root + "/")}
        if not found:
            raise NotFoundError(f"No such file or directory: {path}")
        assert recursive, "Ferry lists whole prefixes"
        return [FileEntry("/" + k, FileEntryType.FILE, 0, len(v)) for k, v in found.items()]

    @contextlib.contextmanager
    def batch_upload(self, force=False):
        self.calls.append("batch_upload")
        volume = self

        class Batch:
            def put_file(self, local_file, remote_path, mode=None):
                assert force and remote_path.startswith("/")
                data = (
                    local_file.read()
                    if hasattr(local_file, "read")
                    else Path(local_file).read_bytes()
                )
                volume.files[remote_path.lstrip("/")] = data

        yield Batch()

    def _get(self, path):
        try:
            return self.files[path.lstrip("/")]
        except KeyError:
            raise FileNotFoundError(path) from None

    def read_file(self, path):
        self.calls.append("read_file")
        data = self._get(path)
        yield data[: len(data) // 2]
        yield data[len(data) // 2 :]

    def read_file_into_fileobj(self, path, fileobj, progress_cb=None):
        self.calls.append("read_file_into_fileobj")
        return fileobj.write(self._get(path))

    def remove_file(self, path, recursive=False):
        self.calls.append("remove_file")
        key = path.strip("/")
        gone = [k for k in self.files if k == key or (recursive and k.startswith(key + "/"))]
        if not gone:
            raise FileNotFoundError(path)
        for k in gone:
            del self.files[k]


def test_volume_store_from_a_laptop_goes_through_the_sdk(tmp_path, monkeypatch):
    """`launch pull`, `resume` and the storage check reach a Modal volume through the SDK
    (no mount). Only Modal's servers are replaced (RemoteVolume above); the store's own
    path (keys under the run's folder, listing, manifests, verified downloads, retention,
    deletes) runs as it does against Modal."""
    import inspect

    import modal

    for name in ("listdir", "read_file", "read_file_into_fileobj", "remove_file"):
        sdk = list(inspect.signature(getattr(modal.Volume, name)).parameters)
        ours = list(inspect.signature(getattr(RemoteVolume, name)).parameters)
        assert ours[: len(sdk)] == sdk[: len(ours)], name
    remote = RemoteVolume()
    asked = []
    monkeypatch.setattr(
        modal.Volume,
        "from_name",
        lambda name, **kw: asked.append((name, kw)) or remote,
    )
    monkeypatch.delenv("FERRY_VOLUME_MOUNTS", raising=False)
    store = open_store("volume://ferry-runs/run-7")
    assert store.credentials() == "this machine's Modal token"

    assert latest_complete_checkpoint(store) is None  # a new run: nothing listed yet
    assert asked == [("ferry-runs", {"create_if_missing": True})]
    for step in (2, 4, 6):
        upload_checkpoint(make_folder(tmp_path / f"c{step}", CHECKPOINT), store, step)
    assert f"run-7/checkpoints/checkpoint-4/{MANIFEST}" in remote.files
    assert "run-7/checkpoints/checkpoint-4/nested/rng_state.pth" in remote.files
    assert latest_complete_checkpoint(store).step == 6

    download_folder(store, "checkpoints/checkpoint-4", tmp_path / "back")
    for name in CHECKPOINT:
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "c4" / name).read_bytes()
    remote.files["run-7/checkpoints/checkpoint-6/optimizer.pt"] = b"corrupted"
    with pytest.raises(FerryError, match="optimizer.pt"):
        download_folder(store, "checkpoints/checkpoint-6", tmp_path / "bad")

    assert apply_retention(store, keep=1) == [2, 4]
    assert {k.split("/")[2] for k in remote.files} == {"checkpoint-6"}
    assert store.read_bytes("nothing-here") is None
    store.delete("nothing-here")  # a missing file is not an error
    assert {"listdir", "batch_upload", "read_file", "read_file_into_fileobj"} <= set(remote.calls)


def test_s3_multipart_upload_of_a_large_file(s3_bucket, tmp_path, monkeypatch):
    from payload.storage.stores import S3Store

    monkeypatch.setattr(S3Store, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(S3Store, "PART_SIZE", 5 * 1024 * 1024)
    store = open_store(f"s3://{s3_bucket}/big")
    folder = make_folder(tmp_path / "big", {"shard.bin": 12 * 1024 * 1024})
    counter = RequestCounter(store.client)
    upload_folder(folder, store, "final")
    assert counter.calls.count("POST") >= 2  # create and complete a multipart upload
    download_folder(store, "final", tmp_path / "back")
    assert (tmp_path / "back" / "shard.bin").read_bytes() == (folder / "shard.bin").read_bytes()


def test_the_launch_check_writes_a_probe_and_leaves_nothing_behind(store):
    """`check` proves the store takes a write (S3: a PutObject and a DeleteObject on the
    real server), names the credentials it used, and cleans up after itself."""
    used = store.check()
    expected = "AWS credentials from env" if store.uri.startswith("s3://") else "file permissions"
    assert expected in used
    assert store.list() == {}


def test_a_store_that_cannot_be_written_fails_the_check_naming_why(tmp_path):
    from payload.storage import StorageCheckError

    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(StorageCheckError, match="cannot write there") as info:
        open_store(f"file://{tmp_path}/a-file/runs").check()
    assert not info.value.credentials_problem


def test_s3_check_tells_a_wrong_bucket_from_missing_credentials(s3_bucket, monkeypatch):
    from payload.storage import StorageCheckError

    with pytest.raises(StorageCheckError, match="NoSuchBucket") as info:
        open_store("s3://no-such-bucket-here/runs").check()
    assert not info.value.credentials_problem  # the place is wrong: never a warning

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageCheckError, match="with no AWS credentials") as info:
        open_store(f"s3://{s3_bucket}/runs").check()
    assert info.value.credentials_problem  # a run with its own credentials may still write


def test_the_launch_check_of_a_mounted_volume_writes_there(tmp_path, monkeypatch):
    """Inside Modal the volume is a folder; the check writes and deletes its probe there."""
    monkeypatch.setenv("FERRY_VOLUME_MOUNTS", f"ferry-runs={tmp_path / 'mnt'}")
    store = open_store("volume://ferry-runs/run-1")
    assert store.check() == "the mounted volume"
    assert (tmp_path / "mnt" / "run-1").is_dir() and store.list() == {}
