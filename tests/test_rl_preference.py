"""The preference objectives (`rl:` dpo, ipo, simpo, kto, orpo) on TRL's trainers.

Through the real CLI, seeded fp32 runs on the tiny model and `examples/data/prefs_rule.jsonl`
(the chosen answer is always the first word of "pick: X or Y?"): the losses are pinned, the
first DPO loss is log 2 and the first KTO loss 0.5 (policy == reference), the DPO loss falls
and its reward margin grows, and DPO on 2 gloo ranks equals 1 rank with twice the
micro-batch.

In this process, the real TRL trainer each recipe builds: every key's value reaches the
loss, checked against the loss's formula on one pair (the metrics TRL logs give the terms),
and the reference model (LoRA: the adapter disabled; full fine-tune: a frozen copy;
precompute_ref_log_probs: log-probs computed before training).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, assert_no_planted_leaks, launch

from payload.storage.layout import read_metrics

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).parent / "recipes" / "preference_losses.json"
PREFS = ROOT / "examples" / "data" / "prefs_rule.jsonl"
TINY = ROOT / "examples" / "assets" / "tiny-llama"
LORA = {"adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True}
STEPS = 6


def raw_config(rl: str, **extra) -> dict:
    """A short seeded run of `rl` on prefs_rule.jsonl, with `extra` keys on top."""
    dataset = {"path": str(PREFS), "type": "chatml.intel"}
    if rl == "orpo":
        dataset = {
            "path": str(PREFS),
            "type": "chat_template.argilla",
            "field_chosen": "chosen_messages",
            "field_rejected": "rejected_messages",
        }
    raw = {
        "base_model": str(TINY),
        "rl": rl,
        "datasets": [dataset],
        "sequence_len": 64,
        "micro_batch_size": 4,
        "max_steps": STEPS,
        "learning_rate": 3e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "seed": 42,
        "logging_steps": 1,
        "save_strategy": "no",
        **LORA,
    }
    raw.update(extra)
    return raw


# ---- through the CLI

# name -> (objective, keys on top, launch arguments)
RUNS = {
    "dpo": ("dpo", {}, []),
    "dpo_2ranks": ("dpo", {"micro_batch_size": 2}, ["--gpus", "2"]),
    "ipo": ("ipo", {}, []),
    "simpo": ("simpo", {}, []),
    "kto": ("kto", {}, []),
    "orpo": ("orpo", {}, []),
}


PRINTED: dict[str, str] = {}  # each run's `launch train` output, filled by `runs`


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """Each run of RUNS through `launch train`: its metrics.jsonl records. Three at a time:
    most of a run's time is starting Python and loading the libraries."""

    def one(name: str) -> tuple[str, list[dict]]:
        rl, extra, args = RUNS[name]
        home = tmp_path_factory.mktemp(f"pref-{name}")
        path = home / f"{name}.yml"
        path.write_text(yaml.safe_dump(raw_config(rl, **extra), sort_keys=False))
        env = {"FERRY_HOME": str(home / "ferry")}
        trained = launch("train", str(path), *args, env=env, check=True, timeout=600)
        (run,) = json.loads(launch("runs", "--json", env=env, check=True).stdout)
        assert_no_planted_leaks([home], [trained.stdout + trained.stderr], {})
        PRINTED[name] = trained.stdout
        return name, read_metrics(run["output_dir"])

    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(one, RUNS))


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_recipe_losses_match_the_recorded_ones(runs):
    """Seeded fp32 runs through the real CLI reproduce the recorded losses of each
    objective. A change not meant to alter the math keeps them; one that is must
    re-record them with FERRY_RECORD_RECIPES=1 and say why."""
    logged = {
        name: {str(step): loss for step, loss in losses(runs[name]).items()}
        for name in ("dpo", "ipo", "simpo", "kto", "orpo")
    }
    if os.environ.get("FERRY_RECORD_RECIPES") == "1":
        RECIPE.write_text(
            json.dumps(
                {"command": "launch train (tests/test_rl_preference.py raw_config)", **logged},
                indent=2,
            )
            + "\n"
        )
    recorded = json.loads(RECIPE.read_text())
    for name, pinned in logged.items():
        assert pinned.keys() == recorded[name].keys(), name
        for step, loss in recorded[name].items():
            assert pinned[step] == pytest.approx(loss, rel=1e-4), f"{name} step {step}"


