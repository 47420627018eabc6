"""Shared fixtures: a private FERRY_HOME per test, GPU-test skipping, and one quickstart
run shared by every test that only needs to look at its results."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    LAUNCH_OUTPUTS,
    PLANTED,
    QUICKSTART,
    ROOT,
    assert_no_planted_leaks,
    launch,
)


def _has_skypilot() -> bool:
    """SkyPilot installed in this Python (by its distribution: a folder named like its
    package on sys.path would fool an import-spec lookup)."""
    try:
        importlib.metadata.version("skypilot")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# tests/sky_sdk/ need SkyPilot's SDK, which cannot share this Python with the training
# stack: `make test` runs them with .venv-sky (tests/sky_sdk/conftest.py says why).
collect_ignore = [] if _has_skypilot() else ["sky_sdk"]


def pytest_report_header(config):  # type: ignore[no-untyped-def]
    if collect_ignore:
        return "tests/sky_sdk: not collected (no SkyPilot in this Python); `make test` runs them"


os.environ["HF_HUB_OFFLINE"] = "1"
# A user's secrets, exported as users do; the S3 and Modal fixtures plant the other two.
os.environ["HF_TOKEN"] = PLANTED["HF_TOKEN"]
os.environ["WANDB_API_KEY"] = PLANTED["WANDB_API_KEY"]


def _hide_gpus() -> int:
    """Count the host's GPUs, then hide them from everything but the GPU tier: the
    default tier's pinned CPU losses, `2 x cpu (gloo)` runs and "needs a CUDA GPU"
    refusals then hold on any machine (see helpers.gpu_env)."""
    from executors.local import local_gpu_count

    gpus = local_gpu_count()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    local_gpu_count.cache_clear()
    return gpus


HOST_GPUS = _hide_gpus()


def _why_no_gpu_tier() -> str | None:
    """Why the GPU tier cannot run here, or None. Asked in a subprocess that sees the
    host's GPUs, so that torch in this process never initialises CUDA."""
    if not HOST_GPUS:
        return "needs a CUDA GPU (this machine has none): make test-gpu"
    from helpers import gpu_env

    env = {k: v for k, v in {**os.environ, **gpu_env()}.items() if v is not None}
    probe = "import torch; print(torch.__version__, torch.cuda.device_count())"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    version, _, count = done.stdout.strip().rpartition(" ")
    if done.returncode != 0 or count in ("", "0"):
        return (
            f"this machine has {HOST_GPUS} GPU(s), but torch {version or '(not importable)'} "
            "in this environment cannot use CUDA: install a CUDA build of torch==2.13.0 "
            "(PyPI's Linux wheel is one), then make test-gpu"
        )
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    why = _why_no_gpu_tier() if gpu_items else None
    if why:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(autouse=True)
def ferry_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own registry and run folders."""
    home = tmp_path / "ferry-home"
    monkeypatch.setenv("FERRY_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def no_planted_secret_leaks(request, tmp_path, ferry_home):
    """After every test: no planted secret (helpers.PLANTED) in any file it left under
    its FERRY_HOME and tmp_path (registry, run folders, logs, saved configs, file://
    storage), in its S3 bucket's objects, or in any `launch` output it captured."""
    LAUNCH_OUTPUTS.clear()
    yield
    objects: dict[str, bytes] = {}
    if hasattr(request.node, "ferry_bucket"):
        import boto3

        server, bucket = request.node.ferry_bucket
        client = boto3.client(
            "s3",
            endpoint_url=server,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                objects[f"s3://{bucket}/{item['Key']}"] = body
    assert_no_planted_leaks([tmp_path, ferry_home], list(LAUNCH_OUTPUTS), objects)


@dataclass
class QuickstartRun:
    result: subprocess.CompletedProcess[str]
    home: Path
    record: dict
    output_dir: Path


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> QuickstartRun:
    """`launch train examples/quickstart.yml`, once per session, exactly as the README says."""
    home = tmp_path_factory.mktemp("quickstart-home")
    env = {"FERRY_HOME": str(home)}
    result = launch("train", str(QUICKSTART.relative_to(ROOT)), env=env, timeout=600, check=True)
    runs = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    assert len(runs) == 1, runs
    assert_no_planted_leaks([home], [result.stdout + result.stderr], {})
    return QuickstartRun(result, home, runs[0], Path(runs[0]["output_dir"]))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on 127.0.0.1, for the session.
    Its address is what a cloud's S3 endpoint would be; nothing else is faked."""
    import shutil
    import socket
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # This virtualenv's moto (the dev extra's), not whichever one PATH finds first: an
    # older moto answers pyarrow's multipart uploads (Ray's storage) with errors.
    ours = Path(sys.executable).with_name("moto_server")
    exe = str(ours) if ours.exists() else shutil.which("moto_server")
    process = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(10)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request):
    """A fresh bucket on the moto server, with this process (and its children) pointed at
    it through the standard AWS environment variables."""
    import re

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-bkt"
    boto3.client("s3").create_bucket(Bucket=name)
    request.node.ferry_bucket = (s3_server, name)  # for the secret scan, after teardown
    return name


