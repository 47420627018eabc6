"""The training config: Axolotl's key names and defaults, with Ferry's help beside each field.

Every field has a default so that a config with a bad value in one key still validates in
its other keys: the loader drops the bad keys, validates the rest, and runs the cross-key
rules (`rules.py`) on what is left, which is how every problem is reported at once.
Required keys (`base_model`, `datasets`, `learning_rate`) are enforced by rules for the same reason.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PositiveInt, field_validator

from payload.config import vocab
from payload.config.vocab import (  # noqa: F401 - names other modules import from here
    ACCELERATORS,
    DATASET_TYPE_LOADERS,
    OPTIMIZERS,
    PREFERENCE_FAMILY,
    SKY_CLOUDS,
    SUPPORTED_DATASET_TYPES,
    SUPPORTED_PREFERENCE_TYPES,
    DatasetHelpers,
    TrainHelpers,
    parse_duration_s,
    parse_memory_mb,
    preference_family,
)

TRAIN_ON = Literal["all", "turn", "last", "none"]

# Names as transformers spells them (its `SchedulerType`); a test keeps them in step.
SCHEDULERS = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]


class _Strict(BaseModel):
    # Unknown keys are reported by the loader (with a did-you-mean) before pydantic runs;
    # `forbid` is the backstop for code that builds a config directly.
    model_config = ConfigDict(extra="forbid", validate_default=False, protected_namespaces=())


class _ChatTemplateKeys(_Strict):
    """Keys set for the whole config or for one dataset; a dataset's own wins."""

    chat_template: str | None = Field(
        default=None,
        description="Chat template: chatml, llama3, gemma, phi_3, tokenizer_default (the "
        "tokenizer's own), or jinja; a dataset's own overrides the top-level one.",
    )
    chat_template_jinja: str | None = Field(
        default=None,
        description="A Jinja chat template (inline or a .jinja file), with `chat_template: jinja`.",
    )
    eot_tokens: list[str] | None = Field(
        default=None, description="Tokens that end a turn (default: the template's)."
    )


class DatasetConfig(_ChatTemplateKeys, DatasetHelpers):
    """One entry of `datasets:` (or `test_datasets:`, `pretraining_dataset:`): where the
    rows come from and how they become tokens. Keys a strategy does not read are warned
    about by the rules, not silently ignored."""

    # ---- where the rows are
    path: str = Field(
        description="A local file (.json/.jsonl/.csv/.parquet/.arrow), a folder saved by "
        "`datasets`, a folder of data files, an s3:// URI, or a hub id."
    )
    type: str | dict[str, Any] | None = Field(
        default=None,
        description="Prompt strategy, e.g. `alpaca`, `chat_template`, `completion`; a "
        "mapping of format strings for a user-defined one.",
    )
    split: str = Field(default="train", description="Which split of the dataset to read.")
    data_files: str | list[str] | None = Field(
        default=None, description="Files inside `path` to read, for folders and hub datasets."
    )
    name: str | None = Field(default=None, description="Dataset configuration name (hub).")
    ds_type: Literal["json", "csv", "parquet", "arrow", "text"] | None = Field(
        default=None, description="File format when it cannot be told from the extension."
    )
    revision: str | None = Field(default=None, description="Hub revision to read.")
    shards: PositiveInt | None = Field(
        default=None, description="Split the dataset into this many shards and keep one."
    )
    shards_idx: int | None = Field(
        default=None, ge=0, description="Which shard to keep (default 0) when `shards` is set."
    )

    # ---- completion / pretrain
    field: str | None = Field(
        default=None, description="`completion`: the column holding the text (default `text`)."
    )
    text_column: str | None = Field(
        default=None, description="`pretrain`: the column holding the text (default `text`)."
    )

    # ---- alpaca family
    field_instruction: str | None = Field(
        default=None, description="`alpaca`: the instruction column (default `instruction`)."
    )
    field_input: str | None = Field(
        default=None, description="`alpaca`: the input column (default `input`)."
    )
    field_output: str | None = Field(
        default=None, description="`alpaca`: the response column (default `output`)."
    )
    field_system: str | None = Field(
        default=None, description="Column holding a per-row system prompt (default `system`)."
    )
    system_prompt: str | None = Field(
        default=None, description="System prompt used when a row has none."
    )

    # ---- chat_template (and legacy ShareGPT rows)
    field_messages: str | None = Field(
        default=None,
        description="`chat_template`: the column holding the list of messages "
        "(default `messages`; `conversations` rows are read as ShareGPT).",
    )
    message_property_mappings: dict[str, str] | None = Field(
        default=None,
        description="Message keys by meaning, e.g. {role: from, content: value}.",
    )
    message_field_role: str | None = Field(
        default=None, description="Legacy: the message key holding the role."
    )
    message_field_content: str | None = Field(
        default=None, description="Legacy: the message key holding the content."
    )
    message_field_training: str | None = Field(
        default=None, description="Message key that says whether to train on that message."
    )
    message_field_training_detail: str | None = Field(
        default=None, description="Message key with character spans to train on."
    )
    roles: dict[str, list[str]] | None = Field(
        default=None,
        description="Roles by template name, each with the names rows use, e.g. "
        "{user: [human, user], assistant: [gpt, assistant]}.",
    )
    roles_to_train: list[str] | None = Field(
        default=None, description="Roles whose messages are trained (default: [assistant])."
    )
    train_on_eos: TRAIN_ON | None = Field(
        default=None,
        description="Which end-of-sequence tokens are trained: all, turn (after trained "
        "turns; default), last, none.",
    )
    train_on_eot: TRAIN_ON | None = Field(
        default=None, description="As train_on_eos, for end-of-turn tokens (`eot_tokens`)."
    )
    drop_system_message: bool | None = Field(default=None, description="Leave out system messages.")
    field_thinking: str | None = Field(
        default=None,
        description="Message key holding the reasoning trace (default `reasoning_content`); "
        "it is trained with its message.",
    )
    template_thinking_key: str | None = Field(
        default=None,
        description="The message key the chat template reads the reasoning trace from "
        "(default `reasoning_content`, as Qwen3's template; some use `thinking`).",
    )

    # ---- stepwise_supervised
    step_separator: str | None = Field(
        default=None, description="`stepwise_supervised`: text between steps (default \\n)."
    )
    max_completion_length: PositiveInt | None = Field(
        default=None, description="`stepwise_supervised`: longest completion in tokens."
    )
    train_on_last_step_only: bool | None = Field(
        default=None, description="`stepwise_supervised`: label only the last step."
    )

    # ---- preference formats (`rl:`)
    field_prompt: str | None = Field(default=None, description="Preference: the prompt column.")
    field_chosen: str | None = Field(default=None, description="Preference: the chosen column.")
    field_rejected: str | None = Field(default=None, description="Preference: the rejected column.")
    field_completion: str | None = Field(default=None, description="KTO: the completion column.")
    field_label: str | None = Field(default=None, description="KTO: the desirable-label column.")


