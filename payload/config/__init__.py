"""The training config: schema, loading, overrides and validation.

Light by design: the launcher imports this on every command, so nothing here may import
torch, transformers or a cloud SDK.
"""

from payload.config.loader import load_config, read_raw, validate_mapping
from payload.config.schema import SUPPORTED_DATASET_TYPES, DatasetConfig, TrainConfig
from payload.errors import ConfigError, FerryError, Problem

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
