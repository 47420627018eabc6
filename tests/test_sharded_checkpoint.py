"""Sharded FSDP2 checkpoints (fsdp_config.state_dict_type: SHARDED_STATE_DICT, torch DCP)
through the real CLI: written per rank, resumed after kill -9 on the same number of
processes, on 1 process and back on 2, and merged into a plain model by
`launch merge-sharded`.

Seeded fp32 runs of 6 steps on the tiny Llama, all taking the same 4 rows per step (as
tests/test_fsdp.py shows, 2 ranks x micro-batch 2 train as 1 process x 4):

- ref: 1 process, micro_batch_size 4, no FSDP: the independent reference;
- killed: 2 ranks x 2, SHARDED_STATE_DICT checkpoints every 2 steps, a storage folder;
  SIGKILL to every process mid-run, then `launch resume` (auto-resume from the newest
  complete checkpoint in storage) to step 6;
- one: killed's checkpoint-2 (a copy) resumed on 1 process x 4, still sharded, with the
  final save sharded too (final_state_dict_type): its checkpoints are 1-rank DCP;
- two: one's checkpoint-4 resumed on 2 ranks x 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from helpers import ASSETS, launch, tiny_run

from payload.storage.layout import read_metrics

pytestmark = pytest.mark.slow

TINY = ASSETS / "tiny-llama"
STEPS = 6
SHARDED = {
    "fsdp_version": 2,
    "fsdp_config": {
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "state_dict_type": "SHARDED_STATE_DICT",
    },
    "save_strategy": "steps",
    "save_steps": 2,
}
# 2 ranks x 2 and 1 x 4 sum in another order: the largest gap measured from the reference
# over every resumed run's steps was 4.8e-7 (a float32 rounding); asserted at 1e-5.
TOLERANCE = 1e-5


def raw(**extra) -> dict:
    fixed = {"micro_batch_size": 4, "lr_scheduler": "cosine", "warmup_steps": 2}
    return tiny_run(STEPS, **{**fixed, "max_grad_norm": 0.5, **extra})


class Run:
    def __init__(self, name: str, output_dir: str, printed: str):
        self.name, self.out, self.printed = name, Path(output_dir), printed

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(self.out) if "loss" in r}


def _write(home: Path, name: str, config: dict) -> Path:
    path = home / f"{name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _train(home: Path, name: str, config: dict, procs: int) -> Run:
    args = ["--gpus", "2"] if procs == 2 else []
    done = launch("train", str(_write(home, name, config)), *args, check=True, timeout=300)
    run_id = done.stdout.split("run ", 1)[1].split()[0]
    return Run(name, _status(run_id).output_dir, done.stdout + done.stderr)


def _status(run_id: str):
    from launcher import api

    return api.status(run_id)


def _kill_mid_run(run_id: str) -> None:
    """SIGKILL to every process of the run once checkpoint-2 is in storage (as
    tests/test_durability.py does): nothing of the run gets to clean up."""
    from payload.runtime.procs import process_tree

    log = Path(_status(run_id).run_dir) / "train.log"
    deadline = time.monotonic() + 240
    while "storage: checkpoint-2 synced" not in (log.read_text() if log.exists() else ""):
        assert _status(run_id).state == "running", log.read_text()
        assert time.monotonic() < deadline, "checkpoint-2 never synced"
        time.sleep(0.05)
    for pid in process_tree(json.loads(_status(run_id).handle)["data"]["pid"]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while _status(run_id).state == "running":
        assert time.monotonic() < deadline, "the killed run is still running"
        time.sleep(0.2)
    assert _status(run_id).state == "failed", "the kill came after the run's end"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """The runs of the module docstring, two at a time where they can (most of a run is
    starting Python)."""
    home = tmp_path_factory.mktemp("sharded")
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(2) as pool:
        patch.setenv("FERRY_HOME", str(home / "ferry"))
        ref = pool.submit(_train, home, "ref", raw(), 1)
        config = _write(home, "killed", raw(**SHARDED, micro_batch_size=2))
        storage = f"file://{home / 'storage'}"
        started = launch(
            "train", str(config), "--gpus", "2", "--storage", storage, "--detach", check=True
        )
        run_id = started.stdout.split()[1]  # "run <id> (local) submitted"
        _kill_mid_run(run_id)
        killed_log = (Path(_status(run_id).run_dir) / "train.log").read_text()
        # A copy for `one`: the resume below rewrites the checkpoints after the one it takes.
        shutil.copytree(Path(_status(run_id).output_dir) / "checkpoint-2", home / "checkpoint-2")

        final = {**SHARDED["fsdp_config"], "final_state_dict_type": "SHARDED_STATE_DICT"}
        one = raw(**{**SHARDED, "fsdp_config": final})
        one["resume_from_checkpoint"] = str(home / "checkpoint-2")
        one_run = pool.submit(_train, home, "one", one, 1)
        resumed = launch("resume", run_id, check=True, timeout=300)
        done = {
            "ref": ref.result(),
            "killed": Run("killed", _status(run_id).output_dir, killed_log + resumed.stdout),
            "one": one_run.result(),
        }

        two = raw(**SHARDED, micro_batch_size=2)
        two["resume_from_checkpoint"] = str(done["one"].out / "checkpoint-4")
        done["two"] = _train(home, "two", two, 2)
        done["home"] = Run("home", str(home), "")
        yield done


def assert_losses(ref: Run, run: Run, steps: range) -> float:
    """The run's losses at `steps` equal the reference's; returns the largest gap."""
    a, b = ref.losses(), run.losses()
    assert sorted(s for s in b if s in steps) == list(steps), f"{run.name}: {sorted(b)}"
    for step in steps:
        assert b[step] == pytest.approx(a[step], abs=TOLERANCE), f"{run.name} step {step}"
    return max(abs(a[s] - b[s]) for s in steps)


def test_killed_sharded_run_resumes_and_ends_as_if_never_interrupted(runs):
    """kill -9 on both ranks after checkpoint-2 reached storage; `launch resume` picks the
    newest complete sharded checkpoint there and ends at step 8 with every step's loss
    equal to the uninterrupted reference: each rank's model and Adam shards, the schedule,
    the RNG and the data position all came back. A failure means a piece of the state was
    not in the DCP files or was read into the wrong shard."""
    killed = runs["killed"]
    assert "resuming from step " in killed.printed
    resumed_from = int(killed.printed.split("resuming from step ")[1].split()[0])
    assert resumed_from in (2, 4, 6)
    assert sorted(killed.losses()) == list(range(1, STEPS + 1))  # each step logged once
    assert_losses(runs["ref"], killed, range(1, STEPS + 1))
    assert (killed.out / "model.safetensors").is_file()  # final_state_dict_type: FULL


def test_the_shard_files_are_per_rank(runs):
    """A 2-rank checkpoint holds one DCP file per rank for the model and the optimizer,
    each with about half of the bytes (a rank that wrote everything, or nothing, fails);
    a 1-process checkpoint holds one file with the whole; no whole-model file is written."""
    folder = runs["killed"].out / "checkpoint-4"
    assert not (folder / "model.safetensors").exists() and not (folder / "optimizer.pt").exists()
    for part in ("model_dcp", "optimizer_dcp"):
        files = sorted(p.name for p in (folder / part).glob("*.distcp"))
        assert files == ["__0_0.distcp", "__1_0.distcp"], files
        sizes = [(folder / part / name).stat().st_size for name in files]
        assert abs(sizes[0] - sizes[1]) < 0.1 * sum(sizes), sizes
        alone = runs["one"].out / "checkpoint-6" / part
        (whole,) = [p.stat().st_size for p in alone.glob("*.distcp")]
        assert sum(sizes) == pytest.approx(whole, rel=0.05), (sizes, whole)
    # 918,656 fp32 parameters (the tied embedding is stored under both names: +131,072).
    model = sum(p.stat().st_size for p in (folder / "model_dcp").glob("*.distcp"))
    assert model == pytest.approx((918_656 + 131_072) * 4, rel=0.05)
    for name in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"):
        assert (folder / name).is_file(), name
    info = json.loads((folder / "sharded.json").read_text())
    assert info == {"world_size": 2, "adapter": False, "names": {}}


def test_a_two_rank_checkpoint_resumes_on_one_process_and_back_on_two(runs):
    """killed's checkpoint-2 on 1 process (DCP reassembles each tensor from both ranks'
    files) and one's 1-process checkpoint-4 on 2 ranks (each reads its half): the losses
    after each resume equal the reference's."""
    gaps = [
        assert_losses(runs["ref"], runs["one"], range(3, STEPS + 1)),
        assert_losses(runs["ref"], runs["two"], range(5, STEPS + 1)),
    ]
    assert "resuming from step 2" in runs["one"].printed
    assert "resuming from step 4" in runs["two"].printed
    assert max(gaps) < TOLERANCE


