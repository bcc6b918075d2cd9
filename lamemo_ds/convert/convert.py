"""Checkpoint conversion: read any of our formats into one in-memory model, write any other.

Formats (each with its reader and writer in convert/registry.py)
- deepspeed:    a training checkpoint (step-N/ of `lamemo train`, any ZeRO stage) — read and write
- consolidated: model.safetensors (+ index when sharded), config.json, tokenizer, README card
- hf:           consolidated + transformers code (AutoModelForCausalLM, trust_remote_code=True)
- reference:    a state dict of the authors' code, `reference.pt` (+ our config.json)

Every writer works in a temp folder renamed into place at the end, so a failed conversion leaves
nothing behind; readers check every tensor against the config and name the bad file.
`lamemo convert` and tools/convert_checkpoint.py both come here.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from ..checkpoint.manager import (
    MANIFEST,
    RUN_CONFIG,
    CheckpointError,
    update_manifest,
    write_manifest,
)
from ..config.load import dump_config, to_dict
from ..config.schema import ConfigError, ModelConfig, RunConfig
from ..data.hf_tokenizer import write_hf_tokenizer
from ..data.tokenizer import load_tokenizer
from ..fileio import atomic_folder, atomic_write
from .loaded import EVAL_NAME, Loaded
from .loaded import read_extras as _read_extras
from .registry import FORMATS_IN, FORMATS_OUT, detect_format, get_format

__all__ = ["DTYPES", "EVAL_NAME", "FORMATS_IN", "FORMATS_OUT", "RUN_CONFIG", "Loaded", "model_card",
           "check_output", "parse_dtype", "parse_size", "read_source", "record_eval",
           "write_target"]


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_size(text: str) -> int:
    """'2GB', '500MB', '10KB' or a byte count -> bytes (0 or less: never shard)."""
    t = str(text).strip().upper()
    try:
        for unit, mult in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10), ("B", 1)):
            if t.endswith(unit):
                return int(float(t[: -len(unit)]) * mult)
        return int(t)
    except ValueError:
        raise ConfigError(f"--max-shard-size {text!r}: expected a size such as 2GB, 500MB, "
                          "10KB or a byte count") from None


def check_output(out: str | Path, *, force: bool = False) -> None:
    """Refuse to overwrite a non-empty output unless forced (checked before any work)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"output {out} already exists and is not empty (pass --force to "
                              "replace it)")



def human_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    k = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**k:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][k]}"


# ---- reading ---------------------------------------------------------------------------------
def read_source(kind: str, path: str | Path, *, model_config: ModelConfig | None = None,
                run_config: RunConfig | None = None, quiet: bool = False,
                verify: bool = True) -> Loaded:
    """Read a model of format `kind` from `path` (see the module docstring); `verify` checks
    every file against the source's sha256 manifest first (a training checkpoint's, an
    export's)."""
    fmt = get_format(kind, write=False)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"input {path} does not exist")
    loaded = fmt.reader(path, model_config=model_config, run_config=run_config, quiet=quiet,
                        verify=verify)
    if run_config is not None and loaded.run_config is None:
        loaded.run_config = run_config
    n = loaded.model.num_parameters()
    dtype = next(loaded.model.parameters()).dtype
    _say(f"read  {kind}: {loaded.source} ({n:,} parameters, {str(dtype).removeprefix('torch.')}, "
         f"memory={loaded.model.config.memory})", quiet)
    return loaded


# ---- writing ---------------------------------------------------------------------------------
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
        lines += ["## Loading", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
                  "out = model(x0)                      # x0 [B, N] token ids",
                  "out = model(x1, mems=out.mems)       # memory carried to the next segment",
                  *(["tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
                     'ids = tok("Once upon", return_tensors="pt").input_ids',
                     "new = model.generate(ids, max_new_tokens=50, do_sample=True, top_k=40)",
                     "print(tok.decode(new[0], skip_special_tokens=True))"]
                    if loaded.tokenizer_files else []),
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
    for name, f in loaded.tokenizer_files.items():
        shutil.copyfile(f, out / name)
        written.append(name)
    if fmt == "hf" and loaded.tokenizer_files:  # the same tokenizer for AutoTokenizer
        written += write_hf_tokenizer(load_tokenizer(out), out)
    if loaded.run_config is not None:
        (out / RUN_CONFIG).write_text(dump_config(loaded.run_config))
        written.append(RUN_CONFIG)
    if loaded.eval_results is not None:
        (out / EVAL_NAME).write_text(json.dumps(loaded.eval_results, indent=2) + "\n")
        written.append(EVAL_NAME)
    (out / "README.md").write_text(model_card(loaded, fmt=fmt, dtype=dtype))
    return [*written, "README.md"]


def write_target(kind: str, loaded: Loaded, out: str | Path, *, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = 0, force: bool = False, quiet: bool = False,
                 deepspeed_options: dict | None = None) -> list[str]:
    """Write `loaded` as format `kind` into folder `out` (atomically); returns the files."""
    fmt = get_format(kind, write=True)
    dtype = dtype or next(loaded.model.parameters()).dtype
    out = Path(out)
    check_output(out, force=force)
    with atomic_folder(out) as tmp:
        files = fmt.writer(loaded, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes, final=out,
                           quiet=quiet, options=deepspeed_options)
        if fmt.card:
            files += _write_extras(loaded, tmp, fmt=kind, dtype=dtype)
        if fmt.card:  # written last: size and sha256 of every file of the export
            write_manifest(tmp, None)
            files.append(MANIFEST)
        sizes = {f: (tmp / f).stat().st_size for f in files if (tmp / f).is_file()}
        for f in tmp.iterdir():  # safetensors writes 0600; exports are meant to be shared
            if f.is_file():
                f.chmod(0o644)
    for f in files:
        size = human_bytes(sizes[f]) if f in sizes else ""
        _say(f"wrote {out / f} {size}", quiet)
    return files


def record_eval(folder: Path, model: torch.nn.Module, result: dict) -> None:
    """Store an eval result in a model folder (eval.json, keyed split/protocol) and refresh the
    README card, each file replaced atomically."""
    path = folder / EVAL_NAME
    evals = json.loads(path.read_text()) if path.is_file() else {}
    evals[f"{result['split']}/{result['protocol']}"] = {
        k: result[k] for k in ("loss", "bits_per_byte", "bits_per_char", "ppl_per_word",
                               "ppl_per_token", "tokens", "segment_len", "mem_len", "clamp_len",
                               "same_length", "data", "memory", "memory_gain_bits_per_token",
                               "recall") if k in result}
    run_cfg, toks, _ = _read_extras(folder)
    loaded = Loaded(model=model, source=str(folder), run_config=run_cfg, tokenizer_files=toks,
                    eval_results=evals)
    fmt = detect_format(folder)
    dtype = next(model.parameters()).dtype
    for name, text in ((EVAL_NAME, json.dumps(evals, indent=2) + "\n"),
                       ("README.md", model_card(loaded, fmt=fmt, dtype=dtype))):
        atomic_write(folder / name, text.encode())
    if (folder / MANIFEST).is_file():
        update_manifest(folder, [EVAL_NAME, "README.md"])
