"""After training, through the real CLI on the session's quickstart run (a LoRA adapter on
the tiny Llama): `launch merge-lora`, `inference`, `evaluate` and `quantize`, found by
run id (pulled from storage when the output folder is gone) or by config. Every
expected value is computed here another way: with peft directly, `model.generate`, the
model's own loss, or the unquantized merged model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import ASSETS, DATA, LAUNCH_OUTPUTS, ROOT, launch, launch_command

PROMPT = "Give three tips for staying healthy."


@pytest.fixture(scope="module")
def run(quickstart_run):
    """The quickstart run, and the environment that finds it in its registry."""
    return quickstart_run, {"FERRY_HOME": str(quickstart_run.home)}


def _peft_model(output_dir):
    """Base + trained adapter, loaded here with transformers and peft alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    return PeftModel.from_pretrained(base, output_dir).eval()


def _inputs():
    import torch

    torch.manual_seed(0)
    return torch.randint(4, 1024, (3, 24))


def _config(tmp_path, output_dir, **keys) -> str:
    """The quickstart's settings, with `keys` on top, pointing at a trained output folder."""
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yml").read_text())
    raw["base_model"] = str(ASSETS / "tiny-llama")
    raw["datasets"][0]["path"] = str(DATA)
    raw.update(output_dir=str(output_dir), **keys)
    path = tmp_path / "posttrain.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
    quick, env = run
    dest = tmp_path_factory.mktemp("merged") / "model"
    result = launch("merge-lora", quick.record["run_id"], "--dest", str(dest), env=env, check=True)
    return dest, result


