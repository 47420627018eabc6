"""`python -m payload.entry.torchrun [torchrun args] -m payload train CFG`: torchrun, tidied.

Every backend starts training through this module, with arguments from
`payload.runtime.cluster.torchrun_args`. It is torch's own launcher
(`torch.distributed.run`) with two changes a user sees only when something stops:
- a rank that exits with an error leaves one line here instead of the agent's traceback
  (the rank's own message is already in the log above it), and the first failed rank's
  exit code becomes this process's, so a distinct code from the payload survives;
- SIGTERM (a cloud's preemption notice) and SIGINT (Modal's) end it with EXIT_PREEMPTED
  (75) once torchrun has passed the signal on and the ranks have saved, uploaded and
  stopped (see payload.durability); torchrun waits `--shutdown-timeout` seconds for that
  before it kills them. SIGHUP ends it with 128+signal. One line, no traceback.
"""

from __future__ import annotations

import signal
import sys

from payload.errors import EXIT_PREEMPTED

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # "save and stop", from a cloud or Modal


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv if argv is not None else sys.argv[1:]))
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
        print(f"torchrun: stopped by {e.sigval.name}", file=sys.stderr, flush=True)
        if e.sigval in STOP_SIGNALS:
            return EXIT_PREEMPTED
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
