"""Local files a config names: found before anything is launched, and made absolute.

A relative path is looked up from the current folder first (as Axolotl does), then from
the config file's folder, so `launch train examples/quickstart.yml` works from the
repository root and from `examples/`. A value that does not look like a path and does not
exist locally is taken as a hub id and left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from payload.errors import Problem

if TYPE_CHECKING:
    from payload.config.schema import DatasetConfig, TrainConfig

DATA_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".yml", ".yaml"}
# The limits of Linux and macOS filesystems, in bytes: one name, and a whole path.
NAME_MAX = 255
PATH_MAX = 4096


def path_problem(value: str) -> str | None:
    """Why `value` cannot name a file on this machine (so looking it up would raise), or
    None. Checked before any lookup: the OS's own errors name no key."""
    if "\x00" in value:
        return "contains a NUL byte, which no path can hold"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        return f"is not valid UTF-8 (it holds the undecodable character U+{ord(bad):04X})"
    if len(value.encode("utf-8")) >= PATH_MAX:
        return f"the path is too long ({len(value)} characters; the limit is {PATH_MAX - 1})"
    longest = max(value.split("/"), key=lambda part: len(part.encode("utf-8")))
    if len(longest.encode("utf-8")) > NAME_MAX:
        return (
            f"the path is too long (a name of {len(longest)} characters; "
            f"the limit is {NAME_MAX} per name)"
        )
    if value.startswith("~"):
        try:
            Path(value).expanduser()
        except RuntimeError:
            user = value[1:].split("/", 1)[0]
            return f"`~{user}` names no user on this machine, so it cannot be expanded"
    return None


def shown(value: str) -> str:
    """`value` for a message: long ones cut to their ends, odd characters escaped."""
    text = value if len(value) <= 80 else f"{value[:40]}...{value[-20:]}"
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def looks_local(value: str) -> bool:
    """True when `value` can only mean a local path (not a hub id like `org/name`)."""
    return (
        value.startswith(("/", "./", "../", "~"))
        or Path(value).suffix.lower() in DATA_SUFFIXES
        or value.count("/") > 1
    )


_memo: dict[tuple[str, str], Path | None] | None = None


@contextlib.contextmanager
def memoized() -> Iterator[None]:
    """Within the block, each path is looked up on disk once (a sweep validates thousands
    of trials that name the same files; neither they nor the current folder change)."""
    global _memo
    outer, _memo = _memo, {} if _memo is None else _memo
    try:
        yield
    finally:
        _memo = outer


def find(value: str, base_dir: Path | None) -> Path | None:
    """The absolute path `value` names, or None when it exists in neither place."""
    if _memo is None:
        return _find(value, base_dir)
    key = (value, str(base_dir))
    if key not in _memo:
        _memo[key] = _find(value, base_dir)
    return _memo[key]


def _find(value: str, base_dir: Path | None) -> Path | None:
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if base_dir is not None and not path.is_absolute():
        candidates.append(base_dir / path)
    for candidate in candidates:
        # A name made too long by the base folder, or a folder we may not enter: the value
        # is not there, as far as this lookup can tell.
        with contextlib.suppress(OSError):
            if candidate.exists():
                return candidate.resolve()
    return None


# What each path key must be when it exists locally: "dir", "file" or None (either).
KINDS = {
    "base_model": "dir",
    "base_model_config": "dir",
    "tokenizer_config": "dir",
    "deepspeed": "file",
    "chat_template_jinja": "file",
    "resume_from_checkpoint": "dir",
}


def _existing_ancestor(path: Path) -> Path | None:
    return next((p for p in path.parents if p.exists()), None)


def kind_problem(key: str, found: Path) -> str | None:
    """Why the existing `found` cannot serve as `key`: a file where a folder is expected
    (or the reverse), or one this process may not read."""
    want = KINDS.get(key.rsplit(".", 1)[-1])
    if want == "dir" and not found.is_dir():
        return f"`{found}` is a file; a folder is expected"
    if want == "file" and found.is_dir():
        return f"`{found}` is a folder; a file is expected"
    mode = os.R_OK | (os.X_OK if found.is_dir() else 0)
    if not os.access(found, mode):
        return f"`{found}` cannot be read (permission denied)"
    return None


