"""Experiment trackers at run time: the HF Trainer's own integrations do the logging;
this sets them up so that the tracker run is named by the Ferry run id, a resumed run
continues the same tracker run, local files land in the run folder, and a sweep's trials
are grouped (W&B group, MLflow parent run).

`metrics.jsonl` stays the source of truth for Ferry's own report; trackers get the same
records through the trainer's `on_log`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from payload.config.schema import TrainConfig
from payload.config.trackers import (
    TRACKERS_DIR,
    active,
    environment,
    missing_packages,
    mlflow_tags,
    run_names,
    safe_id,
    swanlab_init,
)
from payload.errors import FerryError

log = logging.getLogger("ferry.trackers")

SWEEP_ENV = "FERRY_SWEEP_ID"  # set by the launcher on a sweep's trials


@dataclass
class Trackers:
    """The trackers of one run, with what the trainer needs from them."""

    cfg: TrainConfig
    output_dir: str
    run_id: str
    sweep_id: str | None
    is_main: bool
    report_to: list[str]
    closed: bool = False

    @property
    def run_name(self) -> str:
        return run_names(self.cfg, self.run_id)

    @property
    def args(self) -> dict[str, str]:
        """Extra TrainingArguments: Trackio's integration reads its settings there."""
        if "trackio" not in self.report_to:
            return {}
        args = {"project": self.cfg.trackio_project_name or "ferry"}
        if self.cfg.trackio_space_id:
            args["trackio_space_id"] = self.cfg.trackio_space_id
        return args

    def begin(self) -> None:
        """Start the runs the payload starts itself, once the resume has fetched the
        earlier attempts' files (the MLflow run to continue is found in them)."""
        if not self.is_main:
            return
        if "mlflow" in self.report_to:
            _mlflow_run(self.cfg, self.run_id, self.sweep_id)
        if "swanlab" in self.report_to:
            _swanlab_run(self.cfg, self.run_id, self.output_dir, self.sweep_id)

    def close(self) -> None:
        """End the trackers' runs (once): their files are then complete."""
        if not self.closed:
            self.closed = True
            _close(self.report_to)


def run_id_for(output_dir: str) -> str:
    """The Ferry run id; for a run started by hand, the output folder's name and a hash
    of its path (stable across a resume in that folder, and two folders named `lora-out`
    are two runs). Letters, digits, `.`, `_` and `-` only, as every tracker's ids allow."""
    run_id = os.environ.get("FERRY_RUN_ID")
    if not run_id:
        folder = Path(output_dir).resolve()
        digest = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
        run_id = f"{folder.name}-{digest}"
    return safe_id(run_id)


