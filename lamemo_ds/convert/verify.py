"""Is a checkpoint or model folder complete, intact and loadable? (without writing anything)

`verify_path` checks what a conversion of `path` would need, and reports each check:

- a `lamemo train` checkpoint (a run folder, its checkpoints/ or one step-N/): the manifest
  (every file's size and sha256), every DeepSpeed file an intact archive (and, for a pipeline
  layout, every layer file of the layer map), one training-state file per rank holding plain
  data only (checkpoint/safe_load.py: a file that would run code stops `verify`), the training
  config, and the merged weights against the config's shapes, all finite;
- a run folder: also that its newest checkpoint is the newest complete one (a corrupt newer
  step fails, naming the complete one a resume would use);
- a consolidated / hf folder: its manifest (every file's size and sha256), config.json, the
  weights (every shard of the index) against the config's shapes, all finite, and for hf the
  generated code compiles;
- a reference folder: reference.pt against our config.json.

`lamemo verify` and tools/verify_checkpoint.py print the checks and exit 1 if one failed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import deepspeed_files as dsio
from ..checkpoint.manager import DS_TAG, MANIFEST, CheckpointError, locate, verify
from ..checkpoint.safe_load import check_files
from ..config.schema import ConfigError
from . import consolidated
from .registry import detect_format


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _finite(model: torch.nn.Module, where: str) -> Check:
    bad = [n for n, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return Check("values", not bad, f"{where}: all finite" if not bad else
                 f"{where}: non-finite values in {', '.join(bad[:4])}")


def _attempt(checks: list[Check], name: str, fn) -> object | None:
    """Run fn(); on an error record a failed check named `name` and return None."""
    try:
        return fn()
    except (CheckpointError, ConfigError, FileNotFoundError, KeyError, OSError,
            RuntimeError, ValueError) as e:
        checks.append(Check(name, False, str(e)))
        return None


def _verify_step(step: Path, *, located: bool) -> list[Check]:
    checks = [Check("located", True, f"{step}" + (" (the newest complete checkpoint)"
                                                  if located else ""))]
    lamemo = (step / DS_TAG).is_dir()
    if located:
        checks.append(Check("manifest", True, "every file matches its size and sha256"))
    elif lamemo or (step / MANIFEST).is_file():
        checks.append(_manifest_check(step))
    else:
        checks.append(Check("manifest", True, "none (a bare DeepSpeed folder, not written by "
                            "`lamemo train`): files checked one by one below"))
    if lamemo and (step / "meta.json").is_file():
        meta = json.loads((step / "meta.json").read_text())
        files = sorted((step / "lamemo").glob("rank-*.pt"))
        check_files(files)  # plain data only, else UntrustedCheckpointError (exit 2)
        want = meta.get("world_size")
        checks.append(Check("training state", len(files) == want,
                            f"{len(files)} rank file(s) for world size {want}"))
    run_cfg = _attempt(checks, "training config", lambda: dsio.find_run_config(step))
    if run_cfg is not None:
        checks.append(Check("training config", True, f"model.memory={run_cfg.model.memory}, "
                            f"{run_cfg.model.n_layer} layers"))
        from .deepspeed import read_deepspeed

        loaded = _attempt(checks, "weights",
                          lambda: read_deepspeed(step, run_config=run_cfg, quiet=True,
                                                 check_manifest=False))
        if loaded is not None:
            n = loaded.model.num_parameters()
            checks.append(Check("weights", True, f"{n:,} parameters, every DeepSpeed file intact, "
                                "shapes as the config says"))
            checks.append(_finite(loaded.model, "weights"))
    return checks


def _manifest_check(folder: Path) -> Check:
    """Every file of `folder` against its manifest.json (sizes and sha256)."""
    reason = verify(folder)
    return Check("manifest", reason is None, reason or "every file matches its size and sha256")


def _verify_folder(path: Path) -> list[Check]:
    from .reference import read_reference

    checks: list[Check] = []
    if (path / MANIFEST).is_file():
        checks.append(_manifest_check(path))
    else:
        checks.append(Check("manifest", True, "none (written by hand or by an older lamemo): "
                            "sizes and checksums not checked"))
    cfg = _attempt(checks, "config.json", lambda: consolidated.read_model_config(path)[0])
    if cfg is None:
        return checks
    checks.append(Check("config.json", True, f"model.memory={cfg.memory}, {cfg.n_layer} layers"))
    if detect_format(path) == "reference":
        loaded = _attempt(checks, "weights", lambda: read_reference(path, cfg))
        model = None if loaded is None else loaded.model
    else:
        model = _attempt(checks, "weights",
                         lambda: consolidated.load_model_folder(path, verify=False)[0])
    if model is None:
        return checks
    checks.append(Check("weights", True, f"{model.num_parameters():,} parameters, shapes as "
                        "config.json says"))
    checks.append(_finite(model, "weights"))
    code = path / "modeling_lamemo.py"
    if code.is_file():
        ok = _attempt(checks, "hf code", lambda: compile(code.read_text(), str(code), "exec"))
        if ok is not None:
            present = (path / "configuration_lamemo.py").is_file()
            checks.append(Check("hf code", present, "modeling_lamemo.py compiles" + (
                ", configuration_lamemo.py present" if present else
                "; configuration_lamemo.py is missing")))
    return checks


def verify_path(path: str | Path, log=lambda msg: None) -> list[Check]:
    """Every check of `path` (see the module docstring); a failed one has ok=False."""
    path = Path(path)
    if not path.exists():
        return [Check("located", False, f"{path} does not exist")]
    if detect_format(path) != "deepspeed":
        return _verify_folder(path)
    checks: list[Check] = []
    skipped: list[str] = []

    def note(msg: str) -> None:
        skipped.append(msg)
        log(msg)

    step = _attempt(checks, "located", lambda: locate(path, note))
    if step is None:
        return checks
    checks = _verify_step(step, located=step != path)
    if skipped:  # a newer checkpoint failed verification: the run is damaged
        checks.insert(1, Check("newest", False, f"{len(skipped)} newer checkpoint(s) corrupt "
                               f"or incomplete ({'; '.join(skipped)}); the newest complete one, "
                               f"which a resume would use, is {step.name}"))
    return checks
