"""TrainConfig compiled: `launch validate` checks a config without building pydantic models.

Most of what `launch validate` used to spend was pydantic's: loading its model machinery
and turning Ferry's models into a pydantic-core schema (together more than everything
else the command does, Python's own start-up aside). What the models compile to is plain
data once the model classes in it are swapped for the light records below, so it is
built once, kept in a cache file, and checked with pydantic-core itself (which
`import pydantic` loads anyway): the same checks, the same error messages.

- The cache: `$FERRY_HOME/cache/config-schema-<versions>.pickle` (default `~/.ferry`),
  rebuilt (with the models) when any file of `payload/config/` changes size or time, or
  when it cannot be read or is not this user's; written only by a process that loaded
  the models for it (`train_config`); skipped where it cannot be written. Where the
  schema cannot be compiled at all, the loader checks with the models.
- The records (`Record` subclasses, one per model, named as the model) answer what the
  config rules ask of a model: the fields as attributes, `model_fields_set`,
  `model_copy(update=...)`, `model_dump()`, and the models' helper properties (they
  share them: `vocab.DatasetHelpers`, `vocab.TrainHelpers`).
- Field validators are `payload.config.vocab` functions, kept in the schema by reference;
  a schema that calls anything else refuses to compile (a test builds it).

Only `launch validate` (launcher.api.validate(compiled=True)) reads configs this way,
and only those that list no plugins: a plugin brings its keys as a pydantic model of its
own. Everything else gets a TrainConfig.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from payload.config import vocab
from payload.config.vocab import DatasetHelpers, TrainHelpers

FORMAT = 1  # of the cache file; bump when what it holds changes shape
HERE = Path(__file__).resolve().parent  # payload/config: every file here is a source


class Record:
    """A validated section, as pydantic-core makes it for a model schema whose class is
    this one: the fields in `__dict__`, the keys the config set in `model_fields_set`."""

    __slots__ = (
        "__dict__",
        "__pydantic_extra__",
        "__pydantic_fields_set__",
        "__pydantic_private__",
    )

    @property
    def model_fields_set(self) -> set[str]:
        return self.__pydantic_fields_set__

    def __setattr__(self, name: str, value: Any) -> None:
        """As pydantic's (no assignment validation): a field set counts as set; a name
        that is no field is refused."""
        if name.startswith("__pydantic_"):
            object.__setattr__(self, name, value)
            return
        if name not in self.__dict__:
            raise ValueError(f'"{type(self).__name__}" object has no field "{name}"')
        self.__dict__[name] = value
        self.__pydantic_fields_set__.add(name)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Any:
        """As pydantic's: a copy with `update` applied unvalidated, its keys counted as set."""
        new = type(self).__new__(type(self))
        values = copy.deepcopy(self.__dict__) if deep else dict(self.__dict__)
        values.update(update or {})
        object.__setattr__(new, "__dict__", values)
        new.__pydantic_fields_set__ = self.__pydantic_fields_set__ | set(update or ())
        new.__pydantic_extra__ = self.__pydantic_extra__
        new.__pydantic_private__ = self.__pydantic_private__
        return new

    def model_dump(self) -> dict[str, Any]:
        """The fields as plain data, nested sections as mappings (pydantic's python mode)."""
        return {name: _plain(value) for name, value in self.__dict__.items()}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    __hash__ = None  # type: ignore[assignment] - mutable, as pydantic's models are

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({fields})"


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.model_dump()
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# One record per model of schema.py, by the same name (the cache refers to them by name).
class TrainConfig(TrainHelpers, Record):
    __slots__ = ()


class DatasetConfig(DatasetHelpers, Record):
    __slots__ = ()


class QuantizationConfig(Record):
    __slots__ = ()


class VolumeMount(Record):
    __slots__ = ()


class ImageOverrides(Record):
    __slots__ = ()


class RayLaunch(Record):
    __slots__ = ()


class SkyLaunch(Record):
    __slots__ = ()


class LaunchConfig(Record):
    __slots__ = ()


class TRLConfig(Record):
    __slots__ = ()


class VllmConfig(Record):
    __slots__ = ()


@dataclass(eq=False)
class CompiledModel:
    """A model as the loader's key checks and error reports need it: its keys (each name
    a field accepts -> the field), the section each field holds, and (for the top one)
    the validator. `model_validate` returns records, as the model would return models."""

    name: str
    names: dict[str, str]
    fields: dict[str, tuple[CompiledModel | None, bool]] = field(default_factory=dict)
    validator: Any = None

    def model_validate(self, data: dict[str, Any]) -> Any:
        return self.validator.validate_python(data)