def test_final_state_dict_type_sharded_saves_the_final_model_sharded(runs):
    """final_state_dict_type SHARDED_STATE_DICT: the output folder holds the final model
    as DCP shards with its config, not model.safetensors; merge-sharded's default choice
    is that final save."""
    from launcher import api

    out = runs["one"].out
    assert (out / "model_dcp" / ".metadata").is_file() and (out / "config.json").is_file()
    assert not (out / "model.safetensors").exists()
    merged = api.merge_sharded(str(_write_config(runs, out)), dest=runs["home"].out / "m-one")
    assert merged.source == out and merged.world_size == 1
    assert_same_logits(runs["ref"].out, merged.dest)


def _write_config(runs, output_dir: Path) -> Path:
    """A config whose output_dir is `output_dir` (merge-sharded takes a config too)."""
    return _write(runs["home"].out, "out", raw(output_dir=str(output_dir)))


def assert_same_logits(reference: Path, merged: Path, tolerance: float = TOLERANCE) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(merged)("The quick brown fox", return_tensors="pt")
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(reference)(**ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(**ids).logits
    gap = (got - want).abs().max().item()
    assert gap < tolerance, gap
    return gap


def test_merge_sharded_gives_a_model_that_reproduces_the_reference(runs):
    """merge-sharded of the killed run, `--checkpoint 6`, turns the 2-rank checkpoint
    into a save_pretrained folder (config, safetensors, tokenizer) that from_pretrained
    loads and whose logits are the 1-process reference's final model's, and exactly those
    of the run's own final save (gathered whole by the FULL path). (Through the Python
    API, which the CLI calls: `launch merge-sharded` itself is run below.)"""
    from launcher import api

    run_id = runs["killed"].out.parent.name  # <FERRY_HOME>/runs/<run id>/output
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FERRY_HOME", str(runs["home"].out / "ferry"))
        merged = api.merge_sharded(run_id, checkpoint=STEPS, dest=runs["home"].out / "m-6")
    assert merged.world_size == 2 and merged.source.name == f"checkpoint-{STEPS}"
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        assert (merged.dest / name).is_file(), name
    assert_same_logits(runs["ref"].out, merged.dest)
    assert_same_logits(runs["killed"].out, merged.dest, tolerance=1e-7)


def test_merge_sharded_names_a_folder_without_dcp_files(tmp_path):
    """`launch merge-sharded`: a checkpoint with no DCP model (a whole save) is refused
    by name, and a missing one with the checkpoints there are."""
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    config = str(_write(tmp_path, "cfg", raw(output_dir=str(tmp_path))))
    said = refusal("merge-sharded", config, "--checkpoint", "3")
    assert f"{folder} holds no sharded (DCP) model: no model_dcp/.metadata in it" in said
    said = refusal("merge-sharded", config, "--checkpoint", "9")
    assert f"{tmp_path} holds no checkpoint-9" in said and "Its checkpoints: 3." in said


def refusal(*args: str) -> str:
    result = launch(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    return " ".join((result.stdout + result.stderr).split())


def test_a_lora_adapter_saved_sharded_merges_into_peft_files(tmp_path):
    """merge-sharded's LoRA path, in one process (DCP writes and reads without a process
    group too): the adapter folder holds the tensors, under the same names, and the
    config that peft's own save_pretrained writes for the same model, and loads with
    PeftModel. A failure means a merged adapter peft would misread or refuse."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from payload.parallel import dcp
    from payload.posttrain.sharded import merge

    torch.manual_seed(0)
    lora = LoraConfig(  # Ferry's adapters always name their task (payload.model)
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), lora)
    folder = tmp_path / "checkpoint-1"
    with pytest.warns(UserWarning, match="single process"):  # DCP says it saves in one
        dcp.save_model(model, str(folder))
    dcp.write_info(model, str(folder), 1)
    merged = merge(folder, tmp_path / "merged")
    model.save_pretrained(tmp_path / "peft")
    assert merged.adapter and merged.tensors == 16  # 4 blocks x (q, v) x (A, B)
    got = load_file(merged.dest / "adapter_model.safetensors")
    want = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)
    config = "adapter_config.json"
    assert json.loads((merged.dest / config).read_text()) == json.loads(
        (tmp_path / "peft" / config).read_text()
    )
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), merged.dest)


@pytest.mark.parametrize(
    ("fsdp_config", "said"),
    [
        ({"state_dict_type": "SHARDED_STATE_DICT"}, None),
        ({"final_state_dict_type": "SHARDED_STATE_DICT"}, None),
        (
            {"state_dict_type": "LOCAL_STATE_DICT"},
            "fsdp_config.state_dict_type: `LOCAL_STATE_DICT` is not supported yet: it is "
            "FSDP1's flattened per-rank parameters",
        ),
    ],
)
def test_validation_takes_sharded_and_refuses_local_state_dicts(tmp_path, fsdp_config, said):
    from launcher import api
    from payload.errors import FerryError

    config = _write(tmp_path, "cfg", raw(fsdp_version=2, fsdp_config=fsdp_config))
    if said is None:
        api.validate(str(config))
        return
    with pytest.raises(FerryError) as caught:
        api.validate(str(config))
    assert said in " ".join(str(caught.value).split())