def test_first_losses_are_those_of_a_policy_equal_to_its_reference(runs):
    """At step 1 the policy is its reference (LoRA's fresh adapter, disabled, is the
    base): DPO's -log sigmoid(0) = log 2, KTO's 1 - sigmoid(0) = 0.5, and IPO's
    (0 - 1/(2 beta))^2 = 25 with beta 0.1."""
    assert losses(runs["dpo"])[1] == pytest.approx(math.log(2), abs=1e-6)
    assert losses(runs["kto"])[1] == pytest.approx(0.5, abs=1e-6)
    assert losses(runs["ipo"])[1] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-6)


def test_dpo_learns_the_rule_and_logs_the_rewards(runs):
    """The DPO loss falls below log 2 and the reward margin grows from 0; metrics.jsonl
    keeps TRL's reward logs (names with a slash) for DPO and KTO."""
    records = [r for r in runs["dpo"] if "loss" in r]
    first, last = records[0], records[-1]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in first and key in last, key
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert last["loss"] < math.log(2) - 0.05
    assert last["rewards/margins"] > 0.3
    assert last["rewards/accuracies"] > 0.5
    kto = [r for r in runs["kto"] if "loss" in r]
    assert "rewards/chosen" in kto[-1] and "kl" in kto[-1]
    # The step lines show the margin and accuracy, which the loss alone does not tell.
    line = f"[step {STEPS}/{STEPS}] loss {last['loss']:.4f} | margin "
    assert line + f"{last['rewards/margins']:.4f} | acc " in PRINTED["dpo"], PRINTED["dpo"][-2000:]


def test_every_objective_learns_the_rule(runs):
    """Each objective's loss falls over its 6 steps on the rule-following pairs, and the
    reward margin (chosen over rejected) grows from where it started for the objectives
    whose loss is the preference term. (ORPO's loss is mostly the chosen answers' NLL,
    and in 6 steps its margin has not grown yet: measured 0.023 -> 0.012.)"""
    for name in ("dpo", "ipo", "simpo", "kto", "orpo"):
        records = [r for r in runs[name] if "loss" in r]
        assert records[-1]["loss"] < 0.9 * records[0]["loss"], name
        if name != "orpo" and "rewards/margins" in records[0]:
            assert records[-1]["rewards/margins"] > records[0]["rewards/margins"], name


def test_every_objective_counts_the_tokens_it_trains_on(runs):
    """tokens/s needs the tokens of each batch: the CPO (simpo) and ORPO trainers' batches
    hold chosen_/rejected_ sequences, which Ferry counts; the others have input_ids."""
    for name in ("dpo", "ipo", "simpo", "kto", "orpo"):
        last = [r for r in runs[name] if "loss" in r][-1]
        # 6 steps of 4 rows, each row at least a prompt "pick: X or Y?" in chat markup
        assert last["tokens_seen"] > STEPS * 4 * 10, name
        assert last["tokens_per_s"], name


def test_dpo_on_two_ranks_equals_one_rank_with_twice_the_batch(runs):
    """2 gloo ranks x micro-batch 2 take the same rows per step as 1 rank x 4, and DDP
    averages the same per-pair losses: the per-step losses agree."""
    one, two = losses(runs["dpo"]), losses(runs["dpo_2ranks"])
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), f"step {step}"


# ---- in this process: the trainer each recipe builds


def build(tmp_path: Path, rl: str, **extra):
    """The recipe's TRL trainer for `rl` with `extra` keys, as `payload.train` builds it."""
    from transformers import set_seed

    from payload.config import validate_mapping
    from payload.distributed import DistInfo
    from payload.model import load_tokenizer
    from payload.trainers import recipe_for
    from payload.trainers.settings import training_arguments

    cfg = validate_mapping(raw_config(rl, **extra))
    single = DistInfo(rank=0, local_rank=0, world_size=1, backend=None, device="cpu")
    set_seed(cfg.seed)
    recipe = recipe_for(cfg, single)
    tokenizer = load_tokenizer(cfg)
    train, eval_set, _ = recipe.datasets(tokenizer)
    model = recipe.load_model(tokenizer)
    args = training_arguments(
        cfg,
        single,
        str(tmp_path / rl),
        len(train),
        eval_set is not None,
        cls=recipe.arguments_class(),
        objective=recipe.objective_arguments(),
    )
    return recipe.trainer(model, args, train, eval_set, tokenizer, [])


