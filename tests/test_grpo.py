"""GRPO (`rl: grpo`): a real run through the CLI whose reward function lives in a local
file beside the config; `launch validate` on reward code that is missing, misspelt,
broken or of the wrong shape; reward files travelling with a Modal job; every `trl:` key
reaching TRL's GRPOConfig; the reference model TRL gets for beta > 0; the prompt rows.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from helpers import ASSETS, ROOT, launch, plan_row, write_jsonl

from payload.config import load_config
from payload.config.rewards import file_reference
from payload.distributed import DistInfo
from payload.errors import ConfigError, FerryError

SINGLE = DistInfo(rank=0, local_rank=0, world_size=1, backend=None, device="cpu")
TINY = str(ASSETS / "tiny-llama")
# The newline: the untrained tiny model samples it for about 8% of its tokens after a chat
# prompt (measured), so some completions of each group earn more than others from step 1.
TARGET = 204

# Written for this test (not the example's file): the reward reads its target from the
# rows' `target` column, which TRL passes to reward functions as a keyword.
REWARDS = """
def target_share(prompts, completions, completion_ids, target, **kwargs):
    return [ids.count(t) / max(len(ids), 1) for ids, t in zip(completion_ids, target)]


def to_prompt(row):
    return {"prompt": [{"role": "user", "content": row["question"]}], "target": row["id"]}
"""


def grpo_folder(tmp_path, trl: dict, rows=None, rewards: str = REWARDS, **extra):
    """A config beside its rewards.py and prompts.jsonl, as a user would lay them out."""
    folder = tmp_path / "project"
    folder.mkdir(exist_ok=True)
    (folder / "rewards.py").write_text(rewards)
    questions = [f"Say a word about {w}." for w in ("cats", "rain", "maps", "tea", "salt")]
    write_jsonl(
        folder / "prompts.jsonl", rows or [{"question": q, "id": TARGET} for q in questions]
    )
    raw = {
        "base_model": TINY,
        "rl": "grpo",
        "datasets": [{"path": "prompts.jsonl", "type": "rewards.to_prompt"}],
        "trl": trl,
        "micro_batch_size": 8,
        "learning_rate": 1.0e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "seed": 42,
        **extra,
    }
    config = folder / "grpo.yml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    trl = {
        "reward_funcs": ["rewards.target_share"],
        "num_generations": 8,
        "max_completion_length": 8,
    }
    config = grpo_folder(tmp, trl, max_steps=30, logging_steps=1, save_strategy="no")
    out = tmp / "out"
    # From the repository root: the reward module is found beside the config, not here.
    result = launch("train", str(config), "--set", f"output_dir={out}", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r for r in records if "reward" in r]
    return out, rewards, result.stdout


@pytest.mark.slow
def test_grpo_raises_the_mean_reward_of_a_reward_function_in_a_local_file(grpo_run):
    """A failure means GRPO does not learn from the user's reward (or never called it)."""
    out, steps, stdout = grpo_run
    assert [r["step"] for r in steps] == list(range(1, 31))
    first = sum(r["reward"] for r in steps[:5]) / 5
    last = sum(r["reward"] for r in steps[-5:]) / 5
    # Measured here: 0.009 over the first 5 steps, 0.775 over the last 5.
    assert first < 0.2 and last > first + 0.3, (first, last)
    # Each reward is a fraction of 8 tokens or fewer over 8 completions: a share in [0, 1].
    assert all(0.0 <= r["reward"] <= 1.0 for r in steps)
    assert "rewards/target_share/mean" in steps[0]
    assert (out / "model.safetensors").exists()
    assert "grpo | full fine-tune" in stdout


