"""DeepSpeed ZeRO-1/2/3 (`deepspeed:`) through the HF Trainer, on CPU.

Through the real CLI (`launch train --gpus 2`: torchrun, 2 CPU processes over gloo; Ferry
sets DS_ACCELERATOR=cpu itself): seeded fp32 full fine-tunes of the tiny Llama, each
against one 1-process run without DeepSpeed taking the same 4 rows a step (1 x 4 there,
2 x 2 here). ZeRO-1, ZeRO-2 with its optimizer offloaded and ZeRO-3 log the reference's
losses; the checkpoint shards prove the states really were split over the two ranks; the
ZeRO-3 model is saved whole and loads with `from_pretrained`, close to the reference's;
a run resumed from a ZeRO-3 checkpoint logs what the uninterrupted run logged, and (its
JSON not gathering the weights at save) ends with a model consolidated from DeepSpeed's
shards by zero_to_fp32.

In this process: the names Axolotl configs use resolve to the shipped JSONs, each shipped
JSON is what its name says, bad JSONs are named at `launch validate`, the example plans
for local and Modal with its JSON shipped along, and what runs untested is refused.

DeepSpeed must be installed (`pip install 'ferry[deepspeed]'`, in the `dev` extra): these
tests fail without it rather than skip. On CPU, Ferry stops DeepSpeed compiling its
shared-memory op (used only by inference all-reduce), so nothing is compiled here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from helpers import ASSETS, ROOT, launch, tiny_run

from payload.storage.layout import read_metrics

if importlib.util.find_spec("deepspeed") is None:
    pytest.fail(
        "DeepSpeed is not installed, and its tests do not skip: pip install 'ferry[deepspeed]' "
        "(or .venv/bin/pip install deepspeed==0.19.0)",
        pytrace=False,
    )

SHIPPED = ROOT / "examples" / "deepspeed"
EXAMPLE = ROOT / "examples" / "deepspeed_zero3.yml"
STEPS = 6
# A ZeRO run against the 1-process reference. Both are fp32; what differs is the order
# of the sums: each rank sums its rows' gradients and gloo averages the two (the reference
# sums 4 rows at once), and DeepSpeed clips and steps on flat partitions. Measured here
# over 6 steps: losses and gradient norms agree to ~1.5e-6 (2 float32 steps at a loss of
# 6); weights to 1e-6 except ~15 of 918,656 values where Adam divides a near-zero gradient
# by its near-zero RMS, so the sum order shows there, up to 1e-5 (the training moved the
# weights by up to 6e-3). The tolerances leave room for another CPU's summation order.
LOSS_ABS = 2e-5
GRAD_NORM_REL = 1e-5
WEIGHT_ABS = 1e-4  # every value
WEIGHT_CLOSE = 1e-6  # ... and all but WEIGHT_STRAY_SHARE of them
WEIGHT_STRAY_SHARE = 1e-4


def raw_config(**extra) -> dict:
    """A short seeded fp32 full fine-tune of the tiny Llama, `extra` keys on top."""
    raw = tiny_run(STEPS, micro_batch_size=4, lr_scheduler="constant", bf16=False)
    if "save_steps" in extra:
        del raw["save_strategy"]
    raw.update(extra)
    return raw


TWO = {"micro_batch_size": 2}
ZERO3_GATHERLESS = {  # zero3.json, less the gathering of the weights at save
    **json.loads((SHIPPED / "zero3.json").read_text()),
    "zero_optimization": {
        **json.loads((SHIPPED / "zero3.json").read_text())["zero_optimization"],
        "stage3_gather_16bit_weights_on_model_save": False,
    },
}
GPUS2 = ["--gpus", "2"]
LORA = {"adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True}
# name -> (keys on top of raw_config, launch arguments); Axolotl's names for the JSONs
RUNS = {
    "reference": ({}, []),
    "zero1": ({**TWO, "deepspeed": "deepspeed_configs/zero1.json", "save_steps": STEPS}, GPUS2),
    # 1 row x 2 accumulated micro-batches x 2 ranks: the loss scaling under accumulation
    "zero2_offload": (
        {
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 2,
            "deepspeed": "deepspeed_configs/zero2_cpuoffload.json",
            "save_steps": STEPS,
        },
        GPUS2,
    ),
    "zero3": ({**TWO, "deepspeed": "deepspeed_configs/zero3.json", "save_steps": 3}, GPUS2),
    "lora_reference": (LORA, []),
    "lora_zero3": ({**TWO, **LORA, "deepspeed": "deepspeed_configs/zero3.json"}, GPUS2),
}
PRINTED: dict[str, str] = {}  # each run's `launch train` output
HOMES: dict[str, Path] = {}  # each run's own folder


def train(home: Path, name: str, raw: dict, args: list[str]) -> Path:
    """`launch train` the config in a folder of its own; the run's output folder."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / f"{name}.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    # A compiled op would land in the run's own extensions folder (checked below).
    env = {"FERRY_HOME": str(home / "ferry"), "TORCH_EXTENSIONS_DIR": str(home / "ext")}
    # Run from the config's folder: `deepspeed_configs/...` is not there, so the shipped
    # file stands in for it.
    trained = launch("train", str(path), *args, env=env, check=True, timeout=900, cwd=home)
    PRINTED[name] = trained.stdout
    HOMES[name] = home
    (run,) = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    return Path(run["output_dir"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Every run's output folder. Two at a time: much of a run is starting Python. The
    resumed run starts from the ZeRO-3 run's checkpoint-3, with the weights left
    ungathered at save (an inline DeepSpeed config)."""
    root = tmp_path_factory.mktemp("deepspeed")

    def one(name: str) -> tuple[str, Path]:
        extra, args = RUNS[name]
        return name, train(root / name, name, raw_config(**extra), args)

    with ThreadPoolExecutor(2) as pool:
        done = dict(pool.map(one, ["zero3", *(name for name in RUNS if name != "zero3")]))
    resumed = raw_config(
        **TWO,
        deepspeed=ZERO3_GATHERLESS,
        resume_from_checkpoint=str(done["zero3"] / "checkpoint-3"),
    )
    done["zero3_resumed"] = train(root / "resumed", "zero3_resumed", resumed, GPUS2)
    return done


def losses(output: Path, key: str = "loss") -> dict[int, float]:
    """`key` (the loss, the gradient norm, the tokens seen) at each logged step."""
    return {r["step"]: r[key] for r in read_metrics(output) if "loss" in r}


def weights(output: Path) -> dict:
    """The saved model's tensors, loaded with `from_pretrained` (so the folder must be
    a loadable model, not DeepSpeed shards)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output)
    return {k: v.detach() for k, v in model.state_dict().items()}


