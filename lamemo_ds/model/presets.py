"""Reference model shapes (docs/algorithm.md §6) and a tiny debug model."""

from __future__ import annotations

from ..config.schema import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    "wt103_base": ModelConfig(
        vocab_size=267735, n_layer=16, n_head=10, d_model=410, d_head=41, d_inner=2100,
        dropout=0.1, dropatt=0.0, segment_len=150, mem_len=150,
        cutoffs=(20000, 40000, 200000), div_val=1),
    "enwik8_base": ModelConfig(
        vocab_size=204, n_layer=12, n_head=8, d_model=512, d_head=64, d_inner=2048,
        dropout=0.1, dropatt=0.0, segment_len=512, mem_len=512),
    "text8_base": ModelConfig(
        vocab_size=28, n_layer=12, n_head=8, d_model=512, d_head=64, d_inner=2048,
        dropout=0.1, dropatt=0.0, segment_len=512, mem_len=512),
    "debug": ModelConfig(
        vocab_size=257, n_layer=2, n_head=2, d_model=32, d_head=16, d_inner=64,
        dropout=0.0, dropatt=0.0, segment_len=16, mem_len=16),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
