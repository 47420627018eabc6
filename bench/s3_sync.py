"""Ferry's checkpoint sync against `aws s3 sync`, on a local S3 server (moto).

    python bench/s3_sync.py [--size-mb 1024] [--aws PATH_TO_aws]

A checkpoint-like folder (three large shards and a few small files, ~1 GB in all) is
uploaded by Ferry (`payload.storage.upload_folder`, as the training callback calls it)
and by `aws s3 sync --endpoint-url`, each to its own prefix of a fresh bucket; then the
unchanged folder is synced again by both. Ferry runs in this process, as it does inside
a training run, where boto3 is already loaded; `aws` is a new process each time, as it
is when users script it. Both sides are also reported with Ferry in a new process.

The AWS CLI is not a Ferry dependency (its botocore pin fights boto3's); install it in
its own environment (`python -m venv /tmp/aws && /tmp/aws/bin/pip install awscli`) and
pass --aws /tmp/aws/bin/aws, or have `aws` on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "config.json": 2_000,
    "tokenizer.json": 2_000_000,
    "trainer_state.json": 50_000,
    "rng_state.pth": 15_000,
}


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    server = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(url, timeout=1)
            return server, url
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("moto_server did not start")


def make_checkpoint(folder: Path, total_mb: int) -> int:
    shard = (total_mb * 1024 * 1024 - sum(SMALL.values())) // 3
    folder.mkdir(parents=True)
    for i in range(3):
        with (folder / f"model-{i + 1:05d}-of-00003.safetensors").open("wb") as f:
            left = shard
            while left:
                block = min(left, 16 * 1024 * 1024)
                f.write(os.urandom(block))
                left -= block
    for name, size in SMALL.items():
        (folder / name).write_bytes(os.urandom(size))
    return sum(p.stat().st_size for p in folder.iterdir())


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--aws", default=shutil.which("aws"))
    args = parser.parse_args()
    if not args.aws:
        raise SystemExit("needs the AWS CLI: see this script's docstring (--aws PATH)")

    server, url = start_moto()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    try:
        import boto3

        from payload.storage import open_store, upload_folder

        boto3.client("s3").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            folder = Path(tmp) / "checkpoint-1000"
            total = make_checkpoint(folder, args.size_mb)
            print(f"folder: {total / 1e6:,.0f} MB in {len(list(folder.iterdir()))} files")

            store = open_store("s3://bench/ferry")
            sent: list[int] = []
            store.client.meta.events.register(
                "before-send.s3.*",
                lambda request, **_: sent.append(
                    len(request.body or b"") if isinstance(request.body, bytes) else 0
                ),
            )

            def aws(prefix: str) -> list[str]:
                return [
                    args.aws,
                    "s3",
                    "sync",
                    str(folder),
                    f"s3://bench/{prefix}",
                    "--endpoint-url",
                    url,
                    "--only-show-errors",
                ]

            # Two full uploads each, alternating, best of two: the local server's speed
            # drifts by ~15% between runs on a 2-core machine.
            ferry_times, aws_times = [], []
            for attempt, target in enumerate([store, open_store("s3://bench/ferry2")]):
                took, first = timed(lambda t=target: upload_folder(folder, t, "checkpoint-1000"))
                ferry_times.append(took)
                aws_times.append(
                    timed(lambda a=attempt: subprocess.run(aws(f"aws{a}"), env=env, check=True))[0]
                )
            ferry_up, aws_up = min(ferry_times), min(aws_times)
            sent.clear()
            ferry_again, again = timed(lambda: upload_folder(folder, store, "checkpoint-1000"))
            resync_bytes = sum(sent)
            aws_again, _ = timed(lambda: subprocess.run(aws("aws0"), env=env, check=True))
            code = (
                "import sys; from pathlib import Path; from payload.storage import "
                "open_store, upload_folder; upload_folder(Path(sys.argv[1]), "
                "open_store('s3://bench/ferry'), 'checkpoint-1000')"
            )
            ferry_proc, _ = timed(
                lambda: subprocess.run(
                    [sys.executable, "-c", code, str(folder)], env=env, check=True
                )
            )
    finally:
        server.terminate()

    assert first.bytes_sent == total and again.bytes_sent == 0
    print(
        f"full upload:    ferry {ferry_up:6.2f} s ({total / ferry_up / 1e6:,.0f} MB/s)   "
        f"aws s3 sync {aws_up:6.2f} s ({total / aws_up / 1e6:,.0f} MB/s)"
    )
    print(
        f"  (each: ferry {', '.join(f'{t:.2f}' for t in ferry_times)} s; "
        f"aws {', '.join(f'{t:.2f}' for t in aws_times)} s)"
    )
    print(
        f"unchanged sync: ferry {ferry_again:6.3f} s in-process, {ferry_proc:.3f} s as a new "
        f"process   aws s3 sync {aws_again:6.3f} s"
    )
    print(f"RESULT s3_upload_speedup_vs_aws_cli {aws_up / ferry_up:.2f} x")
    print(f"RESULT s3_resync_bytes {resync_bytes} bytes")
    print(f"RESULT s3_resync_speedup_vs_aws_cli {aws_again / ferry_again:.1f} x")
    print(f"RESULT s3_resync_speedup_vs_aws_cli_new_process {aws_again / ferry_proc:.1f} x")


if __name__ == "__main__":
    main()