def test_validate_names_each_broken_reward_function_at_once(tmp_path):
    """All at once, each naming its key: a module that is nowhere, a misspelt function (with
    the right name offered), a module that fails to import (the error and its line), a
    function TRL cannot call, and one without **kwargs (the rows' other columns)."""
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "broken.py").write_text("import math\n\nvalue = 1 / 0\n")
    rewards = REWARDS + textwrap.dedent(
        """
        def one_arg(completions):
            return [0.0 for _ in completions]

        def no_kwargs(prompts, completions, completion_ids, trainer_state, log_extra, log_metric):
            return [0.0 for _ in completions]
        """
    )
    funcs = [
        "nowhere.reward",
        "rewards.target_shares",
        "broken.reward",
        "rewards.one_arg",
        "rewards.no_kwargs",
        "rewards.target_share",  # the good one: no complaint
    ]
    config = grpo_folder(tmp_path, {"reward_funcs": funcs}, rewards=rewards)
    result = launch("validate", str(config))
    assert result.returncode == 1
    err = " ".join(result.stderr.split())
    assert "trl.reward_funcs[0]: `nowhere.reward`: no module `nowhere`" in err
    assert "no nowhere.py in" in err and str(config.parent) in err
    assert (
        "trl.reward_funcs[1]: `rewards.target_shares`: rewards.py has no function "
        "`target_shares`; did you mean `target_share`?" in err
    )
    assert (
        "trl.reward_funcs[2]: `broken.reward`: broken.py fails to import (line 3): "
        "ZeroDivisionError: division by zero" in err
    )
    assert "trl.reward_funcs[3]: `rewards.one_arg` cannot take TRL's call" in err
    assert "trl.reward_funcs[4]: `rewards.no_kwargs` takes no **kwargs" in err
    assert "trl.reward_funcs[5]" not in err
    assert "Traceback" not in result.stderr


def test_validate_checks_the_trl_section_and_the_prompt_transform(tmp_path):
    """A misspelt `trl:` key gets a did-you-mean, one of Axolotl's that Ferry lacks is
    refused by name; GRPO without reward functions, weights
    that do not match them, a group size that does not divide the generation batch, a
    missing transform; vLLM asked for where it is neither installed nor in the image."""
    trl = {
        "num_generation": 4,
        "generation_kwargs": {"do_sample": True},
        "reward_weights": [1.0, 2.0],
        "reward_funcs": ["rewards.target_share"],
        "generation_batch_size": 16,
        "num_generations": 3,
        "use_vllm": True,
    }
    config = grpo_folder(tmp_path, trl)
    raw = yaml.safe_load(config.read_text())
    raw["datasets"][0]["type"] = "rewards.to_promt"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    problems = {p.key: p.message for p in caught.value.problems}
    assert "did you mean `num_generations`" in problems["trl.num_generation"]
    assert problems["trl.generation_kwargs"] == "is not supported yet by Ferry."
    assert "2 weights for 1 reward functions" in problems["trl.reward_weights"]
    assert "multiple of num_generations (3)" in problems["trl.generation_batch_size"]
    assert "did you mean `to_prompt`" in problems["datasets[0].type"]
    assert "extras: [vllm]" in problems["trl.use_vllm"]

    raw.pop("trl")
    raw["datasets"][0]["type"] = "rewards.to_prompt"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"trl.reward_funcs: is required with `rl: grpo`"):
        load_config(config)

    # The image's vllm layer answers for a cloud run.
    raw["trl"] = {"reward_funcs": ["rewards.target_share"], "use_vllm": True}
    raw["launch"] = {"image": {"extras": ["vllm"]}}
    config.write_text(yaml.safe_dump(raw))
    assert load_config(config).trl.use_vllm is True


def test_a_modal_plan_ships_the_reward_file_and_the_job_loads_it_there(tmp_path):
    """The plan mounts rewards.py; the job's config names it at its mount point, where the
    payload loads it by path."""
    from executors.modal import remote_config
    from launcher import api

    config = grpo_folder(tmp_path, {"reward_funcs": ["rewards.target_share"]})
    result = launch("train", str(config), "--cloud", "modal", "--gpus", "H100:1", "--dry-run")
    assert result.returncode == 0, result.stderr
    inputs = [
        line.split(None, 1)[1] for line in result.stdout.splitlines() if line.startswith("input ")
    ]
    rewards_file = config.parent / "rewards.py"
    shipped = [i for i in inputs if i.startswith(f"{rewards_file} -> ")]
    assert len(shipped) == 1, inputs  # reward function and transform share one file
    remote = shipped[0].split(" -> ")[1]
    assert remote == "/ferry/inputs/code-0/rewards.py"

    job, _ = api.prepare(config, cloud="modal", gpus="H100:1")
    remote_cfg, _ = remote_config(job)
    assert remote_cfg["trl"]["reward_funcs"] == [f"{remote}:target_share"]
    assert remote_cfg["datasets"][0]["type"] == f"{remote}:to_prompt"
    assert plan_row(get_plan(job), "gpu") == "H100:1"


