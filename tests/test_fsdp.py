"""FSDP2 (payload/parallel) through the real CLI: 2 gloo ranks against 1 process.

Seeded fp32 runs of 5 steps on the tiny Llama, each through `launch train` (module
fixture), with gradient clipping that bites (max_grad_norm 0.5) and a warmup + cosine:

- full_ref / lora_ref: 1 process, micro_batch_size 4, no FSDP;
- full_fsdp: 2 processes x micro_batch_size 2 (the same rows per step), fsdp_version 2 with
  activation checkpointing, a checkpoint at step 3;
- lora_fsdp: the same with LoRA, micro-batches of 1 accumulated over 2 steps, its FSDP keys
  written the FSDP1 way (the `fsdp:` list, fsdp_version 1, `fsdp_`-prefixed fsdp_config
  keys) that Ferry maps onto FSDP2, as SHARD_GRAD_OP (no resharding after forward);
- resumed: full_fsdp's checkpoint-3 resumed on 2 processes laid out as HSDP
  (dp_replicate_size 2): whole checkpoints do not depend on the mesh.

The runs set the FERRY_TEST_FSDP_PROBE hook: each rank writes, at the end, its shard of
each trained parameter (size, checksum before and after), the type the Trainer trained
and what torch recorded on each sharded block (resharding, checkpointing).
Then `launch validate` and `launch train --dry-run` on impossible layouts and on settings
that are refused by name.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from helpers import ASSETS, launch, tiny_run

from payload.storage.layout import read_metrics

pytestmark = pytest.mark.slow

TINY = ASSETS / "tiny-llama"
STEPS = 5
LORA = {
    "adapter": "lora",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,  # dropout draws differ with the batch split: none, to compare
    "lora_target_linear": True,
}
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "reshard_after_forward": True,
        "activation_checkpointing": True,
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "state_dict_type": "FULL_STATE_DICT",
    },
}
# The same settings as an FSDP1 config writes them (Axolotl's older examples).
FSDP1 = {
    "fsdp": ["shard_grad_op", "auto_wrap"],
    "fsdp_version": 1,
    "fsdp_config": {
        "fsdp_sharding_strategy": "SHARD_GRAD_OP",  # keep gathered weights until backward
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_use_orig_params": False,
    },
}
RUNS = {  # name -> (keys on top of `raw`, processes)
    "full_ref": ({}, 1),
    "full_fsdp": ({**FSDP2, "micro_batch_size": 2, "save_strategy": "steps", "save_steps": 3}, 2),
    "lora_ref": (LORA, 1),
    # Micro-batches of 1 over 2 accumulation steps: FSDP2's reduction waits for the last.
    "lora_fsdp": ({**LORA, **FSDP1, "micro_batch_size": 1, "gradient_accumulation_steps": 2}, 2),
}


def raw(**extra) -> dict:
    fixed = {"micro_batch_size": 4, "lr_scheduler": "cosine", "warmup_steps": 2}
    return tiny_run(STEPS, **{**fixed, "max_grad_norm": 0.5, **extra})


class Run:
    def __init__(self, name: str, home: Path, printed: str, output_dir: str, probe: Path):
        self.name, self.home, self.printed = name, home, printed
        self.out = Path(output_dir)
        self.records = read_metrics(output_dir)
        self.probes = [json.loads(p.read_text()) for p in sorted(probe.parent.glob("probe.*"))]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records if "loss" in r}

    def norms(self) -> dict[int, float]:
        return {r["step"]: r["grad_norm"] for r in self.records if "grad_norm" in r}


def train(tmp_factory, name: str, config: dict, procs: int) -> Run:
    home = tmp_factory.mktemp(f"fsdp-{name}")
    path = home / f"{name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    probe = home / "probe" / "probe"
    probe.parent.mkdir()
    env = {"FERRY_HOME": str(home / "ferry"), "FERRY_TEST_FSDP_PROBE": str(probe)}
    args = ["--gpus", "2"] if procs == 2 else []
    done = launch("train", str(path), *args, env=env, check=True, timeout=600)
    (run,) = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    return Run(name, home, done.stdout + done.stderr, run["output_dir"], probe)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """Every run of RUNS, two at a time (most of a run is starting Python), then the
    resume of full_fsdp's checkpoint."""

    def one(name: str) -> tuple[str, Run]:
        extra, procs = RUNS[name]
        return name, train(tmp_path_factory, name, raw(**extra), procs)

    tmp_path_factory.getbasetemp()  # made once, before the threads ask for it
    with ThreadPoolExecutor(2) as pool:
        done = dict(pool.map(one, RUNS))
    checkpoint = done["full_fsdp"].out / "checkpoint-3"
    resumed = raw(
        **FSDP2, micro_batch_size=2, dp_replicate_size=2, resume_from_checkpoint=str(checkpoint)
    )
    done["resumed"] = train(tmp_path_factory, "resumed", resumed, 2)
    return done