# Axolotl's names for torchao's formats (its TorchAOQuantDType), aliases included.
QUANT_DTYPE = Literal["int4", "int8", "float8_e4m3fn", "fp8", "float8", "nvfp4", "mxfp4", "ternary"]


class QuantizationConfig(_Strict):
    """Axolotl's `quantization:` section: `launch quantize`'s post-training quantization
    with torchao (payload/posttrain/quantize.py says which formats run where)."""

    weight_dtype: QUANT_DTYPE = Field(
        default="int8",
        description="The weights' format: int8 or int4 (float8 on a GPU with compute "
        "capability 8.9 or more). Default int8.",
    )
    activation_dtype: QUANT_DTYPE | None = Field(
        default=None,
        description="Quantize activations too, on the fly: int8 (with int8 or int4 weights), "
        "or float8 with float8 weights. Default: none (weight-only).",
    )
    group_size: PositiveInt | None = Field(
        default=None,
        description="Weights per scale, for int4 (default 32, Axolotl's) and int8 weight-only "
        "(default: one scale per row).",
    )
    quantize_embedding: bool | None = Field(
        default=None, description="Quantize the embeddings too (not supported yet)."
    )


class VolumeMount(_Strict):
    name: str = Field(description="A named volume of the backend (Modal: a Volume).")
    mount: str = Field(description="Where it appears in the container, e.g. /data.")


class ImageOverrides(_Strict):
    base: str | None = Field(default=None, description="Base image instead of Ferry's CUDA one.")
    pip: list[str] = Field(default_factory=list, description="Extra pip packages (pin them).")
    apt: list[str] = Field(default_factory=list, description="Extra apt packages.")
    commands: list[str] = Field(default_factory=list, description="Extra build commands.")
    extras: list[Literal["flash-attn", "deepspeed", "vllm"]] = Field(
        default_factory=list, description="Optional pinned layers."
    )


class RayLaunch(_Strict):
    """`launch.ray`: where the Ray cluster is and how a job runs on it."""

    address: str | None = Field(
        default=None,
        description="The cluster's Jobs API (dashboard) address, http://HEAD:8265; else "
        "--ray-address, else RAY_ADDRESS.",
    )
    runtime: Literal["ship", "pip"] = Field(
        default="ship",
        description="What the workers run: `ship` the payload package with the job (the "
        "cluster has the training stack, as in Ferry's image); `pip` also installs the "
        "image's pinned requirements in the job's environment.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="How Ray places the training workers on nodes."
    )
    resources_per_worker: dict[str, float] | None = Field(
        default=None, description='Each worker\'s Ray resources, e.g. {"CPU": 8, "GPU": 1}.'
    )
    use_gpu: bool | None = Field(
        default=None, description="Workers on GPUs; default: if the cluster has any."
    )


class SkyLaunch(_Strict):
    """`launch.sky`: how a run goes to SkyPilot (`--cloud sky`)."""

    infra: str | None = Field(
        default=None,
        description="Where: a cloud, cloud/region or cloud/region/zone (aws, gcp/us-central1, "
        "k8s). Default: wherever SkyPilot's optimizer finds the machines cheapest.",
    )
    accelerators: list[str] | None = Field(
        default=None,
        description="Acceptable accelerators per node, preferred first, e.g. [H100:8, "
        "A100-80GB:8] (instead of --gpus NAME:COUNT).",
    )
    instance_type: str | None = Field(default=None, description="A cloud instance type.")
    disk_size: PositiveInt | None = Field(default=None, description="Each node's disk, in GB.")
    registry: str | None = Field(
        default=None,
        description="Run in Ferry's image pushed to this registry (docker:REGISTRY/ferry:TAG; "
        "`python -m images tag` prints the tag). Default: the VM's own image, with `setup` "
        "installing the image's pinned requirements.",
    )
    recovery: Literal["EAGER_NEXT_REGION", "FAILOVER"] | None = Field(
        default=None,
        description="A managed job's recovery strategy (SkyPilot's default: EAGER_NEXT_REGION).",
    )
    cluster: str | None = Field(
        default=None, description="A cluster job's cluster name. Default: the run id."
    )
    down: bool | None = Field(
        default=None,
        description="Tear a cluster job's cluster down when the job ends (default true).",
    )
    idle_minutes_to_autostop: int | None = Field(
        default=None, ge=0, description="Stop (or with down, tear down) after this idle time."
    )

    _infra = field_validator("infra")(vocab.sky_infra)
    _accelerators = field_validator("accelerators")(vocab.sky_accelerators)
    _cluster = field_validator("cluster")(vocab.sky_cluster)