def trained_values(output: Path) -> int:
    """How many values the reference trains: the tiny Llama's parameters, tied once."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output)
    return sum(p.numel() for p in model.parameters())


def partitions(checkpoint: Path) -> list[int]:
    """The fp32 master values in each rank's optimizer shard of a DeepSpeed checkpoint,
    in rank order: proof that the optimizer states were split, not copied."""
    import torch

    (step,) = checkpoint.glob("global_step*")
    sizes = []
    for rank in range(2):
        shard = step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        # ZeRO-1/2 and ZeRO-3 name the rank's flat fp32 partition differently.
        flat = state.get("single_partition_of_fp32_groups") or state["fp32_flat_groups"]
        sizes.append(sum(t.numel() for t in flat))
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1", "zero2_offload", "zero3"])
def test_zero_losses_equal_the_single_process_reference(runs, name):
    """2 ranks x 2 rows under ZeRO take the same rows per step as 1 process x 4, and the
    gradients averaged over the ranks are the reference's: the losses agree step by step.
    A failure means the ranks no longer train as one model (a missing average, a wrong
    loss scale, a rank training on its own)."""
    reference, zero = losses(runs["reference"]), losses(runs[name])
    assert sorted(zero) == list(range(1, STEPS + 1))
    assert zero[STEPS] < zero[1] - 0.1, "the run did not learn"
    for step, loss in reference.items():
        assert zero[step] == pytest.approx(loss, abs=LOSS_ABS), f"{name} step {step}"
    # Adam and clipping hide a wrongly scaled gradient from the losses; its norm before
    # clipping does not. The rows each step took are the reference's, token for token.
    norms = losses(runs[name], "grad_norm")
    for step, norm in losses(runs["reference"], "grad_norm").items():
        assert norms[step] == pytest.approx(norm, rel=GRAD_NORM_REL), f"{name} step {step}"
    assert losses(runs[name], "tokens_seen") == losses(runs["reference"], "tokens_seen")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "stage", "optimizer", "offload"),
    [
        ("zero1", 1, "DeepSpeedZeroOptimizer", "optimizer states none, parameters none"),
        ("zero2_offload", 2, "DeepSpeedZeroOptimizer", "optimizer states cpu, parameters none"),
        ("zero3", 3, "DeepSpeedZeroOptimizer_Stage3", "optimizer states none, parameters none"),
    ],
)
def test_deepspeed_really_ran_and_split_the_states(runs, name, stage, optimizer, offload):
    """DeepSpeed, not plain DDP, trained: the run names the ZeRO optimizer DeepSpeed built,
    and each rank's checkpoint shard holds half of the optimizer's fp32 master values (a
    DDP run would have no shards; an unsplit one, two full copies)."""
    printed = PRINTED[name]
    assert "| 2 x cpu (gloo)" in printed
    assert f"deepspeed: ZeRO-{stage} over 2 ranks ({optimizer}); offload: {offload}" in printed
    checkpoint = runs[name] / f"checkpoint-{3 if stage == 3 else STEPS}"
    total = trained_values(runs["reference"])
    sizes = partitions(checkpoint)
    assert sum(sizes) >= total  # every value is somewhere (padded to split evenly)
    for size in sizes:
        assert size == pytest.approx(total / 2, rel=0.01), sizes
    if stage == 3:  # the parameters are partitioned too: one model shard per rank
        step = next(checkpoint.glob("global_step*"))
        assert sorted(p.name for p in step.glob("zero_pp_rank_*_model_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_model_states.pt",
            "zero_pp_rank_1_mp_rank_00_model_states.pt",
        ]


def test_no_run_compiled_a_deepspeed_op(runs):
    """DeepSpeed on CPU would build its shared-memory op (minutes on 2 cores) for an
    inference all-reduce training never calls: no run's extensions folder holds a file."""
    assert set(HOMES) == set(runs)
    for name, home in HOMES.items():
        built = [p for p in (home / "ext").rglob("*") if p.is_file()]
        assert built == [], (name, built)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1", "zero2_offload", "zero3", "zero3_resumed"])