def train_config() -> CompiledModel:
    """TrainConfig compiled: from the cache, else built (with the models) and cached.

    The file is written only by a process that built the models for it, from sources
    that did not change meanwhile: one that had them loaded before (a notebook, with the
    files edited since) would otherwise save its old schema under the new files' stamps."""
    path = cache_file()
    data = _read(path) if path else None
    if data is None:
        loaded = "payload.config.schema" in sys.modules
        data = build()
        if path and not loaded and data["sources"] == sources():
            _write(path, data)
    return _compiled(data)


def cache_file() -> Path | None:
    """The cache file, or None where there is no home folder to keep it in (a container
    run as a user with no home and no FERRY_HOME): then each validate builds the models."""
    import hashlib

    import pydantic_core
    from pydantic.version import VERSION  # pydantic's own, without the rest of pydantic

    try:
        home = Path(os.environ.get("FERRY_HOME") or Path.home() / ".ferry").expanduser()
    except RuntimeError:  # Path.home(): no HOME and no passwd entry
        return None
    # Two checkouts (or virtualenvs) sharing FERRY_HOME each keep their own file.
    tag = hashlib.sha256(f"{HERE}|{sys.version}".encode()).hexdigest()[:10]
    name = f"config-schema-{tag}-pydantic{VERSION}-core{pydantic_core.__version__}.pickle"
    return home / "cache" / name


def sources() -> dict[str, tuple[int, int]]:
    """{file name: (mtime_ns, size)} of every module of payload/config."""
    found = {}
    with os.scandir(HERE) as entries:
        for entry in entries:
            if entry.name.endswith(".py"):
                stat = entry.stat()
                found[entry.name] = (stat.st_mtime_ns, stat.st_size)
    return found


def build() -> dict[str, Any]:
    """Build the models and compile TrainConfig: its core schema with the model classes
    swapped for records, and the key tables of every section it holds."""
    from pydantic import BaseModel

    from payload.config import loader, schema

    def light(node: Any) -> Any:
        if isinstance(node, dict):
            is_schema = isinstance(node.get("type"), str)  # not a mapping of field names
            # metadata: JSON-schema hooks, never used by validation
            return {k: light(v) for k, v in node.items() if not (is_schema and k == "metadata")}
        if isinstance(node, list | tuple):
            return type(node)(light(v) for v in node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            record = globals().get(node.__name__)
            if not (isinstance(record, type) and issubclass(record, Record)):
                raise RuntimeError(
                    f"payload/config/compiled.py has no record for the model {node.__name__}; "
                    f"add `class {node.__name__}(Record)` there."
                )
            return record
        if callable(node) and not isinstance(node, type) and node.__module__ != vocab.__name__:
            raise RuntimeError(
                f"the config schema calls {node!r}: a field validator must be a function "
                "of payload/config/vocab.py for `launch validate` to keep it compiled."
            )
        return node

    stamps = sources()  # before the models load: a later edit makes the file stale, not wrong
    tables: dict[str, dict[str, Any]] = {}
    todo: list[type[BaseModel]] = [schema.TrainConfig]
    while todo:
        model = todo.pop()
        if model.__name__ in tables:
            continue
        fields = loader.field_table(model)
        tables[model.__name__] = {
            "names": loader.key_names(model),
            "fields": {k: (n.__name__ if n else None, many) for k, (n, many) in fields.items()},
        }
        todo.extend(n for n, _ in fields.values() if n is not None)
    return {
        "format": FORMAT,
        "sources": stamps,
        "schema": light(schema.TrainConfig.__pydantic_core_schema__),
        "tables": tables,
    }


def _read(path: Path) -> dict[str, Any] | None:
    """The cache's content, or None where there is none, it is of another format, its
    sources have changed since, or it cannot be read (a record renamed, a torn file)."""
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_uid != os.getuid():
                return None  # unpickling runs code: only a file of this user's is read
            data = pickle.load(f)  # noqa: S301 - written by this module under FERRY_HOME
    except Exception:  # noqa: BLE001 - any unreadable cache is rebuilt
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return data if data.get("sources") == sources() else None


def _write(path: Path, data: dict[str, Any]) -> None:
    """Write the cache atomically (a reader never sees half of it); skip it if the
    folder cannot be written: the next validate builds the models again, nothing worse."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        blob = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    except (OSError, pickle.PicklingError, TypeError, AttributeError):
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _compiled(data: dict[str, Any]) -> CompiledModel:
    from pydantic_core import SchemaValidator

    models = {name: CompiledModel(name, table["names"]) for name, table in data["tables"].items()}
    for name, table in data["tables"].items():
        models[name].fields = {
            key: (models[nested] if nested else None, many)
            for key, (nested, many) in table["fields"].items()
        }
    top = models["TrainConfig"]
    top.validator = SchemaValidator(data["schema"])
    return top
