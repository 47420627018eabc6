"""Plugins: code that adds config keys and acts at the points a training run has.

A plugin is a `Plugin` subclass, named in the config's `plugins:` list by
- an entry point in the `ferry.plugins` group (`plugins: [acme]`, a package's
  `[project.entry-points."ferry.plugins"] acme = "acme_ferry:AcmePlugin"`),
- a dotted path to the class (`plugins: [acme_ferry.AcmePlugin]`), or
- Axolotl's path for a plugin Ferry has written itself (`axolotl.integrations.liger.
  LigerPlugin` is Ferry's Liger plugin: AXOLOTL below).

Its `config` (a pydantic model) declares the keys it adds at the top of the config:
`launch validate` checks them as it checks Ferry's own (did-you-mean, every problem at
once), by validating the config against TrainConfig extended with each listed plugin's
model (`config_class`). A plugin's module is imported to validate, so it imports torch
and its library inside its hooks, never at the top: `launch validate` stays light.

The hooks, in the order a run calls them (payload.train; each gets the validated config):
  before_import(cfg)             the training stack is not imported yet (environment
                                 variables the libraries read at import go here)
  after_config(cfg)              the config is loaded, nothing is built yet
  before_model(cfg)              the model is about to load (patch its modules here)
  after_model(cfg, model)        the model is loaded (adapters applied); may return a new one
  callbacks(cfg)                 trainer callbacks to add
  after_training(cfg, summary)   training has ended (on every rank)
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from payload.errors import FerryError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from payload.plugins.keys import PluginConfig

GROUP = "ferry.plugins"

# Axolotl's plugin paths -> Ferry's own plugin for the same job.
AXOLOTL = {
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin": (
        "payload.plugins.cce.CutCrossEntropyPlugin"
    ),
    "axolotl.integrations.liger.LigerPlugin": "payload.plugins.liger.LigerPlugin",
    "axolotl.integrations.swanlab.SwanLabPlugin": "payload.plugins.swanlab.SwanLabPlugin",
}
# Axolotl plugins Ferry does not have (yet), with the reason.
NOT_YET = {
    "axolotl.integrations.kernels.KernelsPlugin": (
        "swaps mixture-of-experts layers for ScatterMoE or SonicMoE kernels (and loads hub "
        "kernels at run time); Ferry has no MoE kernels yet. Its LoRA kernels are the "
        "lora_mlp_kernel, lora_qkv_kernel and lora_o_kernel keys"
    ),
}
# Ferry's plugins whose keys a config may set without listing them: said by name.
BUILTIN: tuple[str, ...] = (
    "payload.plugins.cce.CutCrossEntropyPlugin",
    "payload.plugins.liger.LigerPlugin",
)


def __getattr__(name: str) -> Any:
    # PluginConfig is a pydantic model: it loads on first use, since `launch validate`
    # checks a config that lists no plugins without pydantic's models (payload.config.compiled).
    if name == "PluginConfig":
        from payload.plugins.keys import PluginConfig

        return PluginConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Plugin:
    """Subclass and override what the plugin needs; every hook is optional."""

    name: ClassVar[str] = ""  # how logs name it; default: the class name
    config: ClassVar[type[PluginConfig] | None] = None

    def problems(self, cfg: Any) -> list[tuple[str, str]]:
        """(key, message) for a config this plugin cannot run, at validate time."""
        return []

    def before_import(self, cfg: Any) -> None:
        pass

    def after_config(self, cfg: Any) -> None:
        pass

    def before_model(self, cfg: Any) -> None:
        pass

    def after_model(self, cfg: Any, model: Any) -> Any:
        return model

    def callbacks(self, cfg: Any) -> list[Any]:
        return []

    def after_training(self, cfg: Any, summary: dict[str, Any]) -> None:
        pass


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _local(name: str, base_dir: Path | None) -> Any:
    """Where a plugin in a local file is (payload.config.rewards.Found): a file reference
    `path/to/mod.py:Class`, or `mod.Class` with mod.py beside the config (or in the
    current folder); None for an installed module or an entry point."""
    from payload.config.rewards import file_reference, locate

    if file_reference(name):
        return locate(name, base_dir)  # FerryError if the file is not there
    module, _, attr = name.rpartition(".")
    if not module or name.startswith(("axolotl.", "payload.")) or name in AXOLOTL:
        return None
    try:
        found = locate(name, base_dir)
    except FerryError:
        return None
    if found.file is None:
        return None
    import importlib.util

    try:
        spec = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):
        spec = None
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if found.file.name == "__init__.py":
        if spec is not None:  # an installed package whose source is here (editable)
            return None
        raise FerryError(
            f"plugin `{name}` is a package beside the config: a plugin shipped with the "
            "job is one .py file (with the .py files beside it that it imports); install a "
            "package with pip instead."
        )
    if origin is not None and origin != found.file.resolve():
        return None  # an installed module of that name wins over a file that shadows it
    return found


def reference(name: str, base_dir: Path | None = None) -> str:
    """How the validated config names the plugin: a plugin in a local file as an
    absolute file reference (remote jobs ship it, as they ship reward functions), any
    other as written."""
    found = _local(name, base_dir)
    return found.reference if found is not None else name


@functools.cache
def resolve(name: str, base_dir: Path | None = None) -> type[Plugin]:
    """The plugin class a `plugins:` entry names; FerryError saying why not."""
    if name in NOT_YET:
        raise FerryError(f"`{name}` is not a plugin Ferry has yet: it {NOT_YET[name]}.")
    if name.startswith("axolotl.") and name not in AXOLOTL:  # never import Axolotl itself
        raise FerryError(
            f"`{name}` is an Axolotl plugin Ferry has no counterpart for; Ferry has "
            f"{', '.join(sorted(AXOLOTL))}."
        )
    path = AXOLOTL.get(name, name)
    local = _local(name, base_dir)
    found = _entry_points().get(name) if local is None else None
    if local is not None:
        from payload.config.rewards import _import

        cls = getattr(_import(local, name), local.function, None)
        if cls is None:
            raise FerryError(f"plugin `{name}`: {local.file.name} has no `{local.function}`.")
    elif found is not None:
        try:
            cls = found.load()
        except Exception as e:  # noqa: BLE001 - the plugin's own import error, said
            raise FerryError(
                f"plugin `{name}` (entry point {found.value}) could not be loaded: {e}"
            ) from e
    else:
        module_name, _, attr = path.rpartition(".")
        if not module_name:
            raise FerryError(
                f"`{name}` is not an installed plugin (no `{GROUP}` entry point of that "
                "name) nor a dotted path module.Class."
            )
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise FerryError(
                f"plugin `{name}`: module `{module_name}` is not installed here ({e.name})."
            ) from e
        except Exception as e:  # noqa: BLE001 - the plugin's own import error, said
            raise FerryError(
                f"plugin `{name}`: module `{module_name}` could not be imported: "
                f"{type(e).__name__}: {e}"
            ) from e
        cls = getattr(module, attr, None)
        if cls is None:
            raise FerryError(f"plugin `{name}`: module `{module_name}` has no `{attr}`.")
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise FerryError(f"plugin `{name}` is not a subclass of payload.plugins.Plugin.")
    return cls


def resolve_all(
    names: Iterable[str] | None, base_dir: Path | None = None
) -> tuple[list[type[Plugin]], list[tuple[int, str]]]:
    """The listed plugins' classes and (index, problem) for those that cannot be used."""
    classes, problems = [], []
    for i, name in enumerate(names or []):
        try:
            cls = resolve(str(name), base_dir)
        except FerryError as e:
            problems.append((i, e.message))
            continue
        if cls not in classes:
            classes.append(cls)
    return classes, problems


