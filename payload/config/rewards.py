"""GRPO's user code, named in the config: reward functions (`trl.reward_funcs`) and
prompt transforms (a GRPO dataset's `type`), each as `module.function`.

A module is a `.py` file next to the config (then in the current folder), as Axolotl's
`rewards.my_reward` finds `rewards.py` beside the config, or else a module importable
from `sys.path`. At validation each one is imported (it is the user's code, so importing
it is the check) and its function's signature is matched with the call it will get; a
local file is then written as `/abs/path/rewards.py:my_reward` (a *file reference*),
which backends ship like a data file and the payload loads by path wherever it lands.

Torch-free: `launch validate` runs this, and only the user's module is imported.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from payload.errors import FerryError, Problem

if TYPE_CHECKING:
    from payload.config.schema import TrainConfig

# TRL's call: reward_func(prompts=..., completions=..., completion_ids=..., **kwargs), the
# kwargs being the dataset's other columns plus these (GRPOTrainer._calculate_rewards).
TRL_REWARD_KWARGS = ("prompts", "completions", "completion_ids")
TRL_EXTRA_KWARGS = ("trainer_state", "log_extra", "log_metric")
REWARD_SHAPE = "def my_reward(prompts, completions, **kwargs) -> list[float]"
TRANSFORM_SHAPE = "def my_transform(row) -> {'prompt': ...}"


@dataclass(frozen=True)
class Found:
    """Where a `module.function` reference points: a local file (shipped with remote
    jobs) or an importable module (which must be in the image too)."""

    module: str  # the dotted module name as written, or the file's stem
    function: str
    file: Path | None = None

    @property
    def reference(self) -> str:
        """How the resolved config names it: a file reference, or the dotted name."""
        return f"{self.file}:{self.function}" if self.file else f"{self.module}.{self.function}"


def file_reference(value: str) -> tuple[str, str] | None:
    """(path, function) of a file reference `path/to/mod.py:function`, else None."""
    path, sep, function = value.rpartition(":")
    if sep and path.endswith(".py") and function.isidentifier():
        return path, function
    return None


def local_modules(path: Path) -> list[Path]:
    """The modules beside `path` that it imports, and theirs in turn: `import helper` or
    `from helper import x` with a helper.py (or a helper/ package) in the same folder. They
    must travel with the file to a remote job, where its folder is on sys.path as it is
    here (`_import`). Paths relative to the folder, the file itself first."""
    import ast

    folder = path.parent
    found: list[Path] = []
    todo = [path]
    while todo:
        current = todo.pop()
        relative = current.relative_to(folder)
        if relative in found:
            continue
        found.append(relative)
        try:
            tree = ast.parse(current.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue  # validation reports an unreadable module; nothing more to find here
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        for name in sorted(names):
            if (folder / f"{name}.py").is_file():
                todo.append(folder / f"{name}.py")
            elif (folder / name / "__init__.py").is_file():
                todo.extend(sorted((folder / name).rglob("*.py")))
    return found


def locate(value: str, base_dir: Path | None) -> Found:
    """Find the module `value` names; raise FerryError saying why not."""
    if ref := file_reference(value):
        path = Path(ref[0]).expanduser()
        if not path.is_absolute() and base_dir is not None and (base_dir / path).is_file():
            path = base_dir / path
        if not path.is_file():
            raise FerryError(f"`{value}`: the file {path} does not exist.")
        return Found(path.stem, ref[1], path.resolve())
    module, _, function = value.rpartition(".")
    parts = module.split(".") if module else []
    if not parts or not all(p.isidentifier() for p in [*parts, function]):
        raise FerryError(
            f"`{value}` is not `module.function` (e.g. `rewards.my_reward` for a "
            "function my_reward in rewards.py next to the config)."
        )
    relative = Path(*parts)
    folders = [f for f in (base_dir, Path.cwd()) if f is not None]
    for folder in folders:
        for candidate in (folder / f"{relative}.py", folder / relative / "__init__.py"):
            if candidate.is_file():
                return Found(module, function, candidate.resolve())
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package that is missing or broken
        spec = None
    if spec is None:
        where = " or ".join(str(f) for f in dict.fromkeys(folders)) or "the current folder"
        raise FerryError(
            f"`{value}`: no module `{module}`: there is no {relative}.py in {where}, and "
            "no installed module of that name."
        )
    return Found(module, function, None)


# (path, mtime_ns) -> module: a cache, so that a sweep's trials import a file once.
_loaded: dict[tuple[str, int], Any] = {}


def _import(found: Found, value: str) -> Any:
    try:
        if found.file is None:
            return importlib.import_module(found.module)
        key = (str(found.file), found.file.stat().st_mtime_ns)
        if key not in _loaded:
            # The file's folder goes on sys.path so that it can import its neighbours,
            # as it could when run from there.
            folder = str(found.file.parent)
            if folder in sys.path:
                sys.path.remove(folder)
            sys.path.insert(0, folder)
            _forget_neighbours_from_elsewhere(found.file.parent)
            spec = importlib.util.spec_from_file_location(found.module, found.file)
            assert spec is not None and spec.loader is not None  # a .py file always has one
            module = importlib.util.module_from_spec(spec)
            sys.modules[found.module] = module
            spec.loader.exec_module(module)
            _loaded[key] = module
        return _loaded[key]
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything on import
        raise FerryError(f"`{value}`: {_import_failure(found, e)}") from e


def _forget_neighbours_from_elsewhere(folder: Path) -> None:
    """Drop from sys.modules the modules that an earlier user file's folder gave a name
    that a file in `folder` also has: in one process (a sweep, or configs validated one
    after another), `import helper` in this file must find this folder's helper.py, not the
    helper.py beside an earlier config. Installed modules are never touched."""
    earlier = {Path(f).parent for f, _ in _loaded}  # already resolved paths
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if "." in name or not file:
            continue
        where = Path(file).resolve()
        home = where.parent.parent if where.name == "__init__.py" else where.parent
        if home == folder.resolve() or home not in earlier:
            continue
        if (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file():
            for sub in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
                del sys.modules[sub]


def _import_failure(found: Found, error: BaseException) -> str:
    """One line: the module, the exception, and the line of the user's file it came from."""
    where = found.file.name if found.file else f"module `{found.module}`"
    lines = [
        f"line {frame.lineno}"
        for frame in traceback.extract_tb(error.__traceback__)
        if found.file and Path(frame.filename) == found.file
    ]
    if isinstance(error, SyntaxError) and error.lineno:
        lines = [f"line {error.lineno}"]
    at = f" ({lines[-1]})" if lines else ""
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{where} fails to import{at}: {type(error).__name__}: {message}".rstrip(": ")


