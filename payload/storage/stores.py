"""Where a run's files are kept: a local folder, an S3 prefix, or a Modal volume, behind
one small interface. Keys are relative, '/'-separated paths under the store's root.

    file:///abs/path          a folder (the local backend's default)
    s3://bucket/prefix        S3 or any S3-compatible service; AWS_ENDPOINT_URL, AWS_PROFILE
                              and the rest of boto3's configuration apply
    volume://name/path        a Modal volume: its mount inside Modal (FERRY_VOLUME_MOUNTS
                              says where), the Modal SDK from anywhere else

boto3 and modal are imported only when a store of their kind is opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from payload.errors import FerryError

SCHEMES = ("file", "s3", "volume")
CHUNK = 8 * 1024 * 1024
PARALLEL_FILES = 4
PROBE = ".ferry-write-probe"  # written and deleted by `check` before a launch
# Modal's API from this machine: small calls, and whole-file transfers (a laptop pulling
# a model). Without a deadline the SDK retries a dead connection for about a minute.
VOLUME_CALL_TIMEOUT_S = 6.0
VOLUME_TRANSFER_TIMEOUT_S = 3600.0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class StorageCheckError(FerryError):
    """The probe write before a launch failed. `credentials_problem`: the credentials
    used here were refused or missing (a run that gets other credentials, a backend's
    secrets, may still write there); otherwise the place itself is wrong."""

    def __init__(self, message: str, hint: str | None = None, credentials_problem: bool = False):
        super().__init__(message, hint)
        self.credentials_problem = credentials_problem


class Store:
    """A place that holds files under keys. Subclasses implement the six primitives."""

    uri: str

    def list(self, prefix: str = "") -> dict[str, int]:
        """Every key under `prefix` (recursively) with its size in bytes."""
        raise NotImplementedError

    def put_file(self, local: Path, key: str, sha256: str) -> None:
        """Store a local file under `key`; `sha256` is kept with it where the store can."""
        raise NotImplementedError

    def get_file(self, key: str, local: Path) -> None:
        raise NotImplementedError

    def put_files(self, items: list[tuple[Path, str, str]], progress=None) -> None:  # type: ignore[no-untyped-def]
        """Store many (local, key, sha256) files, several at a time."""
        from concurrent.futures import ThreadPoolExecutor

        def one(item: tuple[Path, str, str]) -> None:
            self.put_file(*item)
            if progress:
                progress(item[0].stat().st_size)

        with ThreadPoolExecutor(max_workers=PARALLEL_FILES) as pool:
            list(pool.map(one, items))

    def get_files(self, items: list[tuple[str, Path]]) -> None:
        """Fetch many (key, local) files, several at a time."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=PARALLEL_FILES) as pool:
            list(pool.map(lambda item: self.get_file(*item), items))

    def write_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such key."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove one object (no error if it is not there)."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        raise NotImplementedError

    def checksum(self, key: str) -> str | None:
        """The sha256 stored with `key`, if the store keeps one (lets an interrupted
        upload skip the files that did arrive)."""
        return None

    def commit(self) -> None:
        """Make what was written visible elsewhere (Modal volumes need it)."""

    def refresh(self) -> None:
        """See what other machines committed since this one last looked (a Modal
        volume's mount shows it only after a reload)."""

    def check(self) -> str:
        """Write and delete a small probe object here, with this machine's credentials;
        raise FerryError if that fails. Returns which credentials were used."""
        import uuid

        key = f"{PROBE}-{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes(key, b"ferry checks that it can write here\n")
            self.delete(key)
        except FerryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to write is the user's to fix
            raise StorageCheckError(
                f"Storage {self.uri}: cannot write there with {self.credentials()} "
                f"({type(e).__name__}: {e}).",
                hint=self.check_hint,
                credentials_problem=self._credentials_problem(e),
            ) from e
        return self.credentials()

    check_hint: str | None = None

    def _credentials_problem(self, error: Exception) -> bool:
        """Did the probe fail for want of rights (not because the place is wrong)?"""
        return isinstance(error, PermissionError)

    def credentials(self) -> str:
        """Whose rights the probe used, in words."""
        return "this machine's"

    def child(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"


class FileStore(Store):
    def __init__(self, root: Path, uri: str | None = None):
        self.root = root
        self.uri = uri or f"file://{root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def list(self, prefix: str = "") -> dict[str, int]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return {}
        found: dict[str, int] = {}
        for folder, _dirs, files in os.walk(base):  # does not follow symlinked folders
            for name in files:
                path = Path(folder) / name
                if path.is_symlink():
                    continue  # a symlink is never part of a run's files
                found[path.relative_to(self.root).as_posix()] = path.stat().st_size
        return found

    def _atomic_write(self, key: str, write) -> None:  # type: ignore[no-untyped-def]
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".ferry-partial-")
        os.close(fd)
        try:
            write(Path(tmp))
            os.replace(tmp, target)  # readers see the old file or the whole new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, local: Path, key: str, sha256: str) -> None:
        self._atomic_write(key, lambda tmp: shutil.copyfile(local, tmp))

    def get_file(self, key: str, local: Path) -> None:
        shutil.copyfile(self._path(key), local)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda tmp: tmp.write_bytes(data))

    def read_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() and not path.is_symlink() else None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def checksum(self, key: str) -> str | None:
        path = self._path(key)
        return sha256_file(path) if path.is_file() else None

    def credentials(self) -> str:
        return "this machine's file permissions"