class LaunchConfig(_Strict):
    """Where and on what a run goes: Ferry's `launch:` section. The CLI's flags win over
    it, and it wins over a --profile file."""

    cloud: str | None = Field(default=None, description="Backend: local, modal, ...")
    gpus: str | int | None = Field(
        default=None, description="Per node: a count (2) or ACCELERATOR:COUNT (H100:8)."
    )
    nodes: PositiveInt | None = Field(default=None, description="Machines (multi-node).")
    cpu: float | None = Field(default=None, gt=0, description="CPU cores per node.")
    memory: int | None = Field(default=None, description="Memory per node: 64GB, 512MB, MiB.")
    timeout: int | None = Field(default=None, description="Stop after: 24h, 90m, seconds.")
    retries: int | None = Field(default=None, ge=0, description="Restarts after a failure.")
    region: str | None = Field(default=None, description="Cloud region.")
    spot: bool | None = Field(default=None, description="Preemptible (spot) machines.")
    secrets: list[str] = Field(
        default_factory=list, description="Secrets by name (the backend's), never values."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment (not for secrets: use secrets)."
    )
    volumes: list[VolumeMount] = Field(default_factory=list, description="Extra volumes.")
    image: ImageOverrides | None = Field(default=None, description="Changes to the image.")
    storage: str | None = Field(default=None, description="Storage URI (as --storage).")
    ray: RayLaunch | None = Field(default=None, description="The Ray backend's settings.")
    sky: SkyLaunch | None = Field(default=None, description="The SkyPilot backend's settings.")
    managed: bool | None = Field(
        default=None,
        description="On SkyPilot: a managed job, recovered after preemption (as --managed).",
    )
    max_cost: float | None = Field(
        default=None,
        gt=0,
        description="Ask before a launch whose estimated cost (USD) is above this; refused "
        "without a terminal unless --yes.",
    )
    stop_grace: int | None = Field(
        default=None,
        ge=0,
        description="After a stop signal (preemption, cancel), how long the run may take to "
        "save and upload a checkpoint before it is killed: 120s, 10m. Default 120 s.",
    )

    _gpus = field_validator("gpus", mode="before")(vocab.launch_gpus)
    _memory = field_validator("memory", mode="before")(vocab.memory_mb)
    _duration = field_validator("timeout", "stop_grace", mode="before")(vocab.duration_s)
    _no_secrets = field_validator("env")(vocab.env_without_secrets)


class TRLConfig(_Strict):
    """Axolotl's `trl:` section: GRPO's settings (TRL's GRPOConfig names), and `beta` for
    DPO too. Unset keys keep TRL's defaults."""

    beta: float | None = Field(
        default=None,
        ge=0,
        description="KL coefficient against the reference model; 0 (GRPO's default) loads "
        "no reference model.",
    )
    num_generations: int | None = Field(
        default=None, ge=2, description="Completions sampled per prompt (a group). Default 8."
    )
    generation_batch_size: PositiveInt | None = Field(
        default=None,
        description="Completions generated at once; a multiple of num_generations and of "
        "micro_batch_size x GPUs. Default: micro_batch_size x GPUs x "
        "gradient_accumulation_steps.",
    )
    max_completion_length: PositiveInt | None = Field(
        default=None, description="Longest completion generated, in tokens. Default 512."
    )
    num_iterations: PositiveInt | None = Field(
        default=None, description="Optimisation passes over each generated batch (mu). Default 1."
    )
    epsilon: float | None = Field(
        default=None, gt=0, description="Lower clipping range of the ratio. Default 0.2."
    )
    epsilon_high: float | None = Field(
        default=None, gt=0, description="Upper clipping range (DAPO). Default: epsilon."
    )
    loss_type: (
        Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] | None
    ) = Field(default=None, description="How token losses are aggregated. Default dapo.")
    scale_rewards: bool | Literal["group", "batch", "none"] | None = Field(
        default=None,
        description="Divide advantages by the reward std of the group, the batch, or none "
        "(true = group, false = none). Default group.",
    )
    importance_sampling_level: Literal["token", "sequence"] | None = Field(
        default=None, description="Ratio per token (GRPO) or per sequence (GSPO). Default token."
    )
    temperature: float | None = Field(
        default=None, gt=0, description="Sampling temperature. Default 1.0."
    )
    top_p: float | None = Field(
        default=None, gt=0, le=1, description="Nucleus sampling mass. Default 1.0 (off)."
    )
    top_k: int | None = Field(default=None, ge=0, description="Top-k sampling. Default 0 (off).")
    min_p: float | None = Field(
        default=None, ge=0, le=1, description="Minimum probability relative to the top token."
    )
    reward_funcs: list[str] | None = Field(
        default=None,
        description="Reward functions as `module.function`: a .py file next to the config "
        "(`rewards.py` -> `rewards.my_reward`) or an importable module. Required for GRPO.",
    )
    reward_weights: list[float] | None = Field(
        default=None, description="One weight per reward function. Default: all 1."
    )
    sync_ref_model: bool | None = Field(
        default=None, description="Mix the policy into the reference model every few steps."
    )
    ref_model_sync_steps: PositiveInt | None = Field(
        default=None, description="Steps between reference syncs. Default 64 (Axolotl's)."
    )
    ref_model_mixup_alpha: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Share of the policy in each sync. Default 0.9 (Axolotl's).",
    )
    repetition_penalty: float | None = Field(
        default=None,
        gt=0,
        description="Penalty on tokens already in the prompt or completion (above 1 "
        "discourages repeats). Default 1.0 (none).",
    )
    use_vllm: bool | None = Field(
        default=None,
        description="Generate with vLLM (a GPU and the image's `vllm` extra); default: "
        "transformers' generate.",
    )
    vllm_mode: Literal["colocate", "server"] | None = Field(
        default=None,
        description="colocate: vLLM in the training processes; server: a `trl vllm-serve` "
        "server, which the job starts itself on GPUs it keeps from training (the `vllm:` "
        "section) unless vllm_server_host names another machine. Default colocate.",
    )
    vllm_server_host: str | None = Field(
        default=None,
        description="Server mode: a server on another machine to connect to. Unset, or "
        "127.0.0.1/localhost/0.0.0.0: the job starts its own.",
    )
    vllm_server_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Server mode: its port (the same setting as vllm.port). Default 8000.",
    )
    vllm_server_timeout: float | None = Field(
        default=None, gt=0, description="Server mode: seconds to wait for it. Default 240."
    )
    vllm_gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="Colocate: GPU memory share for vLLM. Default 0.3."
    )
    log_completions: bool | None = Field(
        default=None, description="Print a sample of prompts, completions and rewards per log."
    )
    mask_truncated_completions: bool | None = Field(
        default=None, description="Leave completions cut at max_completion_length out of the loss."
    )


class VllmConfig(_Strict):
    """Axolotl's `vllm:` section: the vLLM server a GRPO job starts itself
    (`trl.vllm_mode: server` with no `trl.vllm_server_host`, or a local one;
    payload.config.vllm). Each key set here goes on the server's command line."""

    tensor_parallel_size: PositiveInt | None = Field(
        default=None,
        description="GPUs each copy of the model is split over. The server takes "
        "tensor_parallel_size x data_parallel_size GPUs of the node. Default 1.",
    )
    data_parallel_size: PositiveInt | None = Field(
        default=None,
        description="Copies of the model the server runs (vLLM: for mixture-of-experts models). "
        "Default 1.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="Share of each server GPU vLLM takes. Default 0.9."
    )
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] | None = Field(
        default=None, description="The server's weights and activations. Default auto."
    )
    max_model_len: PositiveInt | None = Field(
        default=None,
        description="Longest prompt plus completion, in tokens. Default: the model's context.",
    )
    enable_prefix_caching: bool | None = Field(
        default=None, description="Reuse the KV cache of shared prompt prefixes. Default: vLLM's."
    )
    host: str | None = Field(
        default=None,
        description="Address the server binds on its node: 127.0.0.1 (default; the trainer "
        "runs there too) or 0.0.0.0 (reachable from other machines as well).",
    )
    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="The server's port; the same setting as trl.vllm_server_port. Default 8000.",
    )


