"""The formats `lamemo convert` and tools/ know, each with its reader and writer.

    reader(path, *, model_config, run_config, quiet, verify) -> Loaded
    writer(loaded, tmp, *, dtype, max_shard_bytes, final, quiet, options) -> files written

A writer fills the temp folder `tmp` that becomes the output folder `final` once it returned
(convert.write_target). `card`: the output also gets the README card, the tokenizer files, the
training config and the eval results of the source (a deepspeed output is a run folder instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import ConfigError
from .loaded import Loaded


@dataclass(frozen=True)
class Format:
    name: str
    help: str
    reader: Callable[..., Loaded] | None
    writer: Callable[..., list[str]] | None
    card: bool = True


# -- readers ---------------------------------------------------------------------------------
def _read_deepspeed(path: Path, *, model_config, run_config, quiet, verify=True) -> Loaded:
    from .deepspeed import read_deepspeed

    return read_deepspeed(path, run_config=run_config, quiet=quiet, check_manifest=verify)


def _read_folder(path: Path, *, model_config, run_config, quiet, verify=True) -> Loaded:
    from .consolidated import read_folder

    return read_folder(path, verify=verify)


def _read_reference(path: Path, *, model_config, run_config, quiet, verify=True) -> Loaded:
    from .reference import read_reference

    return read_reference(path, model_config)


# -- writers ---------------------------------------------------------------------------------
def _write_deepspeed(loaded, tmp, *, dtype, max_shard_bytes, final, quiet, options):
    from .deepspeed import write_deepspeed

    return write_deepspeed(loaded, tmp, final=final, quiet=quiet, **(options or {}))


def _write_consolidated(loaded, tmp, *, dtype, max_shard_bytes, final, quiet, options):
    from .consolidated import write_consolidated

    return write_consolidated(loaded, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)


def _write_hf(loaded, tmp, *, dtype, max_shard_bytes, final, quiet, options):
    from .hf import export_hf

    return export_hf(loaded.model, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)


def _write_reference(loaded, tmp, *, dtype, max_shard_bytes, final, quiet, options):
    from .reference import write_reference

    return write_reference(loaded, tmp, dtype=dtype)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("deepspeed", "a `lamemo train` checkpoint (a run folder, its checkpoints/ or one "
           "step-N/; any ZeRO stage or pipeline layout)", _read_deepspeed, _write_deepspeed,
           card=False),
    Format("consolidated", "model.safetensors (+ index when sharded), config.json, tokenizer, "
           "README card", _read_folder, _write_consolidated),
    Format("hf", "consolidated + transformers code (AutoModelForCausalLM, "
           "trust_remote_code=True)", _read_folder, _write_hf),
    Format("reference", "a state dict of the authors' code, reference.pt (+ our config.json)",
           _read_reference, _write_reference),
)}
FORMATS_IN = tuple(name for name, f in FORMATS.items() if f.reader is not None)
FORMATS_OUT = tuple(name for name, f in FORMATS.items() if f.writer is not None)


def detect_format(path: Path) -> str:
    """The format of the existing `path`, the one rule of every command that reads "any"
    input: a folder with our config.json (and not a step-N/ folder) is an export, "hf" with the
    transformers code, "reference" with reference.pt and no safetensors weights, else
    "consolidated"; anything else (a run folder, its checkpoints/, a step-N/) is "deepspeed"."""
    from ..checkpoint.manager import is_step_folder
    from .consolidated import CONFIG_NAME, WEIGHTS_NAME
    from .hf import MODELING_NAME
    from .reference import REFERENCE_NAME

    if not path.is_dir() or not (path / CONFIG_NAME).is_file() or is_step_folder(path):
        return "deepspeed"
    if (path / MODELING_NAME).is_file():
        return "hf"
    if (path / REFERENCE_NAME).is_file() and not (path / WEIGHTS_NAME).is_file():
        return "reference"
    return "consolidated"


def get_format(name: str, *, write: bool) -> Format:
    """The format `name`, which must have a writer (`write`) or a reader."""
    names = FORMATS_OUT if write else FORMATS_IN
    if name not in names:
        flag = "--to" if write else "--from"
        raise ConfigError(f"{flag} {name!r}: choose one of {', '.join(names)}")
    return FORMATS[name]
