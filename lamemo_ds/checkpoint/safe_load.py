"""The one reader of `.pt` files: it never runs code hidden in a checkpoint.

A `.pt` file is a pickle; unpickling it may call any importable function (a shell command), and
a sha256 manifest does not help, as whoever hands over a folder writes its manifest too. So every
`.pt` that lamemo_ds reads goes through `load_pt`: `torch.load(weights_only=True)`, which builds
only tensors, plain containers and numbers, plus the few classes of ALLOWED, the complete list of
what DeepSpeed 0.19.8 pickles into its checkpoints beside tensors (found by listing the globals of
real ZeRO 0-3, bf16 and pipeline checkpoints; DynamicLossScaler is what fp16 ZeRO saves on a GPU).
Anything else is refused with `UntrustedCheckpointError`, naming the file and the types, before a
single object is built.

DeepSpeed reads some files itself with a full unpickle (engine.load_checkpoint at resume,
zero_to_fp32 when merging ZeRO partitions); `check_files` loads each of them here first, memory
mapped (only the pickle is read), so DeepSpeed only ever sees files that passed.

`--trust-checkpoint` (the CLI runs the command inside `trusting(True)`) restores the full unpickle
for a source the user trusts.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import importlib
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

TRUST_FLAG = "--trust-checkpoint"

# Classes DeepSpeed pickles into its checkpoint files (module path, name), all plain data holders.
ALLOWED: tuple[tuple[str, str], ...] = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),  # ZeRO 1-3 optimizer states
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),  # ZeRO 1-3 (static scale)
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),  # ZeRO 1-3 with fp16 (GPU)
    ("deepspeed.utils.tensor_fragment", "fragment_address"),  # ZeRO 1-2 param slice offsets
)
_ALLOWED_NAMES = {f"{m}.{n}" for m, n in ALLOWED}
# What a training-state file of lamemo_ds before the plain format holds (numpy's RNG state)
_OLD_RANK_STATE = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                   "numpy.ndarray", "numpy.dtype"}

# Whether the command runs with --trust-checkpoint: set only by `trusting` (the CLI, per run).
_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("lamemo_trusted", default=False)


class UntrustedCheckpointError(Exception):
    """A `.pt` file holds an object whose loading would run code (not a CheckpointError: the
    CLI turns it into one line and exit code 2, whatever command read the file)."""

    def __init__(self, path: str | Path, refused: Iterable[str] = (), reason: str = ""):
        self.path, self.refused = Path(path), sorted(refused)
        names = ", ".join(self.refused)
        if reason:
            msg = (f"{self.path} is not plain checkpoint data (the restricted loader met: "
                   f"{reason}): loading it could run code, so it was not loaded; if you trust "
                   f"where this checkpoint came from, rerun with {TRUST_FLAG}")
        elif set(self.refused) <= _OLD_RANK_STATE and self.path.parent.name == "lamemo":
            msg = (f"{self.path} is a training-state file in the old format (pickled numpy "
                   f"objects: {names}); if you trust where it came from, run once with "
                   f"{TRUST_FLAG} (a resumed `lamemo train` then writes its next checkpoint in "
                   "the new, plain format), or train from scratch with --no-resume")
        else:
            msg = (f"{self.path} holds {names}, which is not plain checkpoint data: loading it "
                   "could run code, so it was not loaded; if you trust where this checkpoint "
                   f"came from, rerun with {TRUST_FLAG}")
        super().__init__(msg)


def add_trust_argument(p: argparse.ArgumentParser) -> None:
    """The --trust-checkpoint option of every command that reads `.pt` files."""
    p.add_argument(TRUST_FLAG, dest="trust_checkpoint", action="store_true",
                   help="load .pt files with a full unpickle (may run code they hold): only "
                   "for checkpoints from a source you trust; without it only tensors and "
                   "plain data are read")


@contextlib.contextmanager
def trusting(trusted: bool) -> Iterator[None]:
    """Run the body with full unpickling allowed (`trusted`) or refused (the default)."""
    token = _TRUSTED.set(trusted)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def is_trusted() -> bool:
    return _TRUSTED.get()


def _globals_in(path: Path) -> set[str]:
    """Every global the pickle of `path` names (read without unpickling); empty if unreadable
    (torch.load then reports the file)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        return set(get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip archive, truncated...: left to torch.load's own error
        return set()


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def load_pt(path: str | Path, *, map_location="cpu", mmap: bool = False):
    """torch.load of `path` building only tensors, plain data and ALLOWED (see the module
    docstring); with --trust-checkpoint a full unpickle. Raises UntrustedCheckpointError."""
    import torch

    path = Path(path)
    if _TRUSTED.get():
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    names = _globals_in(path)
    refused = names - _ALLOWED_NAMES
    if refused:
        raise UntrustedCheckpointError(path, refused)
    try:
        with torch.serialization.safe_globals([_resolve(n) for n in sorted(names)]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # what the restricted unpickler met (an opcode...)
        raise UntrustedCheckpointError(path, reason=_reason(str(e))) from None


def _reason(message: str) -> str:
    """The point of torch's weights-only error (its text around it is advice to unpickle)."""
    text = message.partition("WeightsUnpickler error:")[2] or message
    text = text.partition("Check the documentation")[0]
    return " ".join(text.split()) or "an unsupported pickle"


def check_files(paths: Iterable[str | Path]) -> None:
    """Each file loads with `load_pt` (memory-mapped: the pickle is read, the tensor data not),
    so code that reads them with a full unpickle afterwards (DeepSpeed) meets only plain data.
    Nothing is checked under --trust-checkpoint."""
    if _TRUSTED.get():
        return
    for p in paths:
        try:
            load_pt(p, mmap=True)
        except RuntimeError:  # not a zip archive (mmap needs one) or corrupt: read it whole
            load_pt(p)