class TrainConfig(_ChatTemplateKeys, TrainHelpers):
    """A whole fine-tune: model, data, adapter, optimisation, saving."""

    # ---- model and tokenizer
    base_model: str | None = Field(
        default=None, description="Model to fine-tune: a local folder or a hub id. Required."
    )
    base_model_config: str | None = Field(
        default=None, description="Where to read the model config from, if not `base_model`."
    )
    tokenizer_config: str | None = Field(
        default=None, description="Where to read the tokenizer from, if not `base_model`."
    )
    model_type: str | None = Field(
        default=None, description="transformers class to load the model with (default: Auto)."
    )
    tokenizer_type: str | None = Field(
        default=None, description="transformers class to load the tokenizer with (default: Auto)."
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model/tokenizer code from the model's repository."
    )
    special_tokens: dict[str, str] = Field(
        default_factory=dict,
        description="Tokens to set on the tokenizer, e.g. {pad_token: '<pad>'}.",
    )
    tokenizer_use_fast: bool | None = Field(
        default=None,
        description="Load the fast (`tokenizers`) tokenizer; the only kind transformers 5 "
        "has, so `false` is ignored with a warning.",
    )
    tokenizer_legacy: bool | None = Field(
        default=None,
        description="The tokenizer's `legacy` flag (SentencePiece-style tokenizers): true "
        "puts a word-start marker on text after a special token too (default: the "
        "tokenizer's own).",
    )
    tokenizer_use_mistral_common: bool | None = Field(
        default=None,
        description="Load Mistral's own tokenizer (mistral-common, a tekken.json or "
        "tokenizer.model.v* file) instead of the transformers one.",
    )
    # ---- vision-language (and audio) models: payload/data/vision.py, payload/model.py
    processor_type: str | None = Field(
        default=None,
        description="Load the model's processor (`AutoProcessor`, or a transformers processor "
        "class) and train it as a vision-language model on image chats.",
    )
    processor_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="Arguments to the processor's from_pretrained, e.g. {min_pixels: 3136, "
        "max_pixels: 401408} for Qwen2-VL.",
    )
    skip_prepare_dataset: bool = Field(
        default=False,
        description="With a processor: check every row when the run starts, then process "
        "images as batches are drawn instead of keeping processed rows.",
    )
    remove_unused_columns: bool | None = Field(
        default=None,
        description="Accepted as Axolotl writes it (false for VLMs); Ferry's collators pass "
        "the model exactly its inputs, so true is refused with a processor.",
    )
    freeze_mm_modules: bool | None = Field(
        default=None,
        description="Freeze the vision (and audio) tower and the projector of a multimodal "
        "model, whatever else trains.",
    )
    image_size: int | list[int] | None = Field(
        default=None,
        description="Resize every image before the processor: a side (scaled to fit a "
        "square, aspect kept, padded black) or [width, height] (a plain resize).",
    )
    image_resize_algorithm: Literal["bilinear", "bicubic", "lanczos", "nearest"] | None = Field(
        default=None, description="How image_size resizes (default bilinear)."
    )
    revision_of_model: str | None = Field(
        default=None,
        validation_alias=AliasChoices("revision_of_model", "model_revision"),
        description="Hub revision (branch, tag or commit) of base_model, for the model, its "
        "config and the tokenizer; also written `model_revision`.",
    )
    overrides_of_model_config: dict[str, Any] | None = Field(
        default=None,
        validation_alias=AliasChoices("model_config", "overrides_of_model_config"),
        description="`model_config`: values set on the model's config before the weights "
        "load, e.g. {attention_dropout: 0.1} or a rope_parameters mapping.",
    )
    low_cpu_mem_usage: bool | None = Field(
        default=None,
        description="Load the weights into an empty model without a first random init; "
        "transformers 5 always does, so `false` is ignored with a warning.",
    )
    resize_token_embeddings_to_32x: bool | None = Field(
        default=None,
        description="Grow the embeddings to len(tokenizer) rounded up to a multiple of 32 "
        "(not only to len(tokenizer)) when they are smaller.",
    )
    experimental_skip_move_to_device: bool | None = Field(
        default=None,
        description="Leave the loaded model where it loads and let the trainer place it "
        "(Axolotl's default, and what Ferry does); `false` is ignored with a warning.",
    )

    # ---- data
    datasets: list[DatasetConfig] = Field(
        default_factory=list, description="Training datasets, mixed in order. Required."
    )
    test_datasets: list[DatasetConfig] = Field(
        default_factory=list, description="Evaluation datasets (instead of val_set_size)."
    )
    pretraining_dataset: list[DatasetConfig] | None = Field(
        default=None,
        description="Raw text for continued pretraining, concatenated into sequence_len "
        "blocks; streamed (needs max_steps) when `streaming: true`.",
    )
    streaming: bool | None = Field(
        default=None, description="Stream `pretraining_dataset` instead of loading it whole."
    )
    val_set_size: float = Field(
        default=0.0,
        ge=0,
        description="Held out for evaluation: a fraction (<1) or a row count (>=1).",
    )
    shuffle_merged_datasets: bool = Field(
        default=True, description="Shuffle the rows after mixing the datasets (with `seed`)."
    )
    dataset_prepared_path: str | None = Field(
        default=None,
        description="Folder for the tokenized-dataset cache; `launch preprocess` fills it.",
    )
    dataset_processes: PositiveInt | None = Field(
        default=None, description="Processes that tokenize (default: all CPU cores, up to 8)."
    )
    dataset_num_proc: PositiveInt | None = Field(
        default=None, description="Axolotl's newer name for dataset_processes."
    )
    dataset_exact_deduplication: bool | None = Field(
        default=None,
        description="Drop rows whose tokens and labels repeat an earlier row's (counted in "
        "the data report); test_datasets rows also against the train rows.",
    )
    dataset_shard_num: PositiveInt | None = Field(
        default=None, description="Keep one of this many shards of the merged data."
    )
    dataset_shard_idx: int | None = Field(
        default=None, ge=0, description="Which shard of dataset_shard_num to keep."
    )
    sequence_len: PositiveInt = Field(
        default=512, description="Longest sequence in tokens (packing: tokens per bin)."
    )
    excess_length_strategy: Literal["drop", "truncate", "raise"] = Field(
        default="drop",
        description="Rows longer than sequence_len: drop (counted), truncate, or raise.",
    )
    default_system_message: str | None = Field(
        default=None, description="System message for chats that have none."
    )
    train_on_inputs: bool = Field(
        default=False, description="Also train on the prompt tokens, not only the response."
    )
    sample_packing: bool = Field(
        default=False,
        description="Pack several rows into each sequence_len row; attention stays "
        "within each row.",
    )
    eval_sample_packing: bool | None = Field(
        default=None, description="Pack the eval set too (default: as sample_packing)."
    )
    sample_packing_group_size: PositiveInt = Field(
        default=100_000, description="Rows packed together per group (parallel packing)."
    )
    sample_packing_bin_size: PositiveInt = Field(
        default=200, description="Most rows in one packed sequence."
    )
    sample_packing_sequentially: bool = Field(
        default=False, description="Pack rows in order (no sorting): keeps curriculum order."
    )
    sample_packing_eff_est: float | None = Field(
        default=None, gt=0, le=1, description="Packing efficiency estimate (default: measured)."
    )
    pad_to_sequence_len: bool | None = Field(
        default=None, description="Pad every batch to sequence_len (fixed shapes)."
    )

    # ---- adapter
    adapter: Literal["lora", "qlora"] | None = Field(
        default=None, description="`lora`, `qlora`, or unset for a full fine-tune."
    )
    lora_r: PositiveInt = Field(default=8, description="LoRA rank.")
    lora_alpha: PositiveInt | None = Field(
        default=None, description="LoRA scaling numerator (default: 2 x lora_r)."
    )
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on LoRA inputs.")
    lora_target_modules: list[str] | str | None = Field(
        default=None, description="Module names (or a regex) to adapt."
    )
    lora_target_linear: bool | None = Field(
        default=None,
        description="Adapt every linear layer except the output head (and, with "
        "lora_target_modules, those too).",
    )
    unfrozen_parameters: list[str] | None = Field(
        default=None,
        description="Train only the parameters these patterns match (regexes from the start "
        "of the name, dots literal; a `[start:end]` suffix trains only those rows).",
    )
    peft_use_rslora: bool | None = Field(
        default=None, description="Rank-stabilised LoRA: scale by lora_alpha / sqrt(lora_r)."
    )
    peft_use_dora: bool | None = Field(
        default=None, description="DoRA: a trained magnitude per output beside the LoRA update."
    )
    lora_modules_to_save: list[str] | None = Field(
        default=None, description="Modules trained in full and saved beside the adapter."
    )
    lora_target_parameters: list[str] | str | None = Field(
        default=None,
        description="Parameters (not modules) to adapt, by name suffix, e.g. "
        "`mlp.experts.gate_up_proj` for MoE experts stored as one tensor (peft's "
        "target_parameters; needs lora_dropout 0).",
    )
    lora_mlp_kernel: bool | None = Field(
        default=None,
        description="Ferry's fused LoRA MLP (SwiGLU or GeGLU) in every decoder layer "
        "(payload/kernels): one autograd function, the activation in a Triton kernel.",
    )
    lora_qkv_kernel: bool | None = Field(
        default=None, description="Ferry's fused LoRA q, k and v projections."
    )
    lora_o_kernel: bool | None = Field(default=None, description="Ferry's fused LoRA o projection.")
    load_in_8bit: bool = Field(default=False, description="Load the base model in 8 bits.")
    load_in_4bit: bool = Field(default=False, description="Load the base model in 4 bits.")

    # ---- optimisation
    micro_batch_size: PositiveInt = Field(default=1, description="Rows per device per step.")
    eval_batch_size: PositiveInt | None = Field(
        default=None, description="Rows per device per evaluation step (default: micro_batch_size)."
    )
    gradient_accumulation_steps: PositiveInt = Field(
        default=1, description="Micro-batches summed into one optimiser step."
    )
    num_epochs: float = Field(default=1.0, gt=0, description="Passes over the training data.")
    max_steps: PositiveInt | None = Field(
        default=None, description="Stop after this many optimiser steps (overrides epochs)."
    )
    learning_rate: float | None = Field(
        default=None, gt=0, description="Peak learning rate. Required."
    )
    optimizer: str = Field(
        default="adamw_torch_fused", description="Optimizer name, as transformers spells it."
    )
    lr_scheduler: SCHEDULERS = Field(default="cosine", description="Learning-rate schedule.")
    lr_scheduler_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="Arguments of the schedule's transformers function (e.g. num_cycles).",
    )
    cosine_min_lr_ratio: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="With the cosine schedule: decay to this fraction of learning_rate, not 0.",
    )
    cosine_constant_lr_ratio: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="With cosine_min_lr_ratio: the cosine reaches its floor at this fraction "
        "of all steps and stays there (e.g. 0.8: the last 20% at the minimum).",
    )
    lr_quadratic_warmup: bool | None = Field(
        default=None,
        description="With the cosine schedule: warm up along (step / warmup)^2, not linearly.",
    )
    warmup_steps: int | None = Field(default=None, ge=0, description="Linear warmup, in steps.")
    warmup_ratio: float | None = Field(
        default=None, ge=0, lt=1, description="Linear warmup, as a fraction of all steps."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float | None = Field(
        default=None, ge=0, lt=1, description="Adam's beta1 (default 0.9)."
    )
    adam_beta2: float | None = Field(
        default=None, ge=0, lt=1, description="Adam's beta2 (default 0.999)."
    )
    adam_epsilon: float | None = Field(
        default=None, gt=0, description="Adam's epsilon (default 1e-8)."
    )
    max_grad_norm: float | None = Field(
        default=1.0, ge=0, description="Clip gradients to this norm (0 or null: no clipping)."
    )
    bf16: bool | Literal["auto"] | None = Field(
        default="auto", description="bfloat16 mixed precision; `auto` uses it where supported."
    )
    fp16: bool | None = Field(default=None, description="float16 mixed precision.")
    tf32: bool | None = Field(default=None, description="Allow TF32 matmuls on Ampere+ GPUs.")
    gradient_checkpointing: bool | Literal["offload", "offload_disk"] = Field(
        default=False,
        description="Recompute activations in backward to save memory. Axolotl's older "
        "`offload` / `offload_disk` mean true plus activation_offloading true / disk.",
    )
    activation_offloading: bool | Literal["legacy", "disk", "hidden_states"] | None = Field(
        default=None,
        description="With gradient_checkpointing: move the activations checkpointing keeps "
        "(each layer's input) off the GPU during a step: true (to CPU memory, copies "
        "overlapped on a CUDA stream), legacy (to CPU, synchronous), hidden_states (as "
        "true), disk (to files in a temporary folder). Needs a GPU, except disk.",
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="Arguments of torch's checkpoint function, e.g. {use_reentrant: true} "
        "(use_reentrant is false unless set).",
    )
    flash_attention: bool | None = Field(default=None, description="Use flash-attention-2.")
    sdp_attention: bool | None = Field(default=None, description="Use torch SDPA attention.")
    flex_attention: bool | None = Field(
        default=None,
        description="Use torch's FlexAttention (trains on a CUDA GPU; its backward does not "
        "run on the CPU). payload/config/attention.py states every backend.",
    )
    flex_attn_compile_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="torch.compile arguments for flex attention, e.g. {dynamic: false, "
        "mode: max-autotune-no-cudagraphs}.",
    )
    attn_implementation: str | None = Field(
        default=None, description="transformers attention backend, e.g. `sdpa`, `eager`."
    )
    torch_compile: bool | Literal["auto"] | None = Field(
        default=None,
        description="Train the model through torch.compile; `auto`: where a CUDA GPU is.",
    )
    torch_compile_backend: str | None = Field(
        default=None, description="torch.compile backend (default inductor), e.g. aot_eager."
    )
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune"] | None = Field(
        default=None, description="torch.compile mode."
    )
    group_by_length: bool | None = Field(
        default=None,
        description="Batch rows of similar length together (less padding); not with packing.",
    )
    seed: int = Field(default=42, description="Seed for weights, data order and dropout.")

    # ---- saving, evaluation, logging
    output_dir: str | None = Field(
        default=None,
        description="Where checkpoints and the final model go (default: the run's folder).",
    )
    save_steps: PositiveInt | None = Field(default=None, description="Checkpoint every N steps.")
    saves_per_epoch: PositiveInt | None = Field(
        default=None, description="Checkpoints per epoch (default: one, at its end)."
    )
    save_strategy: Literal["steps", "epoch", "no"] | None = Field(
        default=None,
        description="When to checkpoint: `steps` (save_steps / saves_per_epoch), `epoch`, or "
        "`no` (nothing to resume from). Default: steps when those are set, else epoch.",
    )
    save_total_limit: PositiveInt | None = Field(
        default=None, description="Keep only the newest N checkpoints."
    )
    save_only_model: bool | None = Field(
        default=None,
        description="Checkpoints hold the weights only, no optimizer or scheduler state: "
        "smaller, but a run cannot resume from them.",
    )
    save_safetensors: bool | None = Field(
        default=None,
        description="Weights are always saved as safetensors (transformers 5); false is refused.",
    )
    loss_watchdog_threshold: float | None = Field(
        default=None,
        description="Stop the run (failed, with a checkpoint) when the logged training loss "
        "stays above this for loss_watchdog_patience logs in a row: the learning has broken "
        "down. About twice the starting loss is a fair value.",
    )
    loss_watchdog_patience: PositiveInt | None = Field(
        default=None, description="Logged losses in a row above the threshold (default 3)."
    )
    eval_steps: PositiveInt | None = Field(default=None, description="Evaluate every N steps.")
    evals_per_epoch: int | None = Field(
        default=None,
        ge=0,
        description="Evaluations per epoch (0, as in Axolotl: none while training).",
    )
    eval_strategy: Literal["no", "steps", "epoch"] | None = Field(
        default=None,
        description="When to evaluate: `no`, `steps` (eval_steps / evals_per_epoch), "
        "`epoch`. Default: from eval_steps / evals_per_epoch, else each epoch.",
    )
    evaluation_strategy: Literal["no", "steps", "epoch"] | None = Field(
        default=None, description="Axolotl's older name for eval_strategy."
    )
    early_stopping_patience: PositiveInt | None = Field(
        default=None,
        description="Stop when the eval loss has not improved for this many evaluations in a row.",
    )
    debug: bool | None = Field(
        default=None,
        description="Before training, print the first rows of the training set, decoded, "
        "with the trained tokens marked.",
    )
    logging_steps: PositiveInt = Field(default=1, description="Log metrics every N steps.")
    resume_from_checkpoint: str | None = Field(
        default=None, description="Checkpoint to resume from: a folder or a storage URI."
    )
    auto_resume_from_checkpoints: bool | None = Field(
        default=None,
        description="Resume from the newest complete checkpoint (in storage when it is set, "
        "else in `output_dir`). Default: on when storage is set.",
    )
    storage: str | None = Field(
        default=None,
        description="Ferry: where checkpoints and artifacts are synced (file://, s3://, "
        "volume://). The launcher puts each run under <storage>/<run id>.",
    )
    launch: LaunchConfig | None = Field(
        default=None, description="Ferry: where the run goes and what it asks for."
    )

    # ---- experiment trackers (payload.config.trackers: which are on, what they need)
    use_wandb: bool | None = Field(
        default=None, description="Report to Weights & Biases (on when wandb_project is set)."
    )
    wandb_project: str | None = Field(default=None, description="W&B project.")
    wandb_entity: str | None = Field(default=None, description="W&B entity (team or user).")
    wandb_name: str | None = Field(
        default=None, description="W&B run display name (default: the Ferry run id)."
    )
    wandb_run_id: str | None = Field(
        default=None,
        description="W&B run id (default: the Ferry run id, so a resumed run continues it).",
    )
    wandb_mode: Literal["online", "offline", "disabled", "dryrun", "shared"] | None = Field(
        default=None,
        description="online (default; needs WANDB_API_KEY), offline (files in the run "
        "folder, `wandb sync` later), or disabled.",
    )
    wandb_watch: Literal["gradients", "parameters", "all", "false"] | bool | None = Field(
        default=None,
        description="Log gradients and/or parameters with wandb.watch (true: gradients).",
    )
    wandb_log_model: Literal["checkpoint", "end", "false"] | bool | None = Field(
        default=None,
        description="Upload checkpoints (checkpoint) or the final model (end, or true) to W&B.",
    )
    use_mlflow: bool | None = Field(
        default=None,
        description="Report to MLflow (on when mlflow_tracking_uri or mlflow_experiment_name "
        "is set).",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking server or store (default: a file store in the run "
        "folder, synced to storage).",
    )
    mlflow_experiment_name: str | None = Field(default=None, description="MLflow experiment.")
    mlflow_run_name: str | None = Field(
        default=None, description="MLflow run name (default: the Ferry run id)."
    )
    hf_mlflow_log_artifacts: bool | None = Field(
        default=None, description="Also log checkpoints to MLflow as artifacts."
    )
    use_tensorboard: bool | None = Field(
        default=None,
        description="Write TensorBoard event files into the run folder (synced to storage).",
    )
    use_comet: bool | None = Field(
        default=None, description="Report to Comet (on when comet_project_name is set)."
    )
    comet_api_key: str | None = Field(
        default=None, description="Refused: a credential; set COMET_API_KEY as a secret."
    )
    comet_workspace: str | None = Field(default=None, description="Comet workspace.")
    comet_project_name: str | None = Field(default=None, description="Comet project.")
    comet_experiment_key: str | None = Field(
        default=None,
        description="Comet experiment key (default: one derived from the Ferry run id, so a "
        "resumed run continues it).",
    )
    comet_mode: Literal["get", "get_or_create", "create"] | None = Field(
        default=None,
        description="Comet experiment mode (default get_or_create, which a resume needs).",
    )
    comet_online: bool | None = Field(
        default=None, description="false: an offline experiment archive in the run folder."
    )
    comet_experiment_config: dict[str, Any] | None = Field(
        default=None,
        description="Comet ExperimentConfig settings, e.g. {auto_histogram_weight_logging: true}.",
    )
    use_swanlab: bool | None = Field(
        default=None, description="Report to SwanLab (on when swanlab_project is set)."
    )
    swanlab_project: str | None = Field(default=None, description="SwanLab project.")
    swanlab_experiment_name: str | None = Field(
        default=None, description="SwanLab experiment name (default: the Ferry run id)."
    )
    swanlab_description: str | None = Field(default=None, description="SwanLab description.")
    swanlab_workspace: str | None = Field(default=None, description="SwanLab workspace.")
    swanlab_mode: Literal["cloud", "local", "offline", "disabled"] | None = Field(
        default=None,
        description="cloud (default; needs SWANLAB_API_KEY), offline (files in the run "
        "folder, `swanlab sync` later), local (the same, with SwanLab's local dashboard: "
        "pip install 'swanlab[dashboard]'), disabled.",
    )
    swanlab_api_key: str | None = Field(
        default=None, description="Refused: a credential; set SWANLAB_API_KEY as a secret."
    )
    swanlab_lark_secret: str | None = Field(
        default=None, description="Refused: a credential (the Lark webhook's secret)."
    )
    use_trackio: bool | None = Field(
        default=None, description="Report to Trackio (on when trackio_project_name is set)."
    )
    trackio_project_name: str | None = Field(default=None, description="Trackio project.")
    trackio_run_name: str | None = Field(
        default=None, description="Trackio run name (default: the Ferry run id)."
    )
    trackio_space_id: str | None = Field(
        default=None,
        description="A Hugging Face Space to sync to (needs HF_TOKEN); default: local files "
        "in the run folder.",
    )

    # ---- distributed and other trainers
    ddp_find_unused_parameters: bool | None = Field(
        default=None,
        description="DDP looks for parameters that get no gradient in a step (slower; needed "
        "when some do). Default: no.",
    )
    ddp_timeout: PositiveInt | None = Field(
        default=None,
        description="Seconds a rank waits for the others before failing: in collectives, "
        "and while rank 0 uploads a checkpoint or the final artifacts (which must finish "
        "within it). Default 1800.",
    )
    deepspeed: str | dict[str, Any] | None = Field(
        default=None,
        description="DeepSpeed ZeRO-1/2/3, with or without CPU offload: a JSON file's path, "
        "an inline mapping, or one of the names Axolotl configs use "
        "(`deepspeed_configs/zero3_bf16.json`: Ferry ships them under examples/deepspeed/). "
        'Values written "auto" are filled from the config.',
    )
    fsdp_config: dict[str, Any] | None = Field(
        default=None,
        description="FSDP2 (Ferry shards the model with torch's `fully_shard`): "
        "reshard_after_forward, activation_checkpointing, transformer_layer_cls_to_wrap, "
        "state_dict_type, final_state_dict_type, ...; the `fsdp_`-prefixed FSDP1 names are "
        "mapped onto these with a warning.",
    )
    context_parallel_size: PositiveInt = Field(
        default=1,
        description="Split each (packed) sequence over this many processes, attention exact "
        "across the split (keys and values all-gathered); the data-parallel replicas are "
        "the processes divided by it. Supervised fine-tuning only. Default 1.",
    )
    rl: str | None = Field(
        default=None, description="Preference/RL objective: dpo, ipo, simpo, kto, orpo, grpo."
    )
    strict: bool = Field(default=False, description="Make the first bad dataset row an error.")

    # ---- objectives (payload/trainers): each block's keys below its own marker.
    # ---- keys: preference objectives
    rl_beta: float | None = Field(
        default=None,
        gt=0,
        description="dpo/ipo/kto/simpo: how far the policy may move from the reference "
        "(TRL's beta; for ipo the regulariser tau, for simpo the reward scale). "
        "`trl.beta` is the same setting. Default 0.1.",
    )
    dpo_loss_type: list[str] | None = Field(
        default=None,
        min_length=1,
        description="dpo: the loss, or several summed with dpo_loss_weights (TRL's "
        "loss_type: sigmoid, hinge, ipo, robust, sft, ...). Default [sigmoid].",
    )
    dpo_loss_weights: list[float] | None = Field(
        default=None,
        min_length=1,
        description="dpo: the weight of each dpo_loss_type (same length). Default all 1.",
    )
    dpo_label_smoothing: float | None = Field(
        default=None,
        ge=0,
        lt=0.5,
        description="dpo: the probability that a pair's preference is flipped, in [0, 0.5), "
        "for the losses that read it (robust, exo_pair, aot, aot_unpaired). Default 0.",
    )
    dpo_use_weighting: bool | None = Field(
        default=None,
        description="dpo: weight each pair by the policy's length-normalised probability "
        "of its answers (WPO).",
    )
    precompute_ref_log_probs: bool | None = Field(
        default=None,
        description="dpo/ipo/kto: compute the reference model's log-probabilities of every "
        "row once before training, so no reference model runs (or, for a full fine-tune, "
        "stays in memory) while training.",
    )
    simpo_gamma: float | None = Field(
        default=None,
        description="simpo: the target reward margin (gamma). Default 0.5.",
    )
    cpo_alpha: float | None = Field(
        default=None,
        ge=0,
        description="simpo: weight of the supervised (NLL) loss on the chosen answers added "
        "to the SimPO loss (CPO's behaviour-cloning term). Default 1 (TRL's); 0 is pure SimPO.",
    )
    kto_desirable_weight: float | None = Field(
        default=None,
        gt=0,
        description="kto: the weight of the desirable rows' loss (to balance unequal "
        "numbers of desirable and undesirable rows). Default 1.",
    )
    kto_undesirable_weight: float | None = Field(
        default=None,
        gt=0,
        description="kto: the weight of the undesirable rows' loss. Default 1.",
    )
    orpo_alpha: float | None = Field(
        default=None,
        gt=0,
        description="orpo: the weight of the odds-ratio term added to the chosen answers' "
        "NLL loss (TRL's ORPOConfig beta, as Axolotl maps it). Default 0.1.",
    )
    # ---- keys: GRPO
    trl: TRLConfig | None = Field(
        default=None, description="TRL's settings for `rl: grpo` (and `beta` for DPO)."
    )
    vllm: VllmConfig | None = Field(
        default=None,
        description="The vLLM server a GRPO job starts itself in `trl.vllm_mode: server`.",
    )
    # ---- keys: reward models
    reward_model: bool | None = Field(
        default=None,
        description="Train a reward model: a sequence-classification head scoring each "
        "`bradley_terry.chat_template` chosen/rejected pair with TRL's RewardTrainer.",
    )
    process_reward_model: bool | None = Field(
        default=None,
        description="Train a process reward model: a token-classification head labelling "
        "each reasoning step of `stepwise_supervised` rows correct or not.",
    )
    num_labels: PositiveInt | None = Field(
        default=None,
        description="Outputs of the reward head: 1 for reward_model (one score, the only "
        "value TRL's RewardTrainer takes), default 2 for process_reward_model (step wrong / "
        "right).",
    )
    center_rewards_coefficient: float | None = Field(
        default=None,
        ge=0,
        description="reward_model: weight of the mean squared reward added to the loss, "
        "which pulls the rewards towards zero mean (Eisenstein et al. 2023; 0.01 is usual).",
    )
    # ---- keys: QLoRA
    bnb_config_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="BitsAndBytesConfig settings for a 4-bit or 8-bit base, over Axolotl's "
        "defaults (nf4, double quant, bfloat16 storage): bnb_4bit_quant_type, "
        "bnb_4bit_use_double_quant, bnb_4bit_compute_dtype, bnb_4bit_quant_storage, "
        "llm_int8_threshold, llm_int8_skip_modules, llm_int8_has_fp16_weight, ...",
    )
    # ---- keys: after training
    quantization: QuantizationConfig | None = Field(
        default=None,
        description="`launch quantize`: torchao post-training quantization of the trained "
        "model (weight_dtype, activation_dtype, group_size, quantize_embedding).",
    )
    plugins: list[str] | None = Field(
        default=None,
        description="Plugins: a `ferry.plugins` entry point's name, a dotted path to a "
        "payload.plugins.Plugin class, or Axolotl's path of a plugin Ferry has (Liger, Cut "
        "Cross-Entropy, SwanLab). Their keys join the config's.",
    )
    # ---- keys: fsdp
    # (fsdp_config and context_parallel_size are in the distributed block above; how the
    # FSDP keys are read, legacy forms included: payload.config.rules, `fsdp_reading`.)
    fsdp_version: int | None = Field(
        default=None,
        description="2: FSDP2 (`fully_shard`), the only FSDP Ferry runs. 1 (FSDP1) is read as "
        "2, with a warning naming each setting mapped or dropped. Default 2.",
    )
    fsdp: str | list[str] | None = Field(
        default=None,
        description="The legacy FSDP1 list (full_shard, shard_grad_op, auto_wrap, offload), "
        "mapped onto FSDP2's fsdp_config with a warning; prefer fsdp_config.",
    )
    fsdp_final_state_dict_type: str | None = Field(
        default=None,
        description="Deprecated spelling of fsdp_config.final_state_dict_type (mapped onto it).",
    )
    dp_shard_size: PositiveInt | None = Field(
        default=None,
        description="FSDP2: processes each parameter is sharded over. Default: all the "
        "processes left after dp_replicate_size, context_parallel_size and "
        "tensor_parallel_size.",
    )
    dp_replicate_size: PositiveInt | None = Field(
        default=None,
        description="FSDP2: copies of the sharded model (HSDP: shard within a group of "
        "dp_shard_size processes, replicate across the groups; usually the nodes). Default 1.",
    )
    tensor_parallel_size: PositiveInt | None = Field(
        default=None,
        description="Tensor parallel: split each transformer block's weights over this many "
        "processes (Llama-family blocks: q/k/v/gate/up column-wise, o/down row-wise; the rest "
        "replicated). They share one batch; the model's attention heads, key/value heads "
        "and intermediate_size must divide by it. Default 1.",
    )
    sequence_parallel_degree: PositiveInt | None = Field(
        default=None, description="Axolotl's older name of context_parallel_size."
    )
    heads_k_stride: PositiveInt | None = Field(
        default=None,
        description="ring-flash-attn's key heads per step: refused, Ferry's context parallel "
        "does not use ring-flash-attn.",
    )
    ring_attn_func: str | None = Field(
        default=None,
        description="ring-flash-attn's kernel (varlen_llama3, batch_ring, ...): refused, "
        "Ferry's context parallel does not use ring-flash-attn.",
    )
