"""Read a config (path or https URL), apply overrides, and validate it, reporting every
problem at once: unknown keys with a did-you-mean, Axolotl keys Ferry does not support
yet by name, bad values, cross-key rules, and local files that do not exist."""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic_core import ValidationError  # pydantic's own ValidationError

from payload.config import axolotl_keys, paths, trackers  # noqa: F401 - trackers: its rules
from payload.config.compiled import CompiledModel
from payload.config.overrides import apply_overrides
from payload.config.rules import check_rules
from payload.errors import ConfigError, FerryError, Problem
from payload.plugins import builtin_keys as builtin_plugin_keys
from payload.plugins import config_class as plugin_config_class
from payload.plugins import reference as plugin_reference
from payload.plugins import resolve_all as resolve_plugins

if TYPE_CHECKING:
    from pydantic import BaseModel

    from payload.config.schema import TrainConfig

# A model the key checks and validation take: a pydantic model class (TrainConfig, with
# any listed plugins' keys) or its compiled form (payload.config.compiled).
Model = Any

log = logging.getLogger("ferry.config")

URL_TIMEOUT_S = 15


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML that refuses a key written twice (PyYAML would keep the last silently)."""


class _DuplicateKey(yaml.YAMLError):
    pass


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise _DuplicateKey(f"key `{key}` appears twice (lines {seen[key]} and {line})")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def is_url(source: str | os.PathLike[str]) -> bool:
    return str(source).startswith(("https://", "http://"))


def read_text(source: str | os.PathLike[str]) -> str:
    """The config's text, from a local path or an https URL."""
    text_source = str(source)
    if is_url(text_source):
        if text_source.startswith("http://"):
            raise FerryError(f"{text_source}: configs are fetched over https only.")
        import urllib.error
        import urllib.request  # here, not at the top: it costs 40 ms of every CLI start

        try:
            with urllib.request.urlopen(text_source, timeout=URL_TIMEOUT_S) as response:
                return response.read().decode("utf-8")
        except (urllib.error.URLError, TimeoutError, UnicodeDecodeError) as e:
            raise FerryError(f"Could not fetch the config {text_source}: {e}") from e
    if problem := paths.path_problem(text_source):
        raise FerryError(f"File {paths.shown(text_source)}: {problem}.")
    path = Path(text_source).expanduser()
    try:
        if path.is_dir():
            raise FerryError(f"{text_source} is a folder; give a YAML file.")
        if not path.is_file():
            raise FerryError(f"Config file {text_source} does not exist.")
        data = path.read_bytes()
    except OSError as e:
        raise FerryError(f"File {text_source} cannot be read: {e.strerror}.") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise FerryError(
            f"{text_source} is not UTF-8 text: byte {data[e.start]:#04x} on line {line} "
            "cannot be decoded (is it a binary file, or saved in another encoding?)."
        ) from e


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    stream = io.StringIO(text)
    stream.name = source  # so YAML errors name the file, not "<unicode string>"
    try:
        data = yaml.load(stream, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except _DuplicateKey as e:
        raise FerryError(f"{source}: {e}; keep one.") from e
    except yaml.YAMLError as e:
        raise FerryError(f"{source} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FerryError(f"{source} must hold a mapping of keys, not a {type(data).__name__}.")
    return data


def read_raw(source: str | os.PathLike[str], overrides: list[str] | None = None) -> dict[str, Any]:
    """The config as a plain mapping with overrides applied, before validation."""
    return apply_overrides(parse_yaml(read_text(source), str(source)), list(overrides or []))


def load_config(
    source: str | os.PathLike[str],
    overrides: list[str] | None = None,
    *,
    resolve_paths: bool = True,
    compiled: bool = False,
) -> TrainConfig:
    """Load, override and validate a config; raise `ConfigError` listing every problem.

    With `resolve_paths`, local files the config names are looked up (from the current
    folder, then from the config's folder) and made absolute, and missing ones reported.
    Warnings (settings that would be ignored) go to the `ferry.config` logger.
    `compiled`: see `validate_mapping`.
    """
    raw = read_raw(source, overrides)
    base_dir = None if is_url(source) else Path(source).expanduser().resolve().parent
    return validate_mapping(
        raw, str(source), base_dir=base_dir, resolve_paths=resolve_paths, compiled=compiled
    )


def validate_mapping(
    raw: dict[str, Any],
    source: str = "config",
    *,
    base_dir: Path | None = None,
    resolve_paths: bool = True,
    warn: Callable[[str], None] | None = None,
    compiled: bool = False,
) -> TrainConfig:
    """Validate an already-read mapping; see `load_config`. Warnings go to `warn`
    (default: the `ferry.config` logger) as "source: key: message".

    `compiled`: check it against TrainConfig's compiled form (payload.config.compiled),
    without building the pydantic models, and return light records rather than models
    (the same checks and messages; for a caller that only reads the result, as `launch
    validate` does). A config that lists plugins is checked with the models."""
    ignored = [k for k, v in raw.items() if k in axolotl_keys.NO_EFFECT and v not in _OFF]
    raw = {k: v for k, v in raw.items() if k not in axolotl_keys.NO_EFFECT}
    # The listed plugins' keys join the schema (payload.plugins).
    listed = raw.get("plugins") if isinstance(raw.get("plugins"), list) else None
    plugins, unusable = resolve_plugins(listed, base_dir)
    model: Model = None
    if compiled and not plugins:
        from payload.config.compiled import train_config

        try:
            model = train_config()
        except Exception:  # noqa: BLE001 - a schema it cannot compile: check with the models
            log.debug("TrainConfig cannot be compiled; checking with the models", exc_info=True)
    if model is None:
        model = plugin_config_class(tuple(plugins))
    problems, clean = _unknown_keys(raw, model)
    problems.extend(Problem(f"plugins[{i}]", f"{message}") for i, message in unusable)
    bad: set[str] = set()
    try:
        cfg = model.model_validate(clean)
    except ValidationError as e:
        problems.extend(_pydantic_problems(e, clean, model))
        bad.update(str(err["loc"][0]) for err in e.errors())
        # Validate what is left so the cross-key rules can still run on it.
        cfg = model.model_validate({k: v for k, v in clean.items() if k not in bad})
    for plugin in plugins:
        problems.extend(Problem(k, m) for k, m in plugin().problems(cfg))
    errors, warnings = check_rules(cfg, set(clean), bad)
    warnings.extend(Problem(k, axolotl_keys.NO_EFFECT[k]) for k in ignored)
    problems.extend(errors)
    if resolve_paths and listed and not unusable:  # local plugin files: by absolute path
        cfg = cfg.model_copy(
            update={"plugins": [plugin_reference(str(n), base_dir) for n in listed]}
        )
    if resolve_paths and "base_model" not in bad and "datasets" not in bad:
        cfg, path_problems = paths.resolve(cfg, base_dir)
        problems.extend(path_problems)
    if problems:
        raise ConfigError(source, problems)
    for w in warnings:
        (warn or log.warning)(f"{source}: {w}")
    return cfg


def _unknown_keys(raw: dict[str, Any], model: Model) -> tuple[list[Problem], dict[str, Any]]:
    """Report unknown and not-yet-supported keys, at every depth; return the mapping
    without them. `model`: TrainConfig (with the listed plugins' keys), or compiled."""
    problems: list[Problem] = []
    return problems, _check_keys(raw, model, axolotl_keys.TOP_LEVEL, "", problems)


_OFF = (None, False, "", [], {})  # values that ask for nothing

# Axolotl's own keys, by the name of the model whose entries they would be: what "not
# supported yet" means at each depth. Ferry-only sections (launch) have none.
_AXOLOTL = {
    "TrainConfig": axolotl_keys.TOP_LEVEL,
    "DatasetConfig": axolotl_keys.DATASET,
    "TRLConfig": axolotl_keys.TRL,
    "VllmConfig": axolotl_keys.VLLM,
}


def _name(model: Model) -> str:
    return model.name if isinstance(model, CompiledModel) else model.__name__


def _check_keys(
    raw: dict[str, Any],
    model: Model,
    axolotl: frozenset[str],
    prefix: str,
    problems: list[Problem],
) -> dict[str, Any]:
    fields = _fields(model)
    clean: dict[str, Any] = {}
    seen: dict[str, str] = {}  # field name -> the key that set it
    for key, value in raw.items():
        key = str(key)
        if key in fields:
            # As in Axolotl, `key: null` means "not set": the default applies.
            if value is None:
                continue
            name = _names(model)[key]
            if name in seen:
                problems.append(
                    Problem(f"{prefix}{key}", f"and `{seen[name]}` are the same setting; set one.")
                )
                continue
            seen[name] = key
            nested, many = fields[key]
            inner = _AXOLOTL.get(_name(nested), frozenset()) if nested else frozenset()
            if nested and many and isinstance(value, list):
                value = [
                    _check_keys(v, nested, inner, f"{prefix}{key}[{i}].", problems)
                    if isinstance(v, dict)
                    else v
                    for i, v in enumerate(value)
                ]
            elif nested and not many and isinstance(value, dict):
                value = _check_keys(value, nested, inner, f"{prefix}{key}.", problems)
            clean[key] = value
        elif key in axolotl:
            # Axolotl knows it and Ferry does not do it yet. An off value (null, false, empty)
            # asks for nothing, so it is accepted as a no-op.
            if value not in _OFF:
                problems.append(Problem(f"{prefix}{key}", "is not supported yet by Ferry."))
        elif not prefix and key in builtin_plugin_keys():
            if value not in _OFF:
                problems.append(
                    Problem(
                        key,
                        f"is a key of the plugin `{builtin_plugin_keys()[key]}`: list it "
                        "under `plugins:`.",
                    )
                )
        else:
            known = frozenset(fields) | axolotl
            problems.append(Problem(f"{prefix}{key}", _unknown_message(key, known)))
    return clean


def _fields(model: Model) -> dict[str, tuple[Model | None, bool]]:
    return model.fields if isinstance(model, CompiledModel) else field_table(model)


def _names(model: Model) -> dict[str, str]:
    return model.names if isinstance(model, CompiledModel) else key_names(model)


@functools.cache
def field_table(model: type[BaseModel]) -> dict[str, tuple[type[BaseModel] | None, bool]]:
    """{key: (the model it holds, whether a list of them)} for each field of `model`, by
    its name and by each other name it accepts: Axolotl's `model_config` is the field
    `overrides_of_model_config`, since pydantic keeps `model_config` for itself."""
    return {key: _nested(model, name) for key, name in key_names(model).items()}


@functools.cache
def key_names(model: type[BaseModel]) -> dict[str, str]:
    """{key: field name} for each name a field of `model` accepts (see `field_table`)."""
    from pydantic import AliasChoices

    names = {}
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        for key in {name, *(c for c in choices if isinstance(c, str))}:
            names[key] = name
    return names


@functools.cache
def _nested(model: type[BaseModel], key: str) -> tuple[type[BaseModel] | None, bool]:
    """The model a field holds (and whether a list of them), or (None, False)."""
    import typing

    from pydantic import BaseModel

    def find(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation, False
        origin = typing.get_origin(annotation)
        for arg in typing.get_args(annotation):
            found, many = find(arg)
            if found:
                return found, many or origin is list
        return None, False

    return find(model.model_fields[key].annotation)


def _unknown_message(key: str, candidates: frozenset[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean `{close[0]}`?"
    return "unknown key."


def _pydantic_problems(error: ValidationError, raw: dict[str, Any], top: Model) -> list[Problem]:
    """One Problem per key, its key as the user wrote it. A union field fails once per
    member (`bool`, `'auto'`); those are merged into one "should be X or Y"."""
    by_key: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    for err in error.errors():
        key = ""
        model: Model | None = top
        for part in err["loc"]:
            if isinstance(part, int):
                key += f"[{part}]"
            elif model is not None and str(part) in _fields(model):
                key += f".{part}" if key else str(part)
                model = _fields(model)[str(part)][0]
            # Other parts name union members (or dict keys); the user never wrote them.
        if err["type"] == "missing":
            by_key.setdefault(key, []).append("is required")
            continue
        message = err["msg"].split(", unable to")[0].removeprefix("Value error, ")
        message = message.replace("Input should be ", "should be ", 1)
        message = message[0].lower() + message[1:]
        by_key.setdefault(key, [])
        if message not in by_key[key]:
            by_key[key].append(message)
        values[key] = _lookup(raw, err["loc"])
    problems = []
    for key, messages in by_key.items():
        text = messages[0] + "".join(" or " + m.removeprefix("should be ") for m in messages[1:])
        # An env mapping may hold a credential by mistake: never echo it.
        shown = key in values and not key.endswith("env")
        got = f" (got {values[key]!r})" if shown else ""
        problems.append(Problem(key, f"{text}{got}."))
    return problems


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    node = raw
    for part in loc:
        if (
            isinstance(node, dict)
            and part in node
            or isinstance(node, list)
            and isinstance(part, int)
            and part < len(node)
        ):
            node = node[part]
        else:
            break
    return node