@contextlib.contextmanager
def reporting(cfg: TrainConfig, output_dir: str, is_main: bool) -> Iterator[Trackers]:
    """The trackers' environment for the length of a run (restored after, so a process
    that trains twice, as tests do, starts clean), and their runs closed at the end."""
    names = [t.name for t in active(cfg)]
    run_id = run_id_for(output_dir)
    sweep_id = safe_id(os.environ.get(SWEEP_ENV, "")) or None
    if missing := missing_packages(cfg):
        raise FerryError(
            f"The config reports to {', '.join(names)}, but {', '.join(missing)} is not "
            "installed in this environment.",
            hint="pip install 'ferry[trackers]' (the image has every tracker's client).",
        )
    env = environment(cfg, run_id, output_dir, sweep_id) if names else {}
    if "COMET_OFFLINE_DIRECTORY" in env:
        # One folder per attempt: Comet names an archive by the experiment key and a
        # suffix from the (seeded, so repeated) random state, and would overwrite the
        # previous attempt's archive; `comet upload` merges both into one experiment.
        attempt = time.strftime("attempt-%Y%m%d-%H%M%S", time.gmtime())
        env["COMET_OFFLINE_DIRECTORY"] = str(Path(env["COMET_OFFLINE_DIRECTORY"]) / attempt)
        Path(env["COMET_OFFLINE_DIRECTORY"]).mkdir(parents=True, exist_ok=True)
    if names:
        (Path(output_dir) / TRACKERS_DIR).mkdir(parents=True, exist_ok=True)
    # What this run sets, and what the MLflow setup may set, comes back as it was.
    saved = {k: os.environ.get(k) for k in (*env, "MLFLOW_RUN_ID", "MLFLOW_TAGS")}
    trackers = Trackers(cfg, output_dir, run_id, sweep_id, is_main, names)
    os.environ.update(env)
    try:
        yield trackers
    finally:
        trackers.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _mlflow_run(cfg: TrainConfig, run_id: str, sweep_id: str | None) -> None:
    """Continue the MLflow run this Ferry run already has (found by its tag), or tag the
    new one; under a sweep, the trial's run is a child of the sweep's parent run."""
    import json

    from mlflow.tracking import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith("file:"):
        _restore_empty_run_folders(Path(uri.removeprefix("file://").removeprefix("file:")))
    client = MlflowClient(uri)
    name = os.environ["MLFLOW_EXPERIMENT_NAME"]
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    tags = json.loads(mlflow_tags(cfg, run_id, sweep_id))
    if sweep_id:
        parent = client.search_runs(
            [experiment_id],
            f"tags.`ferry.sweep_id` = '{sweep_id}' and tags.`ferry.role` = 'sweep'",
            max_results=1,
        )
        if parent:
            parent_id = parent[0].info.run_id
        else:
            created = client.create_run(
                experiment_id,
                run_name=sweep_id,
                tags={"ferry.sweep_id": sweep_id, "ferry.role": "sweep"},
            )
            parent_id = created.info.run_id
        tags["mlflow.parentRunId"] = parent_id
    earlier = client.search_runs(
        [experiment_id], f"tags.`ferry.run_id` = '{run_id}'", max_results=1
    )
    if earlier:
        os.environ["MLFLOW_RUN_ID"] = earlier[0].info.run_id
        log.info("MLflow: continuing run %s", earlier[0].info.run_id)
    os.environ["MLFLOW_TAGS"] = json.dumps(tags)


def _restore_empty_run_folders(root: Path) -> None:
    """An MLflow folder store counts a run folder only with its metrics, params, tags and
    artifacts folders present; storage keeps files, so empty ones do not come back with
    an earlier attempt's files."""
    for meta in root.glob("*/*/meta.yaml"):  # <experiment>/<run>/meta.yaml
        for name in ("metrics", "params", "tags", "artifacts"):
            (meta.parent / name).mkdir(exist_ok=True)


def _swanlab_run(cfg: TrainConfig, run_id: str, output_dir: str, sweep_id: str | None) -> None:
    """Start the SwanLab run here: the trainer's integration then logs to it (it cannot
    start one itself with SwanLab 0.10, whose get_run() raises when none is active)."""
    import swanlab

    swanlab.init(**swanlab_init(cfg, run_id, output_dir), group=sweep_id)


def _close(names: list[str]) -> None:
    """End what the integrations leave open, so the files are complete when the run's
    folder is uploaded (and a second run in one process starts its own)."""
    import sys

    if "wandb" in names and (wandb := sys.modules.get("wandb")) and wandb.run is not None:
        wandb.finish()
    if "mlflow" in names and (mlflow := sys.modules.get("mlflow")) and mlflow.active_run():
        mlflow.end_run()
    if "comet_ml" in names and (comet := sys.modules.get("comet_ml")):
        experiment = comet.get_running_experiment()
        if experiment is not None:
            experiment.end()  # writes the offline archive; the integration leaves it open
    if "swanlab" in names and (swanlab := sys.modules.get("swanlab")):
        with contextlib.suppress(Exception):
            if swanlab.get_run() is not None:
                swanlab.finish()
    if "trackio" in names and (trackio := sys.modules.get("trackio")):
        with contextlib.suppress(Exception):
            trackio.finish()
