"""Reading DeepSpeed training checkpoints into one state dict (any ZeRO stage, any precision,
data-parallel or pipeline layout); convert/deepspeed.py builds the model from it.

Weights come from the fp32 master copy wherever DeepSpeed keeps one (the ZeRO partitions of the
optimizer files, merged by deepspeed.utils.zero_to_fp32), else from the module state of
mp_rank_00 (ZeRO 0 in fp32). Before anything is merged every expected file is checked to exist and
to be an intact torch archive (CRC of every entry), so a partial or corrupt checkpoint is refused
with the name of the missing or bad file. Every file is read with the restricted loader
(safe_load.py) or checked with it before DeepSpeed's zero_to_fp32 unpickles it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

from ..config.schema import ConfigError, RunConfig
from .layer_map import LAYER_MAP, MODEL_STATES, logical_state_dict
from .manager import DS_TAG, MANIFEST, RUN_CONFIG, CheckpointError, locate, verify
from .safe_load import UntrustedCheckpointError, check_files, load_pt

MODEL_STATES_3 = "zero_pp_rank_{r}_mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_{r}_mp_rank_00_optim_states.pt"


def ds_folder(step: Path) -> Path:
    """Where DeepSpeed's files are: step/deepspeed (`lamemo train`) or the folder itself."""
    return step / DS_TAG if (step / DS_TAG).is_dir() else step


def verify_manifest(step: Path) -> None:
    """Sizes and sha256 of every file against the manifest `lamemo train` writes last."""
    if (step / MANIFEST).is_file() or (step / DS_TAG).is_dir():
        reason = verify(step)
        if reason is not None:
            raise CheckpointError(f"{step}: {reason}")


def _check_archive(path: Path) -> None:
    """A torch.save zip archive whose entries all pass their CRC."""
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"corrupt or truncated checkpoint file {path}: {e}") from e
    if bad is not None:
        raise CheckpointError(f"corrupt checkpoint file {path}: entry {bad} fails its CRC")


def _find_optim(step: Path, rank: int) -> Path:
    """The optimizer partition of `rank` (bf16 optimizers prefix the name with 'bf16_')."""
    name = OPTIM_STATES.format(r=rank)
    for cand in (step / name, step / f"bf16_{name}"):
        if cand.is_file():
            return cand
    raise CheckpointError(f"missing checkpoint file {step / name} (the checkpoint was written "
                          "by more ranks than left files: partial copy or interrupted save?)")


def _load(path: Path) -> dict:
    try:
        return load_pt(path)
    except UntrustedCheckpointError:
        raise
    except Exception as e:  # unpickling raises many types
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from e


def _widen(module: dict, source: Path, quiet: bool) -> dict:
    half = [k for k, v in module.items() if v.dtype in (torch.float16, torch.bfloat16)]
    if half and not quiet:
        print(f"note  {source.name}: no fp32 master copy of {module[half[0]].dtype} module "
              "weights; they are widened to fp32")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def read_pipeline(ds: Path, quiet: bool = False) -> tuple[dict, str]:
    """A pipeline-parallel DeepSpeed folder (layer files + layer_map.json) -> LaMemoLM state."""
    files = sorted(ds.glob("layer_*-model_states.pt"))
    if not (ds / LAYER_MAP).is_file():
        raise CheckpointError(f"{ds}: pipeline layer files without {LAYER_MAP}: not written by "
                              "lamemo train, or an interrupted save")
    for f in tqdm(files, desc="verify", unit="file", leave=False):
        _check_archive(f)
    try:
        sd = logical_state_dict(ds)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from e
    return _widen(sd, ds, quiet), f"pipeline layout, {len(files)} layer file(s) verified"


def inspect(step: Path) -> dict:
    """Layout of a step folder: zero stage, dp world size, files; all files verified."""
    stage3 = (step / MODEL_STATES_3.format(r=0)).is_file()
    first = step / (MODEL_STATES_3.format(r=0) if stage3 else MODEL_STATES)
    _check_archive(first)
    states = _load(first)
    world = int(states.get("dp_world_size", 1))
    ds_cfg = states.get("ds_config") or {}
    zero = int((ds_cfg.get("zero_optimization") or {}).get("stage", 3 if stage3 else 0))
    # bf16 without ZeRO still keeps fp32 masters in (bf16_)zero_pp_rank_* partitions
    masters = zero > 0 or (step / f"bf16_{OPTIM_STATES.format(r=0)}").is_file()
    files = [first]
    if stage3:
        files += [step / MODEL_STATES_3.format(r=r) for r in range(1, world)]
    optim = [_find_optim(step, r) for r in range(world)] if masters else []
    for f in tqdm(files[1:] + optim, desc="verify", unit="file", leave=False):
        _check_archive(f)
    return {"zero_stage": zero, "world_size": world, "files": files + optim, "states": states,
            "masters": masters}


def consolidated_state_dict(step: Path, info: dict, quiet: bool = False) -> dict:
    """Full-precision state dict of a verified step folder."""
    if not info["masters"]:
        module = info["states"].get("module")
        if not module:
            raise CheckpointError(f"{info['files'][0]} holds no module weights")
        return _widen(module, info["files"][0], quiet)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds = ds_folder(step)
    check_files(sorted(ds.glob("*.pt")))  # zero_to_fp32 unpickles every file it globs in full
    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(ds.parent), tag=ds.name)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"cannot merge ZeRO-{info['zero_stage']} partitions in {step}: "
                              f"{e}") from e


def find_run_config(step: Path, given: RunConfig | None = None) -> RunConfig:
    """The training config of a checkpoint: `given`, else the first RUN_CONFIG in the step
    folder or up to two folders above it."""
    from ..config.load import load_config

    if given is not None:
        return given
    for folder in (step, step.parent, step.parent.parent):
        if (folder / RUN_CONFIG).is_file():
            return load_config(folder / RUN_CONFIG)
    raise ConfigError(f"no training config found beside {step} (looked for "
                      f"{RUN_CONFIG} in it and two folders up); pass --config")


def read_state_dict(path: str | Path, quiet: bool = False, *,
                    check_manifest: bool = True) -> tuple[Path, dict, str]:
    """(step folder, full-precision state dict, what was read) of the checkpoint `path` names
    (a step folder, or the newest complete one of a run: checkpoint.manager.locate), every file
    verified first (the manifest too unless `check_manifest` is False: checked already)."""
    path = Path(path)
    try:
        step = locate(path)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from e
    if step == path and check_manifest:  # locate verified a run's newest, not a named step
        verify_manifest(step)
    ds = ds_folder(step)
    if any(ds.glob("layer_*-model_states.pt")):
        sd, what = read_pipeline(ds, quiet)
    else:
        info = inspect(ds)
        what = (f"ZeRO-{info['zero_stage']}, {info['world_size']} data-parallel rank(s), "
                f"{len(info['files'])} file(s) verified")
        sd = consolidated_state_dict(step, info, quiet)
    return step, sd, what
