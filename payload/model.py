"""Load the tokenizer and model a config names, and wrap the model in a LoRA adapter."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from payload.config.schema import TrainConfig
from payload.data.templates import TOKENIZER_DEFAULT, resolve_template
from payload.errors import FerryError

log = logging.getLogger("ferry.model")


def _transformers_class(name: str | None, default: str) -> Any:
    import transformers

    cls = getattr(transformers, name or default, None)
    if cls is None:
        raise FerryError(f"`{name}` is not a class in transformers {transformers.__version__}.")
    return cls


def _hub_kwargs(cfg: TrainConfig, **kwargs: Any) -> dict[str, Any]:
    """What every `from_pretrained` of the run's model, config and tokenizer takes:
    remote code as allowed, and the model's revision (as Axolotl does, it also picks the
    config's and the tokenizer's files)."""
    kwargs["trust_remote_code"] = cfg.trust_remote_code
    if cfg.revision_of_model:
        kwargs["revision"] = cfg.revision_of_model
    return kwargs


def load_tokenizer(cfg: TrainConfig) -> Any:
    if cfg.tokenizer_use_mistral_common:
        return _mistral_common_tokenizer(cfg)
    cls = _transformers_class(cfg.tokenizer_type, "AutoTokenizer")
    source = cfg.tokenizer_config or cfg.base_model
    # No `use_fast`: transformers 5 has only the fast kind and drops the argument (the
    # rules warn about `tokenizer_use_fast: false`).
    kwargs = _hub_kwargs(cfg)
    if cfg.tokenizer_legacy is not None:
        kwargs["legacy"] = cfg.tokenizer_legacy
    try:
        tokenizer = cls.from_pretrained(source, **kwargs)
    except OSError as e:
        raise FerryError(f"Could not load the tokenizer from {source}: {e}") from e
    return _ready(tokenizer, cfg, source)


def load_processor(cfg: TrainConfig) -> Any:
    """A vision-language model's processor (`processor_type`), its tokenizer made ready
    as `load_tokenizer` makes one (special tokens, pad, chat template, right padding)."""
    cls = _transformers_class(cfg.processor_type, "AutoProcessor")
    source = cfg.tokenizer_config or cfg.base_model
    kwargs = _hub_kwargs(cfg, **(cfg.processor_kwargs or {}))
    try:
        processor = cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise FerryError(
            f"processor_type: could not load a {cls.__name__} from {source}: {e}"
        ) from e
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise FerryError(
            f"processor_type: {type(processor).__name__} from {source} is not an image-and-"
            "text processor (it needs a tokenizer and an image processor).",
            hint="Leave processor_type out for a text-only model.",
        )
    if getattr(processor, "chat_template", None):
        # The processor's template is the one that writes image parts; a tokenizer saved
        # beside it may carry a text-only one.
        tokenizer.chat_template = processor.chat_template
    processor.tokenizer = _ready(tokenizer, cfg, source)
    # The template the run uses is the one saved with the processor (and inference's).
    processor.chat_template = processor.tokenizer.chat_template
    return processor


def _ready(tokenizer: Any, cfg: TrainConfig, source: str) -> Any:
    """The run's settings on a freshly loaded tokenizer."""
    if cfg.special_tokens:
        tokenizer.add_special_tokens(dict(cfg.special_tokens))
    if tokenizer.pad_token is None:
        # Padding positions carry label -100 and attention 0, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token; using eos %r", tokenizer.eos_token)
    if tokenizer.eos_token_id is None:
        raise FerryError(
            f"The tokenizer from {source} has no eos_token; set special_tokens.eos_token."
        )
    if (cfg.chat_template or cfg.chat_template_jinja) and cfg.chat_template != TOKENIZER_DEFAULT:
        # On the tokenizer, the top-level template is saved with the model (templates.py).
        tokenizer.chat_template = resolve_template(cfg, None, tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def _mistral_common_tokenizer(cfg: TrainConfig) -> Any:
    """Mistral's own tokenizer (a tekken.json or tokenizer.model.v* file, read by the
    mistral-common package) behind transformers' MistralCommonBackend, in fine-tuning
    mode as Axolotl loads it. It encodes text, and bos/eos/pad are ids of its own; it has
    no Jinja chat template, no character offsets and no way to add tokens, so the rules
    keep it to the strategies that need none of those."""
    try:
        from transformers.tokenization_mistral_common import MistralCommonBackend
    except ImportError as e:
        raise FerryError(
            f"tokenizer_use_mistral_common needs the mistral-common package ({e}).",
            hint="pip install 'mistral-common>=1.8'",
        ) from e
    source = cfg.tokenizer_config or cfg.base_model
    kwargs: dict[str, Any] = {"mode": "finetuning", "padding_side": "right"}
    if cfg.revision_of_model:
        kwargs["revision"] = cfg.revision_of_model
    try:
        tokenizer = MistralCommonBackend.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise FerryError(
            f"tokenizer_use_mistral_common: could not load a mistral-common tokenizer from "
            f"{source} (it needs a tekken.json or tokenizer.model.v* file): {e}"
        ) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def use_bf16(cfg: TrainConfig) -> bool:
    import torch

    if cfg.bf16 == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cfg.bf16 and not torch.cuda.is_available():
        raise FerryError("bf16: true needs a CUDA GPU; this machine has none (use bf16: auto).")
    return bool(cfg.bf16)


def _attention(cfg: TrainConfig) -> str | None:
    """The backend the config asks for (payload.config.attention states them all)."""
    from payload.config.attention import chosen, configure_flex_compile

    name = chosen(cfg)
    if name == "flex_attention":
        configure_flex_compile(cfg.flex_attn_compile_kwargs)
    return name


def _quantization(cfg: TrainConfig) -> Any:
    """bitsandbytes' settings for a 4-bit or 8-bit base (payload/quantized.py); bitsandbytes
    runs both on a GPU and on the CPU."""
    from payload.quantized import quantization_config

    return quantization_config(cfg)


def load_model(
    cfg: TrainConfig,
    tokenizer: Any,
    *,
    head: str = "AutoModelForCausalLM",
    task_type: str = "CAUSAL_LM",
    new_adapter: bool = True,
    **model_kwargs: Any,
) -> Any:
    """The base model, resized for added tokens, wrapped in LoRA when `adapter` is set.
    A recipe names the model `head` (an auto class, used unless `model_type` names
    another), peft's `task_type` for the adapter, and any settings of the head
    (`num_labels`, say) in `model_kwargs`. `new_adapter=False`: the base exactly as
    training loads it (dtype, quantization), for a trained adapter to be loaded onto
    (payload.posttrain)."""
    import torch

    cls = _transformers_class(cfg.model_type, head)
    # Adapters train on a frozen base, so the base can sit in bf16; a full fine-tune keeps
    # fp32 master weights and lets autocast do the bf16 math.
    dtype = torch.bfloat16 if (use_bf16(cfg) and cfg.adapter) else torch.float32
    kwargs = _hub_kwargs(cfg, dtype=dtype, **model_kwargs)
    if cfg.revision_of_model and Path(cfg.base_model or "").expanduser().is_dir():
        log.warning(
            "revision_of_model %r is ignored: base_model %s is a local folder, not a "
            "hub repository with revisions.",
            cfg.revision_of_model,
            cfg.base_model,
        )
    if config := _model_config(cfg):
        kwargs["config"] = config
    if attention := _attention(cfg):
        kwargs["attn_implementation"] = attention
    if quantization := _quantization(cfg):
        kwargs["quantization_config"] = quantization
    try:
        model = cls.from_pretrained(cfg.base_model, **kwargs)
    except OSError as e:
        raise FerryError(f"Could not load the model from {cfg.base_model}: {e}") from e

    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        trained_embeddings = {"embed_tokens", "lm_head"} <= set(cfg.lora_modules_to_save or [])
        if cfg.adapter and not trained_embeddings:
            raise FerryError(
                f"special_tokens adds {len(tokenizer) - vocab} new token(s), whose embeddings "
                "would stay random under LoRA. Add `lora_modules_to_save: [embed_tokens, "
                "lm_head]` to train them, or use tokens the model already has."
            )
    if (rows := embedding_rows(len(tokenizer), cfg)) > vocab:
        model.resize_token_embeddings(rows)
    # A multimodal model keeps its text settings in `text_config`.
    text_config = getattr(model.config, "text_config", None) or model.config
    if getattr(text_config, "pad_token_id", None) is None:
        text_config.pad_token_id = tokenizer.pad_token_id

    if cfg.gradient_checkpointing or cfg.sample_packing:
        # Packing also needs it off: with a KV cache transformers no longer builds the
        # per-row mask from position_ids, and packed rows attend to each other.
        model.config.use_cache = False
    if cfg.adapter and new_adapter:
        model = apply_lora(cfg, model, task_type)
    if cfg.unfrozen_parameters:
        unfreeze_only(model, cfg.unfrozen_parameters)
    if cfg.freeze_mm_modules:  # last: whatever else was set to train
        frozen = freeze_multimodal(model)
        if new_adapter:  # training says it; a command loading the model back does not
            print(f"frozen: {', '.join(frozen)} (freeze_mm_modules)", flush=True)
    return model


def embedding_rows(tokens: int, cfg: TrainConfig) -> int:
    """Rows the embeddings need for `tokens` tokens: that many, or with
    `resize_token_embeddings_to_32x` that many rounded up to a multiple of 32 (Axolotl's
    rule; the extra rows are never looked up, they only give the matmuls a friendlier
    shape). The embeddings grow to it when they are smaller, and never shrink."""
    return -(-tokens // 32) * 32 if cfg.resize_token_embeddings_to_32x else tokens


def _model_config(cfg: TrainConfig) -> Any:
    """The model's config when the defaults will not do: read from `base_model_config`,
    and/or with `model_config` (overrides_of_model_config) set on it, as Axolotl does,
    before the weights load, so the model is built with them. None: transformers reads
    the config itself."""
    if not (cfg.base_model_config or cfg.overrides_of_model_config):
        return None
    from transformers import AutoConfig

    source = cfg.base_model_config or cfg.base_model
    try:
        config = AutoConfig.from_pretrained(source, **_hub_kwargs(cfg))
    except OSError as e:
        raise FerryError(f"Could not load the model config from {source}: {e}") from e
    for key, value in (cfg.overrides_of_model_config or {}).items():
        if not hasattr(config, key):
            # Set all the same (a model's own code may read it), but a typo would
            # otherwise change nothing without a word.
            log.warning(
                "model_config.%s is not a setting of %s; it is set, but the model may "
                "never read it.",
                key,
                type(config).__name__,
            )
        setattr(config, key, value)
    return config


def unfreeze_only(model: Any, patterns: list[str]) -> None:
    """Axolotl's `unfrozen_parameters`: only the parameters whose name a pattern matches
    train (payload.config.unfrozen reads the patterns); a pattern with a row range trains
    only those rows of its parameters (the other rows' gradients are zeroed). A tied
    weight (an output head sharing the embeddings) answers to each of its names."""
    from payload.config.unfrozen import parse_pattern

    parsed = [parse_pattern(p) for p in patterns]
    matched = [False] * len(parsed)
    tensors: dict[int, tuple[Any, list[tuple[int, int | None] | None]]] = {}
    touched_embeddings = False
    for name, param in model.named_parameters(remove_duplicate=False):
        _, ranges = tensors.setdefault(id(param), (param, []))
        for i, (regex, rows) in enumerate(parsed):
            if regex.match(name):
                matched[i] = True
                ranges.append(rows)
                touched_embeddings |= "embed_tokens" in name or "lm_head" in name
    if missing := [patterns[i] for i, hit in enumerate(matched) if not hit]:
        raise FerryError(
            f"unfrozen_parameters: {', '.join(f'`{p}`' for p in missing)} match no "
            "parameter of the model.",
            hint="Patterns match from the start of names such as "
            "`model.layers.0.mlp.up_proj.weight` (dots are literal; under LoRA the names "
            "start with `base_model.model.`).",
        )
    for param, ranges in tensors.values():
        param.requires_grad = bool(ranges)
        if ranges and all(r is not None for r in ranges):  # only some rows train
            keep = _rows_mask(ranges, param.shape[0], param.device)  # type: ignore[arg-type]
            shape = (-1, *[1] * (param.dim() - 1))
            param.register_hook(lambda grad, keep=keep.view(shape): grad * keep)
    if touched_embeddings:
        # Axolotl's rule: with the embeddings or head named, make the inputs of the
        # checkpointed blocks require grad, whatever else was frozen.
        model.enable_input_require_grads()


def _rows_mask(ranges: list[tuple[int, int | None]], rows: int, device: Any) -> Any:
    import torch

    keep = torch.zeros(rows, device=device)
    for start, end in ranges:
        if start >= rows:
            raise FerryError(
                f"unfrozen_parameters: the row range [{start}:{end if end is not None else ''}]"
                f" starts past the end of a parameter with {rows} rows."
            )
        keep[start:end] = 1
    return keep


# The last name of the modules of multimodal models that are not the language model:
# vision and audio towers and the projectors into the language model's embeddings, as
# transformers names them across families (LLaVA, Qwen2-VL, Gemma 3/3n/4, Idefics3/
# SmolVLM, Llama 4, Mllama, Pixtral/Mistral 3, InternVL, PaddleOCR-VL, Voxtral, ...).
MULTIMODAL_MODULES = frozenset(
    {
        "vision_tower",
        "vision_model",
        "visual",
        "vision_encoder",
        "image_encoder",
        "audio_tower",
        "audio_model",
        "audio_encoder",
        "multi_modal_projector",
        "mm_projector",
        "multimodal_projector",
        "connector",
        "projector",
        "vision_projection",
        "embed_vision",
        "embed_audio",
        "audio_projector",
        "vision_adapter",
    }
)
LANGUAGE_MODULES = ("language_model", "text_model")


def multimodal_modules(model: Any) -> list[str]:
    """The outermost non-language modules of a multimodal model, by name."""
    language = language_model_name(model)
    found: list[str] = []
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] not in MULTIMODAL_MODULES:
            continue
        if language and (name + ".").startswith(language + "."):
            continue
        if any(name.startswith(outer + ".") for outer in found):
            continue
        found.append(name)
    return found


def language_model_name(model: Any) -> str | None:
    """The name of a multimodal model's language model (its decoder), if it has one."""
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in LANGUAGE_MODULES]
    return min(names, key=len) if names else None


