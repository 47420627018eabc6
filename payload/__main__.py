"""`python -m payload train|preprocess CONFIG [--set key=value ...]`: what runs inside the
image.

`train` fine-tunes; `preprocess` only tokenizes, into the prepared-dataset cache
(`dataset_prepared_path`, by default $FERRY_HOME/prepared), and prints what it found.

Exit codes: 0 done; 1 a problem the user can fix (printed as one paragraph, and written
to FERRY_ERROR_FILE when the backend sets it, for the backend to report; never retried);
75 (EXIT_PREEMPTED) stopped by SIGTERM or SIGINT after saving and uploading a
checkpoint, relaunch to resume; 70 (EXIT_FAILED) anything else: another attempt may
succeed. A crash (an exception that is not a FerryError, a bug in Ferry) prints its
traceback, then one `error: rank N: Type: message` line, and writes that line to
FERRY_ERROR_FILE too, so that `launch status` names the rank and the exception; a failed
upload says what failed.

Started by `launch` (FERRY_RUN_ID is set), the config was validated and its warnings
printed before the run began, so they are not printed again here; run by hand, rank 0
prints them.

Test hooks: FERRY_TEST_CRASH=payload-preprocess makes `preprocess` raise a RuntimeError
once its config is loaded; FERRY_TEST_CRASH_RANK=N makes rank N raise a RuntimeError once
its config is loaded. They exist only so that tests can crash a real run; they are read
from the environment only, never from a config.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from payload.errors import EXIT_FAILED, FerryError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m payload")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune as the config says")
    prep = commands.add_parser("preprocess", help="tokenize into the prepared-dataset cache")
    prep.add_argument(
        "--result",
        metavar="FILE",
        help="write the outcome (or the error) as JSON here instead of printing it",
    )
    for command in (train, prep):
        command.add_argument("config", help="config path or https URL")
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key (dotted keys allowed)",
        )
    return parser


QUIET_AT_IMPORT = ("torchao", "bitsandbytes", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if rank == 0 else f"[rank {rank}] %(message)s",
    )
    if rank != 0 or os.environ.get("FERRY_RUN_ID"):
        # Every rank reads the same config; rank 0 warns, and `launch` warned already.
        logging.getLogger("ferry.config").setLevel(logging.ERROR)
    # Said at import by the training stack on every run, about optional kernels nothing
    # here uses (torchao's CUDA builds and Triton, bitsandbytes' hub kernels) and a torch
    # deprecation inside torchao: nothing a user can act on.
    for name in QUIET_AT_IMPORT:
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.command == "preprocess":
        return _preprocess(args)
    crash_rank = os.environ.get("FERRY_TEST_CRASH_RANK")  # test hook: see the docstring
    try:
        from payload.config import load_config

        cfg = load_config(args.config, args.overrides)
        if crash_rank == str(rank):
            raise RuntimeError(f"FERRY_TEST_CRASH_RANK={crash_rank}: a crash for the tests")
        from payload.runtime.unused import keep_out

        keep_out(cfg)  # before the training stack imports them (payload.runtime.unused)
        from payload.plugins import Plugins

        Plugins(cfg).before_import()  # before the training stack (and Triton) is imported
        from payload import kernels

        kernels.before_import(cfg)  # the fused LoRA layers, on a CPU: Triton's interpreter
        from payload.durability import Preempted
        from payload.train import run

        try:
            run(cfg)
        except Preempted as e:
            from payload.entry.torchrun import confirm_stop

            if rank == 0:
                print(f"preempted: {e}", file=sys.stderr, flush=True)
            confirm_stop(rank)
            return e.exit_code
    except FerryError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
        if code == 1:  # only the user's own problems go to the wrapper as such
            _record_error(os.environ.get("FERRY_ERROR_FILE"), e.message, e.hint)
        return code
    except Exception as e:  # a crash: its traceback, and a code that allows another attempt
        import traceback

        traceback.print_exc()
        detail = f"rank {rank}: {type(e).__name__}: {e}"
        hint = "This is a bug in Ferry; the traceback is in the run's log."
        print(f"error: {detail}\n{hint}", file=sys.stderr, flush=True)
        _record_error(os.environ.get("FERRY_ERROR_FILE"), detail, hint)
        return EXIT_FAILED
    return 0


def _record_error(path: str | None, message: str, hint: str | None) -> None:
    """The first rank to fail tells the backend why (the others may fail because of it)."""
    if not path:
        return
    try:
        with open(path, "x") as f:
            json.dump({"error": message, "hint": hint}, f)
    except OSError:
        pass  # another rank was first, or the folder is gone: the log has it anyway


def _preprocess(args: argparse.Namespace) -> int:
    result_file = Path(args.result) if args.result else None
    try:
        from payload.config import load_config

        cfg = load_config(args.config, args.overrides)
        if os.environ.get("FERRY_TEST_CRASH") == "payload-preprocess":  # test hook (docstring)
            raise RuntimeError("FERRY_TEST_CRASH=payload-preprocess: a crash for the tests")
        import datasets

        from payload.data.build import preprocess

        datasets.disable_progress_bars()  # ours is enough
        result = preprocess(cfg)
    except FerryError as e:
        if result_file is None:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            result_file.write_text(json.dumps({"error": e.message, "hint": e.hint}))
        return 1
    except Exception as e:  # a bug: the launcher reports it as one, with this traceback
        import traceback

        if result_file is None:
            raise
        crash = {"crash": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        result_file.write_text(json.dumps(crash))
        return EXIT_FAILED
    if result_file is not None:
        result_file.write_text(json.dumps(result, indent=2))
        return 0
    for line in result["lines"]:
        print(f"data: {line}", flush=True)
    if result["default_path"]:
        print(
            f"dataset_prepared_path is not set: prepared under {Path(result['path']).parent}. "
            "Set it in the config so that training loads this cache.",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written and closed. Exit without the interpreter's teardown: native
    # destructors of torch's distributed objects can still hang there (see train.run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
