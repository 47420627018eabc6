"""The vLLM server a GRPO job starts itself: when there is one, what it takes of a node,
and where the trainer finds it. Validation, the executors' checks and plans, the job's
start (payload.runtime.vllm_server) and the GRPO recipe all read it from here.

`trl.vllm_mode: server` generates with a vLLM server instead of inside the training
processes. When `trl.vllm_server_host` names another machine, that server is the user's
to run. When it is unset or names this machine (127.0.0.1, localhost, 0.0.0.0, which is
also Axolotl's default), the job starts the server itself, on the node that trains:

- it takes `vllm.tensor_parallel_size` x `vllm.data_parallel_size` GPUs (default 1),
  the node's last ones; the training ranks take the rest, so `--gpus 4` with tensor
  parallel 2 runs 2 training ranks. One node only: torchrun starts the same number of
  ranks on every node, so GPUs kept on the first node would sit idle on the others.
- it binds `vllm.host` (default 127.0.0.1: only this node needs it; 0.0.0.0 opens it
  to other machines too) at one port, `vllm.port` or `trl.vllm_server_port` (the same
  setting under Axolotl's two names: set both and they must agree; default 8000);
- the trainer connects to it on this node's loopback address, whatever the bind address.

Torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from payload.config.schema import TrainConfig

# Addresses that mean "this machine" to a client: a server there is the job's own.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0")
# Addresses the self-started server may bind: all of them include the loopback address
# the trainer connects to.
BIND_HOSTS = LOCAL_HOSTS
DEFAULT_PORT = 8000  # `trl vllm-serve`'s and GRPOConfig's
DEFAULT_TIMEOUT_S = 240.0  # GRPOConfig.vllm_server_timeout's default


def self_started(cfg: TrainConfig) -> bool:
    """Does this job start its own vLLM server (GRPO, `use_vllm`, server mode, and no
    other machine named)?"""
    trl = cfg.trl
    return bool(
        (cfg.rl or "").lower() == "grpo"
        and trl is not None
        and trl.use_vllm
        and trl.vllm_mode == "server"
        and (trl.vllm_server_host is None or trl.vllm_server_host in LOCAL_HOSTS)
    )


def parallel_sizes(cfg: TrainConfig) -> tuple[int, int]:
    """The server's (tensor parallel, data parallel) sizes."""
    v = cfg.vllm
    return (v.tensor_parallel_size or 1, v.data_parallel_size or 1) if v else (1, 1)


def reserved_gpus(cfg: TrainConfig) -> int:
    """GPUs per node the job keeps for its own server (0: it starts none)."""
    if not self_started(cfg):
        return 0
    tp, dp = parallel_sizes(cfg)
    return tp * dp


def training_procs(cfg: TrainConfig, gpus_per_node: int) -> int:
    """Training processes per node on a node of `gpus_per_node` GPUs (never below 1:
    a job with nothing left to train on is refused by `split_problems` first)."""
    return max(gpus_per_node - reserved_gpus(cfg), 1)


def server_port(cfg: TrainConfig) -> int:
    v, trl = cfg.vllm, cfg.trl
    return (v and v.port) or (trl and trl.vllm_server_port) or DEFAULT_PORT


def bind_host(cfg: TrainConfig) -> str:
    return (cfg.vllm and cfg.vllm.host) or "127.0.0.1"


def connect_host(cfg: TrainConfig) -> str:
    """Where the trainer reaches the server: the loopback address, which every address in
    BIND_HOSTS includes (`localhost` is kept as written: it may resolve to ::1 only)."""
    return "localhost" if bind_host(cfg) == "localhost" else "127.0.0.1"


def ready_timeout_s(cfg: TrainConfig) -> float:
    """How long the job waits for the server to answer before it gives up."""
    return (cfg.trl and cfg.trl.vllm_server_timeout) or DEFAULT_TIMEOUT_S


def describe_reserved(cfg: TrainConfig) -> str:
    tp, dp = parallel_sizes(cfg)
    n = tp * dp
    return (
        f"{n} GPU{'s' if n != 1 else ''} (vllm.tensor_parallel_size {tp} x "
        f"vllm.data_parallel_size {dp})"
    )


def split_problems(cfg: TrainConfig, gpus_per_node: int, nodes: int) -> list[str]:
    """Why a job of `nodes` nodes with `gpus_per_node` GPUs each cannot hold its own
    server and still train; empty when it can, or when it starts no server."""
    reserved = reserved_gpus(cfg)
    if not reserved:
        return []
    problems = []
    if nodes > 1:
        problems.append(
            f"the vLLM server this job starts itself (`trl.vllm_mode: server` without a "
            f"`trl.vllm_server_host` on another machine) runs on one node, and this run asks "
            f"for {nodes}. Train on one node (--nodes 1), or start the server yourself and set "
            "`trl.vllm_server_host` to its address."
        )
    if gpus_per_node <= reserved:
        problems.append(
            f"the vLLM server this job starts takes {describe_reserved(cfg)} and training "
            f"needs at least one more, but the run asks for {gpus_per_node} per node. Ask for "
            f"--gpus {reserved + 1} or more ({reserved} to serve, the rest to train), or make "
            "the server smaller."
        )
    return problems


def split_rows(cfg: TrainConfig, gpus_per_node: int) -> list[tuple[str, str]]:
    """A plan's rows for the split of each node's GPUs (none when no server is started)."""
    reserved = reserved_gpus(cfg)
    if not reserved:
        return []
    train = gpus_per_node - reserved

    def gpus(first: int, count: int) -> str:
        return ",".join(str(i) for i in range(first, first + count))

    return [
        ("train", f"GPUs {gpus(0, train)}: {train} training rank{'s' * (train != 1)}"),
        ("vllm server", f"GPUs {gpus(train, reserved)}: {describe_reserved(cfg)}"),
        (
            "vllm url",
            f"http://{connect_host(cfg)}:{server_port(cfg)} (bound on {bind_host(cfg)}; "
            f"ready within {ready_timeout_s(cfg):g} s or the run fails)",
        ),
    ]
