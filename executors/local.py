"""The local backend: torchrun on this machine, as a detached process group.

    python -m executors.supervise RUN_DIR -- python -m payload.entry.torchrun \
        --standalone --nproc-per-node N --shutdown-timeout GRACE \
        -m payload train RUN_DIR/config.yml

(`payload.entry.torchrun` is torch's torchrun with tidier failures.)

The supervisor leads a new session (so the run outlives the terminal and can be
cancelled as one group), its output goes to RUN_DIR/train.log, and its exit lands in
RUN_DIR/exit.json; the first rank to fail writes why to RUN_DIR/error.json
(FERRY_ERROR_FILE), which `launch status` reports. N is the GPUs asked for, less those a
GRPO job keeps for the vLLM server it starts (payload.config.vllm); without GPUs, N is
the number of CPU processes (gloo). A cancel sends SIGTERM to every process of the run;
the ranks save and upload a checkpoint and exit, and whatever is still running after the
stop grace period (`launch.stop_grace`, torchrun's `--shutdown-timeout` too) is killed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from executors.base import Executor, Handle, JobSpec, Plan, RunState, Status, vllm_rows
from executors.supervise import EXIT_FILE
from payload.config.trackers import missing_packages
from payload.entry.remote import ERROR_FILE, training_command
from payload.runtime.cluster import SINGLE, torchrun_args
from payload.runtime.job import DEFAULT_STOP_GRACE_S, MASTER_PORT
from payload.runtime.procs import alive_with, child_environ, stop_tree

LOG_FILE = "train.log"
CANCEL_FILE = "cancel_requested"
HANDLE_FILE = "local-handle.json"  # the supervisor's pid, written the moment it starts
# torchrun itself needs a moment after its workers' grace period to reap them and exit.
AGENT_MARGIN_S = 15
TRAIN_MODULES = ("torch", "transformers", "peft", "accelerate", "datasets")
# Config keys that only work on CUDA GPUs, and what each needs. (load_in_4bit and
# load_in_8bit are not among them: bitsandbytes runs both on the CPU.)
GPU_ONLY = {
    "fp16": "a CUDA GPU",
    "flash_attention": "flash-attn on a CUDA GPU",
    "flex_attention": "a CUDA GPU (torch's FlexAttention has no backward on the CPU)",
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


def vllm_installed() -> bool:
    """Is vLLM installed here (found, never imported)? A local run uses this machine's
    packages, not the image's `vllm` layer."""
    return importlib.util.find_spec("vllm") is not None


