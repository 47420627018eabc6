"""Experiment trackers: which a config turns on, where each writes, which credential it
needs, and the environment the HF Trainer's own integrations read.

Light (the launcher's validate and plan read it): no tracker library is imported here.
The payload (`payload.trackers`) applies `environment()` before the trainer starts, and
the launcher checks `credential_problems()` before anything starts or bills.

Keys and their meaning follow Axolotl's (`wandb_*`, `mlflow_*`, `use_tensorboard`,
`comet_*`, `swanlab_*`, `trackio_*`); where Ferry differs, the field's help says so:
every tracker run is named by the Ferry run id, so a resumed run continues the same
tracker run, and trackers that can write locally write into the run's output folder,
which is synced to storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from payload.config.rules import _error, _warn, rule

if TYPE_CHECKING:
    from payload.config.schema import TrainConfig

TRACKERS_DIR = "trackers"  # under output_dir: local tracker files, uploaded with the run

# Comet reads its ExperimentConfig from these variables (Comet's documented names).
COMET_CONFIG_ENV = {
    "auto_histogram_activation_logging": "COMET_AUTO_LOG_HISTOGRAM_ACTIVATIONS",
    "auto_histogram_epoch_rate": "COMET_AUTO_LOG_HISTOGRAM_EPOCH_RATE",
    "auto_histogram_gradient_logging": "COMET_AUTO_LOG_HISTOGRAM_GRADIENTS",
    "auto_histogram_tensorboard_logging": "COMET_AUTO_LOG_HISTOGRAM_TENSORBOARD",
    "auto_histogram_weight_logging": "COMET_AUTO_LOG_HISTOGRAM_WEIGHTS",
    "auto_log_co2": "COMET_AUTO_LOG_CO2",
    "auto_metric_logging": "COMET_AUTO_LOG_METRICS",
    "auto_metric_step_rate": "COMET_AUTO_LOG_METRIC_STEP_RATE",
    "auto_output_logging": "COMET_AUTO_LOG_OUTPUT_LOGGER",
    "auto_param_logging": "COMET_AUTO_LOG_PARAMETERS",
    "display_summary_level": "COMET_DISPLAY_SUMMARY_LEVEL",
    "log_code": "COMET_AUTO_LOG_CODE",
    "log_env_cpu": "COMET_AUTO_LOG_ENV_CPU",
    "log_env_details": "COMET_AUTO_LOG_ENV_DETAILS",
    "log_env_disk": "COMET_AUTO_LOG_ENV_DISK",
    "log_env_gpu": "COMET_AUTO_LOG_ENV_GPU",
    "log_env_host": "COMET_AUTO_LOG_ENV_HOST",
    "log_env_network": "COMET_AUTO_LOG_ENV_NETWORK",
    "log_git_metadata": "COMET_AUTO_LOG_GIT_METADATA",
    "log_git_patch": "COMET_AUTO_LOG_GIT_PATCH",
    "log_graph": "COMET_AUTO_LOG_GRAPH",
    "parse_args": "COMET_AUTO_LOG_CLI_ARGUMENTS",
    "tags": "COMET_START_EXPERIMENT_TAGS",
}
# Config keys that would put a credential into the config (and so into the run's saved
# config and the registry): refused, with the variable to use instead.
CREDENTIAL_KEYS = {
    "comet_api_key": "COMET_API_KEY",
    "swanlab_api_key": "SWANLAB_API_KEY",
    "swanlab_lark_secret": "SWANLAB_LARK_SECRET",
}


@dataclass(frozen=True)
class Tracker:
    """One tracker a run reports to."""

    name: str  # the HF Trainer's report_to name
    label: str  # how users call it
    package: str  # the module its client library installs
    where: str  # for the plan: project, mode, store
    credential: str | None = None  # the variable its client needs; None: it needs none
    secret_word: str = ""  # a secret whose name holds this word is taken to carry it
    optional_credential: bool = False  # a server that may or may not ask for one

    def describe(self) -> str:
        text = f"{self.label}: {self.where}"
        if self.credential:
            need = "may need" if self.optional_credential else "needs"
            text += f"; {need} {self.credential}"
        return text


def _on(flag: bool | None, *keys: str | None) -> bool:
    """Axolotl's rule: a tracker is on when its use_ flag is, or when its naming key is
    set (unless the flag says false)."""
    return bool(flag) or (flag is None and any(keys))


def _mode(value: Any) -> str:
    return "false" if value is False else "true" if value is True else str(value)


def active(cfg: TrainConfig) -> list[Tracker]:
    """The trackers this config reports to, in a fixed order."""
    found: list[Tracker] = []
    if _on(cfg.use_wandb, cfg.wandb_project) and cfg.wandb_mode != "disabled":
        offline = cfg.wandb_mode in ("offline", "dryrun")
        where = f"project {cfg.wandb_project or 'huggingface'}"
        if cfg.wandb_entity:
            where += f", entity {cfg.wandb_entity}"
        where += ", offline (files in the run folder)" if offline else ", online"
        found.append(
            Tracker(
                "wandb",
                "W&B",
                "wandb",
                where,
                None if offline else "WANDB_API_KEY",
                "wandb",
            )
        )
    if _on(cfg.use_mlflow, cfg.mlflow_tracking_uri, cfg.mlflow_experiment_name):
        uri = cfg.mlflow_tracking_uri
        remote = bool(uri) and uri.split(":", 1)[0] in ("http", "https", "databricks")
        where = f"{uri or 'a file store in the run folder'}"
        if cfg.mlflow_experiment_name:
            where += f", experiment {cfg.mlflow_experiment_name}"
        found.append(
            Tracker(
                "mlflow",
                "MLflow",
                "mlflow",
                where,
                "MLFLOW_TRACKING_TOKEN" if remote else None,
                "mlflow",
                optional_credential=True,
            )
        )
    if cfg.use_tensorboard:
        found.append(
            Tracker("tensorboard", "TensorBoard", "tensorboard", "event files in the run folder")
        )
    if _on(cfg.use_comet, cfg.comet_project_name):
        offline = cfg.comet_online is False
        where = f"project {cfg.comet_project_name or '(default)'}"
        if cfg.comet_workspace:
            where += f", workspace {cfg.comet_workspace}"
        where += ", offline (an archive in the run folder)" if offline else ", online"
        found.append(
            Tracker(
                "comet_ml",
                "Comet",
                "comet_ml",
                where,
                None if offline else "COMET_API_KEY",
                "comet",
            )
        )
    if _on(cfg.use_swanlab, cfg.swanlab_project) and cfg.swanlab_mode != "disabled":
        mode = cfg.swanlab_mode or "cloud"
        where = f"project {cfg.swanlab_project or '(default)'}, {mode}"
        if mode != "cloud":
            where += " (files in the run folder)"
        found.append(
            Tracker(
                "swanlab",
                "SwanLab",
                "swanlab",
                where,
                "SWANLAB_API_KEY" if mode == "cloud" else None,
                "swanlab",
            )
        )
    if _on(cfg.use_trackio, cfg.trackio_project_name):
        space = cfg.trackio_space_id
        where = f"project {cfg.trackio_project_name or '(default)'}, "
        where += f"Space {space}" if space else "local files in the run folder"
        found.append(
            Tracker(
                "trackio",
                "Trackio",
                "trackio",
                where,
                "HF_TOKEN" if space else None,
                "hf",
            )
        )
    return found


def comet_key(run_id: str) -> str:
    """A Comet experiment key for a Ferry run: Comet wants 32-50 letters and digits, and
    the same run id always gives the same key (so a resume continues the experiment)."""
    return hashlib.sha256(run_id.encode()).hexdigest()[:32]


def safe_id(text: str) -> str:
    """An id every tracker takes: letters, digits, `.`, `_` and `-` (W&B refuses / \\ # ?
    % :, an MLflow tag search quotes it), at most 128 characters. Ferry's run and sweep ids
    already are; a folder name given by hand may not be."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)[:128]


