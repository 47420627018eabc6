"""payload.config: keys, values, cross-key rules, overrides, sources and files."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import ASSETS, DATA, QUICKSTART, ROOT, quickstart_config
from hypothesis import given
from hypothesis import strategies as st

from payload.config import ConfigError, FerryError, load_config, validate_mapping
from payload.config.overrides import apply_overrides, parse_value

BASE = {
    "base_model": str(ROOT / "examples/assets/tiny-llama"),
    "datasets": [{"path": str(ROOT / "examples/data/alpaca_tiny.jsonl"), "type": "alpaca"}],
    "learning_rate": 1e-4,
}


def problems(raw: dict) -> dict[str, str]:
    """{key: message} of every problem validate_mapping reports (fails if there are none)."""
    with pytest.raises(ConfigError) as info:
        validate_mapping(raw, "test.yml")
    return {p.key: p.message for p in info.value.problems}


def test_quickstart_is_valid_and_paths_are_made_absolute():
    cfg = load_config(QUICKSTART)
    assert cfg.adapter == "lora" and cfg.lora_r == 16 and cfg.num_epochs == 2
    assert Path(cfg.base_model).is_absolute() and Path(cfg.base_model).is_dir()
    assert Path(cfg.datasets[0].path).is_file()


def test_relative_paths_resolve_from_the_current_folder_first(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "alpaca_tiny.jsonl").write_text(DATA.read_text())
    monkeypatch.chdir(tmp_path)
    cfg = load_config(QUICKSTART)
    assert cfg.datasets[0].path == str(tmp_path / "data" / "alpaca_tiny.jsonl")
    assert cfg.base_model == str(ASSETS / "tiny-llama")  # not here: found beside the config


def test_misspelt_key_gets_did_you_mean():
    found = problems({**BASE, "lerning_rate": 2e-4})
    assert "did you mean `learning_rate`" in found["lerning_rate"]


def test_misspelt_dataset_key_is_named_with_its_index():
    raw = {**BASE, "datasets": [{**BASE["datasets"][0], "feild_output": "x"}]}
    found = problems(raw)
    assert "did you mean `field_output`" in found["datasets[0].feild_output"]


def test_three_independent_errors_are_reported_together():
    raw = {**BASE, "lerning_rate": 1, "micro_batch_size": 0, "warmup_steps": 5, "warmup_ratio": 0.1}
    found = problems(raw)
    assert set(found) == {"lerning_rate", "micro_batch_size", "warmup_steps"}
    assert "greater than 0" in found["micro_batch_size"]


def test_axolotl_key_not_supported_is_refused_by_name_not_as_typo():
    found = problems({**BASE, "lora_embedding_kernel": True, "use_otel_metrics": True})
    assert found["lora_embedding_kernel"] == "is not supported yet by Ferry."
    assert found["use_otel_metrics"] == "is not supported yet by Ferry."


def test_null_means_not_set():
    cfg = validate_mapping({**BASE, "num_epochs": None, "lora_r": None, "seed": None})
    assert (cfg.num_epochs, cfg.lora_r, cfg.seed) == (1.0, 8, 42)


def test_axolotl_key_set_to_its_off_value_is_accepted():
    cfg = validate_mapping({**BASE, "lora_mlp_kernel": False, "use_otel_metrics": None})
    assert cfg.base_model == BASE["base_model"]


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"adapter": "qlora"}, "adapter", "load_in_4bit"),
        ({"adapter": "lora", "load_in_4bit": True}, "load_in_4bit", "qlora"),
        ({"load_in_8bit": True}, "load_in_8bit", "adapter"),
        ({"warmup_steps": 10, "warmup_ratio": 0.1}, "warmup_steps", "exclusive"),
        ({"fsdp_config": {"a": 1}, "deepspeed": {"b": 2}}, "fsdp_config", "exclusive"),
        ({"bf16": True, "fp16": True}, "bf16", "both"),
        ({"save_steps": 10, "saves_per_epoch": 2}, "save_steps", "exclusive"),
        ({"gradient_accumulation_steps": -2}, "gradient_accumulation_steps", "greater than 0"),
        ({"num_epochs": 0}, "num_epochs", "greater than 0"),
        ({"rl": "ebft"}, "rl", "`ebft` is not an objective Ferry trains; it trains dpo, ipo"),
        ({"rl": "gdpo"}, "rl", "is not an objective Ferry trains"),
        ({"optimizer": "adamw_torh"}, "optimizer", "adamw_torch"),
        ({"lr_scheduler": "cosin"}, "lr_scheduler", "cosine"),
        ({"adapter": "dora"}, "adapter", "lora"),
        ({"flash_attention": True, "sdp_attention": True}, "flash_attention", "one"),
    ],
)
def test_cross_key_and_value_rules(extra, key, words):
    found = problems({**BASE, **extra})
    assert key in found, found
    assert words in found[key]


def test_required_keys():
    found = problems({})
    assert {"base_model", "datasets", "learning_rate"} <= set(found)


def test_unsupported_dataset_type_lists_the_supported_ones():
    raw = {**BASE, "datasets": [{**BASE["datasets"][0], "type": "chat_templat"}]}
    message = problems(raw)["datasets[0].type"]
    assert "did you mean `chat_template`?" in message
    assert "alpaca, alpaca_w_system" in message


def test_preference_formats_are_checked_against_the_rl_family():
    raw = {**BASE, "rl": "dpo", "datasets": [{**BASE["datasets"][0], "type": "alpaca"}]}
    message = problems(raw)["datasets[0].type"]
    assert "`alpaca` is not a dpo format" in message and "chatml.intel" in message


def test_union_errors_are_merged_into_one_message():
    found = problems({**BASE, "bf16": "maybe"})
    assert found["bf16"] == "should be a valid boolean or 'auto' (got 'maybe')."


def test_bad_value_does_not_cascade_into_rule_errors():
    # load_in_4bit is invalid itself; the qlora rule must not also complain about it.
    found = problems({**BASE, "adapter": "qlora", "load_in_4bit": "perhaps"})
    assert set(found) == {"load_in_4bit"}


def test_missing_files_are_reported_with_their_key(tmp_path):
    raw = {
        **BASE,
        "datasets": [{"path": "nowhere/data.jsonl", "type": "alpaca"}],
        "base_model": "./no-model",
    }
    found = problems(raw)
    assert "does not exist" in found["datasets[0].path"]
    assert "does not exist" in found["base_model"]


def test_hub_id_is_refused_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in problems({**BASE, "base_model": "someorg/somemodel"})["base_model"]


def test_ignored_settings_warn(caplog):
    validate_mapping({**BASE, "lora_r": 32})  # no adapter: a full fine-tune ignores lora_r
    assert any("lora_r" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "dup.yml"
    path.write_text("learning_rate: 1.0e-4\nseed: 1\nlearning_rate: 2.0e-4\n")
    with pytest.raises(
        FerryError, match=r"dup.yml: key `learning_rate` appears twice \(lines 1 and 3\)"
    ):
        load_config(path)


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("base_model: [unclosed\n")
    with pytest.raises(FerryError, match="broken.yml is not valid YAML") as info:
        load_config(path)
    assert "<unicode string>" not in str(info.value)


# ---- overrides


def test_overrides_are_typed_and_reach_nested_keys(tmp_path):
    cfg = load_config(
        quickstart_config(tmp_path),
        [
            "learning_rate=1e-4",
            "lora_r=4",
            "train_on_inputs=true",
            "max_steps=3",
            f"datasets.0.path={ROOT}/examples/data/alpaca_tiny.jsonl",
            "datasets.0.split=train",
            "lora_target_modules=[q_proj, v_proj]",
            "lora_target_linear=null",
        ],
    )
    assert cfg.learning_rate == pytest.approx(1e-4)
    assert cfg.lora_r == 4 and cfg.train_on_inputs is True and cfg.max_steps == 3
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.lora_target_linear is None


def test_override_creates_nested_mappings_and_appends_to_lists():
    raw = apply_overrides(
        {"datasets": [{"path": "a"}]},
        ["fsdp_config.reshard_after_forward=true", "datasets.1.path=b"],
    )
    assert raw["fsdp_config"] == {"reshard_after_forward": True}
    assert [d["path"] for d in raw["datasets"]] == ["a", "b"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("learning_rate", "key=value"),
        ("datasets.5.path=x", "list index from 0 to 1"),
        ("seed.x=1", "has no keys"),
    ],
)
def test_bad_overrides_say_what_is_wrong(item, message):
    with pytest.raises(FerryError, match=message):
        apply_overrides({"datasets": [{"path": "a"}], "seed": 3}, [item])


def test_override_typo_is_caught_like_a_file_typo(tmp_path):
    with pytest.raises(ConfigError, match="did you mean `num_epochs`"):
        load_config(quickstart_config(tmp_path), ["num_epoch=3"])


@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_parse_value_round_trips_integers(n):
    assert parse_value(str(n)) == n and isinstance(parse_value(str(n)), int)


@given(st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_parse_value_round_trips_floats(x):
    assert parse_value(repr(x)) == pytest.approx(x)


def test_parse_value_understands_yaml_words():
    assert parse_value("true") is True and parse_value("null") is None
    assert parse_value("2e-4") == pytest.approx(2e-4)  # YAML 1.1 alone would give a string
    assert parse_value("cosine") == "cosine"


# ---- sources


@pytest.fixture
def https_server(tmp_path, monkeypatch):
    """A real HTTPS server on 127.0.0.1 with a certificate from a throwaway CA that this
    process (only) is told to trust."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_config_from_https_url(https_server, tmp_path):
    root, url = https_server
    (root / "remote.yml").write_text(quickstart_config(tmp_path).read_text())
    cfg = load_config(f"{url}/remote.yml", ["lora_r=2"])
    assert cfg.lora_r == 2 and cfg.adapter == "lora"


