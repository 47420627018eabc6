"""Ferry's checkpoint sync against `aws s3 sync`, on a local S3 server (moto).

    python bench/s3_sync.py [--size-mb 1024] [--aws PATH_TO_aws]

A checkpoint-like folder (three large shards and a few small files, ~1 GB in all) goes
to a fresh bucket on moto's S3 server on 127.0.0.1. What each side does:

Full upload, cold (`s3_upload_speedup_vs_aws_cli`). Ferry: a new Python process runs
`payload.storage.upload_folder` to a new prefix, with the folder's checksum cache
(`.ferry-sums.json`) deleted first, so it hashes every file (sha256, for its manifest)
and sends everything. aws: a new process runs `aws s3 sync --endpoint-url` to a new
prefix. Both pay interpreter start-up and imports. Two runs each, alternating; the best
counts (the local server's speed drifts ~15% between runs on a 2-core machine). The same
upload inside a process that has boto3 loaded already, as the training callback runs it,
is reported apart and labelled in-process.

Unchanged re-sync (`s3_resync_speedup_vs_aws_cli`). Both sides again as new processes,
on the folder they uploaded. They do not check the same thing: Ferry reads its own
manifest (one GET) and compares it with the local checksums, cached by size and mtime;
aws lists the remote prefix and compares sizes and mtimes. So a third figure has Ferry
list the prefix too before it syncs (`s3_resync_with_listing_speedup_vs_aws_cli`), doing
at least the remote work aws does. Three runs each, alternating; the median counts.

The AWS CLI is not a Ferry dependency (its botocore pin fights boto3's); install it in
its own environment (`python -m venv /tmp/aws && /tmp/aws/bin/pip install awscli`) and
pass --aws /tmp/aws/bin/aws, or have `aws` on PATH.
"""

from __future__ import annotations

import argparse
import json
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


# Ferry as a new process: what `launch pull` or a script would pay; prints its Transfer.
CHILD = """
import json, sys
from pathlib import Path
from payload.storage import open_store, upload_folder
folder, uri, listing = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "list"
store = open_store(uri)
if listing:
    store.list("checkpoint-1000")  # the remote listing aws s3 sync starts from
done = upload_folder(folder, store, "checkpoint-1000")
print(json.dumps({"bytes_sent": done.bytes_sent, "files_sent": done.files_sent}))
"""


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def runs(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


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
        from payload.storage.sync import SUMS_CACHE

        boto3.client("s3").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            folder = Path(tmp) / "checkpoint-1000"
            total = make_checkpoint(folder, args.size_mb)
            print(f"folder: {total / 1e6:,.0f} MB in {len(list(folder.iterdir()))} files")

            def ferry(prefix: str, listing: bool = False) -> dict:
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, str(folder), f"s3://bench/{prefix}",
                     "list" if listing else "plain"],
                    env=env, cwd=ROOT, check=True, capture_output=True, text=True,
                )  # fmt: skip
                return json.loads(done.stdout.strip().splitlines()[-1])

            def aws(prefix: str) -> None:
                subprocess.run(
                    [args.aws, "s3", "sync", str(folder), f"s3://bench/{prefix}",
                     "--endpoint-url", url, "--only-show-errors",
                     "--exclude", SUMS_CACHE],  # Ferry's local cache: not part of the folder
                    env=env, check=True,
                )  # fmt: skip

            def cold(fn):  # type: ignore[no-untyped-def]
                (folder / SUMS_CACHE).unlink(missing_ok=True)  # hash every file again
                return timed(fn)

            up_ferry, up_aws, up_inproc = [], [], []
            for a in range(2):
                took, sent = cold(lambda a=a: ferry(f"ferry{a}"))
                assert sent["bytes_sent"] == total, sent
                up_ferry.append(took)
                up_aws.append(timed(lambda a=a: aws(f"aws{a}"))[0])
                store = open_store(f"s3://bench/inproc{a}")
                took, done = cold(lambda s=store: upload_folder(folder, s, "checkpoint-1000"))
                assert done.bytes_sent == total
                up_inproc.append(took)

            again_ferry, again_list, again_aws, again_inproc = [], [], [], []
            sent_again = []
            store = open_store("s3://bench/ferry0")
            for _ in range(3):
                took, sent = timed(lambda: ferry("ferry0"))
                again_ferry.append(took)
                sent_again.append(sent["bytes_sent"])
                took, sent = timed(lambda: ferry("ferry0", listing=True))
                again_list.append(took)
                sent_again.append(sent["bytes_sent"])
                again_aws.append(timed(lambda: aws("aws0"))[0])
                took, done = timed(lambda: upload_folder(folder, store, "checkpoint-1000"))
                again_inproc.append(took)
                sent_again.append(done.bytes_sent)
    finally:
        server.terminate()

    best_ferry, best_aws, best_inproc = min(up_ferry), min(up_aws), min(up_inproc)
    print(
        f"full upload, cold, new process each: ferry {best_ferry:6.2f} s "
        f"({total / best_ferry / 1e6:,.0f} MB/s; runs {runs(up_ferry)})   "
        f"aws s3 sync {best_aws:6.2f} s ({total / best_aws / 1e6:,.0f} MB/s; runs {runs(up_aws)})"
    )
    print(f"full upload, cold, in-process ferry: {best_inproc:6.2f} s (runs {runs(up_inproc)})")
    print(
        f"unchanged re-sync, new process each (median of 3): ferry {median(again_ferry):.3f} s "
        f"({runs(again_ferry)}), ferry + listing {median(again_list):.3f} s "
        f"({runs(again_list)}), aws s3 sync {median(again_aws):.3f} s ({runs(again_aws)})"
    )
    print(
        f"unchanged re-sync, in-process ferry: {median(again_inproc):.3f} s ({runs(again_inproc)})"
    )
    print(f"RESULT s3_upload_speedup_vs_aws_cli {best_aws / best_ferry:.2f} x")
    print(f"RESULT s3_upload_in_process_speedup_vs_aws_cli {best_aws / best_inproc:.2f} x")
    print(f"RESULT s3_resync_bytes {sum(sent_again)} bytes")
    print(f"RESULT s3_resync_speedup_vs_aws_cli {median(again_aws) / median(again_ferry):.2f} x")
    print(
        "RESULT s3_resync_with_listing_speedup_vs_aws_cli "
        f"{median(again_aws) / median(again_list):.2f} x"
    )
    print(
        "RESULT s3_resync_in_process_speedup_vs_aws_cli "
        f"{median(again_aws) / median(again_inproc):.1f} x"
    )


if __name__ == "__main__":
    main()