def environment(
    cfg: TrainConfig, run_id: str, output_dir: str, sweep_id: str | None = None
) -> dict[str, str]:
    """The variables the HF Trainer's integrations (and the clients) read, for the
    active trackers. Local files go under `<output_dir>/trackers/`."""
    env: dict[str, str] = {}
    base = Path(output_dir).resolve() / TRACKERS_DIR
    names = {t.name for t in active(cfg)}
    if "wandb" in names:
        env.update(
            WANDB_PROJECT=cfg.wandb_project or "huggingface",
            WANDB_RUN_ID=cfg.wandb_run_id or safe_id(run_id),
            WANDB_RESUME="allow",
            WANDB_DIR=str(base),  # wandb writes <dir>/wandb/<run folder>
        )
        if cfg.wandb_entity:
            env["WANDB_ENTITY"] = cfg.wandb_entity
        if cfg.wandb_mode:
            env["WANDB_MODE"] = "offline" if cfg.wandb_mode == "dryrun" else cfg.wandb_mode
        # YAML's true means the integration's usual choice (it ignores "true" itself).
        if cfg.wandb_watch is not None:
            env["WANDB_WATCH"] = _mode("gradients" if cfg.wandb_watch is True else cfg.wandb_watch)
        if cfg.wandb_log_model is not None:
            env["WANDB_LOG_MODEL"] = _mode(
                "end" if cfg.wandb_log_model is True else cfg.wandb_log_model
            )
        if sweep_id:
            env["WANDB_RUN_GROUP"] = sweep_id
    if "mlflow" in names:
        env["MLFLOW_TRACKING_URI"] = uri = cfg.mlflow_tracking_uri or (base / "mlruns").as_uri()
        if "://" not in uri or uri.startswith("file:"):
            # A folder store: MLflow 3 keeps it in maintenance and asks for this opt-in.
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
        env["MLFLOW_EXPERIMENT_NAME"] = cfg.mlflow_experiment_name or "Default"
        if cfg.hf_mlflow_log_artifacts:
            env["HF_MLFLOW_LOG_ARTIFACTS"] = "true"
    if "tensorboard" in names:
        env["TENSORBOARD_LOGGING_DIR"] = str(base / "tensorboard")
    if "comet_ml" in names:
        env.update(
            COMET_EXPERIMENT_KEY=cfg.comet_experiment_key or comet_key(run_id),
            COMET_START_MODE=cfg.comet_mode or "get_or_create",
            COMET_OFFLINE_DIRECTORY=str(base / "comet"),
        )
        if cfg.comet_online is not None:
            env["COMET_START_ONLINE"] = _mode(cfg.comet_online)
        if cfg.comet_project_name:
            env["COMET_PROJECT_NAME"] = cfg.comet_project_name
        if cfg.comet_workspace:
            env["COMET_WORKSPACE"] = cfg.comet_workspace
        for key, value in (cfg.comet_experiment_config or {}).items():
            if isinstance(value, list):
                value = ",".join(map(str, value))
            env[COMET_CONFIG_ENV[key]] = _mode(value)
    # SwanLab: none. Its 0.10 client parses SWANLAB_* variables as its own settings (and
    # refuses some); the payload starts its run with these values as arguments instead.
    if "trackio" in names:
        env["TRACKIO_DIR"] = str(base / "trackio")
    return env


