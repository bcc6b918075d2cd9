"""Atomic checkpoints: save, verify, resume with fallback, retention.

Folder layout (under ``<train.output_dir>/checkpoints``; the converter reads it)::

    latest                     text file: the folder name of the newest complete checkpoint
                               (for people and outside tools; lamemo itself finds the newest
                               complete checkpoint with `newest_complete` / `locate` below)
    step-00000100/             one complete checkpoint (the step counts optimizer steps done)
      deepspeed/               engine.save_checkpoint(..., tag="deepspeed"): DeepSpeed's own files,
                               mp_rank_00_model_states.pt (key "module": the LaMemoLM state dict
                               with the model's own parameter names; under ZeRO-3 the weights
                               live in the zero_pp_rank_*_optim_states.pt partitions instead)
                               and zero_pp_rank_*_mp_rank_00_optim_states.pt (ZeRO 1-3)
      lamemo/rank-00000.pt     per-rank training state, one dict of Stateful pieces by name
                               (train/state.py: progress, streams, memory, rng, lr), each
                               saved with its state_dict(): tensors and plain data only, read
                               with checkpoint.safe_load.load_pt (no pickled objects)
      config.yaml              the resolved run config (rebuild the model with
                               config.load.load_config(path).model)
      meta.json                step, world size, data-parallel size, precision, ZeRO stage, time
      manifest.json            written last: every file above with its size and sha256
    step-00000100.tmp-PID-NONCE/  a checkpoint being written by the save of rank 0's process PID
                               (never read; leftovers of killed runs are removed by
                               `remove_stale_temps` when the next run starts)

Save (every rank calls it): rank 0 makes ``step-N.tmp-PID-NONCE`` (a name no other writer uses);
DeepSpeed writes its files; each rank writes its own training state (a temp file named after host,
pid and a nonce + os.replace + fsync); rank 0 writes config, meta and the manifest, renames the temp
folder to ``step-N`` (a step-N that is already there is first moved aside, never written into),
then replaces ``latest`` atomically and deletes all but the newest `keep_last` complete
checkpoints. A crash at any point leaves the previous complete checkpoint untouched; the run lock
(train/runlock.py) keeps a second run from writing into the folder at all. Resume picks the
newest folder whose manifest verifies (sizes and sha256), says why it skipped any newer one,
and all ranks use rank 0's choice; rank 0 also loads every .pt of it with the restricted loader
(safe_load.check_files) before DeepSpeed unpickles any. The folder must be on a file system every
rank sees (as DeepSpeed's own checkpoints require).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..config.errors import UserError
from ..fileio import atomic_write, fsync_dir, sha256_file
from .safe_load import UntrustedCheckpointError, check_files, is_trusted, load_pt

DS_TAG = "deepspeed"
RUN_CONFIG = "config.yaml"  # the resolved training config: in a run, each step-N/, an export
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP_DIR = re.compile(r"^step-\d+\.(tmp|old)")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointError(RuntimeError):
    """A checkpoint or model folder is missing, partial or corrupt; the message names the file."""


class Stateful(Protocol):
    """A piece of training state that saves and restores itself (torch's convention)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


def write_manifest(folder: Path, step: int | None) -> dict:
    """Size and sha256 of every file under `folder` (the manifest itself excluded); written
    last into a checkpoint (step N) and into every export (step None)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"step": step, "created": time.time(), "files": files}
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def update_manifest(folder: Path, names: Iterable[str]) -> None:
    """Re-record the size and sha256 of the files `names` (rewritten in place, e.g. an export's
    eval.json and README card) in `folder`'s manifest; every other entry stays as it was."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for rel in names:
        p = folder / rel
        manifest["files"][rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


def verify(folder: Path) -> str | None:
    """None if `folder` is a complete checkpoint, else the reason (naming the bad file)."""
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"manifest.json unreadable: {e}"
    for rel, info in manifest.get("files", {}).items():
        p = folder / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != info["bytes"]:
            return f"file {rel} has {p.stat().st_size} bytes, manifest says {info['bytes']}"
        if sha256_file(p) != info["sha256"]:
            return f"file {rel} is corrupt (sha256 differs from the manifest)"
    return None


def list_steps(root: Path) -> list[int]:
    """Steps of all step-N folders under the checkpoints folder `root` (complete or not)."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if p.is_dir() and (m := _STEP_DIR.match(p.name)))


def newest_complete(root: Path, log: Callable[[str], None] = lambda msg: None) -> int | None:
    """The step of the newest checkpoint under `root` whose manifest verifies (None: none);
    every newer one skipped is reported to `log` with the reason. The one rule of "latest":
    resume and every reader of a run folder use it."""
    for step in reversed(list_steps(root)):
        path = root / step_dir_name(step)
        reason = verify(path)
        if reason is None:
            return step
        log(f"checkpoint {path} skipped: {reason}; trying an older one")
    return None


def is_step_folder(path: Path) -> bool:
    """A folder holding one checkpoint: DeepSpeed's files, or `lamemo train`'s deepspeed/."""
    return any(path.glob("*model_states.pt")) or (path / DS_TAG).is_dir()


def locate(path: str | Path, log: Callable[[str], None] = lambda msg: None) -> Path:
    """The checkpoint folder `path` names: a step folder itself, else the newest complete
    checkpoint under a checkpoints folder or a run folder (its checkpoints/)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a run folder, its "
                                "checkpoints/ or one step-N/ folder)")
    if is_step_folder(path):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    step = newest_complete(root, log)
    if step is None:
        found = [step_dir_name(s) for s in list_steps(root)]
        raise FileNotFoundError(
            f"{root} holds no complete checkpoint (" + (
                f"{', '.join(found)} failed verification" if found else
                "no step-N folder, no DeepSpeed files") + "); give a step-N folder or the run "
            "folder of a finished `lamemo train`")
    return root / step_dir_name(step)


@dataclass(frozen=True)
class Found:
    """A verified checkpoint chosen for resume."""

    path: Path
    step: int
    meta: dict

    def rank_file(self, rank: int) -> Path:
        return self.path / "lamemo" / f"rank-{rank:05d}.pt"


class CheckpointManager:
    """Orchestrates saving and finding checkpoints; the state itself comes from its owners.

    Args:
        root: the checkpoints folder.
        keep_last: complete checkpoints kept.
        comm: an object with rank, world_size, barrier() and broadcast_int() (parallel.dist.Comm).
        log: where messages go (rank 0 prints them).
        on_phase: called with the name of each save phase as it completes (fault-injection
            tests kill the process there).
    """

    def __init__(self, root: str | Path, *, keep_last: int, comm,
                 log: Callable[[str], None] = print,
                 on_phase: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.comm = comm
        self.log = log
        self.on_phase = on_phase or (lambda name: None)

    # ------------------------------------------------------------------------- save
    def save(self, step: int, *, save_weights: Callable[[str, str], None],
             state: Mapping[str, Stateful], config_text: str, meta: dict) -> Path:
        """Write checkpoint `step` atomically (collective: every rank calls it).

        save_weights(folder, tag) writes the engine's files into folder/tag; `state` is this
        rank's training state, saved as {name: piece.state_dict()}.
        """
        rank_state = {name: piece.state_dict() for name, piece in state.items()}
        final = self.root / step_dir_name(step)
        # rank 0's pid and a nonce name this save's folder (every rank gets rank 0's values)
        pid = self.comm.broadcast_int(os.getpid() if self.comm.rank == 0 else 0)
        nonce = self.comm.broadcast_int(secrets.randbits(32) if self.comm.rank == 0 else 0)
        tmp = final.with_name(f"{final.name}.tmp-{pid}-{nonce:08x}")
        if self.comm.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            (tmp / "lamemo").mkdir(parents=True)  # fails rather than share a folder
        self.comm.barrier()
        self.on_phase("begin")
        save_weights(str(tmp), DS_TAG)
        self.on_phase("deepspeed")
        atomic_write(tmp / "lamemo" / f"rank-{self.comm.rank:05d}.pt",
                     lambda f: torch.save(rank_state, f))
        self.on_phase("rank_state")
        self.comm.barrier()
        if self.comm.rank == 0:
            self._finish(step, tmp, final, config_text, meta)
        self.comm.barrier()
        return final

    def _finish(self, step: int, tmp: Path, final: Path, config_text: str, meta: dict) -> None:
        atomic_write(tmp / RUN_CONFIG, config_text.encode())
        atomic_write(tmp / "meta.json", json.dumps(dict(meta, step=step), indent=1).encode())
        write_manifest(tmp, step)
        self.on_phase("manifest")
        old = None
        if final.exists():  # a re-run of the same step after a resume: move it aside whole
            old = final.with_name(f"{final.name}.old-{secrets.token_hex(4)}")
            os.rename(final, old)
        os.rename(tmp, final)  # fails if a step-N appeared meanwhile: never written into
        fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.on_phase("renamed")
        atomic_write(self.root / "latest", (final.name + "\n").encode())
        self.on_phase("latest")
        self._prune()

    def _prune(self) -> None:
        complete = self.list_steps()
        for step in complete[:-self.keep_last]:
            shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)

    def remove_stale_temps(self) -> list[Path]:
        """Delete the temp folders of saves that never finished (rank 0, at the start of a run
        that holds the run lock: no other writer can be filling them); returns them."""
        stale = [p for p in self.root.glob("step-*") if p.is_dir() and _TEMP_DIR.match(p.name)]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return stale

    # ------------------------------------------------------------------------- resume
    def list_steps(self) -> list[int]:
        """Steps of all step-N folders (complete or not), ascending."""
        return list_steps(self.root)

    def find_latest(self) -> Found | None:
        """Newest verified checkpoint (rank 0 verifies, every rank gets its choice)."""
        chosen = -1
        if self.comm.rank == 0:
            found = newest_complete(self.root, self.log)
            chosen = -1 if found is None else found
        chosen = self.comm.broadcast_int(chosen)
        if chosen < 0:
            return None
        path = self.root / step_dir_name(chosen)
        return Found(path=path, step=chosen, meta=json.loads((path / "meta.json").read_text()))

    @staticmethod
    def require_meta(found: Found, keys: Iterable[str]) -> None:
        """Resume reads `keys` from meta.json: one clear error when a checkpoint written by an
        older lamemo_ds lacks one (e.g. pipeline_stages, not always recorded before)."""
        missing = [k for k in keys if k not in found.meta]
        if missing:
            raise UserError(
                f"{found.path}/meta.json lacks {', '.join(missing)}: it was written by an older "
                "lamemo_ds whose layout this version cannot read; resume it with the lamemo_ds "
                "commit that wrote it, or start anew with --overwrite")

    def check_safe(self, found: Found) -> None:
        """Every .pt of `found` holds plain data only (collective: rank 0 reads them with the
        restricted loader, every rank gets the verdict), so DeepSpeed's load_checkpoint, which
        unpickles in full, meets no code; raises UntrustedCheckpointError on every rank."""
        if is_trusted():
            return
        error: Exception | None = None
        if self.comm.rank == 0:
            try:
                check_files(sorted(found.path.rglob("*.pt")))
            except Exception as e:  # any failure on rank 0 must reach every rank, not hang them
                error = e
        code = self.comm.broadcast_int(0 if error is None else
                                       1 if isinstance(error, UntrustedCheckpointError) else 2)
        if code == 1:
            raise error or UntrustedCheckpointError(
                found.path, reason="a file rank 0 names in its message")
        if code == 2:
            raise RuntimeError(f"cannot read checkpoint {found.path}: " + (
                str(error) if error else "see rank 0's message"))

    @staticmethod
    def load_rank_state(found: Found, rank: int) -> dict:
        """The saved training state of `rank`: {name: state_dict} as written by save()."""
        return load_pt(found.rank_file(rank))

    def load_state(self, found: Found, rank: int, state: Mapping[str, Stateful],
                   names: Iterable[str] | None = None) -> None:
        """Restore the pieces `names` (default: all) of `state` from `rank`'s saved state."""
        saved = self.load_rank_state(found, rank)
        for name in (names if names is not None else state):
            if name not in saved:
                raise KeyError(f"{found.rank_file(rank)} holds no {name!r} state (it has "
                               f"{sorted(saved)}): written by an older lamemo_ds? start from "
                               "scratch with --no-resume, or convert its weights with "
                               "`lamemo convert --to deepspeed`")
            state[name].load_state_dict(saved[name])
