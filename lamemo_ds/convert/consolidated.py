"""The consolidated format: model.safetensors (+ an index when sharded) and config.json; the
hf format is the same folder plus the transformers code (convert/hf.py), and reads alike."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import safetensors_io as sio
from ..checkpoint.safetensors_io import CheckpointError
from .loaded import Loaded, read_extras


def read_folder(path: Path, *, verify: bool = True) -> Loaded:
    """A consolidated or Hugging Face export folder (its manifest checked unless not verify)."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder (expected a `lamemo convert` output)")
    model, _ = sio.load_model_folder(path, verify=verify)
    run_cfg, toks, evals = read_extras(path)
    return Loaded(model=model, source=str(path), run_config=run_cfg, tokenizer_files=toks,
                  eval_results=evals)


def write_consolidated(loaded: Loaded, out: Path, *, dtype: torch.dtype,
                       max_shard_bytes: int) -> list[str]:
    tensors, aliases = sio.unique_state_dict(loaded.model, dtype)
    files = sio.save_weights(tensors, out, max_shard_bytes=max_shard_bytes,
                             metadata={"lamemo_tied": json.dumps(aliases)})
    sio.write_config(out, loaded.model.config, {"dtype": str(dtype).removeprefix("torch.")})
    return [*files, sio.CONFIG_NAME]
