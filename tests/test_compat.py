"""The Axolotl compatibility corpus (tests/compat/) and its report script.

The corpus holds configs in the shapes Axolotl's documentation shows, one per feature
family, with hub ids for models and datasets as real configs have. Each must validate,
plan for the local backend and for Modal, and the ones on the bundled tiny assets
(`tiny_*.yml`) must train 2 steps. A config that fails here is a config a user would copy
from Axolotl's docs and Ferry would refuse (or fail to run).

`python -m payload.config.compat DIR` is the report users read: it is checked on a
folder of known good and bad configs, with the counts written out by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import ROOT

from payload.config import compat

CORPUS = ROOT / "tests" / "compat"
CORPUS_FILES = sorted(CORPUS.glob("*.yml"))
TINY_FILES = [p for p in CORPUS_FILES if p.name.startswith("tiny_")]


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


# ---- the report script ----------------------------------------------------------------

GOOD = """\
base_model: NousResearch/Meta-Llama-3.1-8B
datasets:
  - path: tatsu-lab/alpaca
    type: alpaca
learning_rate: 1.0e-4
"""


BAD_ENTRY = "  - path: yahma/alpaca-cleaned\n    type: alpaca\n    made_up_key: x\n"


def write(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Six configs: two valid (one in a subfolder, one .yaml), four blocked.

    a_unknown:  `made_up_key` (unknown) and `another_made_up` (unknown)
    b_bad:      `lora_r` (a bad value) and `datasets[1].made_up_key` (unknown, in an entry)
    c_unknown:  `made_up_key`, and `datasets[0].made_up_key`
    d_broken:   not YAML at all
    """
    folder = tmp_path / "configs"
    write(folder, "good.yml", GOOD)
    write(folder, "nested/good2.yaml", GOOD.replace("1.0e-4", "2.0e-4"))
    write(folder, "a_unknown.yml", GOOD + "made_up_key: 1\nanother_made_up: 2\n")
    write(
        folder,
        "b_bad.yml",
        GOOD.replace("learning_rate", BAD_ENTRY + "learning_rate") + "lora_r: -3\n",
    )
    write(
        folder,
        "c_unknown.yml",
        GOOD.replace("type: alpaca", "type: alpaca\n    made_up_key: y") + "made_up_key: 3\n",
    )
    write(folder, "d_broken.yml", "base_model: [unclosed\n")
    write(folder, "notes.txt", "made_up_key: 1\n")  # not a config: not counted
    return folder


def test_the_report_counts_valid_configs_and_the_keys_that_block(mixed_folder):
    """The counts and the table users read: a failure means the report miscounts."""
    report = compat.scan(mixed_folder)
    assert (report.total, report.valid) == (6, 2)
    assert report.blockers() == [
        ("datasets[].made_up_key", 2),  # b_bad, c_unknown; ties go by name
        ("made_up_key", 2),  # a_unknown, c_unknown
        (compat.UNREADABLE, 1),
        ("another_made_up", 1),
        ("lora_r", 1),
    ]
    by_path = {r.path: r for r in report.results}
    assert by_path["nested/good2.yaml"].valid and by_path["good.yml"].valid
    assert by_path["b_bad.yml"].keys == ["datasets[].made_up_key", "lora_r"]


