"""A job of two nodes whose disks are separate: each node uploads its share of every
checkpoint, and rank 0 completes it only once both shares are in.

The two "nodes" run on this machine, each as a backend's container runs one (`python -m
payload.entry run JOB.json`, static cluster, hosts 127.0.0.1 twice, FERRY_NODE_RANK 0
and 1, one process each: world size 2), each with a working folder of its own that
stands in for its disk, both syncing to one file:// store. Their losses must equal a
1-process run over the same global batch (the reference, trained beside them). Then
both "machines" are wiped and relaunched: each downloads the whole checkpoint and the
run continues from it, still equal to the reference.

The manifest rules (payload.storage.parts) are also tested alone, on a folder store:
conflicting files and missing or failed nodes leave the checkpoint incomplete, with
errors that name the file or the node.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ASSETS, DATA, ROOT, make_folder

from payload.errors import TransferError
from payload.runtime.job import RemoteJob
from payload.storage import MANIFEST, download_folder, latest_complete_checkpoint, open_store
from payload.storage.layout import read_metrics
from payload.storage.parts import Part, complete_from_parts, part_key, upload_part
from payload.storage.stores import FileStore
from payload.storage.sync import read_manifest

FIRST, LAST = 4, 6  # the first attempt stops at step 4 (its checkpoint), the relaunch at 6
CKPT = f"checkpoints/checkpoint-{FIRST}"


def _config(out: Path, steps: int, micro_batch_size: int) -> dict:
    """LoRA on the tiny Llama, fp32, constant learning rate (the two attempts' schedules
    are then the reference's whatever max_steps says), no dropout (its draws depend on
    the batch split)."""
    return {
        "base_model": str(ASSETS / "tiny-llama"),
        "datasets": [{"path": str(DATA), "type": "alpaca"}],
        "sequence_len": 128,
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "micro_batch_size": micro_batch_size,
        "max_steps": steps,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "seed": 42,
        "logging_steps": 1,
        "save_steps": 2,
        "output_dir": str(out),
    }


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(tmp: Path, storage: str, steps: int, reference: Path | None = None) -> list[str]:
    """Both nodes of one attempt, as each node's container starts it, plus (optionally)
    the 1-process reference beside them; each node's output, in node order."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        disk = tmp / f"node-{node}"
        job = RemoteJob(
            run_id="multinode-test",
            config=_config(disk / "out", steps, micro_batch_size=2),
            storage_uri=storage,
            nodes=2,
            cluster="static",
            hosts=["127.0.0.1", "127.0.0.1"],
            workdir=str(disk),
            stop_grace_s=30,
            master_port=port,
        )
        path = tmp / f"job-{node}.json"
        path.write_text(job.to_json())
        argv = [sys.executable, "-m", "payload.entry", "run", str(path)]
        procs.append(subprocess.Popen(argv, **_pipes(_env(FERRY_NODE_RANK=str(node)))))
    if reference is not None:
        cfg = reference / "reference.json"  # JSON is YAML
        cfg.write_text(json.dumps(_config(reference / "out", LAST, micro_batch_size=4)))
        argv = [sys.executable, "-m", "payload", "train", str(cfg)]
        procs.append(subprocess.Popen(argv, **_pipes(_env())))
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-4000:]
        outputs.append(out)
    return outputs[:2]


def _pipes(env: dict[str, str]) -> dict:
    return {
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT,
        "text": True,
        "env": env,
        "cwd": ROOT,
    }


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Attempt 1 (to step FIRST) on two nodes beside the reference, a snapshot of what
    each node's disk and the store hold, then both disks wiped and attempt 2 (to LAST)."""
    import shutil

    tmp = tmp_path_factory.mktemp("multinode")
    (tmp / "reference").mkdir()
    storage = (tmp / "storage").as_uri()
    first = _two_nodes(tmp, storage, FIRST, reference=tmp / "reference")
    store = open_store(storage)
    after_first = {
        "manifest": read_manifest(store, CKPT),
        "parts": {n: store.read_bytes(part_key(CKPT, n)) for n in (0, 1)},
        "disks": {
            n: sorted(p.name for p in (tmp / f"node-{n}" / "out" / f"checkpoint-{FIRST}").iterdir())
            for n in (0, 1)
        },
        "losses": _losses(tmp / "node-0" / "out"),
    }
    for node in (0, 1):  # the next attempt's machines start with nothing but storage
        shutil.rmtree(tmp / f"node-{node}")
    second = _two_nodes(tmp, storage, LAST)
    return {
        "tmp": tmp,
        "store": store,
        "first": first,
        "second": second,
        "after_first": after_first,
        "reference": _losses(tmp / "reference" / "out"),
    }