def assert_same_losses(one: Run, two: Run, steps: range) -> None:
    a, b = one.losses(), two.losses()
    for step in steps:
        assert b[step] == pytest.approx(a[step], abs=1e-5), f"{two.name} step {step}"


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_sharded_ranks_train_as_one_process_with_twice_the_batch(runs, kind):
    """2 ranks x micro-batch 2 (LoRA: 2 ranks x 1 x 2 accumulation steps) take the same
    rows per step as 1 process x 4; FSDP2's reduce-scatter, the global gradient norm over
    DTensors (clipping at 0.5 bites: the norms are above it) and Adam on shards must give
    the same losses and norms. A
    mismatch means the sharded step is not the plain one (a per-rank norm, a gradient
    not averaged, a shard that did not train)."""
    ref, fsdp = runs[f"{kind}_ref"], runs[f"{kind}_fsdp"]
    assert sorted(ref.losses()) == sorted(fsdp.losses()) == list(range(1, STEPS + 1))
    assert_same_losses(ref, fsdp, range(1, STEPS + 1))
    assert max(ref.norms().values()) > 0.5  # so the clipping changed the steps
    for step, norm in ref.norms().items():
        assert fsdp.norms()[step] == pytest.approx(norm, rel=1e-4), f"{kind} norm {step}"


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_parameters_are_dtensors_sharded_across_the_ranks(runs, kind):
    """The run's log says every parameter is a DTensor sharded on dim 0 and each rank
    holds half of the elements; each rank's probe saw its own half of every trained
    parameter, and the Trainer trained the FSDP module itself, not a DDP wrapper. A
    failure here means the run silently trained replicated (DDP) or unsharded."""
    run = runs[f"{kind}_fsdp"]
    line = next(ln for ln in run.printed.splitlines() if "fsdp2: fully_shard on" in ln)
    assert "4 LlamaDecoderLayer blocks" in line and "dp_shard=2 (gloo)" in line
    assert "DTensors [Shard(dim=0)]" in line
    held = re.search(r"elements held per rank: ([\d,]+) / ([\d,]+) of ([\d,]+)", line)
    first, second, total = (int(g.replace(",", "")) for g in held.groups())
    assert first + second == total and 0 < first < total and 0 < second < total
    assert [p["rank"] for p in run.probes] == [0, 1]
    for probe in run.probes:
        assert probe["trained_type"].startswith("FSDP"), probe["trained_type"]
        assert "DistributedDataParallel" not in probe["trained_type"]
        for name, shard in probe["params"].items():
            assert shard["local"] <= -(-shard["full"] // 2), name  # at most half (rounded up)


def test_lora_shards_train_on_every_rank(runs):
    """Axolotl #3772: LoRA shards that did not train under FSDP2. Here every rank's shard
    of every LoRA weight it holds changed over the run."""
    for probe in runs["lora_fsdp"].probes:
        lora = {n: s for n, s in probe["params"].items() if "lora_" in n}
        assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
        held = {n: s for n, s in lora.items() if s["local"]}
        assert len(held) >= len(lora) // 2
        unchanged = [n for n, s in held.items() if s["after"] == s["before"]]
        assert not unchanged, f"rank {probe['rank']}: {unchanged[:3]}"


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize(
    ("kind", "file"), [("full", "model.safetensors"), ("lora", "adapter_model.safetensors")]
)
def test_the_saved_model_is_whole_and_equals_the_reference(runs, kind, file):
    """The final save gathers the shards to rank 0 and writes what save_pretrained writes
    for one process: the same names, shapes and (within 1e-5) values as the reference's."""
    ref = tensors(runs[f"{kind}_ref"].out / file)
    got = tensors(runs[f"{kind}_fsdp"].out / file)
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        assert got[name].shape == value.shape, name
        assert (got[name] - value).abs().max().item() < 1e-5, name
    config = runs[f"{kind}_fsdp"].out / ("config.json" if kind == "full" else "adapter_config.json")
    assert config.exists()


def test_a_checkpoint_is_whole_and_resumes_on_another_mesh(runs):
    """checkpoint-3 holds the whole model and the whole optimizer state (gathered to rank
    0, keyed by parameter name) with the schedule and each rank's RNG; resumed on 2
    processes laid out as HSDP (dp_replicate 2 x dp_shard 1), steps 4 and 5 give the
    uninterrupted run's losses: the weights, Adam's moments and the schedule all came
    back, and reached every rank."""
    import torch

    folder = runs["full_fsdp"].out / "checkpoint-3"
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pth"):
        assert (folder / name).exists(), name
    assert (folder / "rng_state_1.pth").exists()
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    moments = state["state"]["model.layers.0.mlp.up_proj.weight"]
    assert moments["exp_avg"].shape == (384, 128)  # whole, not a rank's half
    resumed = runs["resumed"]
    line = next(ln for ln in resumed.printed.splitlines() if "fsdp2: fully_shard on" in ln)
    assert "dp_replicate=2" in line and "Replicate(), Shard(dim=0)" in line
    assert "resuming from step 3" in resumed.printed
    assert sorted(resumed.losses()) == [4, 5]
    assert_same_losses(runs["full_fsdp"], resumed, range(4, STEPS + 1))


def test_fsdp1_keys_are_mapped_with_one_warning_naming_each(runs):
    """The FSDP1 spelling of lora_fsdp trained as FSDP2 (its losses match, above); the
    run said so once, naming every key it mapped or dropped."""
    warnings = [ln for ln in runs["lora_fsdp"].printed.splitlines() if "read as FSDP2" in ln]
    assert warnings
    said = warnings[0]
    for part in (
        "fsdp `shard_grad_op` -> reshard_after_forward: false",
        "fsdp `auto_wrap` -> fully_shard per transformer block",
        "fsdp_version 1 -> 2",
        "fsdp_config.fsdp_sharding_strategy SHARD_GRAD_OP -> reshard_after_forward: false",
        "fsdp_config.fsdp_transformer_layer_cls_to_wrap -> transformer_layer_cls_to_wrap",
        "fsdp_config.fsdp_state_dict_type -> state_dict_type",
        "dropped (FSDP2 has no such setting): fsdp_config.fsdp_backward_prefetch, "
        "fsdp_config.fsdp_use_orig_params",
    ):
        assert part in said, part


# ---- refused before anything runs


def write(tmp_path: Path, **extra) -> str:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({**raw(**FSDP2), **extra}, sort_keys=False))
    return str(path)


