"""`launch`: the command line, a thin layer over `launcher.api`.

Module level imports typer only; each command imports what it needs, so `launch --help`
and `launch validate` start fast and never touch torch or a cloud SDK.

No `from __future__ import annotations` here: typer reads every command's annotations
when it builds the CLI, on every run, and string annotations it must evaluate each time
it reads them (~7 ms of every command); as objects they are evaluated once, at import.
"""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
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
DetachRunOpt = Annotated[
    bool, typer.Option("--detach", "-d", help="Return after submitting; do not follow the logs.")
]
GpusOpt = Annotated[
    str | None,
    typer.Option(
        "--gpus",
        "-g",
        metavar="[ACCELERATOR:]N",
        help="Per node: GPUs (H100:8), or CPU processes on a machine without GPUs.",
    ),
]
NodesOpt = Annotated[int | None, typer.Option("--nodes", metavar="N", help="Machines.")]
CpuOpt = Annotated[float | None, typer.Option("--cpu", metavar="CORES", help="Per node.")]
MemoryOpt = Annotated[
    str | None, typer.Option("--memory", metavar="SIZE", help="Per node: 64GB, 512MB.")
]
TimeoutOpt = Annotated[
    str | None, typer.Option("--timeout", metavar="DURATION", help="Stop after: 24h, 90m.")
]
StopGraceOpt = Annotated[
    str | None,
    typer.Option(
        "--stop-grace",
        metavar="DURATION",
        help="After a stop signal (preemption, cancel): time to save and upload a "
        "checkpoint before the run is killed. Default 120s.",
    ),
]
RetriesOpt = Annotated[
    int | None, typer.Option("--retries", metavar="N", help="Restarts after a failure.")
]
RegionOpt = Annotated[str | None, typer.Option("--region", help="Cloud region.")]
SpotOpt = Annotated[
    bool | None, typer.Option("--spot/--no-spot", help="Preemptible machines (or not).")
]
SecretOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--secret",
        metavar="NAME",
        help="A secret the backend stores, by name (repeat). Never a value.",
    ),
]
EnvOpt = Annotated[
    list[str] | None,
    typer.Option("--env", metavar="KEY=VALUE", help="Extra environment (repeat); not secrets."),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        metavar="FILE",
        help="Launch settings from a YAML file (Axolotl cloud YAML works too).",
    ),
]
StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        metavar="URI",
        help="Sync checkpoints and artifacts here (file://, s3://, volume://); "
        "each run goes under URI/<run id>. Default: the config's `storage`, else "
        "the backend's (local: $FERRY_HOME/storage).",
    ),
]

RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        metavar="URL",
        help="With --cloud ray: the cluster's Jobs API address (http://HEAD:8265). "
        "Default: `launch.ray.address`, else RAY_ADDRESS.",
    ),
]

ManagedOpt = Annotated[
    bool,
    typer.Option(
        "--managed",
        help="With --cloud sky: a managed job, recovered after preemption (as "
        "`launch.managed: true`).",
    ),
]
CostYesOpt = Annotated[
    bool,
    typer.Option(
        "--yes", "-y", help="Launch even if the estimated cost is above `launch.max_cost`."
    ),
]


