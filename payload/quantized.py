"""A base model loaded in 4 bits (QLoRA) or 8 bits (8-bit LoRA) by bitsandbytes, on a GPU
or on the CPU (bitsandbytes >= 0.49 has a CPU backend for both).

The config maps onto transformers' `BitsAndBytesConfig` as Axolotl builds it: the 4-bit
defaults are NF4 with double quantization and bfloat16 storage, the compute dtype
follows the run's precision, and `bnb_config_kwargs` (`bnb_4bit_quant_type`,
`bnb_4bit_compute_dtype`, ...; Axolotl has no top-level keys for them) is merged in last.
Unlike Axolotl, which reads `bnb_config_kwargs` for 4 bits only, Ferry passes it for 8
bits too (`llm_int8_threshold`, `llm_int8_skip_modules`, ...), rather than ignore it
without a word.
"""

from __future__ import annotations

import logging
from typing import Any

from payload.config.schema import TrainConfig

log = logging.getLogger("ferry.quantized")

# Axolotl's 4-bit defaults (its loaders/model.py); bitsandbytes' own are fp4, no double
# quantization and uint8 storage. The storage dtype only changes how the packed 4-bit
# values are viewed (FSDP needs it to match the other parameters), never their values.
DEFAULTS_4BIT: dict[str, Any] = {
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_quant_storage": "bfloat16",
}


def compute_dtype(cfg: TrainConfig) -> str:
    """The dtype the 4-bit layers de-quantize to and multiply in: bfloat16 when the run
    trains in bf16, float16 when it trains in fp16 on a GPU, else float32 (on a CPU
    float16 matmuls are slow, and bf16 is only used when asked for).
    `bnb_config_kwargs.bnb_4bit_compute_dtype` overrides it."""
    import torch

    from payload.model import use_bf16

    if use_bf16(cfg):
        return "bfloat16"
    if cfg.fp16 and torch.cuda.is_available():
        return "float16"
    return "float32"


def quantization_config(cfg: TrainConfig) -> Any:
    """transformers' `BitsAndBytesConfig` for the run, or None when the base loads in
    full precision."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        settings: dict[str, Any] = {"load_in_8bit": True}
    else:
        settings = {"load_in_4bit": True, **DEFAULTS_4BIT}
        settings["bnb_4bit_compute_dtype"] = compute_dtype(cfg)
    settings.update(cfg.bnb_config_kwargs or {})
    log.info("bitsandbytes settings: %s", settings)
    return BitsAndBytesConfig(**settings)


def prepare_for_training(model: Any) -> None:
    """What a quantized base needs before LoRA trains on it, beyond peft's
    `prepare_model_for_kbit_training`."""
    if (layers := keep_trainable_layout(model)) and log.isEnabledFor(logging.DEBUG):
        log.debug("CPU repacking turned off on %d 4-bit layers", layers)
    _quiet_8bit_cast_warning()


def keep_trainable_layout(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; return
    how many layers it was stopped on.

    On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode with an input that does
    not require grad (an evaluation under `no_grad`) rewrites the layer's weight in place
    into an inference-only layout: the block scales are rounded to bfloat16 and double
    quantization is undone, and every later forward, in training too, goes through
    `gemv_4bit`, which has no autograd formula. From the first evaluation on, the outputs
    change and no gradient flows back through the frozen base to the LoRA weights of the
    layers below (torch only warns). The repacking is chosen per layer by the instance
    flag `support_avx512bf16_for_cpu`; turned off, every forward uses the layout
    training needs, at the cost of slower evaluation on such CPUs."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


class _Once(logging.Filter):
    """Lets one record of each message through (bitsandbytes logs the same line on every
    call of every 8-bit layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _quiet_8bit_cast_warning() -> None:
    # "MatMul8bitLt: inputs will be cast from torch.float32 to float16" comes once per
    # layer call (hundreds a step); once per run says the same.
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())
