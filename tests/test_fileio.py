"""fileio: the one atomic write (of a file, of a folder) and checksums."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lamemo_ds.fileio import atomic_folder, atomic_write, sha256_file

pytestmark = pytest.mark.unit


def test_atomic_write_bytes_and_writer(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write(path, b"one")
    assert path.read_bytes() == b"one"
    atomic_write(path, lambda f: torch.save({"x": torch.arange(3)}, f))
    assert torch.equal(torch.load(path)["x"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # no temp file left


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write(path, b"old")

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_folder_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "f").write_text("2")
        raise RuntimeError("conversion failed")
    assert (out / "f").read_text() == "1"
    with atomic_folder(out) as tmp:
        (tmp / "g").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["g"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sha256_file_reads_in_chunks(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "d").write_bytes(data)
    assert sha256_file(tmp_path / "d", chunk=777) == hashlib.sha256(data).hexdigest()
