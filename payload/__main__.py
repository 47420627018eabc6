"""`python -m payload train CONFIG [--set key=value ...]`: what runs inside the image.

Exit codes: 0 trained; 1 a problem the user can fix (printed as one paragraph); 75
(EXIT_PREEMPTED) stopped by SIGTERM after saving a checkpoint, relaunch to resume; any
other failure keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from payload.errors import FerryError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m payload")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune as the config says")
    train.add_argument("config", help="config path or https URL")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted keys allowed)",
    )
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if rank == 0 else f"[rank {rank}] %(message)s",
    )
    try:
        from payload.config import load_config

        cfg = load_config(args.config, args.overrides)
        from payload.durability import Preempted
        from payload.train import run

        try:
            run(cfg)
        except Preempted as e:
            if rank == 0:
                print(f"preempted: {e}", file=sys.stderr, flush=True)
            return e.exit_code
    except FerryError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written and closed. Exit without the interpreter's teardown: native
    # destructors of torch's distributed objects can still hang there (see train.run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
