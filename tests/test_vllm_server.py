"""GRPO's vLLM server mode with the server started by the job itself (payload.config.vllm,
payload.runtime.vllm_server, payload.entry.torchrun): the `vllm:` section, the GPU split
checked before anything starts, the plans that show it, and the server's whole life
around real torchrun jobs.

No vLLM and no GPU exist here. The lifecycle tests replace the one edge that cannot run
on this machine, the server itself: the wrapper's test hook FERRY_TEST_VLLM_SERVER puts
STANDIN (a tiny HTTP server, below) where `python -m trl.scripts.vllm_serve` would be,
with the same arguments. The GPUs are simulated by CUDA_VISIBLE_DEVICES (four device
ids, as a 4-GPU node shows them), and the training ranks are a trivial worker script in
place of `payload train` (whose GRPO trainer imports vLLM): everything between them, the
torchrun wrapper, torchrun and the config it reads, is the real thing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ASSETS, ROOT, launch, plan_row, write_jsonl

from payload.config import load_config
from payload.errors import ConfigError
from payload.runtime.procs import process_tree, running

TINY = str(ASSETS / "tiny-llama")

# Stands in for `python -m trl.scripts.vllm_serve` (through the test hook): records the
# arguments and GPUs it was given, starts a child as vLLM's engine process would, and
# answers GET /health once up. MODE: ok (up after 1 s), exit (prints, then exits 3 with
# its child still running), silent (never answers).
STANDIN = """
import http.server, json, os, subprocess, sys, time

record, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(record + ".tmp", "w") as f:
    json.dump({"argv": args, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "pid": os.getpid(), "child": child.pid}, f)
os.replace(record + ".tmp", record)
print("INFO stand-in vLLM server: loading the model", flush=True)
if mode == "exit":
    print("ERROR stand-in: CUDA out of memory while loading the weights", flush=True)
    sys.exit(3)
if mode == "silent":
    time.sleep(600)
time.sleep(1.0)  # a server is never up at once: the job must wait, not race it


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(
    (args[args.index("--host") + 1], int(args[args.index("--port") + 1])), Health
)
print("INFO stand-in: Application startup complete.", flush=True)
server.serve_forever()
"""

# The training ranks: each records its rank, its GPUs and whether the server answered
# when it started. WORKER_MODE: ok, fail (rank 1 exits 2), hang (until stopped).
WORKER = """
import json, os, sys, time, urllib.request

rank = os.environ["RANK"]
try:
    health = urllib.request.urlopen(os.environ["WORKER_HEALTH"], timeout=5).status
except Exception as e:
    health = repr(e)
record = {"rank": rank, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "health": health,
          "argv": sys.argv[1:]}
with open(os.path.join(os.environ["WORKER_OUT"], f"rank-{rank}.json"), "w") as f:
    json.dump(record, f)
mode = os.environ.get("WORKER_MODE", "ok")
if mode == "fail" and rank == "1":
    sys.exit(2)
if mode == "hang":
    time.sleep(600)
