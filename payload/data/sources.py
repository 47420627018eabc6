"""Where a dataset's rows come from, and what they are, for the cache key.

    path: data/rows.jsonl            one file: .json/.jsonl, .csv, .parquet, .arrow, .txt
    path: data/saved                 a folder written by `datasets` (save_to_disk); of a
                                     DatasetDict, the dataset's `split`
    path: data/parts                 a folder of data files: `data_files` inside it, else
                                     every file of the one data format it holds
    path: s3://bucket/key-or-prefix  downloaded once into a local cache (keyed by each
                                     object's ETag and size), then read as above
    path: org/name                   a hub dataset, through datasets.load_dataset

`fingerprint` says what the rows are without parsing them (each file's size and sha256,
each S3 object's ETag), so that a cache hit reads nothing but the cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payload.config.schema import DatasetConfig
from payload.data.report import DataReport
from payload.errors import FerryError
from payload.storage.stores import sha256_file

SUFFIX_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


def data_home() -> Path:
    """Ferry's folder on this machine: $FERRY_HOME, else ~/.ferry (as the launcher's)."""
    return Path(os.environ.get("FERRY_HOME") or Path.home() / ".ferry").expanduser()


@dataclass(frozen=True)
class Located:
    """A dataset found on this machine: data `files` of format `fmt`, a `saved` folder,
    or neither (a hub id)."""

    files: tuple[Path, ...] = ()
    fmt: str | None = None
    saved: Path | None = None


def _is_saved(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in SAVED_MARKERS)


def locate(ds: DatasetConfig, where: str, local: Path | None = None) -> Located:
    """Find the dataset's files (`local` replaces `ds.path`: an S3 download)."""
    path = local or Path(ds.path).expanduser()
    if path.is_file():
        return Located((path,), _format(ds, [path], where))
    if not path.is_dir():
        return Located()
    if _is_saved(path) and not ds.data_files:
        return Located(saved=path)
    if ds.data_files:
        names = [ds.data_files] if isinstance(ds.data_files, str) else list(ds.data_files)
        files = []
        for name in names:
            found = sorted(p for p in path.glob(name) if p.is_file())
            if not found:
                raise FerryError(f"{where}: data_files `{name}` matches no file in {path}.")
            files += found
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in SUFFIX_FORMATS and not _hidden(p, path)
        )
        if ds.ds_type:
            files = [p for p in files if SUFFIX_FORMATS[p.suffix.lower()] == ds.ds_type]
        if not files:
            raise FerryError(
                f"{where}: {path} holds no data files ({', '.join(SUFFIX_FORMATS)}) and "
                "was not written by `datasets` save_to_disk.",
                hint="Point `path` at a file, or list the files under `data_files`.",
            )
    return Located(tuple(files), _format(ds, files, where))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _format(ds: DatasetConfig, files: list[Path], where: str) -> str:
    if ds.ds_type:
        return ds.ds_type
    formats = {SUFFIX_FORMATS.get(p.suffix.lower()) for p in files}
    if None in formats:
        odd = next(p for p in files if p.suffix.lower() not in SUFFIX_FORMATS)
        raise FerryError(
            f"{where}: cannot tell the format of {odd.name}; set `ds_type` "
            f"(one of {', '.join(sorted(set(SUFFIX_FORMATS.values())))})."
        )
    if len(formats) > 1:
        raise FerryError(
            f"{where}: the folder mixes {', '.join(sorted(f for f in formats if f))} files.",
            hint="Pick one format with `ds_type`, or list the files under `data_files`.",
        )
    return formats.pop() or "json"