def swanlab_init(cfg: TrainConfig, run_id: str, output_dir: str) -> dict[str, Any]:
    """The arguments of `swanlab.init` for this run."""
    mode = cfg.swanlab_mode or "cloud"
    return {
        "project": cfg.swanlab_project or "ferry",
        "workspace": cfg.swanlab_workspace,
        "name": cfg.swanlab_experiment_name or run_names(cfg, run_id),
        "description": cfg.swanlab_description,
        "mode": "online" if mode == "cloud" else mode,  # Axolotl says cloud, SwanLab online
        "log_dir": str(Path(output_dir).resolve() / TRACKERS_DIR / "swanlab"),
        "id": safe_id(run_id),
        "resume": "allow",
    }


def run_names(cfg: TrainConfig, run_id: str) -> str:
    """The trainer's run name, which W&B, Comet and Trackio give their run: the name key
    of the first tracker that is on and has one (W&B, Trackio, MLflow, SwanLab, in the
    spirit of Axolotl's order), else the Ferry run id. MLflow and SwanLab also get their
    own name key, whatever this is."""
    on = {t.name for t in active(cfg)}
    for tracker, name in (
        ("wandb", cfg.wandb_name),
        ("trackio", cfg.trackio_run_name),
        ("mlflow", cfg.mlflow_run_name),
        ("swanlab", cfg.swanlab_experiment_name),
    ):
        if tracker in on and name:
            return name
    return run_id


def mlflow_tags(cfg: TrainConfig, run_id: str, sweep_id: str | None) -> str:
    """The tags of the run's MLflow run: the Ferry ids it is found by, and its own name
    (mlflow.runName) when mlflow_run_name is set and another tracker names the run."""
    tags = {"ferry.run_id": run_id}
    if sweep_id:
        tags["ferry.sweep_id"] = sweep_id
    if cfg.mlflow_run_name:
        tags["mlflow.runName"] = cfg.mlflow_run_name
    return json.dumps(tags)


# ---- before a launch: credentials and client libraries


def _credential_here(variable: str) -> bool:
    """Is the credential available on this machine: its variable, or the file its
    client's login writes?"""
    if os.environ.get(variable):
        return True
    home = Path.home()
    files = {
        "WANDB_API_KEY": [home / ".netrc"],
        "COMET_API_KEY": [home / ".comet.config"],
        "SWANLAB_API_KEY": [home / ".swanlab" / ".netrc"],
        "HF_TOKEN": [home / ".cache" / "huggingface" / "token"],
    }.get(variable, [])
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if variable != "WANDB_API_KEY" or "api.wandb.ai" in text:
            return True
    return False


