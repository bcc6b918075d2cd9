"""A run folder's history, checked before start-up: fresh starts, `--overwrite`, resume changes.

- A fresh start (`--no-resume`, `checkpoint.resume=false`) into a folder that holds checkpoints
  is refused: the next plain run (a Slurm requeue) would resume the *old* run's newest step and
  drop the new one. `--overwrite` moves the old run aside instead (`supersede`), deleting nothing.
- A resume whose model differs from the checkpoint's config.yaml would fail inside DeepSpeed
  with raw size mismatches; one whose schedule (max_steps, lr, warmup...) differs would silently
  train another schedule. `resume_changes` names each difference; the first is refused, the
  second needs `train.allow_schedule_change=true`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path

from ..config.errors import UserError
from ..config.load import load_config, to_dict
from ..config.schema import ConfigError, RunConfig
from ..fileio import sha256_file
from .manager import MANIFEST, RUN_CONFIG, list_steps, step_dir_name

SUPERSEDED = "superseded-"
# model fields a resume may change: they shape no tensor and no saved state
RESUMABLE_MODEL = frozenset({"dropout", "dropatt", "attention_impl", "init_std",
                             "proj_init_std", "clamp_len", "same_length"})
SCHEDULE = (("train", "max_steps"), ("optim", "lr"), ("optim", "warmup_steps"),
            ("optim", "schedule"), ("optim", "min_lr"))


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the step-N folders under `run`/checkpoints (complete or not)."""
    return list_steps(Path(run) / "checkpoints")


def refuse_fresh_start(run: Path) -> None:
    """A fresh start into `run` is refused while it holds checkpoints of another run."""
    steps = checkpoint_steps(run)
    if steps:
        raise UserError(
            f"--no-resume: {run} already holds checkpoints (newest {step_dir_name(steps[-1])}); "
            "a later plain run (a requeue) would resume those, not the new run. Give another "
            "train.output_dir, or add --overwrite to move the old run aside into "
            f"{run}/{SUPERSEDED}<UTC time>/ (nothing is deleted)")


def supersede(run: Path) -> Path | None:
    """Move everything the old run left in `run` (checkpoints/, metrics.jsonl, tensorboard/,
    config.yaml, ...) into `run`/superseded-<UTC time>/; returns that folder (None: nothing to
    move). Earlier superseded folders and hidden files (locks) stay where they are."""
    run = Path(run)
    items = sorted(p for p in run.iterdir()
                   if not p.name.startswith((SUPERSEDED, "."))) if run.is_dir() else []
    if not items:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = run / f"{SUPERSEDED}{stamp}", 1
    while dest.exists():
        n += 1
        dest = run / f"{SUPERSEDED}{stamp}-{n}"
    dest.mkdir()
    for p in items:
        os.replace(p, dest / p.name)
    return dest


def resume_config(run: Path) -> tuple[Path, RunConfig] | None:
    """(step folder, its config) of the checkpoint a resume would start from: the newest step
    folder whose config.yaml matches its manifest (the cheap part of the resume check; the
    trainer verifies every file). None when there is none."""
    root = Path(run) / "checkpoints"
    for step in reversed(list_steps(root)):
        folder = root / step_dir_name(step)
        try:
            files = json.loads((folder / MANIFEST).read_text())["files"]
            if sha256_file(folder / RUN_CONFIG) != files[RUN_CONFIG]["sha256"]:
                continue
            return folder, load_config(folder / RUN_CONFIG)
        except (OSError, KeyError, ValueError, ConfigError):
            continue
    return None


def _diff(saved: dict, now: dict, section: str, names) -> list[str]:
    return [f"{section}.{k}: {saved[section].get(k)!r} in the checkpoint, {now[section][k]!r} now"
            for k in names if saved[section].get(k) != now[section][k]]


def resume_changes(saved: RunConfig, cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(model differences that make the checkpoint unloadable, schedule differences)."""
    old, new = to_dict(saved), to_dict(cfg)
    shape = _diff(old, new, "model", [k for k in new["model"] if k not in RESUMABLE_MODEL])
    schedule = [d for section, key in SCHEDULE for d in _diff(old, new, section, [key])]
    return shape, schedule


def check_resume(cfg: RunConfig, run: Path) -> None:
    """Refuse a resume into `run` that changes the model, or the schedule without
    train.allow_schedule_change (see the module docstring)."""
    found = resume_config(run)
    if found is None:
        return
    folder, saved = found
    shape, schedule = resume_changes(saved, cfg)
    if shape:
        raise UserError(
            f"resuming {folder} with another model: {'; '.join(shape)}. Its weights cannot load "
            "into this model: restore those values, or start a new run in another "
            "train.output_dir (or --no-resume --overwrite)")
    stages = saved.parallel.pipeline_stages
    if stages > 1 and cfg.parallel.pipeline_stages == 1:  # the data-parallel reader cannot
        raise UserError(
            f"{folder} was written with parallel.pipeline_stages={stages}; resume it with --set "
            f"parallel.pipeline_stages={stages}, or write it for this layout with `lamemo convert "
            "--from deepspeed RUN --to deepspeed NEW`")
    if schedule and not cfg.train.allow_schedule_change:
        raise UserError(
            f"resuming {folder} would change the schedule: {'; '.join(schedule)}. Pass --set "
            "train.allow_schedule_change=true to continue with the new values, or restore them")


def require_shared_folder(comm, folder: str | Path, *, what: str = "train.output_dir",
                          wait_s: float = 10.0) -> None:
    """Fail on every rank, before any work, when `folder` is not one folder all ranks share.

    Checkpoints are written by every rank into one folder that rank 0 then verifies and
    commits, so the run folder must be on a file system every node mounts (NFS, Lustre, GPFS,
    ...). Rank 0 writes a marker holding a random token; each rank must read that token back
    (retrying up to `wait_s` for slow metadata propagation). `comm` is a parallel.dist.Comm.
    """
    import torch  # only this check needs it

    if comm.world_size == 1:
        return
    token = comm.broadcast_int(secrets.randbits(62) if comm.rank == 0 else 0)
    marker = Path(folder) / f".lamemo-shared-check-{token}"
    if comm.rank == 0:
        Path(folder).mkdir(parents=True, exist_ok=True)
        marker.write_text(str(token))
    comm.barrier()
    deadline, seen = time.monotonic() + wait_s, False
    while not seen:
        try:
            seen = marker.read_text() == str(token)
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    missing = torch.zeros(comm.world_size)
    missing[comm.rank] = float(not seen)
    missing = comm.all_reduce(missing)
    if comm.rank == 0:
        marker.unlink(missing_ok=True)
    bad = [r for r in range(comm.world_size) if missing[r] > 0]
    if bad:
        here = "this rank cannot" if not seen else "this rank can"
        raise RuntimeError(
            f"{what}={folder} is not shared by all ranks: rank(s) {bad} cannot see the file "
            f"rank 0 wrote there ({here}; rank {comm.rank} on host {socket.gethostname()}, "
            f"pid {os.getpid()}). Checkpoints need one folder that every rank reads and "
            f"writes: put {what} on a file system all nodes mount (NFS, Lustre, GPFS, ...).")
