"""The LaMemo model, readable top to bottom (lm.py, then step.py, then layers.py).

Rule: the model does not know it is distributed. Nothing here imports deepspeed or touches a
process group (an import-linter contract and tests/test_model_structure.py check it); parallel/
wraps these modules. A memory kind is a `MemoryKind` (step.py) and a layer's memory a
`LayerMemory` (memory.py); "memory none carries no memory" is decided by `config.schema.memory_len`.
The Hugging Face export concatenates these files (convert/hf.py): package-relative imports stay
on one line and top-level names stay unique across the modules.
"""

from ..config.schema import ModelConfig
from .lm import LaMemoLM, LMOutput
from .memory import MemoryState

__all__ = ["LaMemoLM", "LMOutput", "MemoryState", "ModelConfig"]