@pytest.mark.slow
def test_two_nodes_train_as_one_job_equal_to_one_process(two_nodes):
    """Both nodes joined one process group of 2 (the log says so) and trained on the
    global batch: a 1-process run with micro_batch_size 4 gives the same losses within
    1e-5. A failure means the nodes trained apart, or the resume changed the math."""
    assert "| 2 x cpu (gloo)" in two_nodes["first"][0], two_nodes["first"][0][-3000:]
    reference = two_nodes["reference"]
    assert sorted(reference) == list(range(1, LAST + 1))
    first = two_nodes["after_first"]["losses"]
    assert sorted(first) == list(range(1, FIRST + 1))
    for step, loss in first.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), f"step {step}"
    resumed = _losses(two_nodes["tmp"] / "node-0" / "out")
    for step in range(FIRST + 1, LAST + 1):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), f"step {step}"


@pytest.mark.slow
def test_the_checkpoint_holds_both_nodes_files(two_nodes):
    """Node 1's disk held only its own RNG state; the stored checkpoint holds both
    nodes' (rng_state_0 and rng_state_1) with the adapter, each node's part record lists
    what that node uploaded. A failure means a node's share never reached storage while
    the manifest says the checkpoint is complete (issue 12)."""
    seen = two_nodes["after_first"]
    assert seen["disks"][1] == ["rng_state_1.pth"], seen["disks"]
    assert {"rng_state_0.pth", "adapter_model.safetensors"} <= set(seen["disks"][0])
    listed = {f.path for f in seen["manifest"].files}
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= listed, listed
    assert "trainer_state.json" in listed
    assert all(seen["parts"].values()), f"part records missing: {seen['parts']}"
    parts = {n: Part.from_json(data, CKPT) for n, data in seen["parts"].items()}
    assert [f.path for f in parts[1].files] == ["rng_state_1.pth"]
    assert "rng_state_1.pth" not in {f.path for f in parts[0].files}
    assert parts[0].attempt == parts[1].attempt and not parts[0].error and not parts[1].error
    assert listed == {f.path for p in parts.values() for f in p.files}


@pytest.mark.slow
def test_a_relaunch_resumes_on_both_nodes_from_the_whole_checkpoint(two_nodes):
    """Both wiped nodes downloaded the whole checkpoint (each disk now has both RNG
    states), rank 0 says it resumed at step FIRST, and the run finished with its last
    checkpoint complete and its final adapter stored."""
    assert f"resuming from step {FIRST}" in two_nodes["second"][0]
    for node in (0, 1):
        folder = two_nodes["tmp"] / f"node-{node}" / "out" / f"checkpoint-{FIRST}"
        assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= {
            p.name for p in folder.iterdir()
        }, node
    store = two_nodes["store"]
    assert latest_complete_checkpoint(store).step == LAST
    assert "final/adapter_model.safetensors" in store.list("final")


# ---- the manifest rules, on a folder store


def test_parts_merge_into_one_manifest_that_downloads_whole(tmp_path):
    """Two nodes' parts: a file both hold alike is taken once, the manifest is their
    union (not the part records), and the checkpoint downloads whole."""
    store = FileStore(tmp_path / "store")
    shared = {"trainer_state.json": 300}
    a = make_folder(tmp_path / "a", {**shared, "rng_state_0.pth": 1_000})
    make_folder(tmp_path / "b", shared)
    b = make_folder(tmp_path / "b", {"rng_state_1.pth": 900}, seed=1)
    upload_part(a, store, CKPT, 0, "try-1")
    assert read_manifest(store, CKPT) is None  # one part: not complete
    upload_part(b, store, CKPT, 1, "try-1")
    manifest = complete_from_parts(
        store, CKPT, 2, "try-1", run_id="r", step=FIRST, timeout_s=5, poll_s=0.01
    )
    assert [f.path for f in manifest.files] == [
        "rng_state_0.pth",
        "rng_state_1.pth",
        "trainer_state.json",
    ]
    got = download_folder(store, CKPT, tmp_path / "got")
    assert (tmp_path / "got" / "rng_state_1.pth").read_bytes() == (
        b / "rng_state_1.pth"
    ).read_bytes()
    assert got.step == FIRST and not (tmp_path / "got" / ".parts").exists()


