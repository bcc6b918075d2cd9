"""Typed configuration: schema, YAML loading with overrides, derived plans, DeepSpeed JSON."""

from .load import build, dump_config, load_config, to_dict
from .schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "LogConfig", "ModelConfig",
    "OptimConfig", "ParallelConfig", "RunConfig", "TrainConfig", "build", "dump_config",
    "load_config", "to_dict",
]
