"""Checkpoint conversion: read any of our formats into one in-memory model, write any other.

Formats
- deepspeed:    a training checkpoint (step-N/ of `lamemo train`, any ZeRO stage) — read and write
- consolidated: model.safetensors (+ index when sharded), config.json, tokenizer, README card
- hf:           consolidated + transformers code (AutoModelForCausalLM, trust_remote_code=True)
- reference:    a state dict of the authors' code (SPEC §8), `reference.pt` (+ our config.json)

Every writer works in a temp folder renamed into place at the end, so a failed conversion leaves
nothing behind; readers check every tensor against the config and name the bad file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import safetensors_io as sio
from ..checkpoint.safetensors_io import CheckpointError
from ..config.load import dump_config, to_dict
from ..config.schema import ConfigError, ModelConfig, RunConfig

FORMATS_IN = ("deepspeed", "consolidated", "hf", "reference")
FORMATS_OUT = ("consolidated", "hf", "deepspeed", "reference")
REFERENCE_NAME = "reference.pt"
RUN_CONFIG_NAME = "training_config.yaml"
EVAL_NAME = "eval.json"
TOKENIZER_GLOB = "tokenizer*.json"


@dataclass
class Loaded:
    """A model read from some format, plus what travels with it to the output."""

    model: torch.nn.Module
    source: str
    run_config: RunConfig | None = None
    tokenizer_files: list[Path] = field(default_factory=list)
    eval_results: dict | None = None
    notes: list[str] = field(default_factory=list)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


# ---- readers ---------------------------------------------------------------------------------
def _read_extras(folder: Path) -> tuple[RunConfig | None, list[Path], dict | None]:
    from ..config.load import load_config

    run_cfg = None
    if (folder / RUN_CONFIG_NAME).is_file():
        run_cfg = load_config(folder / RUN_CONFIG_NAME)
    evals = None
    if (folder / EVAL_NAME).is_file():
        evals = json.loads((folder / EVAL_NAME).read_text())
    return run_cfg, sorted(folder.glob(TOKENIZER_GLOB)), evals


def read_folder(path: Path) -> Loaded:
    """A consolidated or Hugging Face export folder."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder (expected a `lamemo convert` output)")
    model, _ = sio.load_model_folder(path)
    run_cfg, toks, evals = _read_extras(path)
    return Loaded(model=model, source=str(path), run_config=run_cfg, tokenizer_files=toks,
                  eval_results=evals)


def read_reference(path: Path, model_config: ModelConfig | None) -> Loaded:
    """`reference.pt` (a file, or a folder holding it and our config.json)."""
    from ..checkpoint.reference import from_reference

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
    extras = _read_extras(path) if path.is_dir() else (None, [], None)
    return Loaded(model=model, source=str(file), run_config=extras[0], tokenizer_files=extras[1],
                  eval_results=extras[2])