def test_the_saved_model_loads_and_equals_the_reference(runs, name):
    """The output folder is a whole model that `from_pretrained` loads, equal to the
    reference's: ZeRO-1/2 save whole weights, ZeRO-3 gathers its partitions at save, and
    the resumed run (weights not gathered) is consolidated by Ferry with zero_to_fp32,
    leaving no DeepSpeed shards behind."""
    import torch

    reference, zero = weights(runs["reference"]), weights(runs[name])
    base = weights(ASSETS / "tiny-llama")
    assert zero.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.allclose(zero[key], value, atol=WEIGHT_ABS, rtol=0), key
    apart = torch.cat([(zero[k] - reference[k]).abs().flatten() for k in reference])
    assert (apart > WEIGHT_CLOSE).float().mean().item() < WEIGHT_STRAY_SHARE
    moved = torch.cat([(reference[k] - base[k]).abs().flatten() for k in reference])
    assert (moved > WEIGHT_CLOSE).float().mean().item() > 0.5  # training moved most values
    shards = ("global_step", "latest", "zero_to_fp32")
    assert [p.name for p in runs[name].iterdir() if p.name.startswith(shards)] == []


@pytest.mark.slow
def test_a_zero3_checkpoint_resumes_where_the_run_left_off(runs):
    """Resumed from the ZeRO-3 run's checkpoint-3 (each rank's parameter and optimizer
    shards, the schedule, every rank's RNG state and the data position), steps 4-6 log
    exactly what the uninterrupted run logged. A failure means part of the state did not
    come back (Adam's moments restarting shows at once)."""
    assert "resuming from step 3" in PRINTED["zero3_resumed"]
    whole, resumed = losses(runs["zero3"]), losses(runs["zero3_resumed"])
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(whole[step], abs=1e-6), f"step {step}"
    assert (runs["zero3_resumed"] / "model.safetensors").is_file()