def _debug() -> bool:
    return os.environ.get("FERRY_DEBUG") == "1"


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    if debug:
        os.environ["FERRY_DEBUG"] = "1"
    # Test hook, for tests only: FERRY_TEST_CRASH=<command> makes that command raise an
    # unexpected exception, so that the crash handler in `main` can be tested through
    # the real CLI. Read from the environment only; no config can set it.
    if ctx.invoked_subcommand and os.environ.get("FERRY_TEST_CRASH") == ctx.invoked_subcommand:
        raise RuntimeError(f"FERRY_TEST_CRASH={ctx.invoked_subcommand}: a crash for the tests")


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config (keys, values, cross-key rules, files it names) without running it."""
    from launcher import api, output

    cfg = api.validate(config, set_ or [], compiled=True)
    output.validated(config, cfg)


@app.command()
def preprocess(config: ConfigArg, set_: SetOpt = None, json_: JsonOpt = False) -> None:
    """Tokenize a config's datasets into the prepared cache (dataset_prepared_path), or
    find them there, without training. A run with the same data settings loads it."""
    from launcher import api, output

    result = api.preprocess(config, set_ or [])
    if json_:
        print(json.dumps(asdict(result), indent=2))
        return
    if result.path is None:  # a vision-language config: rows checked, nothing cached
        output.say("checked every row (image chats are processed as training draws them)")
    else:
        output.say(f"prepared {result.path} ({'cache hit' if result.hit else 'tokenized now'})")
    for line in result.lines:
        output.say(f"  {line}")
    if result.default_path:
        output.warning(
            f"dataset_prepared_path is not set, so this went under {Path(result.path).parent}; "
            f"set `dataset_prepared_path: {Path(result.path).parent}` for training to use it."
        )


def _launch_flags(  # type: ignore[no-untyped-def]
    env: list[str] | None, ray_address: str | None = None, managed: bool = False, **flags
):
    """The launch flags as `launcher.api` takes them (names as in `launch:`)."""
    from payload.errors import FerryError

    if ray_address:
        flags["ray"] = {"address": ray_address}
    if managed:
        flags["managed"] = True

    pairs = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FerryError(f"--env {item!r} is not of the form KEY=VALUE.")
        pairs[key] = value
    return {**flags, "env": pairs}


@app.command()
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    cloud: Annotated[
        str | None,
        typer.Option(
            "--cloud",
            "-c",
            metavar="BACKEND",
            help="Backend to run on (default: the config's, else local).",
        ),
    ] = None,
    gpus: GpusOpt = None,
    nodes: NodesOpt = None,
    cpu: CpuOpt = None,
    memory: MemoryOpt = None,
    timeout: TimeoutOpt = None,
    retries: RetriesOpt = None,
    region: RegionOpt = None,
    spot: SpotOpt = None,
    secret: SecretOpt = None,
    env: EnvOpt = None,
    storage: StorageOpt = None,
    stop_grace: StopGraceOpt = None,
    profile: ProfileOpt = None,
    ray_address: RayAddressOpt = None,
    managed: ManagedOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; start nothing.")
    ] = False,
    detach: DetachRunOpt = False,
    yes: CostYesOpt = False,
) -> None:
    """Train one config. Follows the logs until the run ends unless --detach."""
    from launcher import api, output

    launch = _launch_flags(
        env,
        ray_address,
        managed,
        cloud=cloud,
        gpus=gpus,
        nodes=nodes,
        cpu=cpu,
        memory=memory,
        timeout=timeout,
        retries=retries,
        region=region,
        spot=spot,
        secrets=secret,
        storage=storage,
        stop_grace=stop_grace,
    )
    if dry_run:
        output.plan(api.plan(config, set_ or [], profile=profile, **launch))
        return
    _follow(api.train(config, set_ or [], profile=profile, confirm=_confirm(yes), **launch), detach)


def _confirm(yes: bool):  # type: ignore[no-untyped-def]
    """How a launch above `launch.max_cost` gets its yes: --yes, else a question at a
    terminal, else none (refused with the figure)."""
    if yes:
        return lambda _why: True
    if sys.stdin.isatty():
        return lambda why: typer.confirm(f"{why}. Launch anyway?", default=False)
    return None


@app.command()
def resume(run_id: RunArg, detach: DetachRunOpt = False, yes: CostYesOpt = False) -> None:
    """Relaunch a stopped run (preempted, failed, cancelled) under the same run id; with
    storage it continues from its newest complete checkpoint."""
    from launcher import api

    _follow(api.resume(run_id, confirm=_confirm(yes)), detach)


def _follow(record, detach: bool) -> None:  # type: ignore[no-untyped-def]
    """Print the follow-up commands, or follow the log to the end and summarise.
    Ctrl-C while following cancels the run."""
    from launcher import api, output

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
def pull(
    run_id: RunArg,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            "--checkpoint",
            metavar="N|latest|all",
            help="A checkpoint instead of the final artifacts.",
        ),
    ] = None,
    dest: Annotated[
        str | None, typer.Option("--dest", metavar="DIR", help="Where to put it (default ./RUN).")
    ] = None,
) -> None:
    """Download a run's final artifacts (or checkpoints) from its storage, verified."""
    from launcher import api, output

    plan = api.pull_plan(run_id, checkpoint, dest)
    output.pulled(plan, api.pull)