def nudge(trainer) -> None:
    """Move the policy away from its reference, the same way each time."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _name, p in sorted(trainer.model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))


def one_pair_loss(trainer, row: int = 0) -> tuple[float, dict[str, float]]:
    """(the loss of training row `row` alone, the metrics TRL logged for it)."""
    import torch

    batch = trainer.data_collator([trainer.train_dataset[row]])
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, batch))
    if hasattr(trainer, "_stored_metrics"):  # the experimental CPO and ORPO trainers
        logged = trainer._stored_metrics["train"]
    else:
        logged = trainer._metrics["train"]
    return loss, {k: float(v[-1]) for k, v in logged.items() if v}


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_beta_and_label_smoothing_reach_the_loss(tmp_path):
    """One pair, policy nudged: DPO's loss is -log s(z), z the reward margin TRL logs,
    which is beta times the log-ratio difference, so it scales with rl_beta. The robust
    loss smooths with e = dpo_label_smoothing:
    ((1-e) (-log s(z)) - e (-log s(-z))) / (1 - 2e)."""
    plain = build(tmp_path, "dpo")
    nudge(plain)
    loss, m = one_pair_loss(plain)
    z = m["rewards/margins"]
    assert abs(z) > 1e-3
    assert loss == pytest.approx(-log_sigmoid(z), rel=1e-5)

    tuned = build(tmp_path, "dpo", rl_beta=0.5, dpo_loss_type=["robust"], dpo_label_smoothing=0.2)
    assert (tuned.args.beta, tuned.args.label_smoothing) == (0.5, 0.2)
    nudge(tuned)
    loss, m = one_pair_loss(tuned)
    assert m["rewards/margins"] == pytest.approx(5 * z, rel=1e-4)
    expected = (-0.8 * log_sigmoid(5 * z) + 0.2 * log_sigmoid(-5 * z)) / (1 - 0.4)
    assert loss == pytest.approx(expected, rel=1e-4)


def test_dpo_loss_type_and_weights_reach_the_loss(tmp_path):
    """dpo_loss_type [ipo] with weight 2 at policy == reference: 2 * (1/(2*0.1))^2."""
    trainer = build(tmp_path, "dpo", dpo_loss_type=["ipo"], dpo_loss_weights=[2.0])
    assert one_pair_loss(trainer)[0] == pytest.approx(2 * 25.0, rel=1e-6)


def test_kto_weights_reach_the_loss(tmp_path):
    """At policy == reference each row's KTO loss is 1 - sigmoid(0) = 0.5, times its
    weight: a batch's loss is 0.5 * (wd * desirable + wu * undesirable) / rows."""
    import torch

    trainer = build(tmp_path, "kto", kto_desirable_weight=3.0, kto_undesirable_weight=0.5)
    assert (trainer.args.desirable_weight, trainer.args.undesirable_weight) == (3.0, 0.5)
    rows = [trainer.train_dataset[i] for i in range(4)]
    labels = [bool(r["label"]) for r in rows]
    assert 0 < sum(labels) < 4  # both kinds in the batch
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, trainer.data_collator(rows)))
    expected = 0.5 * (3.0 * sum(labels) + 0.5 * (4 - sum(labels))) / 4
    assert loss == pytest.approx(expected, rel=1e-6)


def test_simpo_gamma_and_cpo_alpha_reach_the_loss(tmp_path):
    """SimPO on one pair: -log s(margin - gamma) + cpo_alpha * NLL(chosen), the margin
    being beta times the length-averaged log-prob difference (TRL logs both terms)."""
    trainer = build(tmp_path, "simpo", rl_beta=2.0, simpo_gamma=1.5, cpo_alpha=0.25)
    args = trainer.args
    assert (args.loss_type, args.beta, args.simpo_gamma, args.cpo_alpha) == (
        "simpo",
        2.0,
        1.5,
        0.25,
    )
    loss, m = one_pair_loss(trainer)
    expected = -log_sigmoid(m["rewards/margins"] - 1.5) + 0.25 * m["nll_loss"]
    assert loss == pytest.approx(expected, rel=1e-5)


def test_orpo_alpha_reaches_the_loss(tmp_path):
    """ORPO on one pair: NLL(chosen) - orpo_alpha * log s(log odds ratio)."""
    trainer = build(tmp_path, "orpo", orpo_alpha=0.7)
    assert trainer.args.beta == 0.7
    loss, m = one_pair_loss(trainer)
    expected = m["nll_loss"] - 0.7 * m["log_odds_ratio"]
    assert loss == pytest.approx(expected, rel=1e-5)


def test_lora_reference_is_the_adapter_disabled(tmp_path):
    """LoRA: no reference model and no second adapter (it would be saved too); the loss
    at the start is log 2, and once the adapter moves it is measured against the base."""
    trainer = build(tmp_path, "dpo")
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]
    assert one_pair_loss(trainer)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)


