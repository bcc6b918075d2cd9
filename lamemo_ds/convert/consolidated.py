"""The consolidated format: model.safetensors (sharded above a size, with an index) and
config.json; the hf format (convert/hf.py) is the same folder plus the transformers code and
reads alike, and the reference format keeps our config.json beside its state dict, so both build
on this module (the layer contract in pyproject.toml).

A LaMemoLM ties the output softmax to the input embedding (and, with adaptive softmax, the
projections), so its state_dict holds one storage under two names. safetensors refuses shared
tensors, so each storage is written once under its first name and the aliases are recorded in the
file metadata; loading rebuilds the model, which re-ties the aliases itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint.manager import MANIFEST, CheckpointError, verify
from ..config.load import build, to_dict
from ..config.schema import ModelConfig
from ..export.tied import tied_aliases
from .loaded import Loaded, read_extras

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"



def unique_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None,
                      prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's tensors with each tied storage once, contiguous, optionally cast; + aliases."""
    aliases = tied_aliases(model)
    out = {}
    for name, t in model.state_dict().items():
        if name in aliases:
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[prefix + name] = t.contiguous().cpu()
    return out, {prefix + k: prefix + v for k, v in aliases.items()}


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split in name order into groups of at most max_bytes (a bigger single tensor stays alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in tensors:
        n = tensors[name].numel() * tensors[name].element_size()
        if max_bytes > 0 and groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensors[name]
        size += n
    return groups


def save_weights(tensors: dict[str, torch.Tensor], out_dir: Path, *, max_shard_bytes: int = 0,
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Write model.safetensors, or model-0000i-of-0000n.safetensors + index above the size.

    Returns the file names written.
    """
    from safetensors.torch import save_file

    meta = {"format": "pt", **(metadata or {})}
    groups = _shards(tensors, max_shard_bytes)
    if len(groups) == 1:
        save_file(groups[0], str(out_dir / WEIGHTS_NAME), metadata=meta)
        return [WEIGHTS_NAME]
    names, weight_map = [], {}
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(g, str(out_dir / fname), metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in g})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, **meta}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_NAME]


def _open_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt or truncated weights file {path}: {e}") from e


def load_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a folder (single file or index + shards) and the first file's metadata."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"corrupt shard index {index}: {e}") from e
        tensors, meta = {}, {}
        for fname in sorted(set(weight_map.values())):
            part, meta = _open_safetensors(folder / fname)
            tensors.update(part)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index} lists {missing[0]!r} but no shard holds it")
        return tensors, meta
    return _open_safetensors(folder / WEIGHTS_NAME)


def write_config(out_dir: Path, cfg: ModelConfig, extra: dict | None = None) -> None:
    data = {"model_type": "lamemo", "lamemo_model": to_dict(cfg), **(extra or {})}
    (out_dir / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")


def read_model_config(folder: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the whole config.json) of a consolidated or Hugging Face folder."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"missing {path}: not a lamemo model folder (expected config.json "
                              "written by `lamemo convert`)")
    try:
        data = json.loads(path.read_text())
        cfg = build(ModelConfig, data["lamemo_model"], "model").validate()
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"corrupt {path}: {e!r}") from e
    return cfg, data


def check_shapes(tensors: dict[str, torch.Tensor], model: torch.nn.Module, where: str,
                 aliases: dict[str, str] | None = None) -> None:
    """Every tensor the model needs is present with the config's shape, and nothing else."""
    aliases = aliases if aliases is not None else tied_aliases(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in aliases}
    for name, t in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{where}: tensor {name!r} is missing")
        if tuple(tensors[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, the "
                                  f"config implies {tuple(t.shape)}")
    extra = sorted(set(tensors) - set(expected) - set(aliases))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]!r} (config mismatch?)")


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], where: str,
                dtype: torch.dtype | None = None):
    """A LaMemoLM with `tensors` loaded (tied aliases re-tied by construction)."""
    from ..model import LaMemoLM

    with torch.device("meta"):
        model = LaMemoLM(cfg)
    aliases = tied_aliases(model)
    check_shapes(tensors, model, where, aliases)
    model = LaMemoLM(cfg)
    if dtype is None:
        dtype = next(iter(t for t in tensors.values() if t.is_floating_point())).dtype
    model = model.to(dtype)
    full = dict(tensors)
    full.update({a: tensors[s] for a, s in aliases.items()})
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                           for k, v in full.items()})
    return model.eval()


def check_export_manifest(folder: Path) -> None:
    """Every file of an export matches the size and sha256 in its manifest.json (written last
    by `lamemo convert`); a folder without one (older, or made by hand) is not checked."""
    if (folder / MANIFEST).is_file():
        reason = verify(folder)
        if reason is not None:
            raise CheckpointError(f"{folder}: {reason}; re-export it, or pass --no-verify to "
                                  "use it anyway")


def load_model_folder(folder: str | Path, dtype: torch.dtype | None = None, *,
                      verify: bool = True):
    """A consolidated or Hugging Face export folder -> (LaMemoLM in eval mode, config.json);
    `verify` checks its manifest first (check_export_manifest)."""
    folder = Path(folder)
    if verify:
        check_export_manifest(folder)
    cfg, data = read_model_config(folder)
    tensors, _ = load_weights(folder)
    prefix = data.get("weights_prefix", "")
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return build_model(cfg, tensors, str(folder), dtype), data


def read_folder(path: Path, *, verify: bool = True) -> Loaded:
    """A consolidated or Hugging Face export folder (its manifest checked unless not verify)."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder (expected a `lamemo convert` output)")
    model, _ = load_model_folder(path, verify=verify)
    run_cfg, toks, evals = read_extras(path)
    return Loaded(model=model, source=str(path), run_config=run_cfg, tokenizer_files=toks,
                  eval_results=evals)


def write_consolidated(loaded: Loaded, out: Path, *, dtype: torch.dtype,
                       max_shard_bytes: int) -> list[str]:
    tensors, aliases = unique_state_dict(loaded.model, dtype)
    files = save_weights(tensors, out, max_shard_bytes=max_shard_bytes,
                             metadata={"lamemo_tied": json.dumps(aliases)})
    write_config(out, loaded.model.config, {"dtype": str(dtype).removeprefix("torch.")})
    return [*files, CONFIG_NAME]
