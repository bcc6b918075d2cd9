"""Model presets: the `model:` section of each shipped run config (configs/*.yaml).

One source of truth: `--preset enwik8_base` and `--config enwik8_base` describe the same model
(vocabulary 257, what `lamemo prepare`'s byte tokenizer writes). A checkpoint of the authors'
code keeps the vocabulary of its own data (204 symbols for their enwik8): import it with
`--preset enwik8_base --set model.vocab_size=204` (a mismatch names the size to set).
"""

from __future__ import annotations

from ..config.load import bundled_configs, load_config
from ..config.schema import ModelConfig


def preset(name: str) -> ModelConfig:
    """The model of the shipped config `name` (KeyError naming the known ones)."""
    known = bundled_configs()
    if name not in known:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(known))}")
    return load_config(known[name]).model