def test_full_fine_tune_reference_is_a_frozen_copy(tmp_path):
    """Full fine-tune: the reference is a separate copy, frozen: first loss log 2, and
    after two steps the policy moved while the reference kept its weights."""
    import torch

    trainer = build(tmp_path, "dpo", adapter=None, max_steps=2, learning_rate=1e-3)
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    assert not any(p.requires_grad for p in ref.parameters())
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    assert one_pair_loss(trainer)[0] == pytest.approx(math.log(2), abs=1e-6)
    trainer.train()
    after = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    policy = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], policy[n]) for n in before)


@pytest.mark.parametrize("adapter", [LORA["adapter"], None])
def test_precompute_ref_log_probs_computes_them_up_front(tmp_path, adapter):
    """precompute_ref_log_probs: every training row has its reference log-probs before
    any step and no reference model is kept; the first loss is still log 2."""
    trainer = build(tmp_path, "dpo", adapter=adapter, precompute_ref_log_probs=True)
    assert trainer.args.precompute_ref_log_probs is True
    assert trainer.ref_model is None
    columns = trainer.train_dataset.column_names
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(columns)
    assert all(v < 0 for v in trainer.train_dataset["ref_chosen_logps"])
    assert one_pair_loss(trainer)[0] == pytest.approx(math.log(2), abs=1e-6)


def test_preprocess_says_there_is_nothing_to_prepare(tmp_path):
    """Preference rows stay text until TRL tokenizes them: `launch preprocess` says so
    (rather than failing to find an SFT strategy named like the preference format)."""
    path = tmp_path / "dpo.yml"
    path.write_text(yaml.safe_dump(raw_config("dpo")))
    done = launch("preprocess", str(path), env={"FERRY_HOME": str(tmp_path / "ferry")})
    assert done.returncode == 1
    assert "Nothing to prepare: `rl: dpo` rows stay text" in done.stdout + done.stderr


def test_validate_refuses_what_preference_runs_cannot_honour():
    """Keys the objectives cannot honour are refused by name, with what to do."""
    from payload.config import ConfigError, validate_mapping

    cases = {
        "micro_batch_size": raw_config("kto", micro_batch_size=1),
        "dpo_loss_weights": raw_config("dpo", dpo_loss_weights=[1.0, 2.0]),
        "dpo_loss_type": raw_config("dpo", dpo_loss_type=["sigmod"]),
        "trl.beta": raw_config("ipo", trl={"beta": 0.0}),
        "sample_packing": raw_config("dpo", sample_packing=True),
        "rpo_alpha": raw_config("dpo", rpo_alpha=0.5),
        "rl_beta": raw_config("dpo", rl_beta=0.2, trl={"beta": 0.3}),
    }
    for key, raw in cases.items():
        with pytest.raises(ConfigError) as error:
            validate_mapping(raw)
        assert key in str(error.value), (key, str(error.value))
    # ipo and simpo read dpo's formats; kto's `chatml.intel` is its own
    for rl in ("ipo", "simpo", "kto"):
        validate_mapping(raw_config(rl))


def test_settings_axolotl_passes_on_are_warned_about_not_refused():
    """Axolotl passes these to TRL, which ignores them (label smoothing outside the losses
    that read it) or reads them (WPO weighting for IPO): a config written for Axolotl
    validates, with a warning for what has no effect."""
    from payload.config import validate_mapping
    from payload.distributed import DistInfo
    from payload.trainers import recipe_for

    single = DistInfo(rank=0, local_rank=0, world_size=1, backend=None, device="cpu")
    warned: list[str] = []
    validate_mapping(raw_config("dpo", dpo_label_smoothing=0.1), warn=warned.append)
    assert any("dpo_label_smoothing: is read only by the DPO losses" in w for w in warned)
    warned.clear()
    cfg = validate_mapping(raw_config("ipo", dpo_use_weighting=True), warn=warned.append)
    assert not [w for w in warned if "dpo_use_weighting" in w], warned
    assert recipe_for(cfg, single).objective_arguments()["use_weighting"] is True
    warned.clear()
    sft = {**raw_config("dpo"), "rl": None, "trl": {"beta": 0.2}}
    sft["datasets"] = [{"path": "rows.jsonl", "type": "alpaca"}]
    validate_mapping(sft, resolve_paths=False, warn=warned.append)
    assert any("trl.beta: ignored: only `rl:` objectives read it" in w for w in warned), warned
