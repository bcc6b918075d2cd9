"""What a reader returns: one model in memory and what travels with it (a leaf: every format
module and the registry import it, it imports none of them)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.manager import RUN_CONFIG
from ..config.schema import RunConfig
from ..data.tokenizer import tokenizer_files

EVAL_NAME = "eval.json"


@dataclass
class Loaded:
    """A model read from some format, plus what travels with it to the output."""

    model: torch.nn.Module
    source: str
    run_config: RunConfig | None = None
    tokenizer_files: dict[str, Path] = field(default_factory=dict)
    """name in the output -> file (data/tokenizer.py:tokenizer_files)."""
    eval_results: dict | None = None
    notes: list[str] = field(default_factory=list)


def read_extras(folder: Path) -> tuple[RunConfig | None, dict[str, Path], dict | None]:
    """(training config, tokenizer files, eval results) stored beside a model in `folder`."""
    from ..config.load import load_config

    run_cfg = None
    if (folder / RUN_CONFIG).is_file():
        run_cfg = load_config(folder / RUN_CONFIG)
    evals = None
    if (folder / EVAL_NAME).is_file():
        evals = json.loads((folder / EVAL_NAME).read_text())
    return run_cfg, tokenizer_files(folder), evals
