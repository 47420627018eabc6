"""Plugins (payload.plugins): a third-party plugin pip-installed from a package written
here, found through its `ferry.plugins` entry point, adds keys that `launch validate`
checks like Ferry's own and hooks that change a real run; plugins Ferry cannot use are
refused by name; a listed plugin keeps `launch validate` light."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import BLOCKER, launch, quickstart_config

ACME = textwrap.dedent(
    '''
    """A third-party plugin, as a user would publish one."""
    import json
    from pathlib import Path

    from pydantic import Field

    from payload.plugins import Plugin, PluginConfig


    class AcmeConfig(PluginConfig):
        acme_max_steps: int | None = Field(default=None, gt=0)
        acme_note: str = "hello"


    class AcmePlugin(Plugin):
        name = "acme"
        config = AcmeConfig

        def problems(self, cfg):
            if cfg.acme_note == "forbidden":
                return [("acme_note", "must not be `forbidden`")]
            return []

        def after_config(self, cfg):
            if cfg.acme_max_steps:  # the plugin's key changes the run
                cfg.max_steps = cfg.acme_max_steps

        def before_model(self, cfg):
            self.order = ["before_model"]

        def after_model(self, cfg, model):
            self.order.append("after_model")
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            return model

        def callbacks(self, cfg):
            from transformers import TrainerCallback

            plugin = self

            class Steps(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    plugin.order.append(f"step {state.global_step}")

            return [Steps()]

        def after_training(self, cfg, summary):
            out = Path(cfg.output_dir)
            record = {"note": cfg.acme_note, "order": self.order,
                      "trainable": self.trainable, "steps": summary.get("steps")}
            (out / "acme.json").write_text(json.dumps(record))
    '''
)

PYPROJECT = textwrap.dedent(
    """
    [build-system]
    requires = ["setuptools"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "acme-ferry"
    version = "0.1.0"

    [project.entry-points."ferry.plugins"]
    acme = "acme_ferry:AcmePlugin"

    [tool.setuptools]
    packages = ["acme_ferry"]
    """
)


@pytest.fixture(scope="module")
def acme(tmp_path_factory) -> dict[str, str]:
    """The plugin's package, pip-installed into a folder of its own (the entry point is
    read from the dist-info pip writes there); the env that puts it on the path."""
    root = tmp_path_factory.mktemp("acme")
    source = root / "src"
    (source / "acme_ferry").mkdir(parents=True)
    (source / "acme_ferry" / "__init__.py").write_text(ACME)
    (source / "pyproject.toml").write_text(PYPROJECT)
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (target / "acme_ferry-0.1.0.dist-info" / "entry_points.txt").exists()
    path = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


def test_a_plugins_keys_are_checked_like_ferrys_own(tmp_path, acme):
    """Listed by its entry point's name, the plugin's keys are valid; a typo gets a
    did-you-mean, a bad value and the plugin's own check name the key, all at once;
    without the plugin listed its keys are unknown."""
    good = quickstart_config(tmp_path, "plugins: [acme]\nacme_max_steps: 2\n", name="good.yml")
    launch("validate", str(good), env=acme, check=True)
    bad = quickstart_config(
        tmp_path,
        "plugins: [acme]\nacme_max_step: 2\nacme_note: forbidden\nlearning_rate: 0.0002\n",
        name="bad.yml",
    )
    said = launch("validate", str(bad), env=acme)
    assert said.returncode == 1
    text = " ".join(said.stderr.split())
    assert "acme_max_step: unknown key; did you mean `acme_max_steps`?" in text, text
    assert "acme_note: must not be `forbidden`" in text
    zero = quickstart_config(tmp_path, "plugins: [acme]\nacme_max_steps: 0\n", name="zero.yml")
    said = " ".join(launch("validate", str(zero), env=acme).stderr.split())
    assert "acme_max_steps: should be greater than 0 (got 0)" in said, said
    unlisted = quickstart_config(tmp_path, "acme_max_steps: 2\n", name="unlisted.yml")
    said = launch("validate", str(unlisted), env=acme).stderr
    assert "acme_max_steps" in said and "unknown key" in said


def test_plugins_ferry_cannot_use_are_refused_by_name(tmp_path, acme):
    cfg = quickstart_config(
        tmp_path,
        "plugins:\n  - acme\n  - nosuchplugin\n  - acme_ferry.NoSuchClass\n"
        "  - nosuchmodule.Plugin\n  - axolotl.integrations.spectrum.SpectrumPlugin\n"
        "  - axolotl.integrations.kernels.KernelsPlugin\n  - json.JSONDecoder\n"
        "  - broken_plugin_mod.Plugin\n",
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "broken_plugin_mod.py").write_text("def oops(:\n")
    env = {"PYTHONPATH": os.pathsep.join([str(broken), acme["PYTHONPATH"]])}
    said = launch("validate", str(cfg), env=env)
    assert said.returncode == 1
    assert "Traceback" not in said.stderr
    text = " ".join(said.stderr.split())
    assert "plugins[1]: `nosuchplugin` is not an installed plugin" in text, text
    assert "plugins[2]: plugin `acme_ferry.NoSuchClass`: module `acme_ferry` has no" in text
    assert "plugins[3]: plugin `nosuchmodule.Plugin`: module `nosuchmodule` is not installed" in (
        text
    )
    assert "plugins[4]: `axolotl.integrations.spectrum.SpectrumPlugin` is an Axolotl plugin " in (
        text
    )
    assert "plugins[5]: `axolotl.integrations.kernels.KernelsPlugin` is not a plugin" in text
    assert "plugins[6]: plugin `json.JSONDecoder` is not a subclass of payload.plugins.Plugin" in (
        text
    )
    assert (
        "plugins[7]: plugin `broken_plugin_mod.Plugin`: module `broken_plugin_mod` could "
        "not be imported: SyntaxError" in text
    ), text
    assert "plugins[0]" not in text


def test_a_remote_plan_says_a_foreign_plugin_must_be_on_the_machines(tmp_path, acme):
    cfg = quickstart_config(
        tmp_path, "plugins: [acme, axolotl.integrations.swanlab.SwanLabPlugin]\n"
    )  # fmt: skip
    said = launch("train", str(cfg), "--cloud", "modal", "--gpus", "H100:1", "--dry-run",
                  env=acme, check=True)  # fmt: skip
    text = " ".join((said.stdout + said.stderr).split())
    assert "plugin `acme` is not Ferry's own: the machines the run trains on must have it" in text
    assert "SwanLabPlugin` is not Ferry's own" not in text
    local = launch("train", str(cfg), "--dry-run", env=acme, check=True)
    assert "is not Ferry's own" not in local.stdout + local.stderr


def test_a_listed_plugin_keeps_validate_light(tmp_path, acme):
    """Resolving the plugin imports its module, never torch (the light-import blocker
    of the CLI test, here with the plugin installed)."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), acme["PYTHONPATH"]])}
    cfg = quickstart_config(tmp_path, "plugins: [acme]\nacme_max_steps: 2\n")
    for args in (["--help"], ["validate", str(cfg)]):
        said = launch(*args, env=env)
        assert said.returncode == 0, said.stderr
        assert "BLOCKED-IMPORT" not in said.stderr, said.stderr


