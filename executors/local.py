"""The local backend: torchrun on this machine, as a detached process group.

    python -m executors.supervise RUN_DIR -- python -m payload.torchrun \
        --standalone --nproc-per-node N -m payload train RUN_DIR/config.yml

(`payload.torchrun` is torch's torchrun with tidier failures.)

The supervisor leads a new session (so the run outlives the terminal and can be
cancelled as one group), its output goes to RUN_DIR/train.log, and its exit lands in
RUN_DIR/exit.json. Without GPUs, N is the number of CPU processes (gloo).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from executors.base import Executor, Handle, JobSpec, Plan, RunState, Status
from executors.procs import alive_with
from executors.supervise import EXIT_FILE
from payload.errors import EXIT_PREEMPTED

LOG_FILE = "train.log"
CANCEL_FILE = "cancel_requested"
CANCEL_GRACE_S = 15.0
TRAIN_MODULES = ("torch", "transformers", "peft", "accelerate", "datasets")
# Config keys that only work on CUDA GPUs, and what each needs.
GPU_ONLY = {
    "load_in_4bit": "bitsandbytes on a CUDA GPU",
    "load_in_8bit": "bitsandbytes on a CUDA GPU",
    "fp16": "a CUDA GPU",
    "flash_attention": "flash-attn on a CUDA GPU",
    "deepspeed": "CUDA GPUs",
    "fsdp_config": "CUDA GPUs",
}


@functools.cache
def local_gpu_count() -> int:
    """CUDA GPUs this machine offers, without importing torch. Asked once per process:
    a sweep checks thousands of trials against the same machine."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