def test_the_report_script_prints_the_table_and_exits_1_when_some_are_blocked(mixed_folder):
    done = subprocess.run(
        [sys.executable, "-m", "payload.config.compat", str(mixed_folder)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "2 of 6 configs valid (33.3%)"
    table = [line.split("|") for line in lines[2:9] if "|" in line]
    assert [[c.strip() for c in row] for row in table] == [
        ["key", "configs blocked"],
        ["datasets[].made_up_key", "2"],
        ["made_up_key", "2"],
        [compat.UNREADABLE, "1"],
        ["another_made_up", "1"],
        ["lora_r", "1"],
    ]
    assert "  a_unknown.yml: made_up_key, another_made_up" in lines
    assert "  d_broken.yml: (unreadable file)" in lines


def test_the_json_report_and_exit_0_when_every_config_is_valid(tmp_path):
    folder = tmp_path / "ok"
    write(folder, "one.yml", GOOD)
    write(folder, "two.yml", GOOD)
    done = subprocess.run(
        [sys.executable, "-m", "payload.config.compat", str(folder), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},  # hub ids still count as valid
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert (data["total"], data["valid"], data["percent"], data["blockers"]) == (2, 2, 100.0, [])


def test_an_empty_folder_or_a_missing_one_is_not_a_pass(tmp_path):
    assert compat.main([str(tmp_path)]) == 1  # nothing checked proves nothing
    assert compat.main([str(tmp_path / "missing")]) == 1


# ---- the corpus ----------------------------------------------------------------------


def test_the_corpus_is_large_enough_and_each_config_names_its_family():
    assert len(CORPUS_FILES) >= 40
    assert len(TINY_FILES) >= 10
    unmarked = [p.name for p in CORPUS_FILES if not p.read_text().startswith("# Family: ")]
    assert not unmarked, f"configs without a `# Family:` header: {unmarked}"


def test_the_corpus_reports_100_percent_valid():
    report = compat.scan(CORPUS)
    assert report.total == len(CORPUS_FILES)
    assert report.valid == report.total, compat.render(report)
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # lifted for the scan only, then put back


def test_the_report_script_stays_light():
    """`python -m payload.config.compat` imports no torch or transformers (as `launch
    validate`): a failure means a heavy import crept into payload.config."""
    code = (
        "import sys; from payload.config import compat; "
        "compat.main(['tests/compat']); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("path", CORPUS_FILES, ids=ids(CORPUS_FILES))
def test_each_corpus_config_validates(path):
    with compat._hub_ids_as_names():
        result = compat.check_config(path)
    assert result.valid, "\n".join(result.problems)


@pytest.mark.parametrize("path", CORPUS_FILES, ids=ids(CORPUS_FILES))
def test_each_corpus_config_plans_for_local_and_modal(path, monkeypatch):
    """Dry runs, no credentials and no network. Hub ids stay hub ids (HF_HUB_OFFLINE is
    lifted, as the report script does); the local machine is given 8 GPUs, the one edge
    replaced here, so that GPU-only keys (flash_attention, 4-bit) plan as on a GPU box."""
    from executors import local
    from launcher import api

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(local, "local_gpu_count", lambda: 8)
    for var in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_CONFIG_PATH"):
        monkeypatch.delenv(var, raising=False)
    local_plan = api.plan(path, cloud="local", gpus="1")
    assert local_plan.backend == "local"
    assert local_plan.command[-4:-1] == ["-m", "payload", "train"]
    # The trackers' credentials, as a user names them (an online tracker without its secret
    # is refused before anything starts: tests/test_trackers.py).
    secrets = ["wandb", "comet", "swanlab", "hf-token"]
    modal_plan = api.plan(path, cloud="modal", gpus="H100:1", secrets=secrets)
    assert modal_plan.backend == "modal"
    assert dict(modal_plan.rows)["gpu"] == "H100:1"


# ---- the tiny configs train ----------------------------------------------------------

# One process trains every tiny config in turn: torch and transformers load once, which
# is most of a 2-step run's time. Each config's outcome goes to results.json.
DRIVER = textwrap.dedent(
    """
    import json, sys, traceback
    from pathlib import Path

    from payload.config import load_config
    from payload.train import run

    out, configs = Path(sys.argv[1]), sys.argv[2:]
    results = {}
    for config in configs:
        name = Path(config).stem
        overrides = [
            f"output_dir={out / name}",
            f"dataset_prepared_path={out / 'prepared' / name}",
            "max_steps=2",
            "dataset_processes=1",
        ]
        try:
            summary = run(load_config(config, overrides))
            results[name] = {"ok": True, "summary": summary}
        except BaseException as e:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        print(f"== {name}: {results[name]['ok']}", flush=True)
    (out / "results.json").write_text(json.dumps(results, default=str))
    """
)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> tuple[Path, dict]:
    """Every tiny config trained 2 steps, in one process whose working folder is a temp
    folder, so that whatever a tracker writes (MLflow's ./mlruns) stays in it."""
    work = tmp_path_factory.mktemp("compat-train")
    env = {
        **os.environ,
        "WANDB_SILENT": "true",
        "FERRY_HOME": str(work / "ferry-home"),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("FERRY_RUN_ID", None)
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(work), *map(str, TINY_FILES)],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=600,
    )
    (work / "driver.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work, json.loads((work / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("path", TINY_FILES, ids=ids(TINY_FILES))
def test_each_tiny_corpus_config_trains_two_steps(path, tiny_runs):
    work, results = tiny_runs
    result = results[path.stem]
    assert result["ok"], result.get("error")
    summary = result["summary"]
    assert summary["steps"] == 2
    assert summary["final_loss"] is not None
    out = work / path.stem
    adapter = summary["artifact"] == "adapter"
    saved = "adapter_model.safetensors" if adapter else "model.safetensors"
    assert (out / saved).is_file()


@pytest.mark.slow
def test_the_tiny_tracker_configs_wrote_their_offline_records(tiny_runs):
    """Each tracker wrote inside the test's folder: TensorBoard event files and the wandb
    offline run under the output folder, an MLflow file store in ./mlruns (the working
    folder: the config says `file:./mlruns`)."""
    work, results = tiny_runs
    assert list((work / "tiny_tracker_tensorboard").rglob("events.out.tfevents.*"))
    assert list((work / "tiny_tracker_wandb" / "trackers" / "wandb").glob("offline-run-*"))
    assert list((work / "mlruns").rglob("meta.yaml"))
    # comet_ml is installed, and would record each MLflow run as an offline Comet
    # experiment of its own in the working folder, unasked (payload/__init__.py stops it).
    assert not (work / ".cometml-runs").exists()