@pytest.mark.slow
def test_the_plugins_hooks_change_a_real_run(tmp_path, acme):
    """`launch train` with the plugin: its after_config cuts the quickstart's run to
    `acme_max_steps` (2, where the config alone trains more), the hooks run in a run's
    order, and what after_training writes is in the output."""
    cfg = quickstart_config(
        tmp_path, "plugins: [acme]\nacme_max_steps: 2\nacme_note: from-config\nmax_steps: 6\n"
        "num_epochs: null\n",
    )  # fmt: skip
    done = launch("train", str(cfg), env=acme, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "plugins: acme" in done.stdout
    run = json.loads(launch("runs", "--json", env=acme, check=True).stdout)[0]
    output = Path(run["output_dir"])
    record = json.loads((output / "acme.json").read_text())
    assert record["note"] == "from-config"
    assert record["steps"] == 2
    assert record["order"] == ["before_model", "after_model", "step 1", "step 2"]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 2
    # after_model saw the model with its adapters: LoRA r=16 on every linear layer of the
    # tiny Llama's 4 layers (hidden 128, 2 KV heads of 32, MLP 384), r x (in + out) each.
    per_layer = (128 + 128) * 2 + (128 + 64) * 2 + (128 + 384) * 3  # q o, k v, gate up down
    assert record["trainable"] == 16 * 4 * per_layer


MINE = '''
"""A plugin in a file beside the config, importing a neighbour."""
from helper import FLAG_DEFAULT

from payload.plugins import Plugin, PluginConfig


class MineConfig(PluginConfig):
    mine_flag: bool = FLAG_DEFAULT


class MinePlugin(Plugin):
    config = MineConfig
'''


def test_a_plugin_in_a_local_file_travels_with_a_remote_job(tmp_path):
    """`plugins: [my_plugin.MinePlugin]` with my_plugin.py (and the helper.py it imports)
    beside the config: validated from another folder, written as an absolute file
    reference, staged with the job (SkyPilot's file mount) like a reward function, and
    found there, in a fresh process, with the original files gone."""
    from executors import get_executor
    from executors.sky_task import stage
    from launcher import api

    home = tmp_path / "cfg"
    home.mkdir()
    (home / "my_plugin.py").write_text(MINE)
    (home / "helper.py").write_text("FLAG_DEFAULT = False\n")
    cfg = quickstart_config(home, "plugins: [my_plugin.MinePlugin]\nmine_flag: true\n")
    launch("validate", str(cfg), cwd=tmp_path, check=True)
    job, _ = api.prepare(cfg, cloud="sky", storage="s3://bucket/runs")
    assert job.config["plugins"] == [f"{home / 'my_plugin.py'}:MinePlugin"]
    said = " ".join(get_executor("sky").warnings(job))
    assert "is not Ferry's own" not in said  # it travels with the job
    folder = stage(job)
    contract = json.loads((folder / "job.json").read_text())
    assert contract["config"]["plugins"] == ["/ferry/inputs/code-0/my_plugin.py:MinePlugin"]
    assert (folder / "inputs" / "code-0" / "helper.py").exists()
    node = tmp_path / "node"
    shutil.copytree(folder, node)
    for name in ("my_plugin.py", "helper.py"):
        (home / name).unlink()
    probe = (
        "import json, sys\n"
        "from payload.runtime.job import RemoteJob\n"
        "from payload.config.loader import validate_mapping\n"
        "from payload.plugins import Plugins\n"
        "job = RemoteJob.from_json((__import__('pathlib').Path(sys.argv[1]) / 'job.json')"
        ".read_text()).rooted(sys.argv[1])\n"
        "cfg = validate_mapping(job.config, resolve_paths=False)\n"
        "(plugin,) = Plugins(cfg).items\n"
        "print(json.dumps([cfg.mine_flag, sys.modules[type(plugin).__module__].__file__]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(node)], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    flag, where = json.loads(done.stdout.strip().splitlines()[-1])
    assert flag is True
    assert where == str(node / "inputs" / "code-0" / "my_plugin.py")
