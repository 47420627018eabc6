"""Which local picture files an image-chat data file names, for shipping them with a
remote job beside the file (executors.modal.shipped_inputs). Light: json only.

A picture is named in a row's `images` / `image` column, or inline in an image part
(`{"type": "image", "image" | "url" | "path": ...}`), as payload.data.vision reads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from payload.errors import FerryError

IMAGE_COLUMNS = ("images", "image")
INLINE_KEYS = ("image", "url", "path")
ROW_FILES = (".jsonl", ".json")


def _names(row: Any, fields: tuple[str, ...] = ("messages", "conversations")) -> Iterator[str]:
    if not isinstance(row, dict):
        return
    for column in IMAGE_COLUMNS:
        value = row.get(column)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                yield item
            elif (
                isinstance(item, dict)
                and isinstance(item.get("path"), str)
                and not item.get("bytes")
            ):
                yield item["path"]
    for field in fields:
        for message in row.get(field) or []:
            content = message.get("content") if isinstance(message, dict) else None
            for part in content if isinstance(content, list) else []:
                if isinstance(part, dict) and part.get("type") == "image":
                    found = next((part[k] for k in INLINE_KEYS if part.get(k)), None)
                    if isinstance(found, str):
                        yield found


def _rows(path: Path) -> Iterator[Any]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError:
            return
        yield from data if isinstance(data, list) else [data]
        return
    for line in text.splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue  # the run counts the unreadable line; shipping needs no opinion


def local_pictures(data_file: Path, where: str, field_messages: str | None = None) -> list[str]:
    """The pictures a local data file names by a path relative to its folder, each once,
    in order. A picture named by an absolute local path, or one that is not beside the data
    file (found here only relative to the working folder, say), is an error: it would not
    exist on the remote machine. URLs and data: URIs need no shipping."""
    if data_file.suffix not in ROW_FILES or not data_file.is_file():
        return []
    fields = (field_messages,) if field_messages else ("messages", "conversations")
    out: dict[str, None] = {}
    for row in _rows(data_file):
        for name in _names(row, fields):
            if name.startswith(("http://", "https://", "data:")):
                continue
            path = Path(name).expanduser()
            if path.is_absolute():
                raise FerryError(
                    f"{where}: a row names the picture {name} by an absolute path, which the "
                    "remote machine does not have.",
                    hint="Write picture paths relative to the data file; they travel with it.",
                )
            if ".." in path.parts:
                raise FerryError(
                    f"{where}: a row names the picture {name} outside the data file's folder; "
                    "only pictures in that folder (or below it) travel with the file.",
                    hint="Move the pictures under the data file's folder, or the data file "
                    "up beside them.",
                )
            if not (data_file.parent / path).is_file():
                raise FerryError(
                    f"{where}: a row names the picture {name}, which is not in the data file's "
                    f"folder {data_file.parent}; only what is there travels with the file.",
                    hint="Write picture paths relative to the data file.",
                )
            out[path.as_posix()] = None
    return list(out)
