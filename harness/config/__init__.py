"""Typed run configuration: schema, YAML presets, overrides and validation."""

from harness.config.loader import ConfigError, list_presets, load_config, to_dict, to_yaml
from harness.config.schema import (
    AugmentConfig, CropConfig, DataConfig, LarsConfig, ModelConfig, OptimConfig,
    ParallelConfig, RegNetSpec, RunConfig, ScheduleConfig, SwAVConfig, TrainConfig,
)

__all__ = [
    "AugmentConfig", "ConfigError", "CropConfig", "DataConfig", "LarsConfig", "ModelConfig",
    "OptimConfig", "ParallelConfig", "RegNetSpec", "RunConfig", "ScheduleConfig", "SwAVConfig",
    "TrainConfig", "list_presets", "load_config", "to_dict", "to_yaml",
]
