"""The reference format: a state dict of the authors' code (github.com/thu-coai/LaMemo,
`MemTransformerLM.state_dict()`), as `reference.pt`, with our config.json beside it. The name
mapping is checkpoint/reference.py's."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import safetensors_io as sio
from ..checkpoint.reference import from_reference, to_reference
from ..checkpoint.safetensors_io import CheckpointError
from ..config.schema import ConfigError, ModelConfig
from .loaded import Loaded, read_extras

REFERENCE_NAME = "reference.pt"


def read_reference(path: Path, model_config: ModelConfig | None) -> Loaded:
    """`reference.pt` (a file, or a folder holding it and our config.json)."""
    file = path / REFERENCE_NAME if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"missing reference state dict {file}")
    if model_config is None:
        if not path.is_dir():
            raise ConfigError(f"{path}: a bare reference state dict does not say its shape; pass "
                              "--config/--preset/--set model.* to describe the model")
        model_config, _ = sio.read_model_config(path)
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad pickle/zip
        raise CheckpointError(f"corrupt reference state dict {file}: {e}") from e
    if isinstance(sd, dict) and "model_state_dict" in sd:
        sd = sd["model_state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    dtype = next(v.dtype for v in sd.values() if v.is_floating_point())
    model = from_reference(sd, model_config, dtype=dtype).eval()
    extras = read_extras(path) if path.is_dir() else (None, [], None)
    return Loaded(model=model, source=str(file), run_config=extras[0], tokenizer_files=extras[1],
                  eval_results=extras[2])


def write_reference(loaded: Loaded, out: Path, *, dtype: torch.dtype) -> list[str]:
    sd = {k: v.to(dtype) if v.is_floating_point() else v
          for k, v in to_reference(loaded.model).items()}
    torch.save(sd, out / REFERENCE_NAME)
    sio.write_config(out, loaded.model.config)
    return [REFERENCE_NAME, sio.CONFIG_NAME]
