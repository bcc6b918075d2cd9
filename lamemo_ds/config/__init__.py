"""Typed configuration: schema, YAML loading with overrides, derived plans, the DeepSpeed JSON
config (deepspeed_config.py).

Rule: the bottom of the package (with fileio): it imports nothing of lamemo_ds but itself and no
torch or deepspeed; sections validate themselves, cross-section values are derived once
(derive.py), and small rules every layer shares live here (schema.keeps_memory / memory_len).
"""

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
