"""The training config: schema, loading, overrides and validation.

Light by design: the launcher imports this on every command, so nothing here may import
torch, transformers or a cloud SDK.
"""

from typing import TYPE_CHECKING, Any

from payload.config.loader import load_config, read_raw, validate_mapping
from payload.config.vocab import SUPPORTED_DATASET_TYPES
from payload.errors import ConfigError, FerryError, Problem

if TYPE_CHECKING:
    from payload.config.schema import DatasetConfig, TrainConfig


def __getattr__(name: str) -> Any:
    # The models load on first use: `launch validate` checks a config without them
    # (payload.config.compiled), and building them is most of what it would cost.
    if name in ("DatasetConfig", "TrainConfig"):
        from payload.config import schema

        return getattr(schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SUPPORTED_DATASET_TYPES",
    "ConfigError",
    "DatasetConfig",
    "FerryError",
    "Problem",
    "TrainConfig",
    "load_config",
    "read_raw",
    "validate_mapping",
]