# S3 error codes that mean "these credentials may not", not "this bucket is wrong".
CREDENTIAL_ERRORS = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "403",
    }
)


class S3Store(Store):
    """S3 through one s3transfer manager per batch: multipart uploads whose parts, from
    all the files of a checkpoint together, share one pool of connections. (Measured on
    a local server: one shared pool of 10 with 8 MB parts beat a pool per file, and
    `aws s3 sync`; bench/s3_sync.py.) s3transfer raises the part size by itself where a
    file would need more than S3's 10,000 parts."""

    MULTIPART_THRESHOLD = 16 * 1024 * 1024
    PART_SIZE = 8 * 1024 * 1024
    CONCURRENCY = 10  # requests in flight, over all files of a batch

    def __init__(self, bucket: str, prefix: str, uri: str):
        self.bucket, self.prefix, self.uri = bucket, prefix.strip("/"), uri
        self._client = None
        self._session = None

    @property
    def client(self):  # type: ignore[no-untyped-def]
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as e:
                raise FerryError(
                    f"Storage {self.uri} needs boto3.", hint="pip install 'ferry[s3]'"
                ) from e
            config = Config(
                retries={"max_attempts": 8, "mode": "adaptive"},
                max_pool_connections=32,
                connect_timeout=10,
                read_timeout=120,
            )
            session = self._session = boto3.session.Session()
            region = session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
            self._client = session.client("s3", config=config, region_name=region)
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _transfer(self):  # type: ignore[no-untyped-def]
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.MULTIPART_THRESHOLD,
            multipart_chunksize=self.PART_SIZE,
            max_concurrency=self.CONCURRENCY,
            use_threads=True,
        )

    def list(self, prefix: str = "") -> dict[str, int]:
        root = self._key(prefix).rstrip("/") + "/" if prefix or self.prefix else ""
        found: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=root):
            for item in page.get("Contents", []):
                found[item["Key"][strip:]] = item["Size"]
        return found

    def put_file(self, local: Path, key: str, sha256: str) -> None:
        self.client.upload_file(
            str(local),
            self.bucket,
            self._key(key),
            ExtraArgs={"Metadata": {"sha256": sha256}},
            Config=self._transfer(),
        )

    def get_file(self, key: str, local: Path) -> None:
        self.client.download_file(self.bucket, self._key(key), str(local), Config=self._transfer())

    def put_files(self, items: list[tuple[Path, str, str]], progress=None) -> None:  # type: ignore[no-untyped-def]
        from boto3.s3.transfer import create_transfer_manager
        from s3transfer.subscribers import BaseSubscriber

        class Progress(BaseSubscriber):
            def on_progress(self, future, bytes_transferred, **kwargs):  # type: ignore[no-untyped-def]
                if progress:
                    progress(bytes_transferred)

        with create_transfer_manager(self.client, self._transfer()) as manager:
            futures = [
                manager.upload(
                    str(local),
                    self.bucket,
                    self._key(key),
                    extra_args={"Metadata": {"sha256": sha256}},
                    subscribers=[Progress()],
                )
                for local, key, sha256 in items
            ]
            for future in futures:
                future.result()

    def get_files(self, items: list[tuple[str, Path]]) -> None:
        from boto3.s3.transfer import create_transfer_manager

        with create_transfer_manager(self.client, self._transfer()) as manager:
            futures = [
                manager.download(self.bucket, self._key(k), str(local)) for k, local in items
            ]
            for future in futures:
                future.result()

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def read_bytes(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            return None
        return response["Body"].read()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(k) for k in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})

    def checksum(self, key: str) -> str | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception:  # noqa: BLE001 - missing or unreadable: not known to match
            return None
        return head.get("Metadata", {}).get("sha256")

    check_hint = (
        "Check AWS credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID), AWS_ENDPOINT_URL, that the "
        "bucket exists, and that these credentials may write (s3:PutObject, s3:DeleteObject)."
    )

    def _credentials_problem(self, error: Exception) -> bool:
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(error, NoCredentialsError):
            return True
        code = error.response.get("Error", {}).get("Code") if isinstance(error, ClientError) else ""
        return code in CREDENTIAL_ERRORS

    def credentials(self) -> str:
        self.client  # noqa: B018 - opens the session the credentials come from
        found = self._session.get_credentials()
        if found is None:
            return "no AWS credentials (none found on this machine)"
        return f"AWS credentials from {getattr(found, 'method', None) or 'an unknown source'}"