def refusal(*args: str) -> str:
    result = launch(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    return " ".join((result.stdout + result.stderr).split())


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (
            {"dp_shard_size": 3, "dp_replicate_size": 2, "launch": {"gpus": 4}},
            "dp_shard_size: the layout does not fit launch.gpus x launch.nodes: dp_shard_size "
            "(3) x dp_replicate_size (2) = 6, but the job runs 4 processes",
        ),
        (
            {"dp_replicate_size": 3, "launch": {"gpus": 2}},
            "dp_replicate_size (3) = 3 does not divide the job's 2 processes",
        ),
        ({"dp_shard_size": 2, "fsdp_config": None}, "dp_shard_size: shapes FSDP2's device mesh"),
    ],
)
def test_validate_refuses_impossible_layouts_with_the_numbers(tmp_path, extra, said):
    assert said in refusal("validate", write(tmp_path, **extra))


def test_the_executor_refuses_a_layout_that_does_not_fit_the_processes(tmp_path):
    """The processes are known only at launch: `--gpus 3` with dp_shard_size 2."""
    said = refusal("train", write(tmp_path, dp_shard_size=2), "--gpus", "3", "--dry-run")
    assert "dp_shard_size (2), but the job runs 3 processes" in said


@pytest.mark.parametrize(
    ("fsdp_config", "said"),
    [
        ({"offload_params": True}, "fsdp_config.offload_params: `true` is not supported yet"),
        (
            {"cpu_ram_efficient_loading": True},
            "fsdp_config.cpu_ram_efficient_loading: `true` is not supported yet",
        ),
        (
            {"state_dict_type": "LOCAL_STATE_DICT"},
            "fsdp_config.state_dict_type: `LOCAL_STATE_DICT` is not supported yet",
        ),
        ({"sharding_strategy": "HYBRID_SHARD"}, "set dp_replicate_size (copies"),
        ({"reshard_after_forwrd": True}, "did you mean `reshard_after_forward`?"),
    ],
)
def test_validate_refuses_fsdp_settings_it_cannot_honour_by_name(tmp_path, fsdp_config, said):
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(raw(fsdp_version=2, fsdp_config=fsdp_config)))
    assert said in refusal("validate", str(path))


def test_reshard_after_forward_and_activation_checkpointing_take_effect(runs):
    """What torch recorded on each sharded block: full_fsdp (reshard_after_forward true,
    activation_checkpointing true) reshards every block after forward but the last (its
    weights are needed first in backward) and checkpoints them all; lora_fsdp
    (SHARD_GRAD_OP: reshard false) keeps every block's weights and checkpoints none."""
    for probe in runs["full_fsdp"].probes:
        assert [b["reshards"] for b in probe["blocks"]] == [True, True, True, False]
        assert all(b["checkpointed"] for b in probe["blocks"])
    for probe in runs["lora_fsdp"].probes:
        assert [b["reshards"] for b in probe["blocks"]] == [False] * 4
        assert not any(b["checkpointed"] for b in probe["blocks"])


def test_blocks_are_found_by_class_name_or_the_models_own_list():
    """transformer_layer_cls_to_wrap names the blocks; without it the model's
    _no_split_modules does; a class the model lacks is an error naming its classes."""
    from transformers import AutoModelForCausalLM

    from payload.errors import FerryError
    from payload.parallel.fsdp import transformer_blocks

    model = AutoModelForCausalLM.from_pretrained(TINY)
    found = transformer_blocks(model, ())
    assert [type(b).__name__ for b in found] == ["LlamaDecoderLayer"] * 4
    assert transformer_blocks(model, ("LlamaDecoderLayer",)) == found
    with pytest.raises(FerryError) as caught:
        transformer_blocks(model, ("MistralDecoderLayer",))
    said = str(caught.value)
    assert "transformer_layer_cls_to_wrap" in said and "MistralDecoderLayer" in said
    assert "LlamaDecoderLayer" in said  # among the classes it has
