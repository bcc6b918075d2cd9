"""The authors' LaMemo implementation, run from a local checkout, for side-by-side timing.

Issue 2's speed target is relative to the authors' code (github.com/thu-coai/LaMemo,
`pytorch/mem_transformer.py`). Quoted numbers from another machine cannot be compared with
numbers from this one (the same code's speed moves by tens of percent between machines and
even between runs here), so `bench/model_step.py --reference-dir DIR` runs their model in the
same process, step for step alternating with ours. Nothing of theirs is vendored: DIR is the
`pytorch/` folder of your own clone.

Their training step is reproduced as their `train_ddp.py` does it in fp32 on one process:
zero the gradients, forward with the carried memory, mean of the NLL averaged with the
(all-zero, since calc_mem_loss is off) memory loss, backward, read the loss, clip at 0.25,
Adam. Their learning-rate scheduler is left out: a few scalar operations per step.

Two things stop their published folder from importing on a CPU-only torch, and are handled
here without touching their files: `utils/proj_adaptive_softmax.py` parses
`torch.version.cuda` at import (None on CPU builds: a placeholder is set during the import),
and `log_uniform_sampler` (used only for sampled softmax, which this benchmark does not use)
is not in the repository (a module that refuses to be used stands in for it).
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

ATTN_TYPE = {"lamemo": 3, "xl": 0}  # the reference's names for our memory modes
VARIANT_ATTN_TYPE = {"default": 3, "signed_distance": 31, "separate_content_bias": 32,
                     "unmasked_window": 33}  # our lamemo ablations (model.variant)


def _stand_in_sampler() -> types.ModuleType:
    mod = types.ModuleType("log_uniform_sampler")

    def unavailable(*args, **kwargs):
        raise NotImplementedError("sampled softmax is not part of this benchmark")

    mod.LogUniformSampler = unavailable
    mod.sample_logits = unavailable
    return mod


def load(directory: str | Path) -> types.ModuleType:
    """Import `mem_transformer` from DIR (the `pytorch/` folder of a thu-coai/LaMemo clone)."""
    root = Path(directory).expanduser().resolve()
    if not (root / "mem_transformer.py").is_file():
        raise FileNotFoundError(
            f"--reference-dir {directory}: no mem_transformer.py there. Pass the `pytorch/` "
            "folder of a clone of https://github.com/thu-coai/LaMemo")
    for path in (str(root), str(root / "utils")):  # it appends the relative 'utils' itself
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        importlib.import_module("log_uniform_sampler")
    except ImportError:
        sys.modules["log_uniform_sampler"] = _stand_in_sampler()
    cuda = torch.version.cuda
    torch.version.cuda = cuda or "0.0"
    try:
        return importlib.import_module("mem_transformer")
    except ImportError as e:
        raise ImportError(f"--reference-dir {root}: importing the authors' mem_transformer "
                          f"failed ({e}); the clone may be incomplete") from e
    finally:
        torch.version.cuda = cuda


def fingerprint(directory: str | Path) -> str:
    """First 12 hex digits of the SHA-256 of their mem_transformer.py: which code was timed."""
    digest = hashlib.sha256((Path(directory).expanduser() / "mem_transformer.py").read_bytes())
    return digest.hexdigest()[:12]


def _init(model: torch.nn.Module, std: float = 0.02, proj_std: float = 0.01) -> None:
    """The training script's init in effect: weights N(0, std), projections N(0, proj_std),
    LayerNorm weights N(1, std), biases 0 (timing does not depend on it; realistic values
    keep the numerics ordinary)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "layer_norm" in name and leaf == "weight":
                p.normal_(1.0, std)
            elif "projs" in name:
                p.normal_(0.0, proj_std)
            elif leaf == "bias":
                p.zero_()
            else:  # matrices, embeddings and the u / v / v' position biases
                p.normal_(0.0, std)


