"""Who am I in this job: the node's rank, how many nodes there are, and where they meet.
Then the one function that turns it into torchrun's arguments, for every backend.

A job names how its nodes find each other (`RemoteJob.cluster`):

    single     one node: torchrun's standalone rendezvous
    static     a list of hosts in rank order; this node's rank from FERRY_NODE_RANK
    modal      modal.Cluster.from_context() in a `modal.clustered` function
    skypilot   SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES,
               SKYPILOT_NUM_GPUS_PER_NODE, which SkyPilot sets on every node

A job of several nodes that finds no cluster, or a cluster of another size, stops at
once with a ClusterError (exit 1): it never falls back to one node, which would start
N separate trainings writing into one storage prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from payload.errors import FerryError
from payload.runtime.job import RemoteJob


class ClusterError(FerryError):
    """The job's nodes cannot find each other as the job says they should."""


@dataclass(frozen=True)
class Node:
    """This node's place in the job. `rank` and `master_addr` are text placeholders
    only in a plan (`<container rank>`), never in a running job."""

    rank: int | str
    nodes: int
    master_addr: str | None  # the first node's address; None for one node

    @property
    def standalone(self) -> bool:
        return self.nodes == 1


SINGLE = Node(rank=0, nodes=1, master_addr=None)


def static_hosts(hosts: list[str], rank: int) -> Node:
    if not 0 <= rank < len(hosts):
        raise ClusterError(f"node rank {rank} is outside the {len(hosts)} hosts {hosts}")
    return Node(rank=rank, nodes=len(hosts), master_addr=hosts[0])


def skypilot_node(env: Mapping[str, str]) -> Node | None:
    """This node as SkyPilot describes it, or None outside a SkyPilot task."""
    if "SKYPILOT_NODE_RANK" not in env:
        return None
    ips = [ip.strip() for ip in env.get("SKYPILOT_NODE_IPS", "").splitlines() if ip.strip()]
    try:
        rank = int(env["SKYPILOT_NODE_RANK"])
        nodes = int(env.get("SKYPILOT_NUM_NODES", len(ips) or 1))
    except ValueError as e:
        raise ClusterError(f"SkyPilot's node variables are not numbers: {e}") from e
    if len(ips) != nodes:
        raise ClusterError(
            f"SKYPILOT_NUM_NODES is {nodes} but SKYPILOT_NODE_IPS lists {len(ips)} addresses"
        )
    return Node(rank=rank, nodes=nodes, master_addr=ips[0] if nodes > 1 else None)


def modal_node() -> Node | None:
    """This container's place in its `modal.clustered` group, or None when it runs
    alone. Only the "not in a cluster" answer means alone; any other failure is raised."""
    import modal
    from modal.exception import InvalidError

    try:
        cluster = modal.Cluster.from_context()
    except InvalidError:  # documented: raised outside an initialized clustered execution
        return None
    ips = list(cluster.container_ips())
    return Node(rank=int(cluster.container_rank()), nodes=len(ips), master_addr=ips[0])


def discover(job: RemoteJob, env: Mapping[str, str]) -> Node:
    """Where this node sits in `job`, from the provider the job names; checked against
    the job's node count."""
    if job.cluster == "single":
        found: Node | None = SINGLE if job.nodes == 1 else None
    elif job.cluster == "static":
        if job.nodes > 1 and "FERRY_NODE_RANK" not in env:
            raise ClusterError(
                f"run {job.run_id} runs on {job.nodes} static hosts, but FERRY_NODE_RANK does "
                "not say which of them this is; every node would take rank 0."
            )
        try:
            rank = int(env.get("FERRY_NODE_RANK", "0"))
        except ValueError as e:
            raise ClusterError(f"FERRY_NODE_RANK is not a number: {e}") from e
        found = static_hosts(job.hosts, rank)
    elif job.cluster == "skypilot":
        found = skypilot_node(env)
        gpus = env.get("SKYPILOT_NUM_GPUS_PER_NODE")
        expected = job.procs_per_node
        if found and gpus and gpus.isdigit() and int(gpus) not in (0, expected):
            expected += _server_gpus(job)  # only asked when the plain count differs
            if int(gpus) != expected:
                raise ClusterError(
                    f"the job runs {job.procs_per_node} processes per node but SkyPilot gave "
                    f"this node {gpus} GPUs"
                )
    else:
        found = modal_node()
    if found is None:
        if job.nodes == 1:
            return SINGLE
        raise ClusterError(
            f"run {job.run_id} asks for {job.nodes} nodes, but this container found no "
            f"{job.cluster} cluster around it. Refusing to train on one node: {job.nodes} "
            "separate runs would write into one storage prefix."
        )
    if found.nodes != job.nodes:
        raise ClusterError(
            f"run {job.run_id} asks for {job.nodes} nodes, but its {job.cluster} cluster has "
            f"{found.nodes}."
        )
    return found


def _server_gpus(job: RemoteJob) -> int:
    """GPUs per node the job's own vLLM server takes besides its training processes
    (payload.config.vllm)."""
    from payload.config.vllm import reserved_gpus
    from payload.plugins import config_class_for

    try:
        return reserved_gpus(config_class_for(job.config).model_validate(job.config))
    except ValueError:  # pydantic's ValidationError: the ranks will say what is wrong
        return 0


def torchrun_args(
    procs_per_node: int,
    node: Node,
    master_port: int | str,
    stop_grace_s: int | None = None,
) -> list[str]:
    """torchrun's arguments for this node. One node: a standalone rendezvous. Several:
    a static rendezvous at the first node's address. `stop_grace_s` is how long torchrun
    lets its workers save and upload after a stop signal before it kills them (its own
    default is 30 s, too short for a big checkpoint)."""
    if node.standalone:
        args = ["--standalone"]
    else:
        args = [
            "--nnodes",
            str(node.nodes),
            "--node-rank",
            str(node.rank),
            "--master-addr",
            str(node.master_addr),
            "--master-port",
            str(master_port),
        ]
    args += ["--nproc-per-node", str(procs_per_node)]
    if stop_grace_s is not None:
        args += ["--shutdown-timeout", str(stop_grace_s)]
    return args


def job_torchrun_args(job: RemoteJob, node: Node) -> list[str]:
    return torchrun_args(job.procs_per_node, node, job.master_port, job.stop_grace_s)
