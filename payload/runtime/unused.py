"""Keep installed packages a run does not use from being imported at all.

transformers imports comet_ml whenever it is installed (its integrations module, at
import), and peft imports bitsandbytes whenever it is installed (for its quantized LoRA
layers). On 2 CPU cores that is about 1 s and 2 s of every training process's start-up,
for a run that reports to no Comet experiment and quantizes nothing. A None in
`sys.modules` makes `import x` raise ImportError, which both libraries read as "not
installed". Decided from the config before the training stack is imported; anything in
doubt (a model whose config this machine has not got yet) keeps the package.
"""

from __future__ import annotations

import sys

from payload.config.paths import model_config_json
from payload.config.schema import TrainConfig

# Optimizer names that run on bitsandbytes (Axolotl's and the HF Trainer's).
BNB_OPTIMIZER_WORDS = ("bnb", "8bit", "paged")


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


def keep_out(cfg: TrainConfig) -> list[str]:
    """Block the packages `cfg` does not use (see the module docstring); their names."""
    blocked = []
    for name, needed in (("comet_ml", needs_comet), ("bitsandbytes", needs_bitsandbytes)):
        if name not in sys.modules and not needed(cfg):
            sys.modules[name] = None  # type: ignore[assignment]
            blocked.append(name)
    return blocked
