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
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from payload.errors import EXIT_FAILED, EXIT_PREEMPTED
from payload.runtime.procs import STOP_SIGNALS

MARKERS_ENV = "FERRY_STOP_MARKERS"  # a folder where each rank confirms a clean stop


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
        return _run(args, markers)
    finally:
        shutil.rmtree(markers, ignore_errors=True)


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