@functools.cache
def _missing_modules() -> list[str]:
    """Parts of the training stack that are not installed (found, never imported)."""
    return [m for m in TRAIN_MODULES if importlib.util.find_spec(m) is None]


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants. torchrun starts each rank in a session of its own,
    so the process group alone does not reach them."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    else:  # macOS and other Unixes
        listing = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True)
        for line in listing.stdout.splitlines():
            child, parent = map(int, line.split())
            children.setdefault(parent, []).append(child)
    tree, stack = [pid], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            tree.append(child)
            stack.append(child)
    return tree


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _running(pid: int) -> bool:
    """Still running (not gone, not a zombie waiting to be reaped)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class LocalExecutor(Executor):
    name = "local"

    def _check(self, job: JobSpec) -> list[str]:
        problems = []
        if job.resources.nodes != 1:
            problems.append("the local backend runs on this machine only; nodes must be 1")
        missing = _missing_modules()
        if missing:
            problems.append(
                f"the training stack is not installed here ({', '.join(missing)} missing): "
                "pip install 'ferry[train]'"
            )
        gpus = local_gpu_count()
        wanted = job.resources.gpus_per_node
        if gpus and wanted > gpus:
            problems.append(f"{wanted} GPUs asked for, this machine has {gpus}")
        if not gpus:
            cfg = job.config
            for key, needs in GPU_ONLY.items():
                if cfg.get(key):
                    problems.append(f"`{key}` needs {needs}; this machine has no GPU")
            if cfg.get("bf16") is True:
                problems.append("`bf16: true` needs a CUDA GPU; this machine has none (use auto)")
        return problems

    def _warnings(self, job: JobSpec) -> list[str]:
        r = job.resources
        ignored = [
            name
            for name, value in (
                ("cpu", r.cpu),
                ("memory", r.memory_mb),
                ("timeout", r.timeout_s),
                ("retries", r.retries),
                ("region", r.region),
                ("spot", r.spot),
                ("secrets", job.secrets),
                ("volumes", job.volumes),
            )
            if value
        ]
        notes = []
        if ignored:
            notes.append(f"{', '.join(ignored)} ignored: the run uses this machine as it is")
        if r.accelerator:
            notes.append(f"accelerator {r.accelerator} ignored: the run uses this machine's GPUs")
        return notes

    def default_storage(self, home: Path) -> str | None:
        # A folder beside the registry: durable across relaunches, needs no service.
        return f"file://{home / 'storage'}"

    def _command(self, job: JobSpec) -> list[str]:
        return [
            sys.executable,
            "-m",
            "payload.torchrun",
            "--standalone",
            "--nproc-per-node",
            str(job.resources.gpus_per_node),
            *job.payload_command(),
        ]

    def _env(self, job: JobSpec) -> dict[str, str]:
        env = {**os.environ, **job.payload_env()}
        if not local_gpu_count() and "OMP_NUM_THREADS" not in os.environ:
            # Share the cores between the CPU processes instead of oversubscribing them.
            per_process = max((os.cpu_count() or 1) // job.resources.gpus_per_node, 1)
            env["OMP_NUM_THREADS"] = str(per_process)
        return env

    def _plan(self, job: JobSpec) -> Plan:
        gpus = local_gpu_count()
        n = job.resources.gpus_per_node
        device = f"{n} x GPU (nccl)" if gpus else f"{n} x CPU process (gloo)"
        rows = [
            ("backend", "local (torchrun on this machine)"),
            ("run id", job.run_id),
            ("processes", device),
            ("config", str(job.config_path)),
            ("output_dir", str(job.config.get("output_dir"))),
            ("log", str(job.run_dir / LOG_FILE)),
            ("storage", job.storage_uri or "-"),
        ]
        return Plan(self.name, job.run_id, rows, self._command(job))

    def _submit(self, job: JobSpec) -> Handle:
        if not job.config_path.exists():
            job.write()
        # A relaunch of the same run (a retry) starts with no outcome recorded.
        for stale in (EXIT_FILE, CANCEL_FILE):
            (job.run_dir / stale).unlink(missing_ok=True)
        command = self._command(job)
        supervisor = [sys.executable, "-m", "executors.supervise", str(job.run_dir), "--", *command]
        with (job.run_dir / LOG_FILE).open("ab") as log:
            log.write(f"$ {shlex.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                supervisor,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(job),
                start_new_session=True,  # its own session: the run outlives this terminal
            )
        return Handle(self.name, job.run_id, {"pid": process.pid, "run_dir": str(job.run_dir)})

    def _status(self, handle: Handle) -> Status:
        run_dir = Path(handle.data["run_dir"])
        cancelled = (run_dir / CANCEL_FILE).exists()
        exit_file = run_dir / EXIT_FILE
        if exit_file.exists():
            record = json.loads(exit_file.read_text())
            code, ended = record["exit_code"], record.get("finished_at")
            if cancelled:
                return Status(RunState.CANCELLED, "cancelled by the user", code, ended)
            if code == 0:
                return Status(RunState.SUCCEEDED, None, 0, ended)
            detail = _failure_detail(run_dir, code)
            if code == EXIT_PREEMPTED:
                detail = f"{detail} (`launch resume {handle.run_id}` continues it)"
            return Status(RunState.FAILED, detail, code, ended)
        if alive_with(handle.data["pid"], str(run_dir)):
            return Status(RunState.RUNNING)
        if cancelled:
            return Status(RunState.CANCELLED, "cancelled by the user")
        return Status(
            RunState.FAILED, "the run's processes are gone and recorded no exit (killed?)"
        )

    def _logs(self, handle: Handle, follow: bool) -> Iterator[str]:
        path = Path(handle.data["run_dir"]) / LOG_FILE
        with path.open("r", errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    yield line
                    continue
                if not follow or self._status(handle).state.finished:
                    # One more read: the run may have written its last lines meanwhile.
                    yield from f.readlines()
                    return
                time.sleep(0.2)

    def _cancel(self, handle: Handle) -> Status:
        run_dir = Path(handle.data["run_dir"])
        pid = handle.data["pid"]
        if not alive_with(pid, str(run_dir)):
            return self._status(handle)  # already over: keep how it really ended
        (run_dir / CANCEL_FILE).touch()
        # SIGTERM to every process of the run at once: the supervisor records the exit,
        # torchrun stops its agent, each rank may save and leave.
        tree = process_tree(pid)
        _signal_all(tree, signal.SIGTERM)
        deadline = time.monotonic() + CANCEL_GRACE_S
        while time.monotonic() < deadline and any(_running(p) for p in tree):
            time.sleep(0.1)
        # Whatever is left (a rank stuck in a collective, a child it started) goes now.
        _signal_all([p for p in process_tree(pid) + tree if _running(p)], signal.SIGKILL)
        return self._status(handle)


def _failure_detail(run_dir: Path, code: int) -> str:
    """Why the run failed: the payload's last `error:` line, else the last line that
    names an exception, else the exit code."""
    log = run_dir / LOG_FILE
    lines = log.read_text(errors="replace").splitlines()[-300:] if log.exists() else []
    for wanted in (lambda s: s.startswith(("error:", "preempted:")), lambda s: "Error" in s):
        for line in reversed(lines):
            if wanted(line):
                return line.removeprefix("error:").strip()[:500]
    return f"exit code {code}"