def load_rows(
    ds: DatasetConfig,
    where: str,
    *,
    streaming: bool = False,
    report: DataReport | None = None,
    strict: bool = False,
) -> Any:
    """All the dataset's rows (`shard` picks its shard): a `datasets.Dataset`, or an
    `IterableDataset` when streaming. `where` names the dataset in errors.

    Local json/jsonl/csv files that `datasets` cannot read are read again line by line
    (`careful`): lines that cannot be rows are counted in `report` by reason, with the
    first "<file> line N", and the rest load. With `strict`, or without a `report` to
    count them in, the first such line is an error naming it."""
    import datasets

    local = s3_download(ds.path, where) if ds.path.startswith("s3://") else None
    found = locate(ds, where, local)
    try:
        if found.saved is not None:
            rows = datasets.load_from_disk(str(found.saved))
            if isinstance(rows, datasets.DatasetDict):
                if ds.split not in rows:
                    raise FerryError(
                        f"{where}: the saved dataset has no split `{ds.split}`; "
                        f"it has {', '.join(rows)}. Set `split`."
                    )
                rows = rows[ds.split]
            return rows.to_iterable_dataset() if streaming else rows
        if found.files:
            if not ds.split.startswith("train"):
                raise FerryError(
                    f"{where}: local data files form one split, `train` (slices such as "
                    f"`train[:10%]` work); got split `{ds.split}`."
                )
            with _quiet(JSON_LOGGER):
                rows = datasets.load_dataset(
                    found.fmt,
                    data_files=[str(p) for p in found.files],
                    split=ds.split,
                    streaming=streaming,
                )
        else:
            rows = datasets.load_dataset(
                ds.path,
                name=ds.name,
                data_files=ds.data_files,
                split=ds.split,
                revision=ds.revision,
                streaming=streaming,
            )
    except FerryError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets' and pyarrow's many errors, named here
        # Only now, so that files the fast loader reads cost nothing more.
        if found.files and not streaming:
            _check_split(ds.split, where, e)
            rows = _careful_or_say_why(found, ds.split, where, _on_bad(where, report, strict))
            if rows is not None:
                return rows
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FerryError(
            f"Could not read {where}: {first}",
            hint="Check `path`, `split`, `data_files` and `ds_type` (FERRY_DEBUG=1 for more).",
        ) from e
    return rows


# ---- files the fast loader cannot read

NOT_JSON = "not valid JSON"
NOT_OBJECT = "not a JSON object"
NOT_UTF8 = "not valid UTF-8"
CSV_FIELDS = "not as many CSV fields as the header"


# `datasets` logs an ERROR for a json file it cannot parse, counting rows from 0; the
# careful reader then names the line itself, so that log line would only mislead.
JSON_LOGGER = "datasets.packaged_modules.json.json"


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _on_bad(where: str, report: DataReport | None, strict: bool) -> Callable[[str, str], None]:
    """What to do with a line that cannot be a row: count it, or stop at it."""

    def bad(reason: str, place: str) -> None:
        if strict:
            raise FerryError(f"{where}: {place}: {reason} (strict: true).")
        if report is None:
            raise FerryError(
                f"{where}: {place}: {reason}.",
                hint="Fix or remove the line; only `datasets` entries skip unreadable lines.",
            )
        report.unreadable(reason, place)

    return bad


def _split_parts(split: str, rows: int) -> list[Any]:
    """The row ranges `split` picks of one `train` split of `rows` rows, as the fast loader
    reads it (a ValueError when it cannot)."""
    import datasets

    return datasets.ReadInstruction.from_spec(split).to_absolute({"train": rows})


def _check_split(split: str, where: str, failure: Exception) -> None:
    """Raise naming `split` when the fast loader could not have read it either, so that the
    careful reader never reads a file for a split it cannot pick."""
    try:
        _split_parts(split, 1)
    except (ValueError, AssertionError) as e:
        raise FerryError(
            f"Could not read {where}: split `{split}`: {e}",
            hint="Local data files form one split, `train`; slices such as `train[:10%]` "
            "or `train[100:200]` pick part of it.",
        ) from failure


def _careful_or_say_why(
    found: Located, split: str, where: str, bad: Callable[[str, str], None]
) -> Any:
    """`careful`, with its own failures (a file gone or unreadable, pyarrow or pandas
    refusing what is left) as an error naming the dataset and the files."""
    import pyarrow as pa

    try:
        return careful(found, split, where, bad)
    except FerryError:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        names = ", ".join(str(p) for p in found.files[:3])
        more = f" and {len(found.files) - 3} more" if len(found.files) > 3 else ""
        raise FerryError(
            f"Could not read {where}: {names}{more}: {why}",
            hint="Check the file is there and readable (FERRY_DEBUG=1 for more).",
        ) from e


def careful(found: Located, split: str, where: str, bad: Callable[[str, str], None]) -> Any:
    """The rows of `found`'s files, read line by line, calling `bad(reason, "<file> line
    N")` for each line that cannot be a row; None when the format has no line reader.
    A parquet or arrow file that cannot be read is an error naming it, and so are files
    with no readable row at all."""
    import datasets
    from datasets.table import InMemoryTable

    seen = _Seen(bad)
    if found.fmt == "json":
        table = _json_table(found.files, where, seen)
    elif found.fmt == "csv":
        table = _csv_table(found.files, where, seen)
    elif found.fmt in ("parquet", "arrow"):
        _name_unreadable(found.files, found.fmt, where)
        return None
    else:
        return None
    if table.num_rows == 0:
        files = str(found.files[0]) if len(found.files) == 1 else f"its {len(found.files)} files"
        if seen.count:
            place, reason = seen.first
            raise FerryError(
                f"Could not read {where}: {files} has no readable rows: {seen.count} "
                f"line{'s' if seen.count != 1 else ''}, all bad (first: {place}: {reason})."
            )
        raise FerryError(f"Could not read {where}: {files} is empty.")
    rows = datasets.Dataset(InMemoryTable(table))
    parts = _split_parts(split, len(rows))
    picked = [i for part in parts for i in range(part.from_, part.to)]
    return rows if picked == list(range(len(rows))) else rows.select(picked)