def freeze_multimodal(model: Any) -> list[str]:
    """`freeze_mm_modules`: the vision/audio towers and projectors stop training; returns
    their names. A model with none that Ferry recognises is an error."""
    parts = multimodal_modules(model)
    if not parts:
        raise FerryError(
            f"freeze_mm_modules: {type(model).__name__} has no vision or audio tower or "
            "projector that Ferry recognises (modules named "
            f"{', '.join(sorted(MULTIMODAL_MODULES))})."
        )
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in parts):
            param.requires_grad = False
    return parts


def language_targets(model: Any, targets: Any) -> Any:
    """LoRA targets kept to a multimodal model's language model: `all-linear` or module
    names become the full names of the matching linear layers inside it. A regex (a
    string other than all-linear), or a model with no separate language model, is left as
    it is."""
    language = language_model_name(model)
    if language is None or not multimodal_modules(model):
        return targets
    if isinstance(targets, str) and targets != "all-linear":
        return _current_names(model, targets)  # a regex names exactly the modules it wants
    wanted = None if targets == "all-linear" else [t for t in targets or []]
    if wanted is not None and not wanted:
        return targets
    head = model.get_output_embeddings()
    chosen = []
    for name, module in model.named_modules():
        if not name.startswith(language + ".") or "Linear" not in type(module).__name__:
            continue
        if module is head:
            continue
        if wanted is None or any(name == t or name.endswith("." + t) for t in wanted):
            chosen.append(name)
    if not chosen:
        raise FerryError(
            f"lora_target_modules: {', '.join(wanted or [])} match no linear layer of the "
            f"language model ({language})."
        )
    return chosen


