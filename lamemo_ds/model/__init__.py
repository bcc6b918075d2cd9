"""The LaMemo model (no distributed code here: parallel/ wraps it)."""

from ..config.schema import ModelConfig
from .lm import LaMemoLM, LMOutput
from .memory import MemoryState

__all__ = ["LaMemoLM", "LMOutput", "MemoryState", "ModelConfig"]