def load(value: str, base_dir: Path | None = None) -> Any:
    """The function `value` names (a file reference or `module.function`)."""
    return _function(locate(value, base_dir), value)


def _function(found: Found, value: str) -> Any:
    """The function `found` points to; errors name it as the user wrote it (`value`)."""
    module = _import(found, value)
    function = getattr(module, found.function, None)
    if function is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(found.function, names, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        where = found.file.name if found.file else f"module `{found.module}`"
        raise FerryError(f"`{value}`: {where} has no function `{found.function}`{hint}")
    if not callable(function):
        raise FerryError(f"`{value}` is a {type(function).__name__}, not a function.")
    return function


def reward_signature_problem(function: Any) -> str | None:
    """Why TRL's call of a reward function would fail, or None."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None  # a builtin or C callable: nothing to read, the call will tell
    params = signature.parameters.values()
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    # Other named keyword parameters may be the rows' columns (`answer`, say): only the
    # run knows the columns, so they count as given here.
    columns = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    call = dict.fromkeys([*TRL_REWARD_KWARGS, *TRL_EXTRA_KWARGS, *columns])
    try:
        signature.bind(**call)
    except TypeError as e:
        return f"cannot take TRL's call ({e})"
    if not takes_any:
        # The dataset's other columns arrive as keywords too: without **kwargs the first
        # extra column would fail the call in the middle of training.
        return "takes no **kwargs, which TRL's call also passes (the rows' other columns)"
    return None


def transform_signature_problem(function: Any) -> str | None:
    """Why a prompt transform cannot be called with a row (or, Axolotl's way, with the
    config), or None."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    try:
        if is_factory(function):
            signature.bind({}, dataset_idx=0)
        else:
            signature.bind({})
    except TypeError as e:
        if is_factory(function):
            return f"cannot be called as Axolotl's factory, fn(cfg, dataset_idx=...) ({e})"
        return f"cannot be called with one row ({e})"
    return None


def is_factory(function: Any) -> bool:
    """Axolotl's transforms are factories, `fn(cfg, **kwargs)` returning the row function
    (or `(row_function, map_kwargs)`); a function whose first parameter is `cfg` is one."""
    try:
        params = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "cfg"


def _resolve_one(
    key: str, value: str, base_dir: Path | None, check: Any, shape: str, problems: list[Problem]
) -> str:
    try:
        found = locate(value, base_dir)
        function = _function(found, value)
    except FerryError as e:
        problems.append(Problem(key, str(e)))
        return value
    if problem := check(function):
        problems.append(Problem(key, f"`{value}` {problem}; write it as `{shape}`."))
    return found.reference


def resolve(cfg: TrainConfig, base_dir: Path | None) -> tuple[TrainConfig, list[Problem]]:
    """For `rl: grpo`: each reward function and prompt transform found, imported and its
    signature checked; local ones rewritten as file references. Returns the updated
    config and the problems, each naming its key."""
    if (cfg.rl or "").lower() != "grpo":
        return cfg, []
    problems: list[Problem] = []
    update: dict[str, Any] = {}
    if cfg.trl and cfg.trl.reward_funcs:
        funcs = [
            _resolve_one(
                f"trl.reward_funcs[{i}]",
                value,
                base_dir,
                reward_signature_problem,
                REWARD_SHAPE,
                problems,
            )
            for i, value in enumerate(cfg.trl.reward_funcs)
        ]
        update["trl"] = cfg.trl.model_copy(update={"reward_funcs": funcs})
    for name in ("datasets", "test_datasets"):
        entries = list(getattr(cfg, name) or [])
        for i, ds in enumerate(entries):
            if isinstance(ds.type, str) and ds.type:
                check = transform_signature_problem
                ref = _resolve_one(
                    f"{name}[{i}].type", ds.type, base_dir, check, TRANSFORM_SHAPE, problems
                )
                entries[i] = ds.model_copy(update={"type": ref})
        if entries:
            update[name] = entries
    return cfg.model_copy(update=update), problems
