"""Running a job in a container a backend started with a Python call (Modal today).

The backend calls `run_job(job)` in every container of the job; it writes the resolved
config, sets the environment contract (FERRY_RUN_ID, FERRY_STORAGE_URI, mounted
volumes), works out torchrun's arguments from the cluster it is part of, and runs the
same command as every other backend:

    python -m payload.torchrun <rendezvous args> -m payload train <config>

Standard library only at import: this module is imported where nothing else is yet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

MASTER_PORT = 29500


class Cluster(Protocol):
    """What Ferry needs of a cluster context (modal.Cluster.from_context())."""

    def container_rank(self) -> int: ...

    def container_ips(self) -> list[str]: ...


def cluster_context() -> Cluster | None:
    """This container's cluster, or None when it runs alone (no cluster context)."""
    try:
        import modal

        return modal.Cluster.from_context()
    except Exception:  # noqa: BLE001 - not in a cluster (or no Modal at all): one node
        return None


def torchrun_args(nodes: int, gpus_per_node: int, cluster: Cluster | None) -> list[str]:
    """torchrun's rendezvous arguments: the cluster's rank and first container's IP for a
    multi-node job, a standalone rendezvous for one node (also the fallback when a
    multi-node job finds no cluster context, e.g. when run in-process)."""
    per_node = ["--nproc-per-node", str(gpus_per_node)]
    if nodes <= 1 or cluster is None:
        return ["--standalone", *per_node]
    ips = list(cluster.container_ips())
    rank = cluster.container_rank()
    if len(ips) != nodes:
        raise RuntimeError(f"expected a cluster of {nodes} containers, found {len(ips)}: {ips}")
    master = ips[0]
    return [
        "--nnodes",
        str(nodes),
        "--node-rank",
        str(rank),
        "--master-addr",
        master,
        "--master-port",
        str(MASTER_PORT),
        *per_node,
    ]


def run_job(job: dict[str, Any], cluster: Cluster | None = None) -> int:
    """Train one job here; returns the exit code (0, 1, or 75 after a SIGTERM stop).

    `job` is what the launcher sent: run_id, config (with container paths), storage_uri,
    env, nodes, gpus_per_node, volume_mounts {name: path}."""
    import yaml

    run_id = job["run_id"]
    workdir = Path(job.get("workdir") or f"/tmp/ferry/{run_id}")
    workdir.mkdir(parents=True, exist_ok=True)
    config = dict(job["config"])
    config.setdefault("output_dir", str(workdir / "output"))
    config_path = workdir / "config.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    env = {**os.environ, **job.get("env", {}), "FERRY_RUN_ID": run_id}
    if job.get("storage_uri"):
        env["FERRY_STORAGE_URI"] = job["storage_uri"]
    mounts = job.get("volume_mounts") or {}
    if mounts:
        env["FERRY_VOLUME_MOUNTS"] = ",".join(f"{k}={v}" for k, v in mounts.items())
    if cluster is None and job.get("nodes", 1) > 1:
        cluster = cluster_context()
    args = torchrun_args(job.get("nodes", 1), job.get("gpus_per_node", 1), cluster)
    command = [
        sys.executable,
        "-m",
        "payload.torchrun",
        *args,
        "-m",
        "payload",
        "train",
        str(config_path),
    ]
    print(f"ferry: {' '.join(command)}", flush=True)
    process = subprocess.Popen(command, env=env)
    # The platform's preemption notice reaches this process; torchrun must hear it too.
    # (Signal handlers can only be set from the main thread.)
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
    except ValueError:
        previous = None
    try:
        return process.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
