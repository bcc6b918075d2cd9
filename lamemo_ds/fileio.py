"""Small file helpers shared by every folder above: checksums and the one atomic write (of a
file, and of a folder). Plain files only: nothing here knows a format or a process group."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bounded memory for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def unique_temp(path: Path) -> Path:
    """A temp name next to `path` that no other writer (host, process, call) uses."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-"
                          f"{secrets.token_hex(4)}")


def fsync_dir(path: Path) -> None:
    """Make a rename inside folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Replace the file `path` whole or not at all (the one atomic write of the package).

    `data` is the bytes, or a function that writes into the open file (e.g. `torch.save`). It
    goes to a unique temp file in the same folder, is fsynced, renamed over `path` and the
    folder fsynced: a reader (or a restart after a kill) sees the old file or the new one.
    """
    path = Path(path)
    tmp = unique_temp(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """The folder counterpart of `atomic_write`: yield a temp folder beside `out`, which
    replaces `out` only when the block succeeds (a failure leaves nothing behind, and an
    existing `out` is replaced only after the new one is complete)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
