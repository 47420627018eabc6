"""`python -m payload.entry.torchrun [torchrun args] -m payload train CFG`: torchrun, tidied.

Every backend starts training through this module, with arguments from
`payload.runtime.cluster.torchrun_args`. It is torch's own launcher
(`torch.distributed.run`) with two changes a user sees only when something stops:
- a rank that exits with an error leaves one line here instead of the agent's traceback
  (the rank's own message is already in the log above it), and the first failed rank's
  exit code becomes this process's, so a distinct code from the payload survives;
- SIGTERM (a cloud's preemption notice) and SIGINT (Modal's) end it with EXIT_PREEMPTED
  (75) once torchrun has passed the signal on and every rank has saved, uploaded and
  stopped (see payload.durability); torchrun waits `--shutdown-timeout` seconds for that
  before it kills them. Each rank confirms its stop with a marker file (in
  FERRY_STOP_MARKERS); if any rank did not (it failed, or was killed), the exit is
  EXIT_FAILED instead: nothing promises a checkpoint then. SIGHUP ends it with
  128+signal. One line, no traceback.

A GRPO job whose config has it start its own vLLM server (payload.config.vllm) gets it
here, on the node that trains, before torchrun starts the ranks, and loses it however
torchrun ends (payload.runtime.vllm_server). The ranks are torchrun's `--nproc-per-node`;
the server's GPUs are the node's next ones. The config is the one the training command
names (`-m payload train CONFIG [--set KEY=VALUE ...]`). A server that fails to start
fails the run (EXIT_FAILED, or 1 for a port that is taken or too few GPUs) with its last
lines; a stop signal while it starts stops it and ends with EXIT_PREEMPTED: no training
had begun, so nothing is lost by a relaunch.

Test hook: FERRY_TEST_VLLM_SERVER, a command line (shell words) that stands in for
`python -m trl.scripts.vllm_serve`, followed by the same arguments. It exists only so
that tests on machines without vLLM or a GPU can run the server's lifecycle with a tiny
HTTP server; it is read from the environment only, never from a config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from payload.errors import EXIT_FAILED, EXIT_PREEMPTED, FerryError
from payload.runtime.procs import STOP_SIGNALS

if TYPE_CHECKING:
    from payload.config.schema import TrainConfig

MARKERS_ENV = "FERRY_STOP_MARKERS"  # a folder where each rank confirms a clean stop
SERVER_HOOK_ENV = "FERRY_TEST_VLLM_SERVER"  # test hook: see the module docstring


def confirm_stop(rank: int) -> None:
    """Called by a rank that stopped after its checkpoint was uploaded (payload main)."""
    folder = os.environ.get(MARKERS_ENV)
    if folder:
        Path(folder, f"rank-{rank}").touch()


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.run import parse_args

    args = parse_args(argv if argv is not None else sys.argv[1:])
    markers = Path(tempfile.mkdtemp(prefix="ferry-stop-"))
    os.environ[MARKERS_ENV] = str(markers)  # the workers inherit it
    try:
        server = _server_config(args)
        if server is None:
            return _run(args, markers)
        hook = os.environ.get(SERVER_HOOK_ENV)
        return _run_with_server(args, markers, server, shlex.split(hook) if hook else None)
    finally:
        shutil.rmtree(markers, ignore_errors=True)


class _Stopped(Exception):  # noqa: N818 - a signal, not an error
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP raise _Stopped while the server starts: the `finally`
    that stops it runs, where the default action would end this process and leave the
    server behind. torchrun's agent sets its own handlers once it runs."""

    def stop(signum: int, _frame: object) -> None:
        _ignore_signals()  # once: a second signal must not cut the server's stop short
        raise _Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    yield