class VolumeStore(Store):
    """A Modal volume. Inside a Modal container the volume is a mounted folder (where,
    FERRY_VOLUME_MOUNTS says: `name=/mount,other=/mnt2`) and `commit()` publishes writes;
    elsewhere each operation goes through the Modal SDK."""

    def __init__(self, name: str, path: str, uri: str):
        self.name, self.path, self.uri = name, path.strip("/"), uri
        mount = mounts().get(name)
        self.local = FileStore(Path(mount) / self.path, uri) if mount else None
        self._volume = None

    @property
    def volume(self):  # type: ignore[no-untyped-def]
        if self._volume is None:
            try:
                import modal
            except ImportError as e:
                raise FerryError(
                    f"Storage {self.uri} needs the Modal SDK.", hint="pip install 'ferry[modal]'"
                ) from e
            # The runs volume appears with the first launch; a check before it creates it.
            self._volume = modal.Volume.from_name(self.name, create_if_missing=True)
        return self._volume

    def _api(self, fn, what: str, seconds: float = VOLUME_CALL_TIMEOUT_S):  # type: ignore[no-untyped-def]
        """A call to Modal's API with a deadline."""
        return modal_call(fn, f"{what} on {self.uri}", seconds)

    def credentials(self) -> str:
        return "the mounted volume" if self.local else "this machine's Modal token"

    def _key(self, key: str) -> str:
        return f"{self.path}/{key}" if self.path else key

    def list(self, prefix: str = "") -> dict[str, int]:
        if self.local:
            return self.local.list(prefix)
        from modal.exception import NotFoundError
        from modal.volume import FileEntryType

        strip = len(self.path) + 1 if self.path else 0
        try:
            entries = self._api(
                lambda: self.volume.listdir(self._key(prefix) or "/", recursive=True), "a listing"
            )
        except (FileNotFoundError, NotFoundError):  # listdir passes the server's NOT_FOUND on
            return {}
        return {e.path.lstrip("/")[strip:]: e.size for e in entries if e.type == FileEntryType.FILE}

    def put_file(self, local: Path, key: str, sha256: str) -> None:
        if self.local:
            return self.local.put_file(local, key, sha256)

        def put() -> None:
            with self.volume.batch_upload(force=True) as batch:
                batch.put_file(str(local), "/" + self._key(key))

        self._api(put, f"an upload of {key}", VOLUME_TRANSFER_TIMEOUT_S)

    def get_file(self, key: str, local: Path) -> None:
        if self.local:
            return self.local.get_file(key, local)
        with local.open("wb") as f:
            self._api(
                lambda: self.volume.read_file_into_fileobj("/" + self._key(key), f),
                f"a download of {key}",
                VOLUME_TRANSFER_TIMEOUT_S,
            )

    def write_bytes(self, key: str, data: bytes) -> None:
        if self.local:
            return self.local.write_bytes(key, data)
        import io

        def put() -> None:
            with self.volume.batch_upload(force=True) as batch:
                batch.put_file(io.BytesIO(data), "/" + self._key(key))

        self._api(put, f"a write of {key}")

    def read_bytes(self, key: str) -> bytes | None:
        if self.local:
            return self.local.read_bytes(key)
        try:
            return self._api(
                lambda: b"".join(self.volume.read_file("/" + self._key(key))), f"a read of {key}"
            )
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        if self.local:
            return self.local.delete(key)
        with contextlib.suppress(FileNotFoundError):
            self._api(lambda: self.volume.remove_file("/" + self._key(key)), f"a delete of {key}")

    def delete_prefix(self, prefix: str) -> None:
        if self.local:
            return self.local.delete_prefix(prefix)
        with contextlib.suppress(FileNotFoundError):
            self._api(
                lambda: self.volume.remove_file("/" + self._key(prefix), recursive=True),
                f"a delete of {prefix}",
            )

    def checksum(self, key: str) -> str | None:
        return self.local.checksum(key) if self.local else None

    def commit(self) -> None:
        # Inside Modal, writes to the mount stay private to this container until commit.
        if self.local and os.environ.get("MODAL_TASK_ID"):
            self._api(self.volume.commit, "a commit", VOLUME_TRANSFER_TIMEOUT_S)

    def refresh(self) -> None:
        if self.local and os.environ.get("MODAL_TASK_ID"):
            self._api(self.volume.reload, "a reload")


