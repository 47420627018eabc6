"""Context parallel (payload/parallel/context.py): a sequence split over 2 gloo ranks gives
the logits, loss and gradients one process gets from the whole sequence.

- Beside the test: 2 rank processes (plain Python, gloo) run the tiny Llama with the
  `ferry_cp` attention on their halves of a batch (`split_batch`), packed (position ids
  restarting per sample) and unpacked (right padding, an attention mask), of an odd length
  (the split pads it). The reference is the same model in this process with transformers'
  sdpa on the whole batch. A failure here means the attention, the mask or the split of
  positions/labels is wrong.
- Through the CLI (module fixture): `launch train` unpacked on 1 process (the reference)
  and on 2 processes with context_parallel_size 2 and gradient accumulation; packed on 1
  process and on 4 as 2 data-parallel replicas x 2 with FSDP2 (sharded over the flattened
  dp_shard x cp mesh). Their logged losses must agree, eval loss included, on an eval set
  whose last batch is partial.
- `launch validate` on layouts and combinations that cannot run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ASSETS, launch, tiny_run

from payload.parallel.context import split_batch

TINY = ASSETS / "tiny-llama"
LENGTH = 37  # odd: the split pads it to 38
# fp32 on CPU: a different order of the same sums (gathered keys, summed gradients)
# moves the last bits only.
TOLERANCE = 1e-5
# FSDP2's gradient norm sums each shard's squares, then the ranks': another order over
# every element (measured 4e-6 relative; tests/test_fsdp.py allows the same 1e-4).
FSDP_NORM_RTOL = 1e-4


def _batches(pad_id: int) -> dict[str, dict[str, torch.Tensor]]:
    """Two rows of LENGTH tokens, packed and unpacked, with labels -100 on the prompts."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (2, LENGTH), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    # Packed: samples of 10, 14 and 13 tokens in row 0, 20 and 17 in row 1; the first
    # label of each sample is -100 (it would predict across the boundary).
    positions = torch.cat(
        [
            torch.cat([torch.arange(10), torch.arange(14), torch.arange(13)])[None],
            torch.cat([torch.arange(20), torch.arange(17)])[None],
        ]
    )
    packed_labels = labels.clone()
    packed_labels[positions == 0] = -100
    # Unpacked: row 1 is 29 tokens long, padded on the right.
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0
    padded = ids.clone()
    padded[1, 29:] = pad_id
    padded_labels = labels.clone()
    padded_labels[1, 29:] = -100
    return {
        "packed": {"input_ids": ids, "labels": packed_labels, "position_ids": positions},
        "unpacked": {"input_ids": padded, "labels": padded_labels, "attention_mask": mask},
    }


def _loss_sum(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=-100, reduction="sum"
    )


def _model(attention: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY, attn_implementation=attention)
    model.config.use_cache = False
    return model


def _reference(batch: dict[str, torch.Tensor]) -> dict[str, object]:
    model = _model("sdpa")
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    count = int((shifted != -100).sum())
    loss = _loss_sum(out.logits, shifted) / count
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"logits": out.logits.detach(), "loss": loss.detach(), "grads": grads}