def _ignore_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def _server_config(args: Any) -> TrainConfig | None:
    """The config, when the training command is `train CONFIG [--set ...]` and the config
    has the job start its own vLLM server; else None. A config that does not load is
    left to the ranks, which report it as every run does."""
    words = list(args.training_script_args)
    if not words or words[0] != "train":
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    known, _ = parser.parse_known_args(words[1:])
    from payload.config import load_config
    from payload.config.loader import read_raw
    from payload.config.vllm import self_started

    try:
        trl = read_raw(known.config, known.overrides).get("trl")
        if not (isinstance(trl, dict) and trl.get("use_vllm")):
            return None  # the common case, without validating the whole config twice
        # The ranks print the config's warnings; this is a second reading.
        logging.getLogger("ferry.config").setLevel(logging.ERROR)
        cfg = load_config(known.config, known.overrides)
    except FerryError:
        return None
    return cfg if self_started(cfg) else None


def _run_with_server(args: Any, markers: Path, cfg: TrainConfig, hook: list[str] | None) -> int:
    """Start the config's vLLM server on this node's last GPUs, wait until it answers,
    run torchrun on the others, and stop the server however that ends."""
    from payload.config import vllm
    from payload.runtime import vllm_server

    server = None
    try:
        with _signals_raise():
            per_node = str(args.nproc_per_node)
            if not per_node.isdigit():
                raise FerryError(
                    f"--nproc-per-node {per_node}: a job that starts its own vLLM server needs "
                    "a number of training ranks."
                )
            split = vllm_server.Split.for_node(
                cfg, int(per_node), os.environ.get("CUDA_VISIBLE_DEVICES")
            )
            host, port = vllm.bind_host(cfg), vllm.server_port(cfg)
            if problem := vllm_server.port_problem(host, port):
                raise FerryError(
                    f"The vLLM server this job starts cannot listen: {problem}. Set a free "
                    "`vllm.port` (or `trl.vllm_server_port`); to use a server you started "
                    "yourself, set `trl.vllm_server_host` to this machine's network address."
                )
            command = vllm_server.server_command(cfg)
            if hook:
                command = [*hook, *vllm_server.server_args(cfg)]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(split.serve)}
            url = f"http://{vllm.connect_host(cfg)}:{port}"
            server = vllm_server.VllmServer(command, env, url, vllm.ready_timeout_s(cfg))
            server.start()
            print(
                f"vllm: server starting on GPUs {','.join(split.serve)} (pid {server.pid}): "
                f"{shlex.join(command)}",
                flush=True,
            )
            took = server.wait_ready()
            print(
                f"vllm: ready at {url} after {took:.0f} s; training on GPUs "
                f"{','.join(split.train)}",
                flush=True,
            )
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(split.train)  # the ranks inherit it
        return _run(args, markers)
    except _Stopped as e:
        name = signal.Signals(e.signum).name
        print(f"torchrun: stopped by {name} while the vLLM server started", flush=True)
        return EXIT_PREEMPTED if e.signum in STOP_SIGNALS else 128 + e.signum
    except FerryError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _record_error(e)
        return e.exit_code
    finally:
        if server is not None:
            # A second signal (a cancel sends one to every process of the run) must not
            # cut the stop short.
            _ignore_signals()
            server.stop()
            print(f"vllm: server stopped (pid {server.pid})", flush=True)


def _record_error(e: FerryError) -> None:
    """Tell the backend why the run failed (FERRY_ERROR_FILE, as the payload does): no
    rank ran, so none did."""
    path = os.environ.get("FERRY_ERROR_FILE")
    if not path:
        return
    with contextlib.suppress(OSError), open(path, "x") as f:
        json.dump({"error": e.message, "hint": e.hint}, f)


def _run(args: object, markers: Path) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        print(
            f"torchrun: rank {rank} exited with code {code}; see its messages above",
            file=sys.stderr,
            flush=True,
        )
        return code
    except SignalException as e:
        if e.sigval not in STOP_SIGNALS:
            print(f"torchrun: stopped by {e.sigval.name}", file=sys.stderr, flush=True)
            return 128 + int(e.sigval)
        confirmed = len(list(markers.glob("rank-*")))
        per_node = str(getattr(args, "nproc_per_node", ""))
        expected = int(per_node) if per_node.isdigit() else confirmed
        if confirmed < expected:
            print(
                f"torchrun: stopped by {e.sigval.name}, but only {confirmed} of {expected} "
                "ranks here confirmed a saved checkpoint",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_FAILED
        print(f"torchrun: stopped by {e.sigval.name}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