def test_a_reward_file_travels_with_the_modules_beside_it_that_it_imports(tmp_path):
    """rewards.py imports helper.py and a package beside it: the Modal job gets all three
    in one folder, under their own names, and the function loads from there in a fresh
    process that has only the shipped files (copied as Modal mounts them, under a stand-in
    root for /ferry/inputs) and not the project folder. Unrelated files stay home."""
    import subprocess
    import sys

    from executors.modal import remote_config
    from launcher import api

    rewards = (
        "from helper import TARGET\nfrom scoring.share import share\n"
        + REWARDS.replace("def target_share(", "def _unused(")
        + "\n\ndef target_share(prompts, completions, completion_ids, **kwargs):\n"
        + ("    return [share(ids, TARGET) for ids in completion_ids]\n")
    )
    config = grpo_folder(tmp_path, {"reward_funcs": ["rewards.target_share"]}, rewards=rewards)
    project = config.parent
    (project / "helper.py").write_text(f"TARGET = {TARGET}\n")
    (project / "scoring").mkdir()
    (project / "scoring" / "__init__.py").write_text("")
    (project / "scoring" / "share.py").write_text(
        "def share(ids, target):\n    return ids.count(target) / max(len(ids), 1)\n"
    )
    (project / "unrelated.py").write_text("raise SystemExit('not shipped')\n")
    assert launch("validate", str(config)).returncode == 0

    job, _ = api.prepare(config, cloud="modal", gpus="H100:1")
    remote_cfg, inputs = remote_config(job)
    code = {remote: local for local, remote in inputs if remote.startswith("/ferry/inputs/code-")}
    assert code == {
        "/ferry/inputs/code-0/rewards.py": project / "rewards.py",
        "/ferry/inputs/code-0/helper.py": project / "helper.py",
        "/ferry/inputs/code-0/scoring/__init__.py": project / "scoring" / "__init__.py",
        "/ferry/inputs/code-0/scoring/share.py": project / "scoring" / "share.py",
    }
    root = tmp_path / "container"
    for remote, local in code.items():
        (root / remote.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / remote.lstrip("/")).write_bytes(local.read_bytes())
    (reference,) = remote_cfg["trl"]["reward_funcs"]
    assert reference == "/ferry/inputs/code-0/rewards.py:target_share"
    script = (
        "import sys\nfrom payload.config import rewards\n"
        f"fn = rewards.load({str(root) + reference!r})\n"
        f"print(fn(prompts=[], completions=[], completion_ids=[[{TARGET}, 1], [2, 3]]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0.5, 0.0]"


def test_two_reward_files_in_one_process_each_import_their_own_neighbour(tmp_path):
    """Two configs' folders both hold helper.py, and each folder's rewards.py imports it.
    Loaded one after the other in one process (a sweep, or the test suite), each function
    sees its own folder's helper, not the one the first file imported."""
    from payload.config import rewards

    fns = []
    for name, target in (("one", 7), ("two", 9)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "helper.py").write_text(f"TARGET = {target}\n")
        (folder / "rewards.py").write_text(
            "from helper import TARGET\n\n\ndef target(**kwargs):\n    return TARGET\n"
        )
        fns.append(rewards.load(f"{folder / 'rewards.py'}:target"))
    assert [fn() for fn in fns] == [7, 9]


def get_plan(job):
    from executors import get_executor

    return get_executor("modal").plan(job).text()


def test_every_trl_key_reaches_grpo_config(tmp_path):
    """Each accepted `trl:` key, set away from TRL's default, is the value GRPOConfig
    holds: a key the schema takes but the recipe drops fails here."""
    from trl import GRPOConfig

    from payload.trainers.grpo import GRPO_KEYS, FerryGRPOConfig, grpo_arguments
    from payload.trainers.settings import training_arguments

    trl = {
        "beta": 0.04,
        "num_generations": 4,
        "generation_batch_size": 16,
        "max_completion_length": 24,
        "num_iterations": 2,
        "epsilon": 0.3,
        "epsilon_high": 0.28,
        "loss_type": "dr_grpo",
        "scale_rewards": "batch",
        "importance_sampling_level": "sequence",
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
        "min_p": 0.05,
        "reward_funcs": ["rewards.target_share"],
        "reward_weights": [0.5],
        "sync_ref_model": True,
        "ref_model_sync_steps": 7,
        "ref_model_mixup_alpha": 0.25,
        "use_vllm": True,
        "vllm_mode": "server",
        "vllm_server_host": "10.0.0.2",
        "vllm_server_port": 8123,
        "vllm_server_timeout": 99.0,
        "vllm_gpu_memory_utilization": 0.5,
        "log_completions": True,
        "mask_truncated_completions": True,
        "repetition_penalty": 1.3,
    }
    config = grpo_folder(tmp_path, trl, launch={"image": {"extras": ["vllm"]}})
    cfg = load_config(config)
    args = training_arguments(
        cfg,
        SINGLE,
        str(tmp_path / "out"),
        5,
        False,
        cls=FerryGRPOConfig,
        objective=grpo_arguments(cfg),
    )
    assert isinstance(args, GRPOConfig)
    defaults = GRPOConfig(output_dir=str(tmp_path / "d"), use_cpu=True)
    assert set(GRPO_KEYS) == set(trl) - {"reward_funcs"}  # every key but the functions
    for key in GRPO_KEYS:
        assert getattr(args, key) == trl[key], key
        assert getattr(defaults, key) != trl[key], f"{key}: the test value is TRL's default"
    # The functions themselves go to the trainer, not the arguments (see the trained run).
    assert file_reference(cfg.trl.reward_funcs[0]) == (
        str(config.parent / "rewards.py"),
        "target_share",
    )


def test_a_batch_shape_trl_refuses_is_a_user_error(tmp_path):
    """A generation batch that holds no whole group on this many GPUs: GRPOConfig's
    refusal comes out as a FerryError naming trl:, not a traceback."""
    from payload.trainers.grpo import FerryGRPOConfig, grpo_arguments
    from payload.trainers.settings import training_arguments

    config = grpo_folder(
        tmp_path,
        {"reward_funcs": ["rewards.target_share"], "num_generations": 3},
        micro_batch_size=2,
    )
    cfg = load_config(config)
    with pytest.raises(FerryError, match="trl: GRPO cannot run with these settings.*divisible"):
        training_arguments(
            cfg,
            SINGLE,
            str(tmp_path / "o"),
            5,
            False,
            cls=FerryGRPOConfig,
            objective=grpo_arguments(cfg),
        )


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_the_reference_model_for_beta_above_zero(tmp_path, adapter):
    """Full fine-tune: a frozen copy of the model as Ferry loaded it, not a reload from the
    path (which misses Ferry's changes: here a model_config override that the reloaded
    model would not have). LoRA: the adapter disabled (no second model, and no `ref`
    copy of the adapter, which TRL would add and save beside the trained one); at the
    start that is exactly the policy."""
    import torch

    from payload.model import load_tokenizer
    from payload.trainers import recipe_for
    from payload.trainers.settings import training_arguments

    extra = {"adapter": adapter, "lora_r": 4, "lora_target_linear": True} if adapter else {}
    config = grpo_folder(
        tmp_path,
        {"reward_funcs": ["rewards.target_share"], "beta": 0.1, "num_generations": 8},
        model_config={"rms_norm_eps": 0.125},
        **extra,
    )
    cfg = load_config(config)
    recipe = recipe_for(cfg, SINGLE)
    tokenizer = load_tokenizer(cfg)
    train, _, report = recipe.datasets(tokenizer)
    assert report.train_rows == 5 and train[0]["target"] == TARGET
    model = recipe.load_model(tokenizer)
    args = training_arguments(
        cfg,
        SINGLE,
        str(tmp_path / "out"),
        len(train),
        False,
        cls=recipe.arguments_class(),
        objective=recipe.objective_arguments(),
    )
    trainer = recipe.trainer(model, args, train, None, tokenizer, [])
    if adapter:
        assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
        assert trainer.model.active_adapter == "default"
        return
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    assert ref.config.rms_norm_eps == 0.125  # a reload from the path would have 1e-5
    assert not any(p.requires_grad for p in ref.parameters())
    for (name, p), q in zip(trainer.model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_prompt_rows_pass_through_or_say_what_is_missing(tmp_path, tokenizer):
    """Rows that already hold `prompt` are kept as they are (their other columns too);
    rows without one are refused naming the dataset and the columns they have."""
    from payload.data.prompts import build_prompts

    rows = [{"prompt": "Say hi.", "id": 1}, {"prompt": "Say yo.", "id": 2}]
    config = grpo_folder(tmp_path, {"reward_funcs": ["rewards.target_share"]}, rows=rows)
    raw = yaml.safe_load(config.read_text())
    raw["datasets"][0].pop("type")
    config.write_text(yaml.safe_dump(raw))
    train, eval_set, report = build_prompts(load_config(config), tokenizer)
    assert train["prompt"] == ["Say hi.", "Say yo."]
    assert train["id"] == [1, 2] and eval_set is None and report.train_rows == 2

    write_jsonl(config.parent / "prompts.jsonl", [{"question": "Say hi."}])
    with pytest.raises(
        FerryError, match=r"datasets\[0\]: GRPO rows need a `prompt` column; the rows have question"
    ):
        build_prompts(load_config(config), tokenizer)


def test_the_example_validates():
    result = launch("validate", str(ROOT / "examples" / "grpo.yml"))
    assert result.returncode == 0, result.stderr


def test_an_axolotl_style_factory_transform_gets_the_config_and_the_tokenizer(tmp_path, tokenizer):
    """A `type:` function whose first parameter is `cfg` is Axolotl's factory: called with
    the config and `dataset_idx`, it returns the row function (given the tokenizer when it
    asks) and `datasets.map` arguments (`remove_columns: "__all__"` drops every column)."""
    from payload.data.prompts import build_prompts

    factory = REWARDS + textwrap.dedent(
        """
        def make(cfg, dataset_idx, **kwargs):
            def row(example, tokenizer=None):
                ids = tokenizer(example["question"])["input_ids"]
                return {"prompt": f"{cfg.seed}/{dataset_idx}: {example['question']}", "n": len(ids)}
            return row, {"remove_columns": "__all__"}
        """
    )
    config = grpo_folder(tmp_path, {"reward_funcs": ["rewards.target_share"]}, rewards=factory)
    raw = yaml.safe_load(config.read_text())
    raw["datasets"][0]["type"] = "rewards.make"
    config.write_text(yaml.safe_dump(raw))
    train, _, _ = build_prompts(load_config(config), tokenizer)
    assert train.column_names == ["prompt", "n"]
    assert train[0]["prompt"] == "42/0: Say a word about cats."
    assert train[0]["n"] == len(tokenizer("Say a word about cats.")["input_ids"])


def test_axolotls_rl_beta_and_reference_sync_defaults(tmp_path):
    """As Axolotl reads them: `rl_beta` is GRPO's beta when `trl.beta` is unset (the two
    set apart are refused), and `sync_ref_model` alone syncs every 64 steps with a 0.9
    share of the policy (Axolotl's defaults; TRL's are 512 and 0.6)."""
    from payload.trainers.grpo import FerryGRPOConfig, grpo_arguments
    from payload.trainers.settings import training_arguments

    trl = {"reward_funcs": ["rewards.target_share"], "sync_ref_model": True}
    cfg = load_config(grpo_folder(tmp_path, trl, rl_beta=0.07))
    args = training_arguments(
        cfg, SINGLE, str(tmp_path / "o"), 5, False, cls=FerryGRPOConfig,
        objective=grpo_arguments(cfg),
    )  # fmt: skip
    assert (args.beta, args.ref_model_sync_steps, args.ref_model_mixup_alpha) == (0.07, 64, 0.9)
    with pytest.raises(ConfigError, match=r"rl_beta: \(0.07\) and trl.beta \(0.1\) differ"):
        load_config(grpo_folder(tmp_path, {**trl, "beta": 0.1}, rl_beta=0.07))


@pytest.mark.slow
def test_a_reward_function_that_raises_is_the_users_error(tmp_path):
    """A reward function that fails while scoring stops the run with exit 1 and a message
    naming the key, the function and its line, not as a crash of Ferry (exit 70)."""
    broken = REWARDS + "\n\ndef boom(prompts, completions, **kwargs):\n    return [1 / 0]\n"
    config = grpo_folder(
        tmp_path,
        {"reward_funcs": ["rewards.boom"], "num_generations": 8, "max_completion_length": 4},
        rewards=broken,
        max_steps=1,
    )
    result = launch("train", str(config), "--set", f"output_dir={tmp_path / 'out'}", timeout=300)
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1, said[-3000:]
    line = broken.splitlines().index("    return [1 / 0]") + 1
    expected = (
        f"trl.reward_funcs[0]: `{config.parent / 'rewards.py'}:boom` raised ZeroDivisionError "
        f"(rewards.py line {line}) "
        "while scoring completions: division by zero"
    )
    assert expected in said, said[-3000:]
    assert "bug in Ferry" not in said