class ThrottledProxy:
    """A TCP proxy in front of the S3 server whose upload rate can be capped at any
    moment: a slow link between a cloud machine and its bucket. Requests pass through
    unchanged; only the bytes towards the server are paced, over all connections
    together."""

    CHUNK = 16 * 1024

    def __init__(self, upstream: str):
        import socket
        import threading
        from urllib.parse import urlparse

        target = urlparse(upstream)
        self.upstream = (target.hostname, target.port)
        # Bytes per second towards the server; None: no cap; 0: nothing passes (a stall).
        self.rate: float | None = None
        self._lock = threading.Lock()
        self._next_slot = 0.0
        self.listener = socket.socket()
        # A small receive buffer (inherited by each accepted connection): the client's
        # bytes wait on its side, as on a slow link, instead of piling up in this host.
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pace(self, size: int) -> None:
        import time

        while self.rate == 0:  # stalled until the test says otherwise
            time.sleep(0.05)
        rate = self.rate
        if not rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_slot)
            self._next_slot = start + size / rate
        time.sleep(max(self._next_slot - now, 0))

    def _pump(self, src, dst, upload: bool) -> None:  # type: ignore[no-untyped-def]
        import contextlib
        import socket

        try:
            while data := src.recv(self.CHUNK):
                if upload:
                    self._pace(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@pytest.fixture(scope="session")
def throttle_proxy(s3_server):
    proxy = ThrottledProxy(s3_server)
    yield proxy
    proxy.listener.close()


@pytest.fixture
def slow_s3_bucket(s3_bucket, throttle_proxy, monkeypatch):
    """The test's bucket, reached through the throttling proxy (uncapped until the test
    sets `throttle_proxy.rate`)."""
    throttle_proxy.rate = None
    monkeypatch.setenv("AWS_ENDPOINT_URL", throttle_proxy.url)
    yield s3_bucket
    throttle_proxy.rate = None


@pytest.fixture(scope="session")
def two_rank_reference(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of TWO_RANK_RUN on 2 gloo ranks, never interrupted: what every
    stopped and resumed run must reproduce."""
    from helpers import TWO_RANK_RUN, quickstart_config

    from payload.storage.layout import read_metrics

    home = tmp_path_factory.mktemp("two-rank-reference")
    cfg = quickstart_config(home, TWO_RANK_RUN)
    env = {"FERRY_HOME": str(home / "ferry")}
    trained = launch("train", str(cfg), "--gpus", "2", env=env, check=True, timeout=300)
    (run,) = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    losses = {r["step"]: r["loss"] for r in read_metrics(run["output_dir"]) if "loss" in r}
    assert sorted(losses) == list(range(1, 25))
    assert_no_planted_leaks([home], [trained.stdout + trained.stderr], {})
    return losses


@pytest.fixture(scope="module")
def tokenizer():
    """The bundled tiny tokenizer, loaded once per test module (tests that change it work
    on a copy)."""
    from helpers import ASSETS
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")


@dataclass
class RayHead:
    address: str  # the Jobs API (dashboard), as users pass it to --ray-address
    token: str  # the head's auth token (RAY_AUTH_MODE=token)
    temp_dir: Path


def _free_ports(count: int) -> list[int]:
    import socket

    probes, ports = [], []
    for _ in range(count):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        probes.append(probe)
        ports.append(probe.getsockname()[1])
    for probe in probes:
        probe.close()
    return ports


@pytest.fixture(scope="session")
def ray_head():
    """A real Ray head on 127.0.0.1 for the session: `ray start --head` with ray[default]
    (the dashboard and its Jobs API), every port explicit, a temp dir of its own, token
    authentication on; stopped with `ray stop` at the end. 4 CPUs: two 2-worker runs, or
    a 2-worker run and its driver, fit at once."""
    import secrets
    import shutil
    import tempfile

    ray = str(Path(sys.executable).with_name("ray"))
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    # Started from this virtualenv, as its user would: the jobs' `python` is this one.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    said = ""
    for _attempt in range(3):  # a port picked free may be taken before Ray binds it
        # Short: Ray's unix sockets live under it, and their paths must fit 107 bytes.
        temp = Path(tempfile.mkdtemp(prefix="ferry-ray-", dir="/tmp"))
        gcs, dashboard, client, agent, agent_grpc, metrics, env_agent, node, objects = _free_ports(
            9
        )
        command = [
            ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
            f"--node-manager-port={node}", f"--object-manager-port={objects}",
            # Workers below the kernel's ephemeral range, where the ports above come from.
            "--min-worker-port=10002", "--max-worker-port=19999",
            "--num-cpus=4", f"--temp-dir={temp}", "--disable-usage-stats",
        ]  # fmt: skip
        try:
            started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
            said = started.stdout + started.stderr
            if started.returncode == 0:
                break
        except subprocess.TimeoutExpired as e:
            said = f"ray start did not return within 120 s: {e.stdout!r} {e.stderr!r}"
        _stop_ray_head(ray, temp, env)
        shutil.rmtree(temp, ignore_errors=True)
    else:
        raise AssertionError(f"the Ray head did not start in 3 tries:\n{said}")
    try:
        yield RayHead(f"http://127.0.0.1:{dashboard}", token, temp)
    finally:
        _stop_ray_head(ray, temp, env)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_ray_head(ray: str, temp: Path, env: dict[str, str]) -> None:
    """`ray stop`, Ray's own command, when this head is the only Ray on the machine (it
    stops every one); else this head's processes alone, found by its temp dir."""
    import contextlib
    import signal
    import time

    def processes(pattern: str) -> set[int]:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
        return {int(p) for p in found.stdout.split()} - {os.getpid()}

    ours = processes(str(temp))
    if processes("ray/core/src/ray/(raylet|gcs)") <= ours:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes(str(temp)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(2)


@pytest.fixture
def on_ray(ray_head, monkeypatch):
    """This test's `launch` calls talk to the session's Ray head with its token."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ray_head