@pytest.mark.slow
def test_lora_under_zero3_trains_the_adapter_one_process_trains(runs):
    """ZeRO-3 partitions the frozen base and the LoRA weights alike; the adapter the
    Trainer gathers at save equals the 1-process run's, and the losses agree. A failure
    means the adapter shards did not train, or not together."""
    from safetensors.torch import load_file

    assert "deepspeed: ZeRO-3 over 2 ranks" in PRINTED["lora_zero3"]
    reference, zero = losses(runs["lora_reference"]), losses(runs["lora_zero3"])
    assert sorted(zero) == list(range(1, STEPS + 1)) and zero[STEPS] < zero[1] - 0.1
    for step, loss in reference.items():
        assert zero[step] == pytest.approx(loss, abs=LOSS_ABS), f"step {step}"
    assert not (runs["lora_zero3"] / "model.safetensors").exists()  # an adapter, not a model
    expected = load_file(runs["lora_reference"] / "adapter_model.safetensors")
    saved = load_file(runs["lora_zero3"] / "adapter_model.safetensors")
    assert saved.keys() == expected.keys() and any("lora_B" in k for k in saved)
    for key, value in expected.items():
        assert value.abs().max() > 0, key  # lora_B starts at zero: it trained
        assert (saved[key] - value).abs().max().item() < WEIGHT_ABS, key


# ---- in this process: names, files, validation and plans


AXOLOTL_NAMES = {  # Axolotl's deepspeed_configs/ names -> (stage, offload opt, offload param, bf16)
    "zero1.json": (1, "none", "none", "auto"),
    "zero2.json": (2, "none", "none", "auto"),
    "zero3.json": (3, "none", "none", "auto"),
    "zero3_bf16.json": (3, "none", "none", True),
    "zero3_cpuoffload.json": (3, "cpu", "cpu", "auto"),
    "zero3_bf16_cpuoffload_params.json": (3, "none", "cpu", True),
    "zero3_bf16_cpuoffload_all.json": (3, "cpu", "cpu", True),
}


def test_axolotl_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    """`deepspeed: deepspeed_configs/<name>.json`, as Axolotl's configs write it, is
    Ferry's shipped file when there is no such file here; a local one wins."""
    from payload.config import load_config

    monkeypatch.chdir(tmp_path)
    for name, (_, _, _, bf16) in AXOLOTL_NAMES.items():
        path = tmp_path / "cfg.yml"
        raw = raw_config(deepspeed=f"deepspeed_configs/{name}", bf16=bf16 is True)
        path.write_text(yaml.safe_dump(raw))
        assert load_config(path).deepspeed == str(SHIPPED / name), name
    own = tmp_path / "deepspeed_configs" / "zero3.json"
    own.parent.mkdir()
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    path.write_text(yaml.safe_dump(raw_config(deepspeed="deepspeed_configs/zero3.json")))
    assert load_config(path).deepspeed == str(own)


def test_each_shipped_json_is_what_its_name_says():
    """Every file under examples/deepspeed/ sets the ZeRO stage, the offload devices and
    the precision its name promises, and leaves the batch sizes to the trainer."""
    from payload.config.rules import deepspeed_precision
    from payload.parallel.deepspeed import offload_of, stage_of

    shipped = {p.name: json.loads(p.read_text()) for p in SHIPPED.glob("*.json")}
    assert set(AXOLOTL_NAMES) | {"zero2_cpuoffload.json"} == set(shipped)
    expected = {**AXOLOTL_NAMES, "zero2_cpuoffload.json": (2, "cpu", "none", "auto")}
    for name, config in shipped.items():
        stage, optimizer, params, bf16 = expected[name]
        assert stage_of(config) == stage, name
        assert offload_of(config, "offload_optimizer") == optimizer, name
        assert offload_of(config, "offload_param") == params, name
        assert deepspeed_precision(config, "bf16") == bf16, name
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert config[key] == "auto", (name, key)
        if stage == 3:  # the final model is gathered whole at save
            assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
        if optimizer == "cpu":  # the config's optimizer runs on the offloaded states
            assert config["zero_force_ds_cpu_optimizer"] is False


