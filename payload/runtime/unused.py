"""Keep installed packages a run does not use from being imported at all.

transformers imports comet_ml whenever it is installed (its integrations module, at
import), peft imports bitsandbytes whenever it is installed (for its quantized LoRA
layers), and transformers imports torchao whenever it is installed (its torchao
quantizer, which `transformers.modeling_utils` loads at import, and with it torch's
quantization and inductor modules). On 2 CPU cores that is about 1 s, 2 s and 0.5 s of
every training process's start-up (torchao measured: `import payload.train` after
`keep_out` on the quickstart, 8.1 s with torchao and 7.6 s without, means of 8), for a
run that reports to no Comet experiment and quantizes nothing. A None in `sys.modules`
makes `import x` raise ImportError and `importlib.util.find_spec(x)` return None, which
all these libraries read as "not installed". Decided from the config before the
training stack is imported; anything in doubt (a model whose config this machine has
not got yet) keeps the package.

Only the training processes (`python -m payload train`, Ray Train's workers) call
`keep_out`. `launch quantize` (payload/posttrain/quantize.py, torchao) and the other
post-training commands run in the launcher's own process, which never does.
"""

from __future__ import annotations

import sys

from payload.config.paths import model_config_json
from payload.config.schema import TrainConfig

# Optimizer names that run on bitsandbytes (Axolotl's and the HF Trainer's).
BNB_OPTIMIZER_WORDS = ("bnb", "8bit", "paged")
# The HF Trainer's optimizers that run on torchao (its _TORCHAO_OPTIMIZERS: torchao.optim's
# AdamW4bit and AdamW8bit), and Axolotl's own (ao_adamw_4bit, ao_adamw_8bit, ao_adamw_fp8:
# not names Ferry accepts, kept all the same for a config built in code).
TORCHAO_OPTIMIZERS = ("adamw_torch_4bit", "adamw_torch_8bit")


def needs_comet(cfg: TrainConfig) -> bool:
    from payload.config.trackers import active

    return any(t.package == "comet_ml" for t in active(cfg))


def needs_bitsandbytes(cfg: TrainConfig) -> bool:
    if cfg.load_in_4bit or cfg.load_in_8bit or cfg.adapter == "qlora":
        return True
    if any(word in cfg.optimizer.lower() for word in BNB_OPTIMIZER_WORDS):
        return True
    config = model_config_json(cfg)
    if config is None:
        return True  # not here yet: it may be a checkpoint saved in 4 or 8 bits
    quantized = config.get("quantization_config")
    return bool(quantized) and quantized.get("quant_method", "bitsandbytes") == "bitsandbytes"


def needs_torchao(cfg: TrainConfig) -> bool:
    """A torchao optimizer, or a base model saved quantized by torchao (transformers
    rebuilds its tensors on load, peft puts LoRA on them), or one whose config this
    machine has not got. Ferry's training has no other use of torchao: `quantization:`
    is read by `launch quantize` only (see the module docstring), and Axolotl's `fp8`
    and `qat` keys are refused by the config loader."""
    optimizer = cfg.optimizer.lower()
    if optimizer in TORCHAO_OPTIMIZERS or optimizer.startswith("ao_") or "torchao" in optimizer:
        return True
    if "quantization_config" in (cfg.overrides_of_model_config or {}):
        return True  # `model_config:` sets the quantization on the model's config itself
    config = model_config_json(cfg)
    if config is None:
        return True  # not here yet: it may be a checkpoint saved by torchao
    quantized = config.get("quantization_config")
    if not quantized:
        return False
    if not isinstance(quantized, dict):
        return True  # not a form transformers reads: whatever it is, keep torchao
    return str(quantized.get("quant_method", "")).lower() == "torchao"


KEPT_OUT = (
    ("comet_ml", needs_comet),
    ("bitsandbytes", needs_bitsandbytes),
    ("torchao", needs_torchao),
)


def keep_out(cfg: TrainConfig) -> list[str]:
    """Block the packages `cfg` does not use (see the module docstring); their names."""
    blocked = []
    for name, needed in KEPT_OUT:
        if name not in sys.modules and not needed(cfg):
            sys.modules[name] = None  # type: ignore[assignment]
            blocked.append(name)
    return blocked