@app.command()
def cancel(run_id: RunArg, yes: YesOpt = False) -> None:
    """Stop a run: it saves and uploads a checkpoint first (within its stop grace
    period); on the local backend what is left after that is killed."""
    from launcher import api, output

    output.confirm(f"Cancel run {run_id}?", yes)
    record = api.status(run_id)
    if record.state == "running" and record.backend == "local":
        from payload.runtime.job import DEFAULT_STOP_GRACE_S

        grace = record.resources.get("stop_grace_s", DEFAULT_STOP_GRACE_S)
        output.note(f"stopping {run_id}: it saves and uploads a checkpoint first (up to {grace} s)")
    output.cancelled(api.cancel(run_id))


# ---- after training: merge-lora, inference, evaluate, quantize (payload/posttrain). The
# training stack (torch, transformers, peft) loads inside each command, never for --help.

TargetArg = Annotated[
    str,
    typer.Argument(
        help="A run id (its artifacts are pulled from storage if they are not here) or a "
        "config path (its output_dir holds the trained model).",
        metavar="RUN|CONFIG",
        show_default=False,
    ),
]
DestOpt = Annotated[
    str | None, typer.Option("--dest", metavar="DIR", help="Where to save it.", show_default=False)
]


@app.command("merge-lora")
def merge_lora(run: TargetArg, dest: DestOpt = None) -> None:
    """Merge a trained LoRA adapter into its base model and save one plain model (default
    <output_dir>/merged). A QLoRA adapter merges into the de-quantized 4-bit base."""
    from launcher import api, output

    found = api.target(run)
    output.note(f"merging the adapter in {found.model_dir} into {found.cfg.base_model} ...")
    merged = api.merge_lora(found, dest)
    base = "de-quantized base" if merged.dequantized else "base"
    output.say(f"merged adapter + {base} ({merged.dtype}) saved to {merged.dest}")


@app.command("merge-sharded")
def merge_sharded(
    run: TargetArg,
    checkpoint: Annotated[
        int | None,
        typer.Option(
            "--checkpoint",
            metavar="N",
            help="checkpoint-N; default: the newest sharded save.",
            show_default=False,
        ),
    ] = None,
    dest: DestOpt = None,
) -> None:
    """Turn a sharded checkpoint of an FSDP2 run (fsdp_config.state_dict_type:
    SHARDED_STATE_DICT) into one model folder that loads with from_pretrained, or a peft
    adapter for a LoRA run (default <checkpoint>/merged)."""
    from launcher import api, output

    merged = api.merge_sharded(run, checkpoint, dest)
    kind = "peft adapter" if merged.adapter else "model"
    output.say(
        f"{merged.source} ({merged.tensors} tensors, written by {merged.world_size} ranks) "
        f"saved as one {kind} to {merged.dest}"
    )


@app.command()
def inference(
    run: TargetArg,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt", "-p", help="Complete this; without it, read one prompt a line from stdin."
        ),
    ] = None,
    json_: Annotated[
        bool,
        typer.Option(
            "--json", help='One JSON object a prompt: {"prompt", "text", "tokens", "new_tokens"}.'
        ),
    ] = False,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", metavar="N", help="Stop after N new tokens.")
    ] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", metavar="T", help="0: greedy; above 0: sample.")
    ] = 0.0,
    top_p: Annotated[
        float | None, typer.Option("--top-p", metavar="P", help="Nucleus sampling.")
    ] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", metavar="K", help="Sample from the K likeliest.")
    ] = None,
    no_chat_template: Annotated[
        bool,
        typer.Option(
            "--no-chat-template", help="Send the prompt as raw text, without the chat template."
        ),
    ] = False,
    image: Annotated[
        list[str] | None,
        typer.Option(
            "--image",
            "-i",
            metavar="PATH",
            help="A picture (path or URL) the prompt asks about; repeat for several. "
            "Vision-language models (processor_type) only.",
        ),
    ] = None,
) -> None:
    """Complete prompts with the trained model (base + adapter, or the full model), tokens
    streamed as they come. Greedy unless --temperature > 0. With --image, a
    vision-language model answers about the pictures."""
    from launcher import api, output
    from payload.posttrain.inference import Sampling, prompts_from

    sampling = Sampling(max_new_tokens, temperature, top_p, top_k, not no_chat_template)
    sampling.check()  # before the model loads
    interactive = prompt is None and sys.stdin.isatty()  # piped prompts get no "> " marks
    generator = api.generator(run, sampling)
    if not generator.templated and sampling.chat_template and not json_:
        output.note("the tokenizer has no chat template: prompts go in as raw text")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def ask():  # type: ignore[no-untyped-def]
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    for text in [prompt] if prompt is not None else prompts_from(ask()):
        if json_:
            print(json.dumps(generator.complete(text, images=image).to_dict()), flush=True)
        else:
            generator.complete(text, stream=write, images=image)
            write("\n")