def _rank(rank: int, port: int, out: str, pad_id: int) -> None:
    """One context-parallel rank: its half of each batch through the ferry_cp model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from payload.distributed import DistInfo
    from payload.parallel.context import enable

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    model = _model("sdpa")
    enable(model, DistInfo(rank, rank, 2, "gloo", "cpu", mesh=mesh))
    results = {}
    for kind, batch in _batches(pad_id).items():
        model.zero_grad()
        local = split_batch(dict(batch), rank, 2, pad_id)
        inputs = {k: v for k, v in local.items() if k not in ("labels", "shift_labels")}
        logits = model(**inputs).logits
        shifted = local["shift_labels"]
        count = torch.tensor(int((shifted != -100).sum()))
        dist.all_reduce(count)  # the batch's tokens, as the Trainer counts them
        loss = _loss_sum(logits, shifted) / count
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for g in grads.values():
            dist.all_reduce(g)  # DDP's sum (its mean, times the world the loss was scaled by)
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        parts = [torch.empty_like(logits) for _ in range(2)]
        dist.all_gather(parts, logits.detach().contiguous())
        results[kind] = {
            "logits": torch.cat(parts, dim=1)[:, :LENGTH],
            "loss": summed,
            "grads": grads,
            "local_length": local["input_ids"].shape[1],
            "positions": local["position_ids"],
        }
    torch.save(results, f"{out}.rank{rank}")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory) -> tuple[dict, list[dict]]:
    """(reference per batch kind, each rank's results per batch kind). Each rank is a
    fresh Python process running `_rank` (never a fork of this one: a fork of a test
    process that holds other threads' locks, as pytest's does by then, can hang)."""
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(TINY).pad_token_id
    out = str(tmp_path_factory.mktemp("cp") / "results")
    port = _free_port()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_context_parallel as t; "
        "t._rank(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))"
    )
    here = str(Path(__file__).parent)
    ranks_started = [
        subprocess.Popen(
            [sys.executable, "-c", code, here, str(rank), str(port), out, str(pad_id)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for rank, proc in enumerate(ranks_started):
        try:
            said, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for other in ranks_started:
                other.kill()
            raise
        assert proc.returncode == 0, f"rank {rank}:\n{said[-3000:]}"
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    reference = {kind: _reference(batch) for kind, batch in _batches(pad_id).items()}
    return reference, ranks


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["packed", "unpacked"])
def test_split_sequence_gives_the_whole_sequences_logits_loss_and_gradients(split_runs, kind):
    """Each rank holds 19 of the 38 (padded) tokens with their global positions; their
    logits, summed losses and summed gradients equal one process on the whole batch."""
    reference, ranks = split_runs
    want = reference[kind]
    for rank, results in enumerate(ranks):
        got = results[kind]
        assert got["local_length"] == 19
        whole = _batches(0)[kind].get("position_ids", torch.arange(LENGTH).expand(2, -1))
        real = min(19, LENGTH - rank * 19)  # the last rank's last token is padding
        assert torch.equal(got["positions"][:, :real], whole[:, rank * 19 : rank * 19 + real])
        logits = got["logits"]
        if kind == "unpacked":  # padding's logits are never scored: compare the real tokens
            keep = _batches(0)[kind]["attention_mask"].bool()
            logits, ref_logits = logits[keep], want["logits"][keep]
        else:
            ref_logits = want["logits"]
        torch.testing.assert_close(logits, ref_logits, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(got["loss"], want["loss"], atol=TOLERANCE, rtol=0)
        assert set(got["grads"]) == set(want["grads"])
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, atol=TOLERANCE, rtol=0)


# ---- through the CLI

STEPS = 3
EVAL_ROWS = 15  # odd: each run's last eval step (2 rows) holds 1 real row
RUNS = {  # name -> (keys on top of `raw`, processes)
    "unpacked_ref": ({}, 1),
    # Both ranks must read the same rows (dealt by data-parallel rank), each its half; two
    # micro-batches of 1 row are the reference's one of 2 (eval batches stay 2 rows).
    "unpacked_cp2": (
        {
            "context_parallel_size": 2,
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 2,
            "eval_batch_size": 2,
        },
        2,
    ),
    # Packed training, unpacked eval: the eval rows are dealt by data-parallel rank, so the
    # last step's second replica holds only a filler row.
    "packed_ref": ({"sample_packing": True, "eval_sample_packing": False}, 1),
    # 2 replicas x micro-batch 1 read the reference's 2 bins (eval rows) per step;
    # Axolotl's older name.
    "packed_dp2_cp2": (
        {
            "sample_packing": True,
            "eval_sample_packing": False,
            "micro_batch_size": 1,
            "sequence_parallel_degree": 2,
            "fsdp_version": 2,
            "fsdp_config": {"reshard_after_forward": True},
        },
        4,
    ),
}


def raw(**extra) -> dict:
    fixed = {"micro_batch_size": 2, "max_grad_norm": 0.5}
    # Evaluated at the last step.
    return tiny_run(STEPS, **{**fixed, "val_set_size": EVAL_ROWS, "eval_steps": STEPS, **extra})


class Run:
    def __init__(self, name: str, printed: str, output_dir: str):
        from payload.storage.layout import read_metrics

        self.name, self.printed = name, printed
        self.records = read_metrics(output_dir)

    def values(self, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in self.records if key in r}


def train(tmp_factory, name: str) -> Run:
    extra, procs = RUNS[name]
    home = tmp_factory.mktemp(f"cp-{name}")
    path = home / f"{name}.yml"
    path.write_text(yaml.safe_dump(raw(**extra), sort_keys=False))
    env = {"FERRY_HOME": str(home / "ferry")}
    args = ["--gpus", str(procs)] if procs > 1 else []
    done = launch("train", str(path), *args, env=env, check=True, timeout=600)
    (run,) = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    return Run(name, done.stdout + done.stderr, run["output_dir"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """Every run of RUNS: the three small ones two at a time, then the 4-process one."""
    from concurrent.futures import ThreadPoolExecutor

    tmp_path_factory.getbasetemp()  # made once, before the threads ask for it
    small = [name for name, (_, procs) in RUNS.items() if procs < 4]
    with ThreadPoolExecutor(2) as pool:
        done = {run.name: run for run in pool.map(lambda n: train(tmp_path_factory, n), small)}
    done["packed_dp2_cp2"] = train(tmp_path_factory, "packed_dp2_cp2")
    return done


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "reference", "keys"),
    [
        ("unpacked_cp2", "unpacked_ref", ("loss", "grad_norm", "eval_loss", "tokens_seen")),
        ("packed_dp2_cp2", "packed_ref", ("loss", "grad_norm", "eval_loss")),
    ],
)
def test_context_parallel_run_logs_the_one_process_losses(runs, name, reference, keys):
    """A split run's logged losses, gradient norms (clipping at 0.5 bites, so a wrong
    gradient would change the next losses too), eval loss and tokens seen equal the
    1-process run's: the sequence split, the token count of the loss over accumulated
    micro-batches, the gradient reduction (DDP, or FSDP2 over dp_shard x cp) and the
    dealing of batches by data-parallel rank are all right. Both evaluate EVAL_ROWS rows,
    so an eval loss that weighs the last, partial batch wrong (or scores its filler row)
    fails here."""
    got, want = runs[name], runs[reference]
    assert "each sequence split over 2 ranks" in got.printed
    if name == "packed_dp2_cp2":
        assert "fsdp2: fully_shard" in got.printed and "dp_shard_cp=4" in got.printed
    for run in (got, want):
        (evaluated,) = [r for r in run.records if "eval_loss" in r]
        samples = evaluated["eval_samples_per_second"] * evaluated["eval_runtime"]
        assert round(samples) == EVAL_ROWS, f"{run.name} evaluated {samples:.2f} rows"
    for key in keys:
        mine, theirs = got.values(key), want.values(key)
        assert sorted(mine) == sorted(theirs) and theirs, f"{name} {key} steps"
        sharded = key == "grad_norm" and name == "packed_dp2_cp2"
        for step, value in theirs.items():
            want_value = pytest.approx(value, rel=FSDP_NORM_RTOL if sharded else 0, abs=TOLERANCE)
            assert mine[step] == want_value, f"{name} {key} @ {step}"


# ---- validation


def _validate(tmp_path: Path, *args: str, **extra) -> str:
    path = tmp_path / "cp.yml"
    path.write_text(yaml.safe_dump(raw(**extra), sort_keys=False))
    done = launch("validate", str(path), *args)
    assert done.returncode == 1, done.stdout + done.stderr
    return " ".join((done.stdout + done.stderr).split())


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (
            {"context_parallel_size": 2, "launch": {"gpus": 3}},
            "context_parallel_size: the layout does not fit launch.gpus x launch.nodes: "
            "context_parallel_size (2) = 2 does not divide the job's 3 processes",
        ),
        (
            {"context_parallel_size": 4, "dp_shard_size": 2, "launch": {"gpus": 4}},
            "dp_shard_size (2) x context_parallel_size (4) = 8, but the job runs 4 processes",
        ),
        (
            {"context_parallel_size": 256},
            "context_parallel_size: (256) splits each sequence, and sequence_len is only 128",
        ),
        (
            {"sequence_parallel_degree": 2, "context_parallel_size": 4},
            "sequence_parallel_degree: (2) and `context_parallel_size` (4) are the same setting",
        ),
        ({"context_parallel_size": 2, "rl": "dpo"}, "rl: with context_parallel_size (2)"),
        (
            {"context_parallel_size": 2, "torch_compile": True},
            "torch_compile: with context_parallel_size (2)",
        ),
        (
            {"context_parallel_size": 2, "dp_replicate_size": 2, "fsdp_config": {}},
            "dp_replicate_size: with context_parallel_size (2) is not supported: HSDP copies",
        ),
        ({"heads_k_stride": 1}, "heads_k_stride: tunes ring-flash-attn's kernels"),
        ({"ring_attn_func": "varlen_llama3"}, "ring_attn_func: tunes ring-flash-attn's kernels"),
    ],
)
def test_validate_names_what_cannot_run(tmp_path, extra, said):
    """Each refusal names the key and the numbers (a layout that does not fit, or a
    setting context parallel does not run with)."""
    assert said in _validate(tmp_path, **extra)


def test_dry_run_refuses_processes_the_group_does_not_divide(tmp_path):
    """The executors check the layout against the processes asked for on the command line."""
    path = tmp_path / "cp.yml"
    path.write_text(yaml.safe_dump(raw(context_parallel_size=2), sort_keys=False))
    done = launch("train", str(path), "--gpus", "3", "--dry-run")
    assert done.returncode == 1
    assert "context_parallel_size (2) = 2 does not divide the job's 3 processes" in done.stderr
