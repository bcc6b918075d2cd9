"""The reference format: a state dict of the authors' code (github.com/thu-coai/LaMemo,
`MemTransformerLM.state_dict()` of pytorch/mem_transformer.py), as `reference.pt` with our
config.json beside it; `from_reference` / `to_reference` map it to and from our model (the name
table is keymap.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.manager import CheckpointError
from ..checkpoint.safe_load import UntrustedCheckpointError, load_pt
from ..config.schema import ConfigError, ModelConfig
from ..model import LaMemoLM
from . import consolidated
from .keymap import GLOBAL_TABLE, IGNORED_REFERENCE, LAYER_TABLE, expand
from .loaded import Loaded, read_extras

REFERENCE_NAME = "reference.pt"


def _pairs(cfg: ModelConfig):
    return expand(LAYER_TABLE + GLOBAL_TABLE, cfg.n_layer, len(cfg.cutoffs))


def _ignored(name: str) -> bool:
    return any(name.endswith(s) for s in IGNORED_REFERENCE)


def from_reference(state_dict: dict[str, torch.Tensor], model_config: ModelConfig,
                   *, dtype: torch.dtype | None = None) -> LaMemoLM:
    """Build our model from a reference `MemTransformerLM.state_dict()`.

    Every tensor must be used and every parameter of ours must be filled; shapes are checked
    against the config. Raises ConfigError naming the first mismatch.
    """
    cfg = model_config.validate()
    if cfg.untie_r:
        raise ConfigError("model.untie_r: the reference code shares u, v, v' across layers; "
                          "set untie_r=false to import a reference checkpoint")
    model = LaMemoLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    ours = model.state_dict()
    sd = {k: v for k, v in state_dict.items() if not _ignored(k)}
    new: dict[str, torch.Tensor] = {}
    hd = cfg.n_head * cfg.d_head
    for i in range(cfg.n_layer):
        pre = f"layers.{i}.dec_attn."
        if pre + "qkv_net.weight" in sd:  # Transformer-XL layout
            new[f"layers.{i}.qkv.weight"] = sd.pop(pre + "qkv_net.weight")
        elif pre + "q_net.weight" in sd:  # LaMemo layout: Q, then (K, V)
            new[f"layers.{i}.qkv.weight"] = torch.cat(
                [sd.pop(pre + "q_net.weight"), sd.pop(pre + "kv_net.weight")], 0)
        else:
            raise ConfigError(f"reference checkpoint lacks {pre}q_net.weight / qkv_net.weight "
                              f"(is model.n_layer={cfg.n_layer} right?)")
    for ref, mine in _pairs(cfg):
        if ref in sd:
            new[mine] = sd.pop(ref)
    if sd:
        raise ConfigError(f"reference tensor {sorted(sd)[0]!r} has no place in a model with "
                          f"memory={cfg.memory!r}, variant={cfg.variant!r}, "
                          f"cutoffs={list(cfg.cutoffs)}, div_val={cfg.div_val}")
    for name, t in ours.items():
        if name not in new:
            raise ConfigError(f"reference checkpoint lacks a tensor for {name!r}")
        if tuple(new[name].shape) != tuple(t.shape):
            rows = new[name].shape[0]
            if name == "word_emb.emb_layers.0.weight" and not cfg.cutoffs:  # another vocabulary
                raise ConfigError(f"the reference checkpoint has a vocabulary of {rows}, the "
                                  f"config {cfg.vocab_size}: add --set model.vocab_size={rows}")
            raise ConfigError(f"{name}: reference shape {tuple(new[name].shape)} != "
                              f"{tuple(t.shape)} implied by the config (check n_head/d_head/"
                              f"d_model/vocab_size)")
    del hd
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in new.items()})
    return model


def to_reference(model: LaMemoLM) -> dict[str, torch.Tensor]:
    """Our model -> a state dict the reference `MemTransformerLM` loads (tied weights included
    under both names, as the reference's own state_dict has them)."""
    cfg = model.config
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    hd = cfg.n_head * cfg.d_head
    for i in range(cfg.n_layer):
        w = ours.pop(f"layers.{i}.qkv.weight")
        pre = f"layers.{i}.dec_attn."
        if cfg.memory == "lamemo":
            out[pre + "q_net.weight"], out[pre + "kv_net.weight"] = w[:hd], w[hd:]
        else:
            out[pre + "qkv_net.weight"] = w
    for ref, mine in _pairs(cfg):
        if mine in ours:
            out[ref] = ours.pop(mine)
    out["pos_emb.inv_freq"] = model.pos_emb.inv_freq.detach().clone()
    return out


# ---- the reference.pt format ------------------------------------------------------------


def read_reference(path: Path, model_config: ModelConfig | None) -> Loaded:
    """`reference.pt` (a file, or a folder holding it and our config.json)."""
    file = path / REFERENCE_NAME if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"missing reference state dict {file}")
    if model_config is None:
        if not path.is_dir():
            raise ConfigError(f"{path}: a bare reference state dict does not say its shape; pass "
                              "--config/--preset/--set model.* to describe the model")
        model_config, _ = consolidated.read_model_config(path)
    try:
        sd = load_pt(file)
    except UntrustedCheckpointError:
        raise
    except Exception as e:  # torch raises several types for a bad pickle/zip
        raise CheckpointError(f"corrupt reference state dict {file}: {e}") from e
    if isinstance(sd, dict) and "model_state_dict" in sd:
        sd = sd["model_state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    dtype = next(v.dtype for v in sd.values() if v.is_floating_point())
    model = from_reference(sd, model_config, dtype=dtype).eval()
    extras = read_extras(path) if path.is_dir() else (None, {}, None)
    return Loaded(model=model, source=str(file), run_config=extras[0], tokenizer_files=extras[1],
                  eval_results=extras[2])


def write_reference(loaded: Loaded, out: Path, *, dtype: torch.dtype) -> list[str]:
    sd = {k: v.to(dtype) if v.is_floating_point() else v
          for k, v in to_reference(loaded.model).items()}
    torch.save(sd, out / REFERENCE_NAME)
    consolidated.write_config(out, loaded.model.config)
    return [REFERENCE_NAME, consolidated.CONFIG_NAME]