"""

# Every key of the `vllm:` section Ferry takes, each away from its default.
VLLM = {
    "tensor_parallel_size": 2,
    "data_parallel_size": 1,
    "gpu_memory_utilization": 0.55,
    "dtype": "bfloat16",
    "max_model_len": 384,
    "enable_prefix_caching": False,
    "host": "0.0.0.0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_config(folder: Path, trl: dict | None = None, vllm: dict | None = None, **extra) -> Path:
    """A GRPO config in server mode with no remote host: the job starts its server."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rewards.py").write_text(
        "def share(prompts, completions, completion_ids, **kwargs):\n"
        "    return [0.0 for _ in completions]\n"
    )
    write_jsonl(folder / "prompts.jsonl", [{"prompt": "Say hi."}, {"prompt": "Say yo."}])
    raw = {
        "base_model": TINY,
        "rl": "grpo",
        "datasets": [{"path": "prompts.jsonl"}],
        "trl": {
            "reward_funcs": ["rewards.share"],
            "num_generations": 4,
            "use_vllm": True,
            "vllm_mode": "server",
            **(trl or {}),
        },
        "vllm": {"tensor_parallel_size": 2, **(vllm or {})},
        "micro_batch_size": 2,
        "learning_rate": 1.0e-4,
        # vLLM is in the image, the rules' answer to "is vLLM anywhere" for a cloud run.
        "launch": {"image": {"extras": ["vllm"]}},
        **extra,
    }
    path = folder / "grpo.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Job:
    """`python -m payload.entry.torchrun` on 2 ranks around WORKER, with the stand-in
    server and 4 simulated GPUs, in a session of its own (so a failing test can stop
    all of it)."""

    def __init__(self, tmp: Path, config: Path, server_mode: str, worker_mode: str, port: int):
        self.tmp, self.record = tmp, tmp / "server.json"
        self.config, self.port = config, port
        self.ranks = tmp / "ranks"
        self.ranks.mkdir()
        (tmp / "standin.py").write_text(STANDIN)
        (tmp / "worker.py").write_text(WORKER)
        hook = f"{sys.executable} {tmp / 'standin.py'} {self.record} {server_mode}"
        env = {
            **os.environ,
            "FERRY_TEST_VLLM_SERVER": hook,
            "CUDA_VISIBLE_DEVICES": "0,1,2,3",
            "WORKER_OUT": str(self.ranks),
            "WORKER_MODE": worker_mode,
            "WORKER_HEALTH": f"http://127.0.0.1:{port}/health",
            "FERRY_ERROR_FILE": str(tmp / "error.json"),
        }
        command = [
            sys.executable,
            "-m",
            "payload.entry.torchrun",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--shutdown-timeout",
            "5",
            str(tmp / "worker.py"),
            "train",
            str(config),
        ]
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def wait_for(self, what: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not what.exists():
            assert self.process.poll() is None, f"the job ended first:\n{self.finish()[1]}"
            assert time.monotonic() < deadline, f"no {what.name} after {timeout} s"
            time.sleep(0.1)

    def finish(self, timeout: float = 90) -> tuple[int, str]:
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.process.returncode, out

    def kill(self) -> None:
        for pid in process_tree(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.communicate()

    def server(self) -> dict:
        return json.loads(self.record.read_text())

    def rank_records(self) -> dict[str, dict]:
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.ranks.glob("rank-*.json"))}


@pytest.fixture
def job(tmp_path):
    jobs: list[Job] = []

    def start(server_mode="ok", worker_mode="ok", trl=None, vllm=None) -> Job:
        port = free_port()
        config = server_config(tmp_path / "project", trl, {"port": port, **(vllm or {})})
        started = Job(tmp_path, config, server_mode, worker_mode, port)
        jobs.append(started)
        return started

    yield start
    for started in jobs:  # a failed assertion must not leave the job running
        if started.process.poll() is None:
            started.kill()


def gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while any(running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# ---- the server's life around real torchrun jobs ---------------------------------------


@pytest.mark.slow
def test_the_server_gets_the_last_gpus_and_every_key_and_the_ranks_the_rest(job):
    """A failure means the server and the training ranks share GPUs, a `vllm:` key never
    reaches the server (the stand-in's argv is read back through TRL's own `trl
    vllm-serve` parser), the ranks started before the server answered, or the server
    (or its child) outlived the job. Stand-in server and simulated GPUs: module docstring."""
    from trl.scripts.vllm_serve import make_parser

    started = job(vllm=VLLM)
    code, out = started.finish()
    assert code == 0, out
    server = started.server()
    assert server["cuda"] == "2,3"  # the node's last two: tensor parallel 2 x data parallel 1
    ranks = started.rank_records()
    assert [r["cuda"] for r in ranks.values()] == ["0,1", "0,1"], ranks
    # Each rank found the server up when it started: the job waited for /health.
    assert [r["health"] for r in ranks.values()] == [200, 200], ranks

    parsed, extra = make_parser().parse_args_and_config(
        args=server["argv"], return_remaining_strings=True
    )
    assert extra == []
    assert parsed.model == TINY
    for key, value in VLLM.items():
        assert getattr(parsed, key) == value, key
    assert parsed.port == started.port
    assert ranks["rank-0"]["argv"] == ["train", str(started.config)]
    # Its output is in the job's log, marked; the wrapper says where it runs.
    assert "[vllm] INFO stand-in: Application startup complete." in out
    assert "vllm: server starting on GPUs 2,3" in out and "vllm: server stopped" in out
    assert gone([server["pid"], server["child"]]), "the server outlived the job"


@pytest.mark.slow
def test_a_server_that_exits_early_fails_the_run_with_its_last_lines(job, tmp_path):
    """The server exits while loading: the run fails at once (no ranks start) with one
    paragraph that names it and quotes its output, recorded for `launch status`; the
    child it left behind is stopped with its process group. Stand-in server: module
    docstring."""
    started = job(server_mode="exit")
    code, out = started.finish()
    assert code == 70, out  # EXIT_FAILED: not surely the user's to fix, may be retried
    assert "exited with code 3 before it answered" in out
    assert "  ERROR stand-in: CUDA out of memory while loading the weights" in out
    assert "training did not start" in out and "Traceback" not in out
    error = json.loads((tmp_path / "error.json").read_text())["error"]
    assert "CUDA out of memory" in error
    assert started.rank_records() == {}
    assert gone([started.server()["pid"], started.server()["child"]])


@pytest.mark.slow
def test_a_server_that_never_answers_fails_the_run_within_the_timeout(job):
    """`trl.vllm_server_timeout` bounds the wait: a server that never answers fails the
    run soon after it, with its last lines, and is stopped. Stand-in server: module
    docstring."""
    started = job(server_mode="silent", trl={"vllm_server_timeout": 3})
    code, out = started.finish()
    took = time.monotonic() - started.started
    assert code == 70, out
    assert "did not answer" in out and "within 3 s (trl.vllm_server_timeout)" in out
    assert "  INFO stand-in vLLM server: loading the model" in out
    assert took < 3 + 25, f"{took:.0f} s"  # 3 s of waiting, the rest is start-up and stop
    assert started.rank_records() == {}
    assert gone([started.server()["pid"], started.server()["child"]])


@pytest.mark.slow
def test_the_server_is_stopped_when_training_fails(job):
    """Rank 1 fails: the job fails with the rank's exit code, and the server is gone.
    Stand-in server: module docstring."""
    started = job(worker_mode="fail")
    code, out = started.finish()
    assert code == 2, out
    assert "torchrun: rank 1 exited with code 2" in out
    assert gone([started.server()["pid"], started.server()["child"]])


@pytest.mark.slow
@pytest.mark.parametrize("when", ["while it starts", "while training"])
def test_sigterm_to_the_job_stops_the_server(job, when):
    """A preemption notice (SIGTERM to the job's wrapper, as a cloud or `launch cancel`
    sends it) while the server is still starting, or once the ranks train: either way
    the server and its child are gone when the job has ended. Stand-in server: module
    docstring."""
    if when == "while it starts":
        started = job(server_mode="silent", trl={"vllm_server_timeout": 120})
        started.wait_for(started.record)
    else:
        started = job(worker_mode="hang")
        started.wait_for(started.ranks / "rank-1.json")
    server = started.server()
    started.process.send_signal(signal.SIGTERM)
    code, out = started.finish(timeout=60)
    if when == "while it starts":
        # No training had begun: nothing is lost, a relaunch starts over (75, resumable).
        assert code == 75, out
        assert "stopped by SIGTERM while the vLLM server started" in out
    else:
        assert "torchrun: stopped by SIGTERM" in out
    assert "vllm: server stopped" in out
    assert gone([server["pid"], server["child"]])


def test_a_taken_port_is_refused_before_the_server_starts(job):
    """Something already listens on the server's port: the job refuses to start rather
    than take that process's /health for its server's. Stand-in server: module
    docstring."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = job(vllm={"port": port})
        code, out = started.finish()
    assert code == 1, out
    assert f"port {port} on this node is taken" in out
    assert "trl.vllm_server_host" in out
    assert not started.record.exists()  # no server was started


def test_stop_kills_a_server_that_ignores_sigterm(tmp_path):
    """A server that ignores SIGTERM is killed after the grace period, its child too
    (the group): `stop` never returns with anything of it running."""
    from payload.runtime.vllm_server import VllmServer

    script = tmp_path / "stubborn.py"
    script.write_text(
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    server = VllmServer([sys.executable, str(script)], os.environ, "http://127.0.0.1:1", 5)
    server.start()
    deadline = time.monotonic() + 20
    while not server.tail and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(server.tail[0])
    began = time.monotonic()
    server.stop(grace_s=1)
    assert 1 <= time.monotonic() - began < 10
    assert not running(server.pid) and gone([child], 2)


# ---- what is checked before anything starts --------------------------------------------


def test_validate_names_the_vllm_keys_ferry_does_not_take_and_a_port_or_host_mismatch(tmp_path):
    """Axolotl's `vllm:` keys that Ferry does not take are refused by name, a typo gets a
    did-you-mean, two different ports for the one server and a bind address the trainer
    could not reach are refused, all at once."""
    config = server_config(
        tmp_path,
        trl={"vllm_server_port": 8001},
        vllm={"port": 8002, "host": "10.0.0.7", "enforce_eager": True, "reasoning_parser": "x"},
    )
    raw = yaml.safe_load(config.read_text())
    raw["vllm"]["tensor_paralel_size"] = 2
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    problems = {p.key: p.message for p in caught.value.problems}
    assert problems["vllm.enforce_eager"] == "is not supported yet by Ferry."
    assert problems["vllm.reasoning_parser"] == "is not supported yet by Ferry."
    assert "did you mean `tensor_parallel_size`" in problems["vllm.tensor_paralel_size"]
    assert "trl.vllm_server_port (8001)" in problems["vllm.port"]
    assert "bind 127.0.0.1 or localhost or 0.0.0.0" in problems["vllm.host"]

    # One port under either name, or both agreeing, is fine.
    raw["vllm"] = {"port": 8001, "host": "0.0.0.0"}
    config.write_text(yaml.safe_dump(raw))
    assert load_config(config).vllm.port == 8001


def test_the_vllm_section_is_ignored_with_a_warning_where_no_server_is_started(tmp_path, caplog):
    """A server on another machine (trl.vllm_server_host), or colocate mode: the section
    describes nothing that happens, which is said, not silently dropped."""
    from payload.config import vllm

    remote = load_config(server_config(tmp_path / "a", trl={"vllm_server_host": "10.0.0.2"}))
    assert not vllm.self_started(remote) and vllm.reserved_gpus(remote) == 0
    colocate = load_config(server_config(tmp_path / "b", trl={"vllm_mode": "colocate"}))
    assert vllm.reserved_gpus(colocate) == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert any(
        "vllm: ignored: `trl.vllm_server_host` (10.0.0.2) names another" in w for w in warnings
    )
    assert any(
        "vllm: ignored: it describes the server of `trl.vllm_mode: server`" in w for w in warnings
    )
    local = load_config(server_config(tmp_path / "c", trl={"vllm_server_host": "localhost"}))
    assert vllm.reserved_gpus(local) == 2


def test_a_model_config_the_server_would_not_load_is_warned(tmp_path, caplog):
    """The server loads base_model from disk: a `model_config` override the trainer applies
    would leave it generating with another model, which validation says."""
    load_config(server_config(tmp_path, model_config={"rms_norm_eps": 0.125}))
    warnings = [r.getMessage() for r in caplog.records]
    assert any("model_config: does not reach the vLLM server the job starts" in w for w in warnings)


def _modal_plan(config: Path, *args: str):
    return launch("train", str(config), "--cloud", "modal", *args, "--dry-run")


def test_the_gpu_split_is_checked_and_planned_before_anything_starts(tmp_path):
    """Through the real CLI's dry run on Modal (nothing is sent): 4 GPUs with tensor
    parallel 2 plan 2 training ranks and the server on GPUs 2,3 with its command; 2 GPUs
    (nothing left to train on), several nodes, and no GPU at all are refused with what to
    do."""
    config = server_config(tmp_path, vllm={"port": 8123, "dtype": "bfloat16"})
    planned = _modal_plan(config, "--gpus", "H100:4")
    assert planned.returncode == 0, planned.stderr
    text = planned.stdout
    assert plan_row(text, "gpu") == "H100:4"
    assert plan_row(text, "train") == "GPUs 0,1: 2 training ranks"
    assert plan_row(text, "vllm server").startswith("GPUs 2,3: 2 GPUs (vllm.tensor_parallel")
    assert plan_row(text, "vllm url").startswith("http://127.0.0.1:8123 ")
    served = plan_row(text, "vllm command")
    assert served.startswith("python -m trl.scripts.vllm_serve --model /ferry/inputs/")
    assert "--tensor-parallel-size 2" in served and "--dtype bfloat16" in served
    assert "--nproc-per-node 2 " in plan_row(text, "command")

    too_few = _modal_plan(config, "--gpus", "H100:2")
    assert too_few.returncode == 1
    err = " ".join(too_few.stderr.split())
    assert "takes 2 GPUs (vllm.tensor_parallel_size 2 x vllm.data_parallel_size 1)" in err
    assert "Ask for --gpus 3 or more" in err

    nodes = _modal_plan(config, "--gpus", "H100:8", "--nodes", "2")
    assert nodes.returncode == 1
    assert "runs on one node, and this run asks for 2" in " ".join(nodes.stderr.split())

    cpu = _modal_plan(config, "--gpus", "4")
    assert cpu.returncode == 1
    assert "`trl.use_vllm` needs vLLM on a GPU" in " ".join(cpu.stderr.split())


def test_a_local_run_without_a_gpu_is_refused(tmp_path):
    """This machine has no GPU (tests hide any): vLLM cannot run, whatever the split."""
    result = launch("train", str(server_config(tmp_path)), "--gpus", "3", "--dry-run")
    assert result.returncode == 1
    assert "`trl.use_vllm` needs vLLM on a CUDA GPU; this machine has none" in " ".join(
        result.stderr.split()
    )


def test_a_local_plan_shows_the_split_on_a_gpu_machine(tmp_path, monkeypatch):
    """The local plan on a 4-GPU machine with vLLM installed: both facts about the
    machine are the edges replaced here (local_gpu_count and vllm_installed, as
    tests/test_compat.py gives the machine GPUs); the plan is the real one."""
    from executors import local
    from launcher import api

    monkeypatch.setattr(local, "local_gpu_count", lambda: 4)
    monkeypatch.setattr(local, "vllm_installed", lambda: True)
    plan = api.plan(server_config(tmp_path), cloud="local", gpus="4")
    rows = dict(plan.rows)
    assert rows["processes"] == "2 x GPU (nccl)"
    assert rows["vllm server"].startswith("GPUs 2,3")
    assert rows["vllm command"].startswith(f"{sys.executable} -m trl.scripts.vllm_serve --model")
    assert plan.command[plan.command.index("--nproc-per-node") + 1] == "2"


@pytest.mark.parametrize(
    ("gpus", "tp", "batch", "refused"),
    [
        # 12 completions a step: 2 training ranks of micro-batch 2 take it (the server has
        # 2 of the 4 GPUs); 4 ranks would not.
        (4, 2, 12, False),
        (4, 0, 12, True),
        # 8 completions: 4 ranks take it, 3 (a 1-GPU server) do not.
        (4, 0, 8, False),
        (4, 1, 8, True),
    ],
)
def test_grpo_batch_shapes_are_checked_on_the_training_ranks(tmp_path, gpus, tp, batch, refused):
    """generation_batch_size must split into micro_batch_size x training ranks, where the
    training ranks are the GPUs the server leaves (tp 0 here: no server, colocate mode).
    A failure means the rule counts the server's GPUs as ranks, or misses the shape TRL
    would refuse only after the model loaded."""
    trl = {"generation_batch_size": batch}
    vllm = {"tensor_parallel_size": tp}
    if not tp:
        trl["vllm_mode"], vllm = "colocate", {}
    config = server_config(tmp_path, trl=trl)
    raw = yaml.safe_load(config.read_text())
    raw["vllm"] = vllm or None
    config.write_text(yaml.safe_dump(raw))
    result = _modal_plan(config, "--gpus", f"H100:{gpus}")
    err = " ".join(result.stderr.split())
    assert (result.returncode == 1) is refused, err
    if refused:
        ranks = gpus - tp
        assert f"micro_batch_size x training ranks (2 x {ranks} = {2 * ranks})" in err


def test_the_trainer_connects_to_the_server_the_job_started(tmp_path):
    """GRPOConfig gets the loopback address and the one port, whichever key set it."""
    from payload.trainers.grpo import grpo_arguments

    cfg = load_config(server_config(tmp_path / "a", vllm={"port": 8124, "host": "0.0.0.0"}))
    args = grpo_arguments(cfg)
    assert (args["vllm_server_host"], args["vllm_server_port"]) == ("127.0.0.1", 8124)
    cfg = load_config(server_config(tmp_path / "b", trl={"vllm_server_port": 8125}))
    assert grpo_arguments(cfg)["vllm_server_port"] == 8125
    remote = load_config(server_config(tmp_path / "c", trl={"vllm_server_host": "10.0.0.2"}))
    assert grpo_arguments(remote)["vllm_server_host"] == "10.0.0.2"


def test_the_server_command_holds_every_key_the_config_sets(tmp_path):
    """Through TRL's own `trl vllm-serve` parser and its `vllm serve` command: each key
    lands where vLLM reads it (a key the command builder drops fails here)."""
    from trl.scripts.vllm_serve import build_command, make_parser

    from payload.runtime.vllm_server import server_args

    cfg = load_config(server_config(tmp_path, vllm={**VLLM, "port": 8126}))
    parsed, _ = make_parser().parse_args_and_config(
        args=server_args(cfg), return_remaining_strings=True
    )
    serve = build_command(parsed)
    for flag, value in [
        ("--tensor-parallel-size", "2"),
        ("--data-parallel-size", "1"),
        ("--gpu-memory-utilization", "0.55"),
        ("--dtype", "bfloat16"),
        ("--max-model-len", "384"),
        ("--host", "0.0.0.0"),
        ("--port", "8126"),
    ]:
        assert serve[serve.index(flag) + 1] == value, flag
    assert "--no-enable-prefix-caching" in serve
    assert serve[serve.index("serve") + 1] == TINY