def test_unreachable_url_is_a_clear_error(https_server):
    _, url = https_server
    with pytest.raises(FerryError, match="Could not fetch the config"):
        load_config(f"{url}/missing.yml")


def test_plain_http_is_refused():
    with pytest.raises(FerryError, match="https only"):
        load_config("http://127.0.0.1:1/cfg.yml")


# ---- in step with what it describes


def test_importing_the_config_does_not_import_torch():
    code = (
        "import sys, payload.config; "
        "bad = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_optimizer_and_scheduler_names_exist_in_transformers():
    from typing import get_args

    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from payload.config.schema import OPTIMIZERS, SCHEDULERS

    assert set(OPTIMIZERS) <= {o.value for o in OptimizerNames}
    assert set(get_args(SCHEDULERS)) <= {s.value for s in SchedulerType}


def test_supported_dataset_types_match_the_registered_strategies():
    from payload.config.schema import SUPPORTED_DATASET_TYPES
    from payload.data.core import registered

    assert set(SUPPORTED_DATASET_TYPES) == set(registered())


def test_every_schema_key_is_an_axolotl_key_or_a_documented_extension():
    from payload.config import axolotl_keys
    from payload.config.schema import DatasetConfig, TrainConfig

    assert set(TrainConfig.model_fields) <= axolotl_keys.TOP_LEVEL | {"storage", "launch"}
    # Keys of Axolotl's user-defined and preference dataset formats, accepted flat here.
    extensions = {
        "field_instruction",
        "field_input",
        "field_output",
        "field_system",
        "system_prompt",
        "text_column",
        "train_on_eot",
        "eot_tokens",
        "field_prompt",
        "field_chosen",
        "field_rejected",
        "field_completion",
        "field_label",
    }
    assert set(DatasetConfig.model_fields) <= axolotl_keys.DATASET | extensions
    for model in (TrainConfig, DatasetConfig):
        missing_help = [k for k, f in model.model_fields.items() if not f.description]
        assert not missing_help, f"fields without help: {missing_help}"


def test_launch_section_is_checked_at_every_depth():
    found = problems(
        {
            **BASE,
            "launch": {
                "gpu": "H100",
                "memory": "lots",
                "timeout": "2h",
                "image": {"bse": "x"},
                "volumes": [{"name": "v"}],
            },
        }
    )
    assert "did you mean `gpus`" in found["launch.gpu"]
    assert "did you mean `base`" in found["launch.image.bse"]
    assert "'lots' is not a memory size" in found["launch.memory"]
    assert found["launch.volumes[0].mount"] == "is required."


@pytest.mark.parametrize(
    ("given", "memory_mb", "timeout_s"),
    [
        ({"memory": "64GB", "timeout": "24h"}, 65536, 86400),
        ({"memory": 2048, "timeout": 90}, 2048, 90),
        ({"memory": "1.5GiB", "timeout": "90m"}, 1536, 5400),
    ],
)
def test_launch_sizes_and_durations(given, memory_mb, timeout_s):
    cfg = validate_mapping({**BASE, "launch": given})
    assert (cfg.launch.memory, cfg.launch.timeout) == (memory_mb, timeout_s)


def test_user_defined_mapping_is_checked_at_validate():
    spec = {"formt": "{instruction}", "format": "{instruction}", "no_input_format": "{q}"}
    found = problems({**BASE, "datasets": [{**BASE["datasets"][0], "type": spec}]})
    assert "did you mean `format`?" in found["datasets[0].type.formt"]
    assert "uses {q}" in found["datasets[0].type.no_input_format"]


def test_preference_mapping_is_checked_at_validate():
    ds = {**BASE["datasets"][0], "type": {"prompt_format": "Q: {question}", "chosen_fmt": "x"}}
    found = problems({**BASE, "rl": "dpo", "datasets": [ds]})
    assert "did you mean `chosen_format`?" in found["datasets[0].type.chosen_fmt"]
    # It has two problems; `problems` keeps the last one reported for a key.
    assert found["datasets[0].type.prompt_format"] == "has no {prompt}."


def test_loader_suffixes_are_checked_per_type():
    def type_problem(name: str) -> str:
        ds = {**BASE["datasets"][0], "type": name}
        return problems({**BASE, "datasets": [ds]})["datasets[0].type"]

    assert "has no loader `load_q` (one of: load, load_concise, load_qa" in type_problem(
        "alpaca_chat.load_q"
    )
    assert "`completion` has no loader `load` (none)" in type_problem("completion.load")
    assert "process reward model" in type_problem("stepwise_supervised")


def test_loader_tables_match_the_strategies():
    from payload.config.schema import DATASET_TYPE_LOADERS
    from payload.data.sft import AlpacaChat, AlpacaWithSystem

    assert set(DATASET_TYPE_LOADERS["alpaca_chat"]) == set(AlpacaChat.LOADERS)
    assert set(DATASET_TYPE_LOADERS["alpaca_w_system"]) == set(AlpacaWithSystem.LOADERS)


def test_packing_settings_that_would_be_ignored_or_cannot_work():
    from payload.config import validate_mapping

    seen: list[str] = []
    validate_mapping(
        {**BASE, "sample_packing": True, "sample_packing_eff_est": 0.9}, warn=seen.append
    )
    assert seen == [
        "config: sample_packing_eff_est: is ignored: rows are packed before training and the "
        "step count is exact."
    ]
    stream = {
        **BASE,
        "datasets": [],
        "pretraining_dataset": [{"path": str(DATA)}],
        "streaming": True,
        "max_steps": 5,
        "sample_packing": True,
    }
    assert "streamed pretraining_dataset" in problems(stream)["sample_packing"]


def test_chat_template_jinja_paths_are_resolved_and_checked(tmp_path, monkeypatch):
    from payload.config import load_config

    (tmp_path / "chat.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    config = quickstart_config(
        tmp_path,
        "chat_template: jinja\nchat_template_jinja: chat.jinja\n"
        "datasets:\n  - path: " + str(DATA) + "\n    type: alpaca\n"
        "    chat_template: jinja\n    chat_template_jinja: nowhere.jinja\n",
    )
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as info:
        load_config(str(config))
    found = {p.key: p.message for p in info.value.problems}
    assert found["datasets[0].chat_template_jinja"].startswith("`nowhere.jinja` does not exist")
    assert "chat_template_jinja" not in found  # found beside the config file


def test_keys_axolotl_ignores_are_taken_with_a_warning():
    """eval_max_new_tokens and eval_table_size are deprecated no-ops in Axolotl 0.21 and
    common in its example configs: accepted, said to have no effect."""
    said = []
    cfg = validate_mapping(
        {**BASE, "eval_max_new_tokens": 128, "eval_table_size": 5}, warn=said.append
    )
    assert cfg.base_model == BASE["base_model"]
    assert sorted(said) == [
        "config: eval_max_new_tokens: has no effect (Axolotl deprecated it for "
        "generate_samples, and ignores it too).",
        "config: eval_table_size: has no effect (Axolotl deprecated it for generate_samples, "
        "and ignores it too).",
    ]


def test_a_tensor_parallel_size_the_heads_do_not_divide_is_refused_at_validate(tmp_path):
    """The tiny Llama's config is on this machine: 4 heads and 2 KV heads do not divide
    by 8, and validate says so with the numbers; a size they divide by is fine. A model
    whose config is not here is checked when it loads instead."""
    raw = {
        "base_model": str(ASSETS / "tiny-llama"),
        "datasets": [{"path": str(DATA), "type": "alpaca"}],
        "learning_rate": 1e-3,
    }
    said = problems({**raw, "tensor_parallel_size": 8})
    assert said["tensor_parallel_size"].startswith(
        "(8) splits each block's attention heads and MLP over 8 ranks, and the model's "
        "num_attention_heads (4) and num_key_value_heads (2) are not divisible by 8."
    )
    validate_mapping({**raw, "tensor_parallel_size": 2}, "test.yml")
    elsewhere = {**raw, "base_model": "someone/not-downloaded-model-xyz"}
    # (refused here for another reason: the hub is offline in the tests)
    assert "tensor_parallel_size" not in problems({**elsewhere, "tensor_parallel_size": 8})


def test_launch_gpus_as_an_accelerator_alone_counts_as_one_per_node():
    """`launch: {gpus: H100}` (one H100) with an FSDP2 layout: the layout rule counts one
    process per node instead of crashing on the missing count (found by the config fuzzer)."""
    from helpers import tiny_config

    from payload.errors import FerryError

    with pytest.raises(FerryError, match=r"= 4, but the job runs 2 processes"):
        tiny_config(
            [{"path": str(DATA), "type": "alpaca"}],
            launch={"gpus": "H100", "nodes": 2},
            dp_shard_size=2,
            dp_replicate_size=2,
            fsdp_version=2,
            fsdp_config={"fsdp_offload_params": False},
        )