class _Seen:
    """`bad`, counting the bad lines and keeping the first (place, reason)."""

    def __init__(self, bad: Callable[[str, str], None]):
        self.bad, self.count, self.first = bad, 0, ("", "")

    def __call__(self, reason: str, place: str) -> None:
        self.count += 1
        if self.count == 1:
            self.first = (place, reason)
        self.bad(reason, place)


NOT_SAME_TYPE = "not the same type as the other rows' `{}`"
TWICE = "a field given twice"


def _json_table(files: tuple[Path, ...], where: str, bad: Callable[[str, str], None]) -> Any:
    """One table of every JSON object in `files`: jsonl lines, or a file's one array. A
    .jsonl file is always read line by line; another file is one array only when the
    whole of it parses as one (a .json file that starts as an array and does not parse is
    an error). A row giving a field another type than most rows do is a bad row."""
    good: list[tuple[str, dict]] = []  # (place, object)
    for path in files:
        data = path.read_bytes()
        whole = None if path.suffix.lower() == ".jsonl" else _one_document(path, data, where)
        if isinstance(whole, list):
            good += _json_array(path, whole, bad)
            continue
        for number, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            place = f"{path} line {number}"
            try:
                value = json.loads(line.decode("utf-8"), object_pairs_hook=_no_twice)
                json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone surrogate
            except _Twice:
                bad(TWICE, place)
                continue
            except UnicodeError:
                bad(NOT_UTF8, place)
                continue
            except ValueError:
                bad(NOT_JSON, place)
                continue
            if not isinstance(value, dict):
                bad(NOT_OBJECT, place)
                continue
            good.append((place, value))
    return _objects_table(_same_types(good, bad), where)


class _Twice(ValueError):
    pass


def _no_twice(pairs: list[tuple[str, Any]]) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise _Twice
    return value