def credential_problems(
    cfg: TrainConfig, secrets: list[str], remote: bool, variables: bool = False
) -> list[str]:
    """What stops the trackers from reporting, said before the run starts. Remote: a
    named secret must carry each needed credential: its name holds the tracker's word
    (e.g. `wandb`: a Modal secret holds several variables) or is the variable itself,
    which is the only way where each secret is one variable (`variables`: SkyPilot, Ray).
    Local: the variable or the client's login file must be here."""
    problems = []
    for tracker in active(cfg):
        need = tracker.credential
        if not need or tracker.optional_credential:
            continue
        if remote:
            if any(
                s == need
                or (not variables and (s.upper() == need or tracker.secret_word in s.lower()))
                for s in secrets
            ):
                continue
            name = need if variables else tracker.secret_word
            problems.append(
                f"{tracker.label} ({tracker.where}) needs {need} in the job: name a secret "
                f"holding it (--secret {name}, or launch.secrets), or "
                f"{_offline_hint(tracker)}"
            )
        elif not _credential_here(need):
            problems.append(
                f"{tracker.label} ({tracker.where}) needs {need}, which is neither set here nor "
                f"saved by the client's login; export it, or {_offline_hint(tracker)}"
            )
    return problems


def _offline_hint(tracker: Tracker) -> str:
    return {
        "wandb": "set wandb_mode: offline",
        "comet_ml": "set comet_online: false",
        "swanlab": "set swanlab_mode: local",
        "trackio": "leave trackio_space_id unset (local files)",
    }.get(tracker.name, "turn the tracker off")


def missing_packages(cfg: TrainConfig) -> list[str]:
    """Tracker clients the config needs that are not installed here (found, not imported)."""
    import importlib.util

    needed = [t.package for t in active(cfg)]
    if "swanlab" in needed and cfg.swanlab_mode == "local":
        needed.append("swanboard")  # SwanLab's local dashboard: swanlab[dashboard]
    return [name for name in needed if importlib.util.find_spec(name) is None]


# ---- validation rules


@rule(*CREDENTIAL_KEYS)
def _credential_keys(cfg: TrainConfig, given: set[str]) -> Iterator[tuple[str, str, bool]]:
    for key, variable in CREDENTIAL_KEYS.items():
        if getattr(cfg, key):
            yield _error(
                key,
                f"would write a credential into the config, which Ferry saves with the run; "
                f"export {variable} instead (remote backends: a secret holding it, by name)",
            )


# Comet settings Axolotl passes on and Ferry decides itself, with the reason.
_COMET_FERRY_SETS = {
    "name": "Ferry names the experiment (the run name: wandb_name / the run id)",
    "offline_directory": "Ferry keeps offline archives in the run folder, which is synced",
    "comet_disabled": "turn Comet off with use_comet: false (or leave comet_project_name unset)",
    "distributed_node_identifier": "Ferry reports from rank 0 only",
}


@rule("comet_experiment_config")
def _comet_config(cfg: TrainConfig, given: set[str]) -> Iterator[tuple[str, str, bool]]:
    for key in cfg.comet_experiment_config or {}:
        if key in _COMET_FERRY_SETS:
            yield _error("comet_experiment_config", f"`{key}`: {_COMET_FERRY_SETS[key]}")
        elif key not in COMET_CONFIG_ENV:
            yield _error(
                "comet_experiment_config",
                f"`{key}` is not a Comet ExperimentConfig setting Ferry can pass; known: "
                + ", ".join(sorted(COMET_CONFIG_ENV)),
            )
    if cfg.comet_experiment_key is not None:
        key = cfg.comet_experiment_key
        if not (key.isalnum() and 32 <= len(key) <= 50):
            yield _error(
                "comet_experiment_key", "must be 32 to 50 letters and digits (Comet's rule)"
            )


_NAMING = {
    "wandb": ("use_wandb", "wandb_project"),
    "mlflow": ("use_mlflow", "mlflow_tracking_uri", "mlflow_experiment_name"),
    "comet": ("use_comet", "comet_project_name"),
    "swanlab": ("use_swanlab", "swanlab_project"),
    "trackio": ("use_trackio", "trackio_project_name"),
}


@rule()
def _tracker_settings_unused(cfg: TrainConfig, given: set[str]) -> Iterator[tuple[str, str, bool]]:
    """A tracker's settings without the tracker being on are said, not silently dropped."""
    on = {t.name.split("_")[0] for t in active(cfg)}
    for tracker, (flag, *naming) in _NAMING.items():
        if tracker in on or getattr(cfg, f"{tracker}_mode", None) == "disabled":
            continue  # on, or turned off on purpose by its mode
        settings = sorted(
            k
            for k in given
            if k.startswith((f"{tracker}_", f"hf_{tracker}_"))
            and k not in CREDENTIAL_KEYS
            and getattr(cfg, k, None) not in (None, False)
        )
        if settings and getattr(cfg, flag) is not False:
            turn_on = " or ".join(f"`{k}`" for k in (flag, *naming))
            also = f" (nor {', '.join(settings[1:])})" if settings[1:] else ""
            yield _warn(
                settings[0],
                f"has no effect{also}: {tracker} is off (turn it on with {turn_on})",
            )