class LocalExecutor(Executor):
    name = "local"
    remote = False  # credentials are this machine's own

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
        if trackers := missing_packages(job.train_config()):
            problems.append(
                f"the config reports to {', '.join(trackers)}, not installed here: "
                "pip install 'ferry[trackers]'"
            )
        if job.config.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            # DeepSpeed runs on this machine's CPUs too (DS_ACCELERATOR=cpu, set by the payload).
            problems.append(
                "the config asks for DeepSpeed, not installed here: pip install 'ferry[deepspeed]'"
            )
        gpus = local_gpu_count()
        wanted = job.resources.gpus_per_node
        if gpus and wanted > gpus:
            problems.append(f"{wanted} GPUs asked for, this machine has {gpus}")
        cfg = job.config
        if (cfg.get("trl") or {}).get("use_vllm") and str(cfg.get("rl")).lower() == "grpo":
            if not gpus:
                problems.append(
                    "`trl.use_vllm` needs vLLM on a CUDA GPU; this machine has none (leave it "
                    "out to generate with transformers)"
                )
            elif not vllm_installed():
                problems.append("`trl.use_vllm` needs vLLM, not installed here: pip install vllm")
        if not gpus:
            for key, needs in GPU_ONLY.items():
                if cfg.get(key):
                    problems.append(f"`{key}` needs {needs}; this machine has no GPU")
            named = cfg.get("attn_implementation") or ""
            if named.startswith("flash_attention") or named == "flex_attention":
                problems.append(
                    f"`attn_implementation: {named}` needs a CUDA GPU; this machine has none"
                )
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
        r = job.resources
        args = torchrun_args(job.procs_per_node, SINGLE, MASTER_PORT, r.stop_grace_s)
        return training_command(sys.executable, args, job.config_path)

    def _env(self, job: JobSpec) -> dict[str, str]:
        env = {**child_environ(), **job.payload_env()}
        env["FERRY_ERROR_FILE"] = str(job.run_dir / ERROR_FILE)
        if not local_gpu_count() and "OMP_NUM_THREADS" not in os.environ:
            # Share the cores between the CPU processes instead of oversubscribing them.
            per_process = max((os.cpu_count() or 1) // job.resources.gpus_per_node, 1)
            env["OMP_NUM_THREADS"] = str(per_process)
        return env

    def _plan(self, job: JobSpec) -> Plan:
        gpus = local_gpu_count()
        n = job.procs_per_node
        device = f"{n} x GPU (nccl)" if gpus else f"{n} x CPU process (gloo)"
        rows = [
            ("backend", "local (torchrun on this machine)"),
            ("run id", job.run_id),
            ("processes", device),
            ("config", str(job.config_path)),
            ("output_dir", str(job.config.get("output_dir"))),
            ("log", str(job.run_dir / LOG_FILE)),
            ("storage", job.storage_uri or "-"),
            ("stop grace", f"{job.resources.stop_grace_s} s to save and upload after a stop"),
            *vllm_rows(job.train_config(), job.resources.gpus_per_node, sys.executable),
        ]
        return Plan(self.name, job.run_id, rows, self._command(job))

    def _submit(self, job: JobSpec) -> Handle:
        if not job.config_path.exists():
            job.write()
        # A relaunch of the same run (a retry) starts with no outcome recorded.
        for stale in (EXIT_FILE, CANCEL_FILE, HANDLE_FILE, ERROR_FILE):
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
        handle = Handle(
            self.name,
            job.run_id,
            {
                "pid": process.pid,
                "run_dir": str(job.run_dir),
                "stop_grace_s": job.resources.stop_grace_s,
            },
        )
        # Before anything else can fail: a retried submit finds this run instead of
        # starting a second one on the same folder.
        (job.run_dir / HANDLE_FILE).write_text(handle.to_json())
        return handle

    def _find(self, job: JobSpec) -> Handle | None:
        try:
            handle = Handle.from_json((job.run_dir / HANDLE_FILE).read_text())
        except (OSError, ValueError, TypeError):
            return None
        if handle.backend != self.name or not alive_with(handle.data["pid"], str(job.run_dir)):
            return None
        return handle

    def _status(self, handle: Handle) -> Status:
        run_dir = Path(handle.data["run_dir"])
        cancelled = (run_dir / CANCEL_FILE).exists()
        exit_file = run_dir / EXIT_FILE
        if exit_file.exists():
            record = json.loads(exit_file.read_text())
            code, ended = record["exit_code"], record.get("finished_at")
            if cancelled:
                return Status(RunState.CANCELLED, "cancelled by the user", code, ended)
            state = RunState.after_exit(code)
            if state == RunState.SUCCEEDED:
                return Status(state, None, 0, ended)
            detail = _failure_detail(run_dir, code)
            if state == RunState.PREEMPTED:
                detail = f"{detail} (`launch resume {handle.run_id}` continues it)"
            return Status(state, detail, code, ended)
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
        # torchrun stops its agent, each rank saves, uploads and leaves. Whatever is still
        # there after the grace period (a rank stuck in a collective) is killed.
        grace = handle.data.get("stop_grace_s", DEFAULT_STOP_GRACE_S)
        stop_tree(pid, grace + AGENT_MARGIN_S)
        return self._status(handle)


def _failure_detail(run_dir: Path, code: int) -> str:
    """Why the run failed: the error the first failed rank recorded (a user error, or
    "rank N: Type: message" for a crash), else the payload's last `error:` line, else the
    last line that names an exception, else the exit code."""
    try:
        recorded = json.loads((run_dir / ERROR_FILE).read_text())["error"]
    except (OSError, ValueError, TypeError, KeyError):
        recorded = None
    if isinstance(recorded, str) and recorded:
        return recorded[:500]
    log = run_dir / LOG_FILE
    lines = log.read_text(errors="replace").splitlines()[-300:] if log.exists() else []
    for wanted in (lambda s: s.startswith(("error:", "preempted:")), lambda s: "Error" in s):
        for line in reversed(lines):
            if wanted(line):
                return line.removeprefix("error:").strip()[:500]
    return f"exit code {code}"