# transformers 4 named a VLM's language model `language_model.model.layers...` (and its
# head `language_model.lm_head`); transformers 5 names it `model.language_model.layers...`.
# Axolotl's VLM examples still write the old names in their LoRA regexes.
OLD_NAMES = (("language_model.model.", "model.language_model."),)


def _current_names(model: Any, regex: str) -> str:
    """A LoRA regex (peft matches it against whole module names) as it is when it matches
    a module; else with transformers 4's names rewritten when that makes it match; else a
    FerryError showing a real module name."""
    import re

    names = [n for n, _ in model.named_modules()]
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise FerryError(f"lora_target_modules: `{regex}` is not a valid regex: {e}") from e
    if any(pattern.fullmatch(n) for n in names):
        return regex
    for old, new in OLD_NAMES:
        rewritten = regex.replace(old, new)
        if rewritten != regex and any(re.fullmatch(rewritten, n) for n in names):
            print(f"lora_target_modules: `{regex}` read as `{rewritten}` (transformers 5's "
                  "module names)", flush=True)  # fmt: skip
            return rewritten
    language = language_model_name(model) or ""
    example = next((n for n in names if n.startswith(language) and n.endswith("q_proj")), names[-1])
    raise FerryError(
        f"lora_target_modules: the regex `{regex}` matches no module of "
        f"{type(model).__name__} (it must match whole names such as `{example}`)."
    )


