"""The vLLM server a GRPO job starts itself (payload.config.vllm says when), run by the
node's torchrun wrapper (payload.entry.torchrun) around the training ranks:

1. The node's GPUs split: the last `reserved` ones (vllm.tensor_parallel_size x
   data_parallel_size) serve, the first ones train. "The node's GPUs" are those in
   CUDA_VISIBLE_DEVICES when it is set, else 0..N-1.
2. The server starts: `python -m trl.scripts.vllm_serve --model BASE_MODEL ...` (TRL's
   `trl vllm-serve`, which adds the flags TRL's client needs and execs vLLM's own
   server in the same process), in a session of its own, with CUDA_VISIBLE_DEVICES =
   its GPUs. Each line it prints goes to the run's log as `[vllm] ...`.
3. The wrapper waits for its /health to answer 200, at most `trl.vllm_server_timeout`
   seconds (240). If it exits first, or the time runs out, the run fails with one
   paragraph and the server's last lines, and no training rank starts.
4. The ranks start with CUDA_VISIBLE_DEVICES = the other GPUs.
5. However training ends (done, failed, SIGTERM/SIGINT to the job), the server's process
   group and every descendant get SIGTERM, then SIGKILL after STOP_GRACE_S. On Linux
   the server also gets SIGTERM from the kernel if the wrapper itself dies.

Standard library only (and the torch-free config).
"""

from __future__ import annotations

import collections
import errno
import http.client
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from payload.config import vllm
from payload.config.schema import TrainConfig, VllmConfig
from payload.errors import EXIT_FAILED, FerryError
from payload.runtime.procs import stop_group

SERVE = ("-m", "trl.scripts.vllm_serve")  # `trl vllm-serve` without the console script
STOP_GRACE_S = 20.0  # vLLM frees its GPUs in a few seconds; nothing of it needs saving
TAIL_LINES = 25  # of the server's output, in the message of a failed start
POLL_S = 0.5
LOG_PREFIX = "[vllm] "


class ServerFailed(FerryError):
    """The server exited or stayed silent before training began. Not surely the user's
    to fix (a hub download or a GPU may fail once), so the run may be tried again."""

    exit_code = EXIT_FAILED


def server_args(cfg: TrainConfig) -> list[str]:
    """`trl vllm-serve`'s arguments for the config's server: the model as the trainer
    loads it, each `vllm:` key the config sets, and where it listens."""
    v = cfg.vllm or VllmConfig()
    tp, dp = vllm.parallel_sizes(cfg)
    args = ["--model", str(cfg.base_model)]
    if cfg.revision_of_model:
        args += ["--revision", cfg.revision_of_model]
    if cfg.trust_remote_code:
        args += ["--trust-remote-code", "true"]
    args += ["--tensor-parallel-size", str(tp), "--data-parallel-size", str(dp)]
    if v.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(v.gpu_memory_utilization)]
    if v.dtype is not None:
        args += ["--dtype", v.dtype]
    if v.max_model_len is not None:
        args += ["--max-model-len", str(v.max_model_len)]
    if v.enable_prefix_caching is not None:
        args += ["--enable-prefix-caching", str(v.enable_prefix_caching).lower()]
    return [*args, "--host", vllm.bind_host(cfg), "--port", str(vllm.server_port(cfg))]


def server_command(cfg: TrainConfig, python: str = sys.executable) -> list[str]:
    return [python, *SERVE, *server_args(cfg)]


@dataclass(frozen=True)
class Split:
    """Which of this node's GPUs train and which serve (CUDA_VISIBLE_DEVICES values)."""

    train: list[str]
    serve: list[str]

    @classmethod
    def for_node(cls, cfg: TrainConfig, procs: int, visible: str | None) -> Split:
        """`procs` training ranks plus the server's GPUs, out of `visible` (the node's
        CUDA_VISIBLE_DEVICES; None: unset, every GPU from 0)."""
        reserved = vllm.reserved_gpus(cfg)
        if visible is None:
            devices = [str(i) for i in range(procs + reserved)]
        else:
            devices = [d.strip() for d in visible.split(",") if d.strip() not in ("", "-1")]
        if len(devices) < procs + reserved:
            shown = "unset" if visible is None else repr(visible)
            raise FerryError(
                f"This node shows {len(devices)} GPU(s) (CUDA_VISIBLE_DEVICES {shown}), but the "
                f"job needs {procs + reserved}: {procs} training rank(s) and "
                f"{vllm.describe_reserved(cfg)} for the vLLM server it starts."
            )
        return cls(train=devices[:procs], serve=devices[len(devices) - reserved :])


class VllmServer:
    """One server process: started, waited for, stopped (see the module docstring)."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        url: str,
        ready_timeout_s: float,
        out: IO[str] | None = None,
    ):
        self.command = list(command)
        self.env = dict(env)
        self.url = url
        self.ready_timeout_s = ready_timeout_s
        self.out = out or sys.stdout
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: stopped as a whole
            preexec_fn=_parent_death_signal(),
        )
        self._reader = threading.Thread(target=self._pump, name="vllm-log", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        """Copy the server's output into the run's log, line by line, keeping the last
        lines for an error message."""
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.tail.append(line)
            self.out.write(f"{LOG_PREFIX}{line}\n")
            self.out.flush()

    def wait_ready(self) -> float:
        """Block until /health answers 200; the seconds it took. Raises ServerFailed when
        the server exits first or stays silent for `ready_timeout_s`."""
        assert self.process is not None
        started = time.monotonic()
        deadline = started + self.ready_timeout_s
        health = f"{self.url}/health"
        while True:
            code = self.process.poll()
            if code is not None:
                raise self._failed(f"exited with code {code} before it answered {health}")
            if _answers(health):
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                raise self._failed(
                    f"did not answer {health} within {self.ready_timeout_s:g} s "
                    "(trl.vllm_server_timeout) and was stopped"
                )
            time.sleep(POLL_S)

    def _failed(self, what: str) -> ServerFailed:
        # Stopped first: its output ends only once every process of it is gone (a child
        # it left holds the pipe), and the message quotes its last lines.
        self.stop()
        lines = list(self.tail) or ["(it printed nothing)"]
        return ServerFailed(
            f"The vLLM server this job started (pid {self.pid}) {what}; training did not "
            "start. Its last lines:\n" + "\n".join(f"  {line}" for line in lines),
            hint="Its whole output is in the run's log, each line marked [vllm].",
        )

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop the server's process group and every descendant (SIGTERM, then SIGKILL
        after `grace_s`); nothing of it is left running."""
        if self.process is None or self._stopped:
            return
        self._stopped = True  # once: its pid may belong to another process afterwards
        stop_group(self.process.pid, grace_s)
        self.process.wait()
        if self._reader is not None:
            self._reader.join(5)


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen at host:port, if something else already does.
    Checked before it starts: a stranger answering /health there would be taken for it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the server will bind it: a port left in TIME_WAIT by an earlier run is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return f"{host}:{port} cannot be bound here: {e.strerror}"
            return f"port {port} on this node is taken: another process listens there"
    return None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        return False


def _parent_death_signal() -> Callable[[], None] | None:
    """What the server's process runs before the server (Linux only): ask the kernel for
    SIGTERM when the wrapper dies, even by SIGKILL, which leaves it no time to stop the
    server. libc is loaded here, in the parent: the child of a threaded process should
    run nothing that imports or allocates."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(signal.SIGTERM))