def modal_silent(what: str, seconds: float, cls: type[FerryError] = FerryError, then: str = ""):  # type: ignore[no-untyped-def]
    """The one paragraph for "Modal's API did not answer" (`then`: what that means)."""
    from modal.config import config

    return cls(
        f"Modal's API at {config.get('server_url')} did not answer {what} within "
        f"{seconds:.0f} s{then}.",
        hint="Check your network or proxy (can this machine reach it?), "
        "https://status.modal.com, and `modal token info`.",
    )


def modal_call(fn, what: str, seconds: float):  # type: ignore[no-untyped-def]
    """A call to Modal's API that reads, writes or stops something, with a deadline (the
    SDK otherwise retries a dead connection for about a minute)."""
    from payload.runtime.deadline import DeadlineExceeded, call_within

    try:
        return call_within(fn, seconds, f"Modal: {what}")
    except DeadlineExceeded as e:
        raise modal_silent(what, seconds) from e


def mounts() -> dict[str, str]:
    """FERRY_VOLUME_MOUNTS (`name=/path,...`): volumes mounted in this container."""
    found = {}
    for item in os.environ.get("FERRY_VOLUME_MOUNTS", "").split(","):
        name, sep, path = item.partition("=")
        if sep and name.strip() and path.strip():
            found[name.strip()] = path.strip()
    return found


def check_uri(uri: str) -> str | None:
    """Why `uri` is not a storage URI Ferry can use, or None if it is."""
    if "\x00" in uri or not uri.isprintable():
        return f"{uri!r} holds a NUL byte or another unprintable character"
    parsed = urlparse(uri)
    if parsed.scheme not in SCHEMES:
        return f"`{uri}` should start with file://, s3:// or volume://"
    if parsed.scheme == "file" and (parsed.netloc not in ("", "localhost") or not parsed.path):
        return f"`{uri}` needs an absolute path (file:///abs/path)"
    if parsed.scheme in ("s3", "volume") and not parsed.netloc:
        name = "bucket" if parsed.scheme == "s3" else "volume name"
        return f"`{uri}` names no {name}"
    return None


def open_store(uri: str) -> Store:
    """The store a storage URI names."""
    problem = check_uri(uri)
    if problem:
        raise FerryError(f"Storage URI {problem}.")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return FileStore(Path(parsed.path), uri.rstrip("/"))
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path, uri.rstrip("/"))
    return VolumeStore(parsed.netloc, parsed.path, uri.rstrip("/"))


def walk_files(folder: Path, exclude: tuple[str, ...] = ()) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under `folder`, sorted, skipping
    symlinks and top-level entries named in `exclude`."""
    found = []
    for parent, dirs, files in os.walk(folder):  # never descends into symlinked folders
        here = Path(parent)
        if here == folder:
            dirs[:] = [d for d in dirs if d not in exclude]
        for name in files:
            path = here / name
            rel = path.relative_to(folder)
            if rel.parts[0] in exclude or path.is_symlink():
                continue
            found.append((rel.as_posix(), path))
    yield from sorted(found)
