"""The job contract and the cluster layer: what a remote container is told, and how each
node finds its place in the job. Pure functions of their inputs; the cluster providers
read the variables each platform sets, given here as the platform would set them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import ROOT, quickstart_config

from executors.base import remote_job
from launcher import api
from payload.errors import FerryError
from payload.runtime.cluster import (
    SINGLE,
    ClusterError,
    Node,
    discover,
    job_torchrun_args,
    skypilot_node,
    static_hosts,
    torchrun_args,
)
from payload.runtime.job import MASTER_PORT, RemoteJob, secret_like

SECRET = "hf_live_9f8e7dSECRETvalue"


def _job(**fields) -> RemoteJob:
    return RemoteJob(**{"run_id": "r-1", "config": {"base_model": "m"}, **fields})


def test_the_job_round_trips_through_json_with_every_field():
    job = _job(
        storage_uri="s3://b/runs/r-1",
        env={"WANDB_MODE": "offline"},
        nodes=2,
        procs_per_node=8,
        cluster="static",
        hosts=["10.0.0.1", "10.0.0.2"],
        volume_mounts={"ferry-runs": "/vol/ferry-runs"},
        stop_grace_s=300,
        master_port=29511,
    )
    text = job.to_json()
    assert RemoteJob.from_json(text) == job
    data = json.loads(text)
    assert data["version"] == 1 and data["workdir"] == "/tmp/ferry/r-1"
    assert set(data) == {
        "version",
        "run_id",
        "config",
        "storage_uri",
        "env",
        "nodes",
        "procs_per_node",
        "cluster",
        "hosts",
        "volume_mounts",
        "workdir",
        "stop_grace_s",
        "master_port",
    }


def test_a_job_from_another_version_or_with_unknown_fields_is_refused_clearly():
    data = json.loads(_job().to_json())
    with pytest.raises(FerryError, match="out of step"):
        RemoteJob.from_json(json.dumps({**data, "version": 2}))
    with pytest.raises(FerryError, match="does not know: secrets"):
        RemoteJob.from_json(json.dumps({**data, "secrets": {"HF_TOKEN": SECRET}}))
    with pytest.raises(FerryError, match="not valid JSON"):
        RemoteJob.from_json("{")
    with pytest.raises(FerryError, match="nodes should be int, not str"):
        RemoteJob.from_json(json.dumps({**data, "nodes": "2"}))


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("HF_TOKEN", True),
        ("WANDB_API_KEY", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("AWS_ACCESS_KEY_ID", True),
        ("MODAL_TOKEN_SECRET", True),
        ("db_password", True),
        ("TOKENIZERS_PARALLELISM", False),
        ("WANDB_MODE", False),
        ("HF_HOME", False),
        ("SORT_KEY", False),
    ],
)
def test_secret_names_are_told_by_whole_words(name, secret):
    assert secret_like(name) is secret


def test_no_secret_value_can_enter_a_job(tmp_path, monkeypatch):
    """Three ways a secret could travel: by a secret-looking name in env (refused when the
    job is made), by any name or inside the config (refused against the launching
    machine's secret variables), and by `--secret NAME` (only the name is used, never
    looked up). What the launcher builds for a job with secrets holds no value."""
    with pytest.raises(FerryError, match="HF_TOKEN: looks like a credential"):
        _job(env={"HF_TOKEN": SECRET})
    laptop = {"HF_TOKEN": SECRET, "HOME": "/home/me"}
    with pytest.raises(FerryError, match="The value of HF_TOKEN appears") as info:
        _job(env={"EXTRA": SECRET}).check_no_secret_values(laptop)
    assert SECRET not in str(info.value)  # the error names the variable, not the value
    with pytest.raises(FerryError, match="The value of HF_TOKEN appears"):
        _job(config={"base_model": "m", "hub_note": f"token={SECRET}"}).check_no_secret_values(
            laptop
        )
    quoted = 'p"w\\d\u00e9-secret'  # JSON escapes it: the check reads values, not the text
    with pytest.raises(FerryError, match="The value of DB_PASSWORD appears"):
        _job(config={"base_model": "m", "dsn": f"x:{quoted}@h"}).check_no_secret_values(
            {"DB_PASSWORD": quoted}
        )

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET + "aws")
    job, _ = api.prepare(
        quickstart_config(tmp_path), cloud="modal", gpus="H100:1", secrets=["hf", "aws"]
    )
    text = remote_job(job, job.config, "single").to_json()
    assert SECRET not in text and "hf" not in json.loads(text)["env"]


def test_launch_env_refuses_a_secret_name_at_validate_time(tmp_path):
    cfg = quickstart_config(tmp_path, f"launch:\n  env:\n    HF_TOKEN: {SECRET}\n")
    with pytest.raises(
        FerryError, match=r"launch.env: would carry a credential .*\(HF_TOKEN\)"
    ) as info:
        api.validate(cfg)
    assert SECRET not in str(info.value)  # not echoed back either


def test_one_node_is_a_standalone_rendezvous():
    assert torchrun_args(4, SINGLE, MASTER_PORT, 120) == [
        "--standalone",
        "--nproc-per-node",
        "4",
        "--shutdown-timeout",
        "120",
    ]
    assert discover(_job(), {}) == SINGLE


class FakeModalCluster:
    """modal.Cluster.from_context() exists only inside a Modal cluster; this answers the
    two questions Ferry asks of it, as rank 1 of 2 would."""

    def container_rank(self) -> int:
        return 1

    def container_ips(self) -> list[str]:
        return ["fd00::a", "fd00::b"]


def test_modal_cluster_context_rank_1_of_2(monkeypatch):
    import modal

    monkeypatch.setattr(modal.Cluster, "from_context", staticmethod(FakeModalCluster))
    job = _job(nodes=2, procs_per_node=8, cluster="modal", stop_grace_s=90)
    node = discover(job, {})
    assert node == Node(rank=1, nodes=2, master_addr="fd00::a")
    assert job_torchrun_args(job, node) == [
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "fd00::a",
        "--master-port",
        str(MASTER_PORT),
        "--nproc-per-node",
        "8",
        "--shutdown-timeout",
        "90",
    ]


def test_outside_a_modal_cluster_is_one_node_only_for_a_one_node_job():
    """The real SDK, outside a cluster: from_context raises InvalidError."""
    assert discover(_job(cluster="modal"), {}) == SINGLE
    with pytest.raises(ClusterError, match="asks for 2 nodes, but this container found no modal"):
        discover(_job(nodes=2, cluster="modal"), {})


SKY = {
    "SKYPILOT_NODE_IPS": "10.1.0.5\n10.1.0.6\n",
    "SKYPILOT_NUM_NODES": "2",
    "SKYPILOT_NUM_GPUS_PER_NODE": "8",
}


@pytest.mark.parametrize("rank", [0, 1])
def test_skypilot_variables_give_each_node_its_rank_and_the_first_node(rank):
    job = _job(nodes=2, procs_per_node=8, cluster="skypilot")
    node = discover(job, {**SKY, "SKYPILOT_NODE_RANK": str(rank)})
    assert node == Node(rank=rank, nodes=2, master_addr="10.1.0.5")
    args = job_torchrun_args(job, node)
    assert args[args.index("--node-rank") + 1] == str(rank)
    assert args[args.index("--master-addr") + 1] == "10.1.0.5"


def test_skypilot_mismatches_are_refused():
    env = {**SKY, "SKYPILOT_NODE_RANK": "0"}
    with pytest.raises(ClusterError, match="SkyPilot gave this node 8 GPUs"):
        discover(_job(nodes=2, procs_per_node=4, cluster="skypilot"), env)
    with pytest.raises(ClusterError, match="asks for 3 nodes, but its skypilot cluster has 2"):
        discover(_job(nodes=3, procs_per_node=8, cluster="skypilot"), env)
    with pytest.raises(ClusterError, match="lists 1 addresses"):
        skypilot_node(
            {"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": "a"}
        )


def test_a_static_host_list():
    job = _job(nodes=3, cluster="static", hosts=["h0", "h1", "h2"], procs_per_node=2)
    node = discover(job, {"FERRY_NODE_RANK": "2"})
    assert node == Node(rank=2, nodes=3, master_addr="h0")
    assert "--node-rank" in job_torchrun_args(job, node)
    with pytest.raises(ClusterError, match="outside the 3 hosts"):
        static_hosts(["h0", "h1", "h2"], 3)
    with pytest.raises(FerryError, match="needs 3 hosts"):
        _job(nodes=3, cluster="static", hosts=["h0"])


@pytest.mark.parametrize("cluster", ["single", "skypilot"])
def test_two_nodes_without_a_cluster_fail_at_once_and_never_fall_back_to_one(cluster):
    with pytest.raises(ClusterError, match="Refusing to train on one node"):
        discover(_job(nodes=2, cluster=cluster), {})


def test_torchrun_arguments_are_built_in_one_place():
    """Every backend gets torchrun's arguments from payload.runtime.cluster. A second
    place that spells out the rendezvous port or `--master-port` fails this test."""
    owner = Path("payload/runtime/cluster.py")
    port_owner = Path("payload/runtime/job.py")
    found = []
    for folder in ("launcher", "executors", "payload", "images"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            text = path.read_text()
            for flag in ("--master-port", "--master_port", "--nnodes", "--node-rank"):
                if flag in text and rel != owner:
                    found.append(f"{rel}: {flag}")
            if re.search(r"\b29500\b", text) and rel != port_owner:
                found.append(f"{rel}: 29500")
            if re.search(r"/tmp/ferry/", text) and rel != port_owner:
                found.append(f"{rel}: /tmp/ferry/")
    assert found == []