def build(module: types.ModuleType, memory: str, a, *, init_std: float = 0.02
          ) -> torch.nn.Module:
    """The authors' MemTransformerLM at our benchmark's config `a` (vocab, layers, heads,
    d_model, d_head, d_inner, dropout, seg_len, mem_len), tied output, no adaptive softmax."""
    if memory not in ATTN_TYPE:
        raise ValueError(f"the reference runs memory 'lamemo' or 'xl', not {memory!r}")
    model = module.MemTransformerLM(
        a.vocab, a.layers, a.heads, a.d_model, a.d_head, a.d_inner, a.dropout, 0.0,
        tie_weight=True, d_embed=a.d_model, div_val=1, tie_projs=[False], pre_lnorm=False,
        tgt_len=a.seg_len, ext_len=0, mem_len=a.mem_len, cutoffs=[], same_length=False,
        attn_type=ATTN_TYPE[memory], clamp_len=-1, sample_softmax=-1)
    _init(model, std=init_std, proj_std=init_std / 2)
    return model


def build_from_config(module: types.ModuleType, cfg, *, init_from=None) -> torch.nn.Module:
    """The authors' MemTransformerLM at every field of our ModelConfig `cfg` that it has.

    `init_from`: one of our LaMemoLM models whose weights it starts from (through
    `to_reference`, so both models start from the very same weights: the strongest way to
    give their model our init); None: our init's distributions by role (LaMemoLM.
    reset_parameters, which follows their train_ddp.py `weights_init`) at cfg.init_std /
    cfg.proj_init_std: `_init`, then xavier-uniform v' (r_r_bias_future, and u'
    r_w_bias_future), as their constructor draws them and their script leaves them. A memory
    kind the reference lacks ('none') or our untied u/v (untie_r) is a ValueError naming it."""
    from lamemo_ds.convert import to_reference
    from lamemo_ds.convert.keymap import IGNORED_REFERENCE

    if cfg.memory not in ATTN_TYPE:
        raise ValueError(f"model.memory={cfg.memory!r}: the reference runs 'lamemo' or 'xl' "
                         "only; pass a lamemo or xl run")
    if cfg.untie_r:
        raise ValueError("model.untie_r=true: the reference shares u, v, v' across layers")
    attn_type = VARIANT_ATTN_TYPE[cfg.variant] if cfg.memory == "lamemo" else 0
    model = module.MemTransformerLM(
        cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.d_head, cfg.d_inner,
        cfg.dropout, cfg.dropatt, tie_weight=cfg.tie_weight, d_embed=cfg.d_model,
        div_val=cfg.div_val, tie_projs=[False] + [cfg.tie_projs] * len(cfg.cutoffs),
        pre_lnorm=cfg.pre_lnorm, tgt_len=cfg.segment_len, ext_len=0, mem_len=cfg.mem_len,
        cutoffs=list(cfg.cutoffs), same_length=cfg.same_length, attn_type=attn_type,
        clamp_len=cfg.clamp_len, sample_softmax=-1)
    if init_from is None:
        _init(model, std=cfg.init_std, proj_std=cfg.proj_init_std)
        for name, p in model.named_parameters():
            if name.endswith("_bias_future"):
                torch.nn.init.xavier_uniform_(p)
    else:
        result = model.load_state_dict(to_reference(init_from), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(IGNORED_REFERENCE)]
        if missing or result.unexpected_keys:  # their zero logits-constant buffers may stay
            raise ValueError(f"our weights do not fill theirs: missing {missing}, "
                             f"unexpected {result.unexpected_keys}")
    return model


def make_step(module: types.ModuleType, memory: str, a, data: torch.Tensor
              ) -> Callable[[int], float]:
    """step(s) trains the authors' model on segment s of `data` [B, S*N+1] (batch-first, as
    our benchmark holds it; their model is time-major) and returns the loss."""
    torch.manual_seed(0)
    model = build(module, memory, a).train()
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-4)
    time_major = data.t().contiguous()
    mems: list = []

    def step(s: int) -> float:
        x = time_major[s * a.seg_len:(s + 1) * a.seg_len]
        y = time_major[s * a.seg_len + 1:(s + 1) * a.seg_len + 1]
        model.zero_grad()
        ret = model(x, y, *mems)
        loss, mem_loss = ret[0].float().mean(), ret[1].float().mean()
        ((loss + mem_loss) / 2).backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        mems[:] = ret[2:]
        return value

    step.num_parameters = sum(p.numel() for p in model.parameters())
    return step
