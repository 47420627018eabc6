"""Launch settings: flags > the config's `launch:` > a profile > defaults, and Axolotl's
cloud YAML keys mapped or refused by name."""

from __future__ import annotations

import textwrap

import pytest
from helpers import launch, plan_row, quickstart_config

from launcher import api
from launcher.launch_settings import load_profile
from payload.errors import ConfigError, FerryError


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_flags_beat_config_beat_profile_beat_defaults(tmp_path):
    profile = write(
        tmp_path / "profile.yml",
        """
        cloud: modal
        gpus: A100-80GB:8
        memory: 32GB
        timeout: 2h
        region: us-east
        secrets: [from-profile]
        env: {A: profile, B: profile}
    """,
    )
    cfg = quickstart_config(
        tmp_path,
        "launch:\n  gpus: H100:8\n  memory: 64GB\n  secrets: [from-config]\n  env: {B: config}\n",
    )
    job, cloud = api.prepare(
        cfg, profile=profile, memory="128GB", secrets=["from-flag"], env={"C": "flag"}
    )
    r = job.resources
    assert cloud == "modal"  # profile (nothing closer set it)
    assert (r.accelerator, r.gpus_per_node) == ("H100", 8)  # config beats profile
    assert r.memory_mb == 128 * 1024  # flag beats config
    assert r.timeout_s == 7200 and r.region == "us-east"  # profile fills the rest
    assert job.secrets == ["from-profile", "from-config", "from-flag"]  # they add up
    assert job.env == {"A": "profile", "B": "config", "C": "flag"}
    assert "launch" not in job.config  # launch settings never travel in the config


def test_defaults_when_nothing_is_set(tmp_path):
    job, cloud = api.prepare(quickstart_config(tmp_path))
    assert cloud == "local" and job.resources.gpus_per_node == 1 and job.resources.nodes == 1
    assert job.image.tag.startswith("ferry:")


def test_axolotl_cloud_yaml_is_mapped(tmp_path):
    profile = load_profile(
        write(
            tmp_path / "cloud.yml",
            """
        provider: modal
        gpu: h100
        gpu_count: 8
        memory: 128
        timeout: 86400
        volumes:
          - {name: axolotl-data, mount: /workspace/data}
        secrets: [HF_TOKEN]
        dockerfile_commands: ["pip install einops==0.8.1"]
    """,
        )
    )
    assert (profile.cloud, profile.gpus, profile.memory, profile.timeout) == (
        "modal",
        "H100:8",
        128,
        86400,
    )
    assert profile.volumes[0].mount == "/workspace/data" and profile.secrets == ["HF_TOKEN"]
    assert profile.image.commands == ["pip install einops==0.8.1"]


def test_axolotl_keys_ferry_does_not_take_are_refused_by_name(tmp_path):
    path = write(
        tmp_path / "cloud.yml",
        """
        provider: modal
        env: [HF_TOKEN, WANDB_API_KEY]
        branch: main
        docker_tag: main-latest
    """,
    )
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    found = {p.key: p.message for p in info.value.problems}
    assert set(found) == {"env", "branch", "docker_tag"}
    assert "secrets:" in found["env"] and "image" in found["docker_tag"]


def test_profile_typos_are_named(tmp_path):
    with pytest.raises(ConfigError, match="gpus: .*'H100:x' is not a count"):
        load_profile(write(tmp_path / "p.yml", "gpus: H100:x\n"))
    with pytest.raises(ConfigError, match="gpsu"):
        load_profile(write(tmp_path / "q.yml", "gpsu: H100:8\n"))


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"memory": "lots"}, "--memory: 'lots' is not a memory size"),
        ({"timeout": "soon"}, "--timeout: 'soon' is not a duration"),
        ({"retries": -1}, "--retries"),
        ({"secrets": ["HF_TOKEN=abc"]}, "not a value"),
        ({"storage": "gs://b"}, "--storage"),
    ],
)
def test_bad_flags_name_the_flag(tmp_path, flags, words):
    with pytest.raises(FerryError, match=words):
        api.prepare(quickstart_config(tmp_path), **flags)


def test_storage_set_twice_in_one_config_is_refused(tmp_path):
    cfg = quickstart_config(tmp_path, "storage: s3://a/b\nlaunch:\n  storage: s3://c/d\n")
    with pytest.raises(FerryError, match="Set storage once"):
        api.prepare(cfg)


def test_cli_flags_reach_the_plan(tmp_path):
    result = launch(
        "train",
        str(quickstart_config(tmp_path)),
        "--cloud",
        "modal",
        "--gpus",
        "L40S:2",
        "--memory",
        "48GB",
        "--timeout",
        "3h",
        "--retries",
        "1",
        "--secret",
        "hf",
        "--env",
        "WANDB_MODE=offline",
        "--dry-run",
        check=True,
    )
    for key, value in (
        ("gpu", "L40S:2"),
        ("memory", "49152 MiB"),
        ("timeout", "10800 s"),
        ("retries", "1 (after a crash; never after a user error)"),
        ("secrets", "hf"),
        ("env", "WANDB_MODE"),
    ):
        assert plan_row(result.stdout, key) == value, (key, result.stdout)


def test_the_local_backend_warns_about_settings_it_ignores(tmp_path):
    result = launch(
        "train",
        str(quickstart_config(tmp_path)),
        "--memory",
        "4GB",
        "--secret",
        "hf",
        "--dry-run",
        check=True,
    )
    assert "warning: local: memory, secrets ignored" in result.stderr


def test_stop_grace_reaches_torchrun_and_the_plan(tmp_path):
    """One setting for every grace period: the flag wins over the config's `launch:`,
    and both reach torchrun's --shutdown-timeout and the plan (a cancel waits as long)."""
    cfg = quickstart_config(tmp_path, "launch:\n  stop_grace: 90s\n")
    from_config = launch("train", str(cfg), "--dry-run", check=True).stdout
    assert plan_row(from_config, "stop grace") == "90 s to save and upload after a stop"
    assert "--shutdown-timeout 90 -m payload train" in from_config
    from_flag = launch("train", str(cfg), "--stop-grace", "5m", "--dry-run", check=True).stdout
    assert "--shutdown-timeout 300 -m payload train" in from_flag
    job, _ = api.prepare(cfg, stop_grace="5m")
    assert job.resources.stop_grace_s == 300
    bad = launch("train", str(cfg), "--stop-grace", "soon", "--dry-run")
    assert bad.returncode == 1 and "--stop-grace: 'soon' is not a duration" in bad.stderr