@app.command()
def evaluate(run: TargetArg, json_: JsonOpt = False) -> None:
    """Eval loss and perplexity of the trained model on the config's eval set
    (test_datasets, or the val_set_size rows held out in training)."""
    from launcher import api, output

    result = api.evaluate(run)
    if json_:
        print(json.dumps(result.to_dict(), indent=2))
        return
    output.say(
        f"eval_loss {result.eval_loss:.4f}  perplexity {result.perplexity:.4f}  "
        f"({result.source}: {result.rows} rows, {result.tokens:,} trained tokens; "
        "token-weighted mean, nats per token)"
    )


@app.command()
def quantize(run: TargetArg, dest: DestOpt = None) -> None:
    """torchao post-training quantization (the config's `quantization:` keys; default int8
    weight-only) of the trained model, merged first if it is an adapter; saved to
    <output_dir>/quantized by default, loadable with from_pretrained."""
    from launcher import api, output

    found = api.target(run)
    if found.cfg.quantization is None:
        output.note("the config has no `quantization:` section: int8 weight-only (per row)")
    done = api.quantize(found, dest)
    merged = "adapter merged, then " if done.merged else ""
    output.say(
        f"{merged}quantized ({done.scheme}, torchao {done.torchao_config}, on {done.device}) "
        f"saved to {done.dest}"
    )


# ---- sweeps: `launch sweep CFG --sweep GRID.yml` runs one; subcommands look after it


class _SweepGroup(typer.core.TyperGroup):
    """`launch sweep CFG ...` means `launch sweep run CFG ...`: `run` is the default."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


sweep_app = typer.Typer(
    cls=_SweepGroup,
    help="Run a grid of configs side by side, follow it, and rank the results.\n\n"
    "launch sweep CFG --sweep GRID.yml [--cloud B ...] [--max-parallel K] runs one.",
    no_args_is_help=True,
)
app.add_typer(sweep_app, name="sweep")
SweepArg = Annotated[
    str, typer.Argument(help="Sweep id (printed by `launch sweep`).", metavar="SWEEP")
]
DetachOpt = Annotated[
    bool, typer.Option("--detach", "-d", help="Return at once; a background process dispatches.")
]


@sweep_app.command("run")
def sweep_run(
    config: ConfigArg,
    grid: Annotated[
        str,
        typer.Option("--sweep", metavar="GRID.yml", help="The sweep file: key -> list of values."),
    ],
    set_: SetOpt = None,
    cloud: Annotated[
        list[str] | None,
        typer.Option(
            "--cloud",
            "-c",
            metavar="BACKEND",
            help="Backend(s); repeat to spread trials over several.",
        ),
    ] = None,
    gpus: GpusOpt = None,
    nodes: NodesOpt = None,
    cpu: CpuOpt = None,
    memory: MemoryOpt = None,
    timeout: TimeoutOpt = None,
    retries: RetriesOpt = None,
    region: RegionOpt = None,
    spot: SpotOpt = None,
    secret: SecretOpt = None,
    env: EnvOpt = None,
    profile: ProfileOpt = None,
    max_parallel: Annotated[
        int, typer.Option("--max-parallel", "-k", metavar="K", help="Trials at once per backend.")
    ] = 1,
    max_trials: Annotated[
        int, typer.Option("--max-trials", metavar="N", help="Refuse grids larger than this.")
    ] = 256,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the trials and their plans; start nothing.")
    ] = False,
    detach: DetachOpt = False,
    storage: StorageOpt = None,
    stop_grace: StopGraceOpt = None,
    ray_address: RayAddressOpt = None,
    yes: CostYesOpt = False,
) -> None:
    """Expand the grid, validate every trial, then run them (the default subcommand)."""
    from launcher import api, output

    launch = _launch_flags(
        env,
        ray_address,
        gpus=gpus,
        nodes=nodes,
        cpu=cpu,
        memory=memory,
        timeout=timeout,
        retries=retries,
        region=region,
        spot=spot,
        secrets=secret,
        storage=storage,
        stop_grace=stop_grace,
    )
    plan = api.sweep_plan(
        config,
        grid,
        set_ or [],
        clouds=cloud,
        max_parallel=max_parallel,
        max_trials=max_trials,
        profile=profile,
        **launch,
    )
    for warning in plan.warnings:
        output.warning(warning)
    if dry_run:
        output.sweep_dry_run(plan, api.sweep_cost(plan))
        return
    sweep = api.sweep_start(plan, detach=detach, confirm=_confirm(yes))
    output.sweep_started(sweep, len(plan.trials), detach)
    if not detach:
        _follow_sweep(sweep.sweep_id)


def _follow_sweep(sweep_id: str) -> None:
    """Dispatch in the foreground, one line per event; then the summary and the report.
    Ctrl-C cancels the sweep."""
    from launcher import api, output

    try:
        api.sweep_dispatch(sweep_id, on_event=output.sweep_event)
    except KeyboardInterrupt:
        output.note(f"\ninterrupted: cancelled sweep {sweep_id}")
    sweep, trials = api.sweep_status(sweep_id)
    output.sweep_summary(sweep, trials)
    if any(t.state == "succeeded" for t in trials):
        try:
            report, data, png = api.sweep_report(sweep_id)
            output.sweep_report(report, data, png)
        except Exception as e:  # noqa: BLE001 - the sweep ran; a report problem must not hide it
            output.warning(f"could not write the report: {e}")
    if any(t.state != "succeeded" for t in trials):
        raise typer.Exit(1)


@sweep_app.command("status")
def sweep_status(
    sweep_id: SweepArg,
    json_: JsonOpt = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until the sweep ends.")
    ] = False,
) -> None:
    """The sweep's trials: state, backend, progress, loss."""
    from launcher import api, output

    if json_:
        sweep, trials = api.sweep_status(sweep_id)
        print(json.dumps({**sweep.to_dict(), "trials": [t.to_dict() for t in trials]}, indent=2))
        return
    output.sweep_status(sweep_id, watch)