def linear_layer_names(model: Any) -> set[str]:
    """The last name of every linear layer (plain or quantized) but the output head."""
    head = model.get_output_embeddings()
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and "Linear" in type(module).__name__ and module is not head
    }


def apply_lora(cfg: TrainConfig, model: Any, task_type: str = "CAUSAL_LM") -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_4bit or cfg.load_in_8bit:
        from payload.quantized import prepare_for_training

        # peft freezes the base and casts its non-quantized parameters (norms,
        # embeddings) to float32; the 4-bit and 8-bit weights stay as they are.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
        prepare_for_training(model)
    elif cfg.gradient_checkpointing:
        # With a frozen base no input requires grad, and checkpointed blocks would then
        # have nothing to backpropagate through.
        model.enable_input_require_grads()
    targets: Any = cfg.lora_target_modules
    if cfg.lora_target_linear:
        # With names as well, both (as Axolotl does): every linear layer but the output
        # head, and the named modules.
        named = [targets] if isinstance(targets, str) else list(targets or [])
        targets = sorted(set(named) | linear_layer_names(model)) if named else "all-linear"
    targets = language_targets(model, targets)  # a VLM's language model only
    parameters = cfg.lora_target_parameters
    parameters = [parameters] if isinstance(parameters, str) else list(parameters or [])
    if parameters and targets is None:
        # Parameters alone: no modules. Left as None, peft would add its default modules
        # for the architecture (q_proj and v_proj on a Llama).
        targets = []
    keep = list(cfg.lora_modules_to_save or [])
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):
        # The new classification head trains in full. Named before the LoRA layers are
        # placed: peft's TOKEN_CLS model adds it only afterwards, when `all-linear` has
        # already wrapped it in LoRA (and then fails).
        keep += [name for name in ("score", "classifier") if name not in keep]
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.effective_lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        target_parameters=parameters or None,
        modules_to_save=keep or None,
        use_rslora=bool(cfg.peft_use_rslora),
        use_dora=bool(cfg.peft_use_dora),
        task_type=task_type,
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise FerryError(
            f"LoRA could not be applied (lora_target_modules, lora_target_parameters?): {e}"
        ) from e
    from payload import kernels

    if kernels.asked(cfg):  # Ferry's fused LoRA layers (payload.kernels)
        from payload.kernels import apply, interpret

        done = apply.apply(model, bool(cfg.lora_mlp_kernel), bool(cfg.lora_qkv_kernel),
                           bool(cfg.lora_o_kernel))  # fmt: skip
        how = " (Triton's interpreter: no CUDA here)" if interpret.on_cpu() else ""
        print(f"kernels: {done}{how}", flush=True)
    return model