def test_a_file_two_nodes_hold_differently_is_refused_by_name(tmp_path):
    """A path with different contents on two nodes would make the checkpoint whatever
    upload landed last: refused, naming the file and both nodes, no manifest."""
    store = FileStore(tmp_path / "store")
    upload_part(make_folder(tmp_path / "a", {"optimizer.pt": 500}), store, CKPT, 0, "t")
    upload_part(make_folder(tmp_path / "b", {"optimizer.pt": 500}, seed=7), store, CKPT, 1, "t")
    with pytest.raises(
        TransferError,
        match=r"checkpoint-4/optimizer.pt differs between nodes: "
        r"node 0 has 500 bytes .* node 1 500 bytes",
    ):
        complete_from_parts(store, CKPT, 2, "t", run_id=None, step=4, timeout_s=5, poll_s=0.01)
    assert store.read_bytes(f"{CKPT}/{MANIFEST}") is None


def test_a_missing_node_part_fails_the_bounded_wait_naming_the_node(tmp_path):
    """Rank 0 waits for node 1 only while something arrives: with nothing for the
    timeout (0.3 s here), it fails naming node 1, and a part a dead attempt left is not
    taken for this attempt's. No manifest: a relaunch never resumes from it."""
    store = FileStore(tmp_path / "store")
    upload_part(make_folder(tmp_path / "a", {"rng_state_0.pth": 100}), store, CKPT, 0, "now")
    upload_part(make_folder(tmp_path / "b", {"rng_state_1.pth": 100}), store, CKPT, 1, "dead")
    with pytest.raises(TransferError, match=r"node\(s\) 1 did not upload their part"):
        complete_from_parts(store, CKPT, 2, "now", run_id=None, step=4, timeout_s=0.3, poll_s=0.02)
    assert latest_complete_checkpoint(store) is None


def test_a_node_whose_upload_fails_says_so_and_rank_0_names_it(tmp_path):
    """Node 1's store refuses its file: its upload raises there, its part record says
    why, and rank 0 stops waiting at once with node 1's error."""

    class Refusing(FileStore):
        def put_file(self, local: Path, key: str, sha256: str) -> None:
            raise PermissionError(f"write to {key} denied")

    store = FileStore(tmp_path / "store")
    upload_part(make_folder(tmp_path / "a", {"rng_state_0.pth": 100}), store, CKPT, 0, "t")
    with pytest.raises(PermissionError):
        upload_part(
            make_folder(tmp_path / "b", {"rng_state_1.pth": 100}),
            Refusing(tmp_path / "store"),
            CKPT,
            1,
            "t",
        )
    with pytest.raises(
        TransferError,
        match=r"node 1 could not upload its files: "
        r"PermissionError: write to .*rng_state_1.pth denied",
    ):
        complete_from_parts(store, CKPT, 2, "t", run_id=None, step=4, timeout_s=60, poll_s=0.01)
    assert store.read_bytes(f"{CKPT}/{MANIFEST}") is None


# ---- the shipped example


def test_the_multinode_example_plans_two_nodes_and_local_refuses_it():
    """examples/fsdp2_multinode.yml validates and plans as 2 clustered Modal containers
    of 8 GPUs, each running torchrun with a static rendezvous at the first; the local
    backend, one machine, refuses it and says why."""
    from helpers import launch, plan_row

    example = "examples/fsdp2_multinode.yml"
    launch("validate", example, check=True)
    plan = launch("train", example, "--cloud", "modal", "--dry-run", check=True).stdout
    assert plan_row(plan, "nodes").startswith("2 (modal.clustered")
    assert plan_row(plan, "gpu") == "H100:8"
    assert "--nnodes 2 --node-rank '<container rank>'" in plan_row(plan, "command")
    assert "--nproc-per-node 8" in plan_row(plan, "command")
    local = launch("train", example, "--cloud", "local", "--dry-run")
    assert local.returncode == 1
    assert "the local backend runs on this machine only; nodes must be 1" in local.stderr