@sweep_app.command("report")
def sweep_report(
    sweep_id: SweepArg,
    metric: Annotated[
        str | None,
        typer.Option("--metric", "-m", help="Rank by this (default: eval_loss, else loss)."),
    ] = None,
    mode: Annotated[str, typer.Option("--mode", help="min or max: which end is best.")] = "min",
    out: Annotated[
        str | None, typer.Option("--out", "-o", metavar="DIR", help="Where report.json/png go.")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Rank the trials by a metric; write report.json and a PNG of their curves."""
    from launcher import api, output

    report, data, png = api.sweep_report(sweep_id, metric, mode, out)
    if json_:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        output.sweep_report(report, data, png)


@sweep_app.command("retry")
def sweep_retry(
    sweep_id: SweepArg,
    failed: Annotated[bool, typer.Option("--failed", help="Rerun the trials that failed.")] = False,
    detach: DetachOpt = False,
) -> None:
    """Rerun failed trials (--failed) and any the dispatcher never started."""
    from launcher import api, output

    queued = api.sweep_requeue(sweep_id, failed)
    output.say(
        f"retrying {len(queued)} trial(s): "
        + ", ".join(f"t{t.trial['index']} ({t.trial['name']})" for t in queued)
    )
    if detach:
        api.sweep_detach(sweep_id)
        return
    _follow_sweep(sweep_id)


@sweep_app.command("cancel")
def sweep_cancel(sweep_id: SweepArg, yes: YesOpt = False) -> None:
    """Stop the sweep: its running trials, its queue, its background dispatcher."""
    from launcher import api, output

    output.confirm(f"Cancel sweep {sweep_id} and all its unfinished trials?", yes)
    trials = api.sweep_cancel(sweep_id)
    output.say(
        f"cancelled sweep {sweep_id}: "
        + ", ".join(f"t{t.trial['index']} {t.state}" for t in trials)
    )


# What `launch` exits with (scripts may tell them apart).
EXIT_USER_ERROR = 1  # a FerryError: something the user can fix
EXIT_BUG = 2  # any other exception: a bug in Ferry, its traceback in a crash log


def main() -> None:
    """Console entry point, the one top-level handler: user errors become a clean message
    and exit 1; any other exception (a bug) one paragraph naming a crash log that holds
    its traceback, and exit 2. Tracebacks reach the screen only with --debug."""
    from payload.errors import FerryError

    if "--debug" in sys.argv[1:]:
        os.environ["FERRY_DEBUG"] = "1"
    from payload.runtime.procs import skip_pydantic_plugin_scan

    skip_pydantic_plugin_scan()  # ~27 ms of a validate (payload.runtime.procs)
    _route_warnings()
    code = 0
    try:
        _check_argv()
        app()
    except FerryError as e:
        from launcher import output

        if _debug():
            import traceback

            traceback.print_exc()
        output.error(e)
        code = EXIT_USER_ERROR
    except SystemExit as e:  # typer's own exit, with its code
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == EXIT_BUG:  # click's usage errors (a bad option): the user's, so 1
            code = EXIT_USER_ERROR
    except Exception as e:  # a bug in Ferry; KeyboardInterrupt is not one and passes by
        code = _crashed(e)
    finally:
        # Nothing is left to collect: skip the interpreter's last full GC pass over
        # everything pydantic and typer built, about 0.1 s of every command's exit.
        import gc

        gc.freeze()
    from payload.runtime.deadline import abandoned

    if abandoned():
        # A cloud SDK call we gave up on is still running in its thread; the
        # interpreter's teardown would wait for it or print its noise. Leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _crashed(e: Exception) -> int:
    """Report an unexpected exception: its traceback to a crash log (and to the screen
    with --debug), one paragraph to the user. Returns the exit code."""
    import traceback

    text = traceback.format_exc()
    if _debug():
        sys.stderr.write(text)
    doing = " ".join(["launch", *_command_words(sys.argv[1:])])
    log = _write_crash_log(doing, text)
    try:
        from launcher import output
    except Exception:  # the bug may be in what output imports: say it plainly
        print(f"error: {doing} failed with {type(e).__name__}: {e}; see {log}", file=sys.stderr)
        return EXIT_BUG
    output.crash(doing, e, log)
    return EXIT_BUG


def _command_words(args: list[str]) -> list[str]:
    """The command and its arguments up to the first option (`train examples/x.yml`):
    what was being done, short, and without option values (an --env value)."""
    words = []
    for arg in args:
        if arg.startswith("-"):
            if words:
                break
            continue  # a root option (--debug) before the command
        words.append(arg)
    return words


def _write_crash_log(doing: str, text: str) -> Path | None:
    """Write the traceback to $FERRY_HOME/logs/crash-<time>.log, else to the system's
    temp folder; None if neither can be written. Only the command line and the
    traceback go in: never the environment, which holds the user's secrets."""
    import tempfile
    import time

    from payload.runtime.job import secret_like  # standard library only

    try:
        from launcher.registry import ferry_home

        folders = [ferry_home() / "logs"]
    except Exception:  # the bug may be there: the temp folder still works
        folders = []
    # A KEY=VALUE argument whose key names a credential keeps its key only.
    argv = [_redacted(a, secret_like) for a in sys.argv]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    body = f"{doing}\nargv: {argv!r}\n\n{text}"
    for folder in [*folders, Path(tempfile.gettempdir())]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"crash-{stamp}-", suffix=".log", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(body)
            return Path(name)
        except Exception:  # noqa: BLE001 - the next folder may do; the paragraph says if none
            continue
    return None


def _check_argv() -> None:
    """Every argument is UTF-8 text (Python keeps other bytes as lone surrogates, which
    no file name, run id or value of ours can hold)."""
    from payload.errors import FerryError

    for arg in sys.argv[1:]:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise FerryError(
                f"The argument '{shown}' is not UTF-8 text.",
                hint="Check the terminal's encoding, or what the script passes.",
            ) from None


def _redacted(arg: str, secret_like) -> str:  # type: ignore[no-untyped-def]
    """`arg` for the crash log: the value of `KEY=VALUE` or `--opt=KEY=VALUE` hidden when
    KEY names a credential."""
    parts = arg.split("=")
    for i, part in enumerate(parts[:-1]):
        if secret_like(part.lstrip("-")):
            return "=".join(parts[: i + 1]) + "=***"
    return arg


def _route_warnings() -> None:
    """Config warnings (settings that would be ignored) print as yellow lines; what a
    launch checked (`ferry.launch`, info) prints as a plain note."""
    import logging

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            from launcher import output

            if record.levelno >= logging.WARNING:
                output.warning(record.getMessage())
            else:
                output.note(record.getMessage())

    logger = logging.getLogger("ferry")
    logger.addHandler(_Handler(level=logging.INFO))
    logger.propagate = False
    logging.getLogger("ferry.launch").setLevel(logging.INFO)


if __name__ == "__main__":
    main()