def _one_document(path: Path, data: bytes, where: str) -> Any:
    """The file as one JSON document, or None when it is more than one (jsonl). A .json
    file that starts as an array and does not parse as one is an error."""
    text = data.decode("utf-8", errors="replace")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" or path.suffix.lower() != ".json" or text.lstrip()[:1] != "[":
            return None
        raise FerryError(
            f"Could not read {where}: {path} line {e.lineno} is {NOT_JSON} ({e.msg}); the "
            "file is one JSON array, so none of it can be read.",
            hint="Write one JSON object per line (jsonl): then only a bad line is skipped.",
        ) from e
    if not isinstance(value, list):
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise FerryError(f"Could not read {where}: {path} line {line} is {NOT_UTF8}.") from e
    return value


def _json_array(path: Path, value: list, bad: Callable[[str, str], None]):
    """The objects of a file that is one JSON array; other elements are bad rows ("<file>
    element N", N from 0 as rows are)."""
    good = []
    for index, element in enumerate(value):
        place = f"{path} element {index}"
        if not isinstance(element, dict):
            bad(NOT_OBJECT, place)
            continue
        try:
            json.dumps(element, ensure_ascii=False).encode("utf-8")
        except UnicodeError:
            bad(NOT_UTF8, place)
            continue
        good.append((place, element))
    return good


def _kind(value: Any) -> str | None:
    """The pyarrow JSON type family of a value; None (null) goes with any."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "list" if isinstance(value, list) else "object"


def _same_types(good: list[tuple[str, dict]], bad: Callable[[str, str], None]):
    """`good`, less the rows that give a top-level field another type than most rows do."""
    from collections import Counter

    votes: dict[str, Counter] = {}
    for _, value in good:
        for key, field in value.items():
            kind = _kind(field)
            if kind is not None:
                votes.setdefault(key, Counter())[kind] += 1
    if all(len(v) == 1 for v in votes.values()):
        return good
    usual = {key: v.most_common(1)[0][0] for key, v in votes.items()}
    kept = []
    for place, value in good:
        odd = next((k for k, f in value.items() if _kind(f) not in (None, usual[k])), None)
        if odd is None:
            kept.append((place, value))
        else:
            bad(NOT_SAME_TYPE.format(odd), place)
    return kept


def _objects_table(good: list[tuple[str, dict]], where: str) -> Any:
    """The table pyarrow's JSON reader makes of `good`; a row it refuses is an error
    naming its place (found by halving)."""
    import pyarrow as pa
    import pyarrow.json as paj

    def read(rows: list[tuple[str, dict]]) -> Any:
        text = b"\n".join(json.dumps(v, ensure_ascii=False).encode("utf-8") for _, v in rows)
        options = paj.ReadOptions(block_size=min(max(len(text) + 1, 1 << 20), 2**31 - 1))
        return paj.read_json(pa.py_buffer(text), read_options=options)

    if not good:
        return pa.table({})
    try:
        return read(good)
    except pa.ArrowInvalid as e:  # e.g. a clash inside a nested field
        low, high = 1, len(good)  # the shortest failing prefix ends at the offender
        while low < high:
            mid = (low + high) // 2
            try:
                read(good[:mid])
                low = mid + 1
            except pa.ArrowInvalid:
                high = mid
        why = str(e).removeprefix("JSON parse error: ").split(" in row ")[0]
        raise FerryError(
            f"Could not read {where}: {good[low - 1][0]}: {why}.",
            hint="Every row must give each field the same type.",
        ) from e


def _csv_table(files: tuple[Path, ...], where: str, bad: Callable[[str, str], None]) -> Any:
    """One table of every CSV row in `files` with as many fields as its file's header,
    typed as the fast loader types them (pandas)."""
    import csv
    import io

    import pandas as pd
    import pyarrow as pa

    frames = []
    for path in files:
        lines = _Lines(path, bad)
        reader = csv.reader(lines)
        header = next(reader, None)
        if header is None:
            continue
        kept = io.StringIO()
        writer = csv.writer(kept)
        writer.writerow(header)
        for record in reader:
            if not record:
                continue
            if len(record) != len(header):
                bad(CSV_FIELDS, f"{path} line {lines.number}")
                continue
            writer.writerow(record)
        kept.seek(0)
        frames.append(pd.read_csv(kept))
    if not frames:
        return pa.table({})
    return pa.Table.from_pandas(pd.concat(frames, ignore_index=True), preserve_index=False)


class _Lines:
    """A file's lines as text for `csv.reader`; a line that is not UTF-8 is a bad row.
    `number` is the line last read (from 1), so the line a record ends on."""

    def __init__(self, path: Path, bad: Callable[[str, str], None]):
        self.path, self.bad, self.number = path, bad, 0

    def __iter__(self) -> Iterator[str]:
        for number, line in enumerate(self.path.read_bytes().split(b"\n"), 1):
            self.number = number
            try:
                yield line.decode("utf-8") + "\n"
            except UnicodeDecodeError:
                self.bad(NOT_UTF8, f"{self.path} line {self.number}")


def _name_unreadable(files: tuple[Path, ...], fmt: str, where: str) -> None:
    """Raise naming the first of `files` that pyarrow cannot read, and why."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        try:
            if fmt == "parquet":
                pq.read_table(path)
            else:
                with pa.memory_map(str(path)) as source:
                    try:
                        pa.ipc.open_stream(source).read_all()
                    except pa.ArrowInvalid:
                        source.seek(0)
                        pa.ipc.open_file(source).read_all()
        except (OSError, pa.ArrowException) as e:
            raise FerryError(
                f"Could not read {where}: {path} is not a readable {fmt} file ({e}).",
                hint="The file may be truncated or still being written: write it again.",
            ) from e


def shard(rows: Any, shards: int | None, index: int | None) -> tuple[Any, int]:
    """(shard `index` (default 0) of `shards` contiguous shards, the row number its first
    row had). A stream is sharded by its files instead, and reports offset 0."""
    if not shards:
        return rows, 0
    index = index or 0
    if not hasattr(rows, "__len__"):
        return rows.shard(num_shards=shards, index=index), 0
    offset = (len(rows) // shards) * index + min(index, len(rows) % shards)
    return rows.shard(num_shards=shards, index=index, contiguous=True), offset


# ---- fingerprints


def fingerprint(ds: DatasetConfig, where: str) -> str:
    """A digest of the rows' source: every local file's size and sha256, every S3
    object's ETag and size. A hub dataset is known only by its name and `revision`
    (pin `revision` for a cache that follows the hub)."""
    if ds.path.startswith("s3://"):
        parts: Any = [(o.rel, o.etag, o.size) for o in s3_objects(ds.path, where)]
    else:
        found = locate(ds, where)
        if found.saved is not None:
            files = [p for p in sorted(found.saved.rglob("*")) if p.is_file()]
            parts = [(str(p), *_file_digest(p)) for p in files]
        elif found.files:
            parts = [(str(p), *_file_digest(p)) for p in found.files]
        else:
            parts = ["hub", ds.path, ds.name, ds.revision]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _file_digest(path: Path) -> tuple[int, str]:
    stat = path.stat()
    return stat.st_size, _sha256(str(path), stat.st_size, stat.st_mtime_ns)


DIGESTS = "digests.json"  # in $FERRY_HOME/cache: {path: [size, mtime_ns, sha256]}
MAX_DIGESTS = 10_000


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A data file's sha256, remembered on disk while its size and mtime stay the same,
    so a multi-GB file is read once rather than on every run and by every rank (as `make`
    and rsync trust mtimes; any edit through normal tools changes it)."""
    book = data_home() / "cache" / DIGESTS
    try:
        known = json.loads(book.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(path)
    if isinstance(entry, list) and entry[:2] == [size, mtime_ns]:
        return entry[2]
    digest = sha256_file(Path(path))
    known[path] = [size, mtime_ns, digest]
    if len(known) > MAX_DIGESTS:  # the oldest entries go first (dicts keep order)
        known = dict(list(known.items())[-MAX_DIGESTS:])
    # Written whole and renamed: a reader never sees half a file. Two writers at once
    # can only lose each other's new entry, which is hashed again next time.
    try:
        book.parent.mkdir(parents=True, exist_ok=True)
        partial = book.with_name(f".{DIGESTS}.{os.getpid()}")
        partial.write_text(json.dumps(known))
        os.replace(partial, book)
    except OSError:
        pass  # a read-only home: the file is simply hashed again next run
    return digest


# ---- S3


@dataclass(frozen=True)
class S3Object:
    key: str
    rel: str  # the path under the download folder
    etag: str
    size: int


def _split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def s3_objects(uri: str, where: str) -> list[S3Object]:
    """The object `uri` names, or every object under it as a prefix."""
    from payload.storage import open_store

    bucket, key = _split_uri(uri)
    store = open_store(f"s3://{bucket}")
    try:
        pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        items = [item for page in pages for item in page.get("Contents", [])]
    except Exception as e:  # noqa: BLE001 - botocore's errors: credentials, endpoint, bucket
        raise FerryError(
            f"{where}: cannot list {uri}: {e}",
            hint="Check AWS credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID), AWS_ENDPOINT_URL "
            "and the bucket name.",
        ) from e
    exact = [i for i in items if i["Key"] == key and key]
    if exact:
        item = exact[0]
        return [S3Object(key, Path(key).name, item["ETag"].strip('"'), item["Size"])]
    prefix = key.rstrip("/") + "/" if key else ""
    found = [
        S3Object(i["Key"], i["Key"][len(prefix) :], i["ETag"].strip('"'), i["Size"])
        for i in items
        if i["Key"].startswith(prefix) and not i["Key"].endswith("/")
    ]
    if not found:
        raise FerryError(f"{where}: there is no object at {uri} (nor under it).")
    return sorted(found, key=lambda o: o.key)


def s3_download(uri: str, where: str) -> Path:
    """A local copy of `uri` (a file, or a folder for a prefix). The copy lives under
    $FERRY_HOME/cache/s3 and is reused while every object's ETag and size are unchanged;
    a lock keeps processes that want the same copy from fetching it twice."""
    from filelock import FileLock

    from payload.storage import open_store

    objects = s3_objects(uri, where)
    identity = json.dumps([(o.key, o.etag, o.size) for o in objects]).encode()
    root = data_home() / "cache" / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = root / hashlib.sha256(identity).hexdigest()[:16]
    single = len(objects) == 1 and objects[0].key == _split_uri(uri)[1]
    result = target / objects[0].rel if single else target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        if target.is_dir():
            return result
        partial = root / f".partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            for o in objects:
                (partial / o.rel).parent.mkdir(parents=True, exist_ok=True)
            store = open_store(f"s3://{_split_uri(uri)[0]}")
            store.get_files([(o.key, partial / o.rel) for o in objects])
            for old in root.iterdir():  # earlier versions of these objects
                if old.is_dir() and not old.name.startswith("."):
                    shutil.rmtree(old, ignore_errors=True)
            partial.rename(target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return result