def _resolve_one(
    key: str, value: str, base_dir: Path | None, problems: list[Problem], *, hub_ok: bool
) -> str:
    if problem := path_problem(value):
        problems.append(Problem(key, f"`{shown(value)}`: {problem}."))
        return value
    found = find(value, base_dir)
    if found is not None:
        if problem := kind_problem(key, found):
            problems.append(Problem(key, f"{problem}."))
        return str(found)
    if hub_ok and not looks_local(value):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            problems.append(
                Problem(
                    key, f"`{value}` is not a local path, and HF_HUB_OFFLINE=1 rules out the hub."
                )
            )
        return value
    where = "the current folder" + (f" or {base_dir}" if base_dir else "")
    problems.append(Problem(key, f"`{value}` does not exist (looked in {where})."))
    return value


def resolve(cfg: TrainConfig, base_dir: Path | None) -> tuple[TrainConfig, list[Problem]]:
    """A copy of `cfg` with local paths absolute, and the problems with missing ones."""
    problems: list[Problem] = []
    update: dict[str, object] = {}
    for key in ("base_model", "base_model_config", "tokenizer_config"):
        value = getattr(cfg, key)
        if value:
            update[key] = _resolve_one(key, value, base_dir, problems, hub_ok=True)
    if isinstance(cfg.deepspeed, str):
        update["deepspeed"] = _resolve_deepspeed(cfg, base_dir, problems)
    if is_template_path(cfg.chat_template_jinja):
        update["chat_template_jinja"] = _resolve_one(
            "chat_template_jinja", cfg.chat_template_jinja, base_dir, problems, hub_ok=False
        )
    if cfg.resume_from_checkpoint and "://" not in cfg.resume_from_checkpoint:
        update["resume_from_checkpoint"] = _resolve_one(
            "resume_from_checkpoint", cfg.resume_from_checkpoint, base_dir, problems, hub_ok=False
        )
    for name in ("datasets", "test_datasets", "pretraining_dataset"):
        entries = getattr(cfg, name)
        if entries:
            update[name] = [
                _resolve_dataset(f"{name}[{i}]", ds, base_dir, problems)
                for i, ds in enumerate(entries)
            ]
    # Output folders may not exist yet: anchor them to the current folder so that every
    # process of the run, whatever its working directory, writes to the same place.
    for key in ("output_dir", "dataset_prepared_path"):
        value = getattr(cfg, key)
        if value and "://" not in value:
            if problem := path_problem(value):
                problems.append(Problem(key, f"`{shown(value)}`: {problem}."))
                continue
            folder = Path(value).expanduser().resolve()
            if folder.is_file():
                problems.append(Problem(key, f"`{folder}` is a file; a folder is expected."))
            elif (blocker := _existing_ancestor(folder)) and not blocker.is_dir():
                # /etc/passwd/out: no folder can be made there
                problems.append(Problem(key, f"`{folder}` cannot be made: `{blocker}` is a file."))
            update[key] = str(folder)
    if cfg.dataset_prepared_path and "://" in cfg.dataset_prepared_path:
        problems.append(
            Problem("dataset_prepared_path", "must be a local folder (the cache is locked there).")
        )
    # GRPO's reward functions and prompt transforms: code the config names, looked up like
    # its files (next to the config) and imported to check them (payload.config.rewards).
    from payload.config import rewards

    cfg, code_problems = rewards.resolve(cfg.model_copy(update=update), base_dir)
    return cfg, problems + code_problems


# The DeepSpeed configs Ferry ships, found under the names Axolotl's configs use for its
# own folder (`deepspeed: deepspeed_configs/zero3_bf16.json`) when no such file is here.
DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "deepspeed"
AXOLOTL_DEEPSPEED_FOLDER = "deepspeed_configs"


def shipped_deepspeed(value: str) -> Path | None:
    """The shipped file an Axolotl-style `deepspeed_configs/<name>.json` stands for."""
    path = Path(value)
    if path.is_absolute() or path.parent.name != AXOLOTL_DEEPSPEED_FOLDER:
        return None
    shipped = DEEPSPEED_CONFIGS / path.name
    return shipped if shipped.is_file() else None


