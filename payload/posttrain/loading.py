"""Loading a trained model back: its tokenizer, its base as training loaded it, the base
with the trained adapter on it, or a fully fine-tuned model."""

from __future__ import annotations

import logging
from typing import Any

from payload.errors import FerryError
from payload.posttrain.target import Target

log = logging.getLogger("ferry.posttrain")


def quiet() -> None:
    """Keep the command's output to its own results (as a training run's log is)."""
    import warnings

    # Optional kernels these libraries look for at import (torchao's CUDA builds,
    # bitsandbytes' hub kernels) and say are missing: nothing these commands use.
    for name in ("torchao", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft)\.")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def recipe(target: Target) -> Any:
    """The objective's recipe (its model head, peft task type and head settings), for a
    single process."""
    from payload.distributed import DistInfo
    from payload.trainers import recipe_for

    return recipe_for(target.cfg, DistInfo(0, 0, 1, None, "cpu"))


def tokenizer(target: Target) -> Any:
    """The tokenizer saved with the trained model (the run's pad token and chat template
    on it), else the one the config names."""
    from payload.model import load_tokenizer

    if (target.model_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            target.model_dir, trust_remote_code=target.cfg.trust_remote_code
        )
    return load_tokenizer(target.cfg)


def processor(target: Target) -> Any:
    """A vision-language model's processor: the one saved with the trained model (its
    chat template and tokenizer as the run used them), else the one the config names."""
    from payload.model import load_processor

    if (target.model_dir / "processor_config.json").is_file():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(
            target.model_dir, trust_remote_code=target.cfg.trust_remote_code
        )
    return load_processor(target.cfg)


def base_model(target: Target, tok: Any) -> Any:
    """The base model exactly as training loaded it (dtype, 4-bit or 8-bit weights,
    resized embeddings), without a new adapter."""
    from payload.model import load_model

    r = recipe(target)

    return load_model(
        target.cfg,
        tok,
        head=r.head,
        task_type=r.task_type,
        new_adapter=False,
        **r.model_kwargs(),
    )


def dequantized(model: Any, cfg: Any) -> Any:
    """A 4-bit or 8-bit base with every quantized layer replaced by a plain one holding
    its de-quantized weights: the values the adapter was trained against, which the
    merged weights must add to (merging into the original full-precision weights
    would not give the model that was trained)."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return model
    if not hasattr(model, "dequantize"):
        raise FerryError(f"{type(model).__name__} cannot de-quantize its {cfg.base_model} base.")
    # transformers' bitsandbytes integration: bitsandbytes' dequantize_4bit (or the int8
    # scales) per layer, on the device the layer is on (the CPU here).
    model = model.dequantize()
    return model


def trained_model(target: Target, tok: Any) -> Any:
    """The model as trained, in eval mode: base + adapter (a peft model), or the full
    fine-tune's own weights."""
    if target.adapter:
        from peft import PeftModel

        base = base_model(target, tok)
        model = PeftModel.from_pretrained(base, target.model_dir)
    else:
        model = full_model(target)
    model.eval()
    _use_cache(model)
    return model


def full_model(target: Target, folder: Any = None, **kwargs: Any) -> Any:
    """A whole saved model (a full fine-tune, or a merged one) with the objective's head."""
    import transformers

    r = recipe(target)
    cls = getattr(transformers, target.cfg.model_type or r.head)
    try:
        return cls.from_pretrained(
            folder or target.model_dir, trust_remote_code=target.cfg.trust_remote_code, **kwargs
        )
    except OSError as e:
        raise FerryError(f"Could not load the model in {folder or target.model_dir}: {e}") from e


def _use_cache(model: Any) -> None:
    """Training turns the KV cache off for gradient checkpointing and packing; generation
    wants it back."""
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = True
        text_config = getattr(config, "text_config", None)  # a multimodal model's
        if text_config is not None:
            text_config.use_cache = True
