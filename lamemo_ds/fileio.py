"""Small file helpers shared by the data and checkpoint subsystems."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import time
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bounded memory for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