@pytest.mark.slow
def test_merge_lora_logits_equal_base_plus_adapter(run, merged):
    """If this fails, the merged model is not the trained one: the adapter was merged
    with the wrong scale, into the wrong layers, or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quick, _ = run
    dest, result = merged
    assert f"saved to {dest}" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())  # plain weights
    reference = _peft_model(quick.output_dir)
    with torch.no_grad():
        got, want = model(_inputs()).logits, reference(_inputs()).logits
        base = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-llama")(_inputs()).logits
    assert (got - want).abs().max().item() < 1e-5
    assert (want - base).abs().max().item() > 1e-2  # the adapter does change the logits
    assert AutoTokenizer.from_pretrained(dest).chat_template  # the tokenizer went with it


@pytest.mark.slow
def test_inference_prints_the_greedy_completion(run):
    """If this fails, `inference` does not give what greedy decoding of the trained model
    gives for the chat-templated prompt, or `--json`'s text is not its tokens' text."""
    import torch
    from transformers import AutoTokenizer

    quick, env = run
    args = ["inference", quick.record["run_id"], "--max-new-tokens", "8"]
    # Two prompts piped in (the interactive loop reads to EOF), answered as JSON lines.
    done = subprocess.run(
        [*launch_command(), *args, "--json"],
        input=f"{PROMPT}\n\nName a colour.\n",
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=300,
    )
    LAUNCH_OUTPUTS.append(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["prompt"] for a in answers] == [PROMPT, "Name a colour."]

    tok = AutoTokenizer.from_pretrained(quick.output_dir)
    model = _peft_model(quick.output_dir)
    for answer in answers:
        text = tok.apply_chat_template(
            [{"role": "user", "content": answer["prompt"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
            )
        want = out[0, ids.shape[1] :].tolist()
        assert answer["tokens"] == want
        assert answer["new_tokens"] == len(want) > 0
        assert answer["text"] == tok.decode(want, skip_special_tokens=True)

    # The plain form streams the same completion to stdout.
    plain = launch(*args, "--prompt", PROMPT, env=env, check=True)
    assert plain.stdout.strip() == answers[0]["text"].strip()


@pytest.mark.slow
def test_evaluate_equals_the_models_own_loss(run, tmp_path):
    """If this fails, `evaluate`'s loss is not the token-weighted mean cross-entropy of the
    trained model on the test_datasets rows (or its perplexity not exp of it)."""
    import torch

    from payload.config import load_config
    from payload.data.build import build_datasets
    from payload.model import load_tokenizer

    quick, env = run
    rows = DATA.read_text().splitlines()[:12]
    (tmp_path / "eval.jsonl").write_text("\n".join(rows) + "\n")
    test_sets = [{"path": str(tmp_path / "eval.jsonl"), "type": "alpaca"}]
    cfg_path = _config(tmp_path, quick.output_dir, test_datasets=test_sets, micro_batch_size=5)
    result = json.loads(launch("evaluate", cfg_path, "--json", env=env, check=True).stdout)
    plain = launch("evaluate", cfg_path, env=env, check=True).stdout

    cfg = load_config(cfg_path)
    _, eval_set, _ = build_datasets(cfg, load_tokenizer(cfg), progress=False)
    model = _peft_model(quick.output_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in eval_set:  # one row at a time: no padding involved
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            n = int((labels[0, 1:] != -100).sum())  # tokens the model's loss averages over
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    assert result["rows"] == 12 and result["tokens"] == count
    assert result["eval_loss"] == pytest.approx(total / count, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["weighting"] == "token"
    assert f"eval_loss {result['eval_loss']:.4f}" in plain
    assert f"perplexity {result['perplexity']:.4f}" in plain
    assert "token-weighted" in plain


@pytest.mark.slow
@pytest.mark.parametrize(
    ("quantization", "tensor", "tolerance"),
    [
        # One scale per row: each weight off by at most half a step of 1/127 of its row's
        # largest, so a few hundredths of the largest logit at most.
        ({"weight_dtype": "int8"}, "Int8Tensor", 0.03),
        # 16 levels per group of 32: far coarser; 0.23 measured on the quickstart run.
        ({"weight_dtype": "int4", "group_size": 32}, "IntxUnpackedToInt8Tensor", 0.3),
    ],
)
def test_quantize_writes_a_model_that_loads(run, merged, tmp_path, quantization, tensor, tolerance):
    """If this fails, `quantize` wrote no loadable model, left the weights unquantized, or
    quantized them badly: its logits must stay within `tolerance` (a share of the largest
    logit of the unquantized merged model) of the merged model's, and must differ."""
    import torch
    from transformers import AutoModelForCausalLM

    quick, env = run
    cfg_path = _config(tmp_path, quick.output_dir, quantization=quantization)
    dest = tmp_path / "quantized"
    result = launch("quantize", cfg_path, "--dest", str(dest), env=env, check=True)
    assert "adapter merged" in result.stdout and str(dest) in result.stdout

    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == tensor
    reference = AutoModelForCausalLM.from_pretrained(merged[0]).eval()
    with torch.no_grad():
        got, want = model(_inputs()).logits, reference(_inputs()).logits
    diff = (got - want).abs().max().item()
    assert 0 < diff < tolerance * want.abs().max().item()


