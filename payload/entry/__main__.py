"""`python -m payload.entry run JOB.json|- [--root DIR]`: run a RemoteJob on this node and
exit with its code (0 done, 1 a user error, 75 stopped after a checkpoint). `-` reads the
job from stdin. `--root DIR`: the job's /ferry paths (shipped inputs, working folder) are
under DIR on this node. SkyPilot's `run` script starts jobs this way."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    root = None
    if len(argv) == 4 and argv[2] == "--root":
        argv, root = argv[:2], argv[3]
    if len(argv) != 2 or argv[0] != "run":
        print("usage: python -m payload.entry run JOB.json|- [--root DIR]", file=sys.stderr)
        return 2
    from payload.entry.remote import run_job
    from payload.errors import FerryError
    from payload.runtime.job import RemoteJob

    try:
        text = sys.stdin.read() if argv[1] == "-" else open(argv[1]).read()  # noqa: SIM115
        job = RemoteJob.from_json(text)
        if root:
            job = job.rooted(root)
    except (OSError, FerryError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return run_job(job).exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