def test_bad_deepspeed_configs_are_named_at_validate(tmp_path):
    """`launch validate` names every problem of a DeepSpeed JSON before anything runs,
    each with the JSON key, the config key and the numbers."""
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "zero_optimization": {
                    "stage": 4,
                    "offload_optimizer": {"device": "nvme"},
                    "offload_param": {"device": "gpu"},
                },
                "fp16": {"enabled": True},
                "train_micro_batch_size_per_gpu": 8,
                "gradient_accumulation_steps": 2,
            }
        )
    )
    (tmp_path / "broken.json").write_text('{"zero_optimization": ')
    cases = {
        str(bad): [
            "`zero_optimization.stage` is 4",
            "offload_optimizer.device: nvme` in `",
            "is not supported yet",
            "`zero_optimization.offload_param.device` is 'gpu'",
            "`fp16.enabled` is true in",
            "the config's `fp16` is false",
            "`train_micro_batch_size_per_gpu` is 8",
            "the config's `micro_batch_size` is 4",
            "`gradient_accumulation_steps` is 2",
        ],
        str(tmp_path / "broken.json"): ["is not valid JSON", "(line 1, column 23)"],
        "deepspeed_configs/zero1_torch_compile.json": [
            "not one of the DeepSpeed configs Ferry ships",
            "`torch_compile: true`",
        ],
        "{zero_optimization: {stage: 1, offload_param: {device: cpu}}}": [
            "in the inline mapping needs ZeRO stage 3",
        ],
    }
    config = tmp_path / "cfg.yml"
    config.write_text(yaml.safe_dump(raw_config()))
    for value, messages in cases.items():
        result = launch("validate", str(config), "--set", f"deepspeed={value}", cwd=tmp_path)
        assert result.returncode == 1, value
        assert "Traceback" not in result.stderr
        for message in messages:
            assert message in result.stderr, (value, message, result.stderr)
        assert all(line.startswith("  - deepspeed: ") for line in result.stderr.splitlines()[1:])


def test_what_runs_untested_under_deepspeed_is_refused():
    from payload.config import validate_mapping
    from payload.errors import ConfigError

    for extra, key in (
        ({"rl": "dpo"}, "rl"),
        ({"reward_model": True}, "reward_model"),
        ({"adapter": "qlora", "load_in_4bit": True}, "load_in_4bit"),
    ):
        raw = raw_config(deepspeed={"zero_optimization": {"stage": 2}}, **extra)
        with pytest.raises(ConfigError) as e:
            validate_mapping(raw, resolve_paths=False)
        problems = {p.key: p.message for p in e.value.problems}
        assert "with `deepspeed` is not supported yet" in problems[key], problems


def test_what_only_the_machine_knows_is_checked_before_the_model_loads():
    """`bf16: auto` is off on a CPU: a JSON that turns bf16 on contradicts it; a fixed
    train_batch_size must be micro_batch_size x gradient_accumulation_steps x ranks."""
    from payload.config import validate_mapping
    from payload.distributed import DistInfo
    from payload.parallel.deepspeed import machine_problems

    cfg = validate_mapping(raw_config(bf16="auto", micro_batch_size=2), resolve_paths=False)
    two = DistInfo(rank=0, local_rank=0, world_size=2, backend="gloo", device="cpu")
    (problem,) = machine_problems({"bf16": {"enabled": True}}, cfg, two)
    assert "`bf16: auto` is false on this machine" in problem
    (problem,) = machine_problems({"train_batch_size": 8}, cfg, two)
    assert "train_batch_size is 8" in problem and "takes 4 rows a step" in problem
    assert machine_problems({"train_batch_size": 4, "bf16": {"enabled": "auto"}}, cfg, two) == []


def test_the_example_plans_for_local_and_modal_with_its_json_shipped():
    """examples/deepspeed_zero3.yml validates and plans on both backends; on Modal its
    DeepSpeed JSON (Axolotl's name, resolved to the shipped file) travels with the job
    and the image has DeepSpeed's layer, at the version the tests here run, although the
    config does not ask for the layer: `deepspeed:` is enough."""
    from executors.modal import INPUTS, remote_config
    from launcher import api

    rel = str(EXAMPLE.relative_to(ROOT))
    assert "extras" not in EXAMPLE.read_text()
    launch("validate", rel, check=True)
    launch("train", rel, "--gpus", "2", "--dry-run", check=True)
    plan = launch("train", rel, "--cloud", "modal", "--gpus", "H100:8", "--dry-run", check=True)
    assert f"{SHIPPED / 'zero3.json'} -> {INPUTS}/" in plan.stdout
    assert f"deepspeed=={importlib.metadata.version('deepspeed')}" in plan.stdout
    job, _ = api.prepare(EXAMPLE, cloud="modal", gpus="H100:8")
    config, inputs = remote_config(job)
    assert config["deepspeed"].startswith(INPUTS) and config["deepspeed"].endswith("zero3.json")
    assert (SHIPPED / "zero3.json", config["deepspeed"]) in inputs
