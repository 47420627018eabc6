"""`launch`: the command line, a thin layer over `launcher.api`.

Module level imports typer only; each command imports what it needs, so `launch --help`
and `launch validate` start fast and never touch torch or a cloud SDK.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

app = typer.Typer(
    name="launch",
    help="Fine-tune an LLM on any compute: validate a config, train it locally or in the "
    "cloud, and follow the runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# ---- options shared by several commands, defined once
ConfigArg = Annotated[
    str, typer.Argument(help="Config file path or https URL.", metavar="CONFIG", show_default=False)
]
RunArg = Annotated[
    str, typer.Argument(help="Run id (see `launch runs`).", metavar="RUN", show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a config key; dotted keys reach nested ones (datasets.0.path=...).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def _debug() -> bool:
    return os.environ.get("FERRY_DEBUG") == "1"


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    if debug:
        os.environ["FERRY_DEBUG"] = "1"


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config (keys, values, cross-key rules, files it names) without running it."""
    from launcher import api, output

    cfg = api.validate(config, set_ or [])
    output.validated(config, cfg)


@app.command()
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    cloud: Annotated[
        str, typer.Option("--cloud", "-c", metavar="BACKEND", help="Backend to run on.")
    ] = "local",
    gpus: Annotated[
        str | None,
        typer.Option(
            "--gpus",
            "-g",
            metavar="[ACCELERATOR:]N",
            help="Processes per node: GPUs (H100:8), or CPU processes without GPUs.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; start nothing.")
    ] = False,
    detach: Annotated[
        bool,
        typer.Option("--detach", "-d", help="Return after submitting; do not follow the logs."),
    ] = False,
) -> None:
    """Train one config. Follows the logs until the run ends unless --detach."""
    from launcher import api, output

    if dry_run:
        output.plan(api.plan(config, set_ or [], cloud=cloud, gpus=gpus))
        return
    record = api.train(config, set_ or [], cloud=cloud, gpus=gpus)
    output.submitted(record, detach=detach)
    if detach:
        return
    try:
        for line in api.logs(record.run_id, follow=True):
            output.log_line(line)
    except KeyboardInterrupt:
        output.note(f"\ninterrupted: cancelling {record.run_id} ...")
        api.cancel(record.run_id)
    final = api.wait(record.run_id)
    output.finished(final)
    if final.state != "succeeded":
        raise typer.Exit(1)


@app.command()
def runs(
    json_: JsonOpt = False,
    limit: Annotated[
        int, typer.Option("--limit", "-n", metavar="N", help="Show at most N runs.")
    ] = 20,
) -> None:
    """List recent runs, newest first."""
    from launcher import api, output

    records = api.runs(limit=limit)
    if json_:
        print(json.dumps([r.to_dict() for r in records], indent=2))
    else:
        output.runs_table(records)


@app.command()
def status(run_id: RunArg, json_: JsonOpt = False) -> None:
    """Show one run: state, resources, where its files are, its final metrics."""
    from launcher import api, output

    record = api.status(run_id)
    if json_:
        print(json.dumps(record.to_dict(), indent=2))
    else:
        output.run_details(record)


@app.command()
def logs(
    run_id: RunArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the run ends.")
    ] = False,
) -> None:
    """Print a run's log."""
    from launcher import api, output

    try:
        for line in api.logs(run_id, follow=follow):
            output.log_line(line)
    except KeyboardInterrupt:
        pass  # stop following; the run goes on


@app.command()
def cancel(run_id: RunArg, yes: YesOpt = False) -> None:
    """Stop a run: SIGTERM to all its processes, SIGKILL after a grace period."""
    from launcher import api, output

    output.confirm(f"Cancel run {run_id}?", yes)
    record = api.cancel(run_id)
    output.cancelled(record)


def main() -> None:
    """Console entry point: the one place user errors become a clean message and exit 1."""
    from payload.errors import FerryError

    if "--debug" in sys.argv[1:]:
        os.environ["FERRY_DEBUG"] = "1"
    _route_warnings()
    try:
        app()
    except FerryError as e:
        from launcher import output

        if _debug():
            import traceback

            traceback.print_exc()
        output.error(e)
        sys.exit(1)
    finally:
        # Nothing is left to collect: skip the interpreter's last full GC pass over
        # everything pydantic and typer built, about 0.1 s of every command's exit.
        import gc

        gc.freeze()


def _route_warnings() -> None:
    """Config warnings (settings that would be ignored) print as yellow lines."""
    import logging

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            from launcher import output

            output.warning(record.getMessage())

    logger = logging.getLogger("ferry")
    logger.addHandler(_Handler(level=logging.WARNING))
    logger.propagate = False


if __name__ == "__main__":
    main()