def _resolve_deepspeed(cfg: TrainConfig, base_dir: Path | None, problems: list[Problem]) -> str:
    """The DeepSpeed JSON's absolute path, a shipped one for Axolotl's names; its
    contents are checked against the config (payload.config.rules.deepspeed_problems)."""
    from payload.config.rules import deepspeed_json, deepspeed_problems

    value = cfg.deepspeed
    assert isinstance(value, str)
    # A value no path can hold is named by _resolve_one below, before any lookup.
    missing = path_problem(value) is None and find(value, base_dir) is None
    if missing and (shipped := shipped_deepspeed(value)):
        value = str(shipped)
    elif missing and Path(value).parent.name == AXOLOTL_DEEPSPEED_FOLDER:
        names = sorted(p.name for p in DEEPSPEED_CONFIGS.glob("*.json"))
        hint = ""
        if "_torch_compile" in value:  # Axolotl's zero1/zero2_torch_compile.json
            hint = " For a compiled model, take the file without `_torch_compile` and set "
            hint += "`torch_compile: true`."
        problems.append(
            Problem(
                "deepspeed",
                f"`{shown(value)}` is not here, and not one of the DeepSpeed configs Ferry "
                f"ships for Axolotl's names: {', '.join(names) or 'none found'}.{hint}",
            )
        )
        return value
    before = len(problems)
    resolved = _resolve_one("deepspeed", value, base_dir, problems, hub_ok=False)
    if len(problems) == before:
        ds, unreadable = deepspeed_json(resolved)
        found = [unreadable] if unreadable else []
        if not unreadable:
            found = deepspeed_problems(ds, cfg, set(cfg.model_fields_set), f"`{shown(value)}`")
        problems.extend(Problem("deepspeed", message) for message in found)
    return resolved


def _resolve_dataset(
    key: str, ds: DatasetConfig, base_dir: Path | None, problems: list[Problem]
) -> DatasetConfig:
    """The entry with a local path made absolute; an s3:// URI is checked for form only
    (the payload lists it when it runs), other URLs are refused."""
    if "://" in ds.path:
        from payload.storage.stores import check_uri  # here: see rules._storage

        if not ds.path.startswith("s3://"):
            problems.append(
                Problem(
                    f"{key}.path", f"`{ds.path}`: Ferry reads s3:// URIs, local paths and hub ids."
                )
            )
        elif problem := check_uri(ds.path):
            problems.append(Problem(f"{key}.path", f"{problem}."))
        return ds
    if problem := path_problem(ds.path):
        problems.append(Problem(f"{key}.path", f"`{shown(ds.path)}`: {problem}."))
        return ds
    path = _resolve_one(f"{key}.path", ds.path, base_dir, problems, hub_ok=True)
    folder = Path(path)
    if folder.is_dir() and ds.data_files:
        names = [ds.data_files] if isinstance(ds.data_files, str) else ds.data_files
        for name in names:
            if problem := path_problem(name):
                problems.append(Problem(f"{key}.data_files", f"`{shown(name)}`: {problem}."))
            elif not any(c in name for c in "*?[") and not (folder / name).exists():
                problems.append(Problem(f"{key}.data_files", f"`{name}` is not in {folder}."))
    update = {"path": path}
    if is_template_path(ds.chat_template_jinja):
        update["chat_template_jinja"] = _resolve_one(
            f"{key}.chat_template_jinja", ds.chat_template_jinja, base_dir, problems, hub_ok=False
        )
    return ds.model_copy(update=update)


def is_template_path(value: str | None) -> bool:
    """`chat_template_jinja` holds a file's path rather than the template itself: one
    line with no Jinja braces (the data code reads the file in that case)."""
    return bool(value) and not any(c in value for c in "{}\n")


def model_config_json(cfg: TrainConfig) -> dict | None:
    """The model's config.json from its folder or this machine's hub cache, else None
    (never a download)."""
    source, revision = cfg.base_model_config or cfg.base_model, cfg.revision_of_model
    path: Path | None = Path(source) / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(source, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - not a hub id: the model load will say what it is
            return None
        path = Path(found) if isinstance(found, str) else None
    try:
        return json.loads(path.read_text()) if path else None
    except (OSError, ValueError):
        return None