def read_source(kind: str, path: str | Path, *, model_config: ModelConfig | None = None,
                run_config: RunConfig | None = None, quiet: bool = False) -> Loaded:
    """Read a model of format `kind` from `path` (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"input {path} does not exist")
    if kind in ("consolidated", "hf"):
        loaded = read_folder(path)
    elif kind == "reference":
        loaded = read_reference(path, model_config)
    elif kind == "deepspeed":
        from ..checkpoint.deepspeed_io import read_deepspeed

        loaded = read_deepspeed(path, run_config=run_config, quiet=quiet)
    else:
        raise ConfigError(f"--from {kind!r}: choose one of {', '.join(FORMATS_IN)}")
    if run_config is not None and loaded.run_config is None:
        loaded.run_config = run_config
    n = loaded.model.num_parameters()
    dtype = next(loaded.model.parameters()).dtype
    _say(f"read  {kind}: {loaded.source} ({n:,} parameters, {str(dtype).removeprefix('torch.')}, "
         f"memory={loaded.model.config.memory})", quiet)
    return loaded


# ---- writers ---------------------------------------------------------------------------------
def model_card(loaded: Loaded, *, fmt: str, dtype: torch.dtype) -> str:
    """README.md of an export: what the model is, how it was trained, how well it does."""
    cfg = loaded.model.config
    lines = [f"# LaMemo language model ({cfg.memory} memory)", "",
             f"Exported by `lamemo convert` from `{loaded.source}` as `{fmt}` "
             f"({str(dtype).removeprefix('torch.')}).", "",
             f"- parameters: {loaded.model.num_parameters():,}",
             f"- layers {cfg.n_layer}, d_model {cfg.d_model}, heads {cfg.n_head}x{cfg.d_head}, "
             f"d_inner {cfg.d_inner}, vocab {cfg.vocab_size}",
             f"- segment length {cfg.segment_len}, memory length {cfg.mem_len}", ""]
    if fmt == "hf":
        lines += ["## Loading", "", "```python", "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
                  "out = model(x0)                      # x0 [B, N] token ids",
                  "out = model(x1, mems=out.mems)       # memory carried to the next segment",
                  "```", ""]
    lines += ["## Evaluation", ""]
    if loaded.eval_results:
        lines += ["```json", json.dumps(loaded.eval_results, indent=2), "```", ""]
    else:
        lines += ["No evaluation recorded; run `lamemo eval --model THIS_FOLDER --data DATA`.", ""]
    lines += ["## Model config", "", "```json", json.dumps(to_dict(cfg), indent=2), "```", ""]
    if loaded.run_config is not None:
        lines += ["## Training config", "", "```yaml", dump_config(loaded.run_config).rstrip(),
                  "```", ""]
    return "\n".join(lines)


def _write_extras(loaded: Loaded, out: Path, *, fmt: str, dtype: torch.dtype) -> list[str]:
    written = []
    for f in loaded.tokenizer_files:
        shutil.copyfile(f, out / f.name)
        written.append(f.name)
    if loaded.run_config is not None:
        (out / RUN_CONFIG_NAME).write_text(dump_config(loaded.run_config))
        written.append(RUN_CONFIG_NAME)
    if loaded.eval_results is not None:
        (out / EVAL_NAME).write_text(json.dumps(loaded.eval_results, indent=2) + "\n")
        written.append(EVAL_NAME)
    (out / "README.md").write_text(model_card(loaded, fmt=fmt, dtype=dtype))
    return [*written, "README.md"]


def write_consolidated(loaded: Loaded, out: Path, *, dtype: torch.dtype,
                       max_shard_bytes: int) -> list[str]:
    tensors, aliases = sio.unique_state_dict(loaded.model, dtype)
    files = sio.save_weights(tensors, out, max_shard_bytes=max_shard_bytes,
                             metadata={"lamemo_tied": json.dumps(aliases)})
    sio.write_config(out, loaded.model.config, {"dtype": str(dtype).removeprefix("torch.")})
    return [*files, sio.CONFIG_NAME]


def write_reference(loaded: Loaded, out: Path, *, dtype: torch.dtype) -> list[str]:
    from ..checkpoint.reference import to_reference

    sd = {k: v.to(dtype) if v.is_floating_point() else v
          for k, v in to_reference(loaded.model).items()}
    torch.save(sd, out / REFERENCE_NAME)
    sio.write_config(out, loaded.model.config)
    return [REFERENCE_NAME, sio.CONFIG_NAME]


def write_target(kind: str, loaded: Loaded, out: str | Path, *, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = 0, force: bool = False, quiet: bool = False,
                 deepspeed_options: dict | None = None) -> list[str]:
    """Write `loaded` as format `kind` into folder `out` (atomically); returns the files."""
    from .hf import export_hf

    if kind not in FORMATS_OUT:
        raise ConfigError(f"--to {kind!r}: choose one of {', '.join(FORMATS_OUT)}")
    dtype = dtype or next(loaded.model.parameters()).dtype
    out = Path(out)
    with sio.atomic_output(out, force=force) as tmp:
        if kind == "consolidated":
            files = write_consolidated(loaded, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)
        elif kind == "hf":
            files = export_hf(loaded.model, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)
        elif kind == "reference":
            files = write_reference(loaded, tmp, dtype=dtype)
        else:
            from .deepspeed import write_deepspeed

            files = write_deepspeed(loaded, tmp, final=out, quiet=quiet,
                                    **(deepspeed_options or {}))
        if kind != "deepspeed":
            files += _write_extras(loaded, tmp, fmt=kind, dtype=dtype)
        sizes = {f: (tmp / f).stat().st_size for f in files if (tmp / f).is_file()}
    for f in files:
        size = sio.human_bytes(sizes[f]) if f in sizes else ""
        _say(f"wrote {out / f} {size}", quiet)
    return files


def record_eval(folder: Path, model: torch.nn.Module, result: dict) -> None:
    """Store an eval result in a model folder (eval.json, keyed split/protocol) and refresh the
    README card, each file replaced atomically."""
    import os

    path = folder / EVAL_NAME
    evals = json.loads(path.read_text()) if path.is_file() else {}
    evals[f"{result['split']}/{result['protocol']}"] = {
        k: result[k] for k in ("loss", "ppl", "bpc", "tokens", "segment_len", "mem_len",
                               "clamp_len", "same_length", "data", "memory", "memory_gain_bpc",
                               "recall") if k in result}
    run_cfg, toks, _ = _read_extras(folder)
    loaded = Loaded(model=model, source=str(folder), run_config=run_cfg, tokenizer_files=toks,
                    eval_results=evals)
    fmt = "hf" if (folder / "modeling_lamemo.py").is_file() else "consolidated"
    dtype = next(model.parameters()).dtype
    for name, text in ((EVAL_NAME, json.dumps(evals, indent=2) + "\n"),
                       ("README.md", model_card(loaded, fmt=fmt, dtype=dtype))):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / name)