@functools.cache
def config_class(classes: tuple[type[Plugin], ...]) -> type[BaseModel]:
    """TrainConfig with the keys of each plugin in `classes` (TrainConfig if none)."""
    from payload.config.schema import TrainConfig

    models = [c.config for c in classes if c.config is not None]
    if not models:
        return TrainConfig
    return type("TrainConfig", (TrainConfig, *models), {"__module__": TrainConfig.__module__})


def config_class_for(raw: dict[str, Any]) -> type[BaseModel]:
    """The model a config mapping validates against: TrainConfig plus its plugins' keys."""
    classes, _ = resolve_all(raw.get("plugins"))
    return config_class(tuple(classes))


@functools.cache
def builtin_keys() -> dict[str, str]:
    """{key: plugin path} for the keys of Ferry's own plugins (said when set unlisted)."""
    keys = {}
    for path in BUILTIN:
        cls = resolve(path)
        axolotl = next((a for a, p in AXOLOTL.items() if p == path), path)
        for key in cls.config.model_fields if cls.config else ():
            keys[key] = axolotl
    return keys


class Plugins:
    """The run's plugins, instantiated once, each hook called on all of them in order."""

    def __init__(self, cfg: Any) -> None:
        classes, problems = resolve_all(getattr(cfg, "plugins", None))
        if problems:
            raise FerryError("; ".join(p for _, p in problems))
        self.cfg = cfg
        self.items = [cls() for cls in classes]

    @property
    def names(self) -> list[str]:
        return [p.name or type(p).__name__ for p in self.items]

    def before_import(self) -> None:
        for p in self.items:
            p.before_import(self.cfg)

    def after_config(self) -> None:
        for p in self.items:
            p.after_config(self.cfg)

    def before_model(self) -> None:
        for p in self.items:
            p.before_model(self.cfg)

    def after_model(self, model: Any) -> Any:
        for p in self.items:
            model = p.after_model(self.cfg, model) or model
        return model

    def callbacks(self) -> list[Any]:
        return [c for p in self.items for c in p.callbacks(self.cfg)]

    def after_training(self, summary: dict[str, Any]) -> None:
        for p in self.items:
            p.after_training(self.cfg, summary)


def foreign(names: Iterable[str] | None) -> list[str]:
    """The listed plugins that are neither Ferry's own nor in a local file the job ships:
    they must be installed wherever the run trains."""
    from payload.config.rewards import file_reference

    out = []
    for name in names or []:
        try:
            cls = resolve(str(name))
        except FerryError:
            continue
        if not cls.__module__.startswith("payload.") and not file_reference(str(name)):
            out.append(str(name))
    return out