@pytest.mark.slow
def test_a_run_whose_output_is_gone_is_pulled_from_storage(run, tmp_path):
    """If this fails, a run id whose output folder is not on this machine does not
    resolve to its final artifacts in storage (pulled and verified)."""
    from launcher.registry import Registry, RunRecord

    quick, _ = run
    assert quick.record["storage_uri"]
    home = tmp_path / "home"
    run_dir = tmp_path / "elsewhere" / "run"
    run_dir.mkdir(parents=True)
    shutil.copy(quick.home / "runs" / quick.record["run_id"] / "config.yml", run_dir)
    record = {**quick.record, "run_dir": str(run_dir), "output_dir": str(tmp_path / "gone")}
    Registry(home / "ferry.db").add(RunRecord(**record))
    dest = tmp_path / "merged"
    launch(
        "merge-lora",
        record["run_id"],
        "--dest",
        str(dest),
        env={"FERRY_HOME": str(home)},
        check=True,
    )
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert (dest / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_grpo_run_that_generated_with_vllm_is_usable_where_vllm_is_not(run, tmp_path):
    """A run whose config asks for vLLM (a cloud GRPO run, with vLLM in its image) is
    inspected on a machine without vLLM (this one): the post-training commands generate
    with transformers and must not refuse it for the missing vLLM. The quickstart's
    adapter stands in for the GRPO run's (same base, LoRA)."""
    from launcher.registry import Registry, RunRecord

    quick, _ = run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    raw = yaml.safe_load(Path(_config(tmp_path, quick.record["output_dir"])).read_text())
    raw.update(
        rl="grpo",
        trl={"reward_funcs": ["rewards.share"], "use_vllm": True, "vllm_mode": "server"},
        vllm={"tensor_parallel_size": 1},
    )
    (run_dir / "config.yml").write_text(yaml.safe_dump(raw, sort_keys=False))
    record = {**quick.record, "run_id": "grpo-20260101-000000-abcd", "run_dir": str(run_dir)}
    home = tmp_path / "home"
    Registry(home / "ferry.db").add(RunRecord(**record))
    said = launch(
        "inference", record["run_id"], "--prompt", PROMPT, "--max-new-tokens", "4", "--json",
        env={"FERRY_HOME": str(home)}, check=True,
    ).stdout  # fmt: skip
    assert len(json.loads(said.splitlines()[-1])["tokens"]) == 4


# ---- errors: each before any model is loaded


def _fails(*args, env=None) -> str:
    result = launch(*args, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return " ".join(result.stderr.split())


def test_an_unknown_run_id_is_named(ferry_home):
    assert "No run 'nope-20260101-000000-abcd'" in _fails("merge-lora", "nope-20260101-000000-abcd")


def test_a_config_without_a_trained_model_says_so(tmp_path):
    cfg = _config(tmp_path, tmp_path / "empty")
    message = _fails("inference", cfg, "--prompt", "hi")
    assert f"its output_dir {tmp_path / 'empty'} holds no trained model" in message
    assert f"launch train {cfg}" in message


def test_merge_lora_refuses_a_full_fine_tune(tmp_path):
    """The bundled tiny model's folder stands for a full fine-tune's output."""
    raw = yaml.safe_load(Path(_config(tmp_path, ASSETS / "tiny-llama")).read_text())
    for key in ("adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_linear"):
        raw.pop(key)
    (tmp_path / "full.yml").write_text(yaml.safe_dump(raw))
    message = _fails("merge-lora", str(tmp_path / "full.yml"))
    assert "has no LoRA adapter to merge" in message and "full fine-tune" in message


def test_a_run_still_training_has_no_model_yet(tmp_path, ferry_home):
    from launcher.registry import Registry, RunRecord

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(_config(tmp_path, tmp_path / "out"), run_dir / "config.yml")
    Registry().add(
        RunRecord(
            run_id="live-20260101-000000-abcd",
            name="live",
            source="live.yml",
            backend="local",
            state="running",
            created_at=0.0,
            updated_at=0.0,
            run_dir=str(run_dir),
            resources={},
            output_dir=str(tmp_path / "out"),
        )
    )
    message = _fails("evaluate", "live-20260101-000000-abcd")
    assert "run live-20260101-000000-abcd is still running: it has no trained model yet" in message


def test_evaluate_without_an_eval_set_says_which_keys(tmp_path):
    message = _fails("evaluate", _config(tmp_path, ASSETS / "tiny-llama"))
    assert "has no eval set: set `test_datasets`" in message and "`val_set_size`" in message


def test_inference_flags_are_checked(tmp_path):
    message = _fails("inference", _config(tmp_path, tmp_path), "--top-p", "0.9")
    assert "--top-p/--top-k shape sampling" in message and "--temperature" in message
