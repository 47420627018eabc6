"""Experiment trackers: W&B (offline), MLflow (a file store), TensorBoard, Comet (offline),
SwanLab (local) and Trackio (local) fed by the HF Trainer's own integrations with the real
client libraries, read back with each one's own reader; a resumed run continues the same
tracker run; credentials are checked before a launch and never written anywhere.

Only the trackers' servers are absent: every client runs in its offline or file mode,
which is the same code path up to the upload.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import ASSETS, DATA, ROOT, launch, plan_row

from payload.config import validate_mapping
from payload.config.trackers import comet_key, environment

RUN_ID = "trk-20261202-0001"
SWEEP_ID = "trk-sweep"

ALL_TRACKERS = {
    "wandb_project": "ferry-test",
    "wandb_mode": "offline",
    "wandb_name": "tiny-run",
    "wandb_entity": "ferry-team",
    "wandb_log_model": True,  # the final model, as a W&B artifact
    "hf_mlflow_log_artifacts": True,  # each checkpoint, as MLflow artifacts
    "mlflow_experiment_name": "ferry-exp",
    "mlflow_run_name": "mlflow-name",  # MLflow's own name, beside W&B's
    "use_tensorboard": True,
    "comet_project_name": "ferry-comet",
    "comet_online": False,
    "comet_workspace": "ferry-ws",
    "comet_experiment_config": {"tags": ["tiny", "ferry"]},
    "swanlab_project": "ferry-swan",
    "swanlab_mode": "offline",
    "trackio_project_name": "ferry-trackio",
}


def _config(tmp: Path, **extra) -> Path:
    raw = {
        "base_model": str(ASSETS / "tiny-llama"),
        "datasets": [{"path": str(DATA), "type": "alpaca"}],
        "sequence_len": 128,
        "micro_batch_size": 8,
        "learning_rate": 3e-3,
        "optimizer": "adamw_torch",
        "max_steps": 4,
        "logging_steps": 1,
        "save_steps": 2,
        "output_dir": str(tmp / "out"),
        "storage": (tmp / "storage").as_uri(),
        "debug": True,  # its rows printed before training: checked here, in a real run
        **ALL_TRACKERS,
        **extra,
    }
    path = tmp / f"trackers-{raw['max_steps']}.yml"  # under the sweep's id: the trial's folder
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(config: Path, tmp: Path) -> str:
    """One attempt, as a backend runs it inside the job (the payload entry), under a
    sweep trial's environment."""
    env = {
        **os.environ,
        "FERRY_RUN_ID": RUN_ID,
        "FERRY_SWEEP_ID": SWEEP_ID,
        "HOME": str(tmp / "home"),  # trackers' own caches stay in the test
    }
    done = subprocess.run(
        [sys.executable, "-m", "payload", "train", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Four steps, then the same run resumed from storage to step 6 in a fresh output
    folder, as on a new machine after a preemption: the first attempt's tracker files
    travel with its checkpoints and come back."""
    tmp = tmp_path_factory.mktemp("trackers")
    (tmp / "home").mkdir()
    first = _train(_config(tmp), tmp)
    out = tmp / "out"
    shutil.rmtree(out)  # the next attempt's machine starts with nothing but storage
    second = _train(_config(tmp, max_steps=6), tmp)
    assert "resuming from step 4" in second
    # debug: true prints the first rows with the trained tokens marked, before training.
    assert first.index("debug: row 0 (") < first.index("loss")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in metrics if "loss" in r}
    return out, losses, first + second


# ---- W&B: the offline run's own record log (`run-<id>.wandb`)


def _wandb_records(path: Path) -> list:
    """The records of a .wandb file: a 7-byte W&B header, then a LevelDB-style log of
    32 KiB blocks whose chunks (7-byte header: crc, length, type) carry protobuf
    `Record`s, split over blocks as FIRST/MIDDLE/LAST."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, records, pending = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_has_the_losses_and_a_resume_continues_it(tracked):
    out, losses, _ = tracked
    runs = sorted((out / "trackers" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one folder per attempt, both the same W&B run
    history, meta, artifacts = {}, [], []
    for folder in runs:
        for record in _wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "artifact":
                artifacts.append((folder, record.artifact.type, record.artifact.name))
            if kind == "run":
                run = record.run
                meta.append((run.run_id, run.display_name, run.run_group, run.entity, run.project))
            elif kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                if "train/loss" in items:
                    history[items["train/global_step"]] = items["train/loss"]
    assert {m[0] for m in meta} == {RUN_ID}
    assert {m[1] for m in meta} == {"tiny-run"}  # wandb_name is the display name
    assert {m[2] for m in meta} == {SWEEP_ID}  # a sweep's trials are grouped
    assert {m[3:] for m in meta} == {("ferry-team", "ferry-test")}  # entity, project
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    assert history == pytest.approx(losses)
    # wandb_log_model: true is "end": each attempt's model at its end, as a model artifact.
    assert {f for f, kind, _ in artifacts if kind == "model"} == set(runs)


# ---- MLflow: a file store, read with MlflowClient


def test_mlflow_store_has_the_metrics_in_one_run_under_the_sweep_parent(tracked):
    from mlflow.tracking import MlflowClient

    out, losses, _ = tracked
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # reading a folder store, as the run wrote
    client = MlflowClient((out / "trackers" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("ferry-exp")
    runs = client.search_runs([experiment.experiment_id], f"tags.`ferry.run_id` = '{RUN_ID}'")
    assert len(runs) == 1  # the resumed attempt continued the first attempt's run
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    parents = client.search_runs([experiment.experiment_id], "tags.`ferry.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.run_name == SWEEP_ID
    assert runs[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert runs[0].info.run_name == "mlflow-name"
    # hf_mlflow_log_artifacts: each checkpoint logged as a model of the run (MLflow 3).
    models = client.search_logged_models([experiment.experiment_id])
    assert sorted(m.name for m in models if m.source_run_id == runs[0].info.run_id) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]


# ---- TensorBoard: event files in the run folder, read with tensorboard's reader


def test_tensorboard_events_hold_every_logged_loss(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, losses, _ = tracked
    folder = out / "trackers" / "tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one file per attempt
    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("train/loss")}
    assert scalars == pytest.approx(losses, rel=1e-6)


# ---- Comet: offline archives, one experiment key for both attempts


def test_comet_offline_archives_carry_the_losses_under_one_experiment_key(tracked):
    out, losses, _ = tracked
    archives = sorted((out / "trackers" / "comet").glob("attempt-*/*.zip"))
    assert len(archives) == 2  # one per attempt, under one experiment key
    key = comet_key(RUN_ID)
    assert archives and all(a.name.startswith(key) for a in archives)
    logged = {}
    for archive in archives:
        with zipfile.ZipFile(archive) as z:
            for line in z.read("messages.json").decode().splitlines():
                payload = json.loads(line).get("payload", {})
                metric = payload.get("metric") or {}
                if metric.get("metricName") == "train/loss":
                    logged[metric["step"]] = float(metric["metricValue"])
    assert logged == pytest.approx(losses)
    with zipfile.ZipFile(archives[0]) as z:  # comet_experiment_config reached Comet
        experiment = json.loads(z.read("experiment.json"))
    assert sorted(experiment["tags"]) == ["ferry", "tiny"]
    assert (experiment["workspace"], experiment["project_name"]) == ("ferry-ws", "ferry-comet")
    assert experiment["resume_strategy"] == "get_or_create"  # comet_mode's default: resumable


# ---- SwanLab (local) and Trackio (local): their files, in the run folder


def test_swanlab_local_run_and_trackio_database_are_the_same_run_twice(tracked):
    out, losses, _ = tracked
    swan = sorted((out / "trackers" / "swanlab").glob("run-*"))
    assert len(swan) == 2  # SwanLab spells the run id with underscores
    assert all(p.name.endswith("trk_20261202_0001") for p in swan)
    database = out / "trackers" / "trackio" / "ferry-trackio.db"
    with sqlite3.connect(database) as db:
        rows = db.execute("select run_name, step, metrics from metrics").fetchall()
    records = [json.loads(metrics) for _, _, metrics in rows]  # Trackio counts its own steps
    logged = {r["train/global_step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert {name for name, _, _ in rows} == {"tiny-run"}
    assert logged == pytest.approx(losses)


def test_no_credential_reaches_the_trackers_files(tracked):
    """WANDB_API_KEY and HF_TOKEN are planted in the environment (conftest): no tracker
    file, and no line of the run's output, holds either."""
    from helpers import PLANTED

    out, _, output = tracked
    for path in (out / "trackers").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in PLANTED.values():
                assert value.encode() not in data, path
    for value in PLANTED.values():
        assert value not in output


# ---- before a launch: what validate and the plan say, and what they refuse


def _cfg(**keys):
    raw = {
        "base_model": str(ASSETS / "tiny-llama"),
        "datasets": [{"path": str(DATA), "type": "alpaca"}],
        "learning_rate": 1e-4,
        **keys,
    }
    return raw


def test_validate_says_which_trackers_get_the_run(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(_cfg(wandb_project="p", use_tensorboard=True)))
    out = launch("validate", str(path), check=True).stdout
    assert "reports to W&B: project p, online; needs WANDB_API_KEY" in out
    assert "reports to TensorBoard: event files in the run folder" in out


def test_a_credential_in_the_config_is_refused_with_the_variable_to_use(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(_cfg(comet_project_name="p", comet_api_key="abc123")))
    result = launch("validate", str(path))
    assert result.returncode != 0
    assert "comet_api_key: would write a credential into the config" in result.stderr
    assert "export COMET_API_KEY" in result.stderr


def test_tracker_settings_without_the_tracker_are_said(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(_cfg(wandb_entity="team", use_wandb=None)))
    result = launch("validate", str(path), check=True)
    assert "wandb_entity: has no effect: wandb is off" in result.stdout + result.stderr


def test_a_remote_launch_needs_the_trackers_secret_before_anything_starts(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(_cfg(wandb_project="p")))
    refused = launch("train", str(path), "--cloud", "modal", "--dry-run")
    assert refused.returncode != 0
    assert "W&B (project p, online) needs WANDB_API_KEY in the job" in refused.stderr
    assert "--secret wandb" in refused.stderr
    ok = launch(
        "train", str(path), "--cloud", "modal", "--secret", "wandb-key", "--dry-run", check=True
    )
    assert plan_row(ok.stdout, "tracker") == "W&B: project p, online; needs WANDB_API_KEY"
    # Offline, nothing is needed.
    offline = tmp_path / "o.yml"
    offline.write_text(yaml.safe_dump(_cfg(wandb_project="p", wandb_mode="offline")))
    plan = launch("train", str(offline), "--cloud", "modal", "--dry-run", check=True).stdout
    assert plan_row(plan, "tracker") == "W&B: project p, offline (files in the run folder)"


def test_where_a_secret_is_one_variable_it_must_be_the_trackers_variable(tmp_path):
    """On SkyPilot a secret is an environment variable by its name: `--secret wandb`
    would give the node `$wandb`, not WANDB_API_KEY, so only the variable's name will do
    (a Modal secret named wandb-key may hold WANDB_API_KEY; see the test above)."""
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(_cfg(wandb_project="p")))
    args = ["train", str(path), "--cloud", "sky", "--storage", "s3://b/r", "--dry-run"]
    refused = launch(*args, "--secret", "wandb")
    assert refused.returncode != 0
    assert "needs WANDB_API_KEY in the job" in refused.stderr
    assert "--secret WANDB_API_KEY" in refused.stderr
    launch(*args, "--secret", "WANDB_API_KEY", check=True)


def test_a_local_launch_without_the_credential_is_refused(tmp_path, monkeypatch):
    from executors import get_executor
    from launcher import api

    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(_cfg(wandb_project="p")))
    job, _ = api.prepare(path, cloud="local")
    problems = get_executor("local").problems(job)
    assert any("needs WANDB_API_KEY, which is neither set here" in p for p in problems)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert get_executor("local").problems(job) == []


def test_each_tracker_run_is_named_by_the_run_id():
    cfg = validate_mapping(_cfg(**{**ALL_TRACKERS, "wandb_name": None}))
    env = environment(cfg, "run-7", "/tmp/o", "sweep-1")
    assert env["WANDB_RUN_ID"] == "run-7" and env["WANDB_RESUME"] == "allow"
    assert env["WANDB_RUN_GROUP"] == "sweep-1"
    assert env["COMET_EXPERIMENT_KEY"] == comet_key("run-7") != comet_key("run-8")
    assert len(comet_key("run-7")) == 32
    assert env["TENSORBOARD_LOGGING_DIR"] == "/tmp/o/trackers/tensorboard"
    assert env["MLFLOW_TRACKING_URI"] == "file:///tmp/o/trackers/mlruns"


def test_sweep_trials_carry_the_sweep_id(tmp_path):
    from launcher import api

    sweep = tmp_path / "sweep.yml"
    sweep.write_text("learning_rate: [1.0e-3, 2.0e-3]\n")
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(_cfg(use_tensorboard=True)))
    plan = api.sweep_plan(config, sweep, clouds=["local"])
    assert {job.env["FERRY_SWEEP_ID"] for job in plan.jobs} == {plan.sweep_id}


# ---- the trackers' files in storage: a consistent copy, and never a failed checkpoint


def _sync_with_a_checkpoint(tmp_path: Path):
    """A StorageSync on a file:// store, and an output folder holding checkpoint-2 and a
    tracker's event file, as the trainer leaves them when it saves."""
    from payload.durability import StorageSync
    from payload.storage import open_store

    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "model.safetensors").write_bytes(b"w" * 100)
    events = out / "trackers" / "tensorboard" / "events.out.tfevents.1"
    events.parent.mkdir(parents=True)
    events.write_bytes(b"e" * 600)
    store = open_store((tmp_path / "storage").as_uri())
    return StorageSync(store, str(out), "run-1", None, True, False), store, events


def test_tracker_files_growing_during_the_upload_come_back_intact(tmp_path, monkeypatch):
    """A tracker appends to its file between the manifest's hash and the copy into
    storage (forced here, on the first file stored): what storage holds is the copy taken
    at the save, which verifies when a later attempt fetches it."""
    from types import SimpleNamespace

    from payload.storage import download_folder

    sync, store, events = _sync_with_a_checkpoint(tmp_path)
    real = type(store).put_files

    def put_files(self, items, progress=None):
        if any(key.startswith("trackers/") for _, key, _ in items):
            with events.open("ab") as f:  # the live file grows meanwhile
                f.write(b"more")
        return real(self, items, progress)

    monkeypatch.setattr(type(store), "put_files", put_files)
    sync.on_save(None, SimpleNamespace(global_step=2), None)
    sync.wait()
    back = tmp_path / "back"
    download_folder(store, "trackers", back)  # raises if a file fails verification
    assert (back / "tensorboard" / "events.out.tfevents.1").read_bytes() == b"e" * 600


def test_a_failed_tracker_upload_does_not_fail_the_checkpoint(tmp_path, monkeypatch, caplog):
    """Any error from the store while the trackers' files go up (S3's own exceptions are
    not OSErrors) is logged; the checkpoint is complete in storage and wait() is clean."""
    from types import SimpleNamespace

    from payload.storage import latest_complete_checkpoint

    sync, store, _ = _sync_with_a_checkpoint(tmp_path)
    real = type(store).put_files

    class S3UploadFailedError(Exception):  # boto3's, as the S3 store would raise it
        pass

    def put_files(self, items, progress=None):
        if any(key.startswith("trackers/") for _, key, _ in items):
            raise S3UploadFailedError("Failed to upload: AccessDenied")
        return real(self, items, progress)

    monkeypatch.setattr(type(store), "put_files", put_files)
    sync.on_save(None, SimpleNamespace(global_step=2), None)
    sync.wait()  # no TransferError
    assert latest_complete_checkpoint(store).step == 2
    assert "tracker files not uploaded: Failed to upload: AccessDenied" in caplog.text


# ---- names, ids and the checks around them


def test_the_run_name_comes_from_a_tracker_that_is_on():
    from payload.config.trackers import run_names

    both = validate_mapping(_cfg(wandb_name="w", mlflow_experiment_name="e", mlflow_run_name="m"))
    assert run_names(both, "run-1") == "m"  # W&B is off: its name names nothing
    on = validate_mapping(_cfg(wandb_project="p", wandb_name="w", mlflow_run_name="m"))
    assert run_names(on, "run-1") == "w"
    assert run_names(validate_mapping(_cfg(use_tensorboard=True)), "run-1") == "run-1"


def test_a_run_started_by_hand_is_named_by_its_folder_safely(tmp_path, monkeypatch):
    from payload.trackers import run_id_for

    monkeypatch.delenv("FERRY_RUN_ID", raising=False)
    odd = run_id_for(str(tmp_path / "it's mine" / "lora-out"))
    other = run_id_for(str(tmp_path / "lora-out"))
    assert odd.startswith("lora-out-") and other.startswith("lora-out-") and odd != other
    assert run_id_for(str(tmp_path / "o'dd run")).startswith("o-dd-run-")
    assert odd == run_id_for(str(tmp_path / "it's mine" / "lora-out"))  # stable: resumable
    monkeypatch.setenv("FERRY_RUN_ID", "sweep-3-t1")
    assert run_id_for(str(tmp_path)) == "sweep-3-t1"


def test_a_disabled_tracker_is_not_warned_about(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(_cfg(wandb_project="p", wandb_mode="disabled")))
    result = launch("validate", str(path), check=True)
    assert "has no effect" not in result.stdout + result.stderr
    assert "reports to" not in result.stdout


def test_a_sweep_refuses_one_tracker_run_for_every_trial(tmp_path):
    from launcher import api
    from payload.errors import FerryError

    sweep = tmp_path / "sweep.yml"
    sweep.write_text("learning_rate: [1.0e-3, 2.0e-3]\n")
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(_cfg(wandb_project="p", wandb_run_id="mine")))
    with pytest.raises(FerryError, match="wandb_run_id: would put every trial into one"):
        api.sweep_plan(config, sweep, clouds=["local"])


def test_a_tracker_client_missing_in_the_job_stops_it_before_the_data(tmp_path, monkeypatch):
    """The client's absence is made by hiding it from importlib (the only stand-in)."""
    import importlib.util

    from payload.errors import FerryError
    from payload.trackers import reporting

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "swanlab" else real(name, *a)
    )
    cfg = validate_mapping(_cfg(swanlab_project="p", swanlab_mode="offline"))
    with (
        pytest.raises(FerryError, match="reports to swanlab, but swanlab is not installed"),
        reporting(cfg, str(tmp_path), True),
    ):
        pass
    assert "SWANLAB_PROJECT" not in os.environ


def test_the_trackers_environment_is_restored_after_the_run(tmp_path, monkeypatch):
    from payload.trackers import reporting

    monkeypatch.setenv("MLFLOW_TAGS", '{"team": "a"}')
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg = validate_mapping(_cfg(wandb_project="p", wandb_mode="offline", use_tensorboard=True))
    with reporting(cfg, str(tmp_path), False) as trackers:
        assert os.environ["WANDB_PROJECT"] == "p"
        assert trackers.report_to == ["wandb", "tensorboard"]
    assert "WANDB_PROJECT" not in os.environ
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    assert os.environ["MLFLOW_TAGS"] == '{"team": "a"}'


def test_user_given_tracker_ids_replace_the_run_id():
    cfg = validate_mapping(
        _cfg(
            wandb_project="p",
            wandb_run_id="my-run",
            comet_project_name="c",
            comet_experiment_key="a" * 32,
            wandb_watch=True,
            wandb_log_model="checkpoint",
        )
    )
    env = environment(cfg, "run-7", "/tmp/o")
    assert env["WANDB_RUN_ID"] == "my-run" and env["COMET_EXPERIMENT_KEY"] == "a" * 32
    assert env["WANDB_WATCH"] == "gradients" and env["WANDB_LOG_MODEL"] == "checkpoint"


def test_comet_settings_ferry_sets_itself_are_refused_with_why():
    from payload.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        validate_mapping(_cfg(comet_project_name="c", comet_experiment_config={"name": "x"}))
    assert "`name`: Ferry names the experiment" in str(refused.value)
