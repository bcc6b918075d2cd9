"""Webdataset tar shards with reproducible bytes, plus the flat token file of a split.

A shard is a plain tar (fixed mtime/owner, members in write order) of samples
`{key}.tokens.npy` + `{key}.json`, so `webdataset.WebDataset(urls, shardshuffle=False)` reads it
and two runs of prepare write identical bytes. Shards are written under a temporary name and
renamed when complete; sha256 is computed while writing.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..fileio import sha256_file

BLOCK = 512  # tar block
TAR_OVERHEAD = 8 * BLOCK  # per sample: 2 headers, json, npy header, padding, archive end


class ShardError(RuntimeError):
    """A shard or token file is missing, truncated or corrupted."""


def verify_hint(data_dir: str | Path) -> str:
    return f"run `lamemo prepare --verify {data_dir}` (and re-prepare with --force if it fails)"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


class _HashingFile:
    """File wrapper computing sha256 and size of everything written (for tarfile)."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self.f.flush()
        self.f.close()


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _member(name: str, data: bytes) -> bytes:
    """One tar member (ustar header, data, zero padding) with fixed mtime/owner/mode.

    Written by hand rather than with TarFile so the archive ends right after its two zero
    blocks (TarFile pads to 10 KiB records), which keeps shard sizes exact.
    """
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = (
        len(data), 0, 0o644, 0, 0, "", "")
    head = ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    return head + data + b"\0" * (_padded(len(data)) - len(data))


def npy_bytes(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes one split's samples into consecutive shards of at most `shard_bytes` bytes.

    Args:
        out: the data folder; shards go to `out/split/shard-NNNNNN.tar`.
        split: split name (also the url prefix).
        shard_bytes: size limit per shard; one sample larger than that is the caller's job to cut
            (see `part_tokens`).
        dtype: token dtype of every sample.
    """

    def __init__(self, out: Path, split: str, *, shard_bytes: int, dtype: np.dtype):
        self.out, self.split, self.shard_bytes, self.dtype = out, split, shard_bytes, dtype
        (out / split).mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.token_offset = 0
        self._file: _HashingFile | None = None
        self._cur: dict = {}

    @property
    def part_tokens(self) -> int:
        """Most tokens one sample may hold so that it fits in an empty shard."""
        return max(1, (self.shard_bytes - TAR_OVERHEAD) // self.dtype.itemsize)

    def add(self, key: str, tokens: np.ndarray, meta: dict) -> None:
        payload = npy_bytes(tokens.astype(self.dtype, copy=False))
        body = json.dumps(meta, sort_keys=True).encode()
        need = 2 * BLOCK + _padded(len(payload)) + _padded(len(body))
        if self._file is not None and self._file.size + need + 2 * BLOCK > self.shard_bytes \
                and self._cur["samples"] > 0:
            self._close_shard()
        if self._file is None:
            self._open_shard()
        for name, data in ((f"{key}.tokens.npy", payload), (f"{key}.json", body)):
            self._file.write(_member(name, data))
        c = self._cur
        c["samples"] += 1
        c["documents"] += int(meta.get("part", 0) == 0)
        c["tokens"] += int(tokens.size)

    def _open_shard(self) -> None:
        url = f"{self.split}/shard-{len(self.records):06d}.tar"
        self._file = _HashingFile(self.out / (url + ".tmp"))
        self._cur = {"url": url, "samples": 0, "documents": 0, "tokens": 0,
                     "token_offset": self.token_offset}

    def _close_shard(self) -> None:
        self._file.write(b"\0" * (2 * BLOCK))  # end-of-archive marker
        self._file.close()
        c = self._cur
        c["bytes"], c["sha256"] = self._file.size, self._file.sha.hexdigest()
        (self.out / (c["url"] + ".tmp")).replace(self.out / c["url"])
        self.token_offset += c["tokens"]
        self.records.append(c)
        self._file = None

    def close(self) -> list[dict]:
        if self._file is not None:
            self._close_shard()
        return self.records


class FlatWriter:
    """The split as one token file (what the stream loader memory-maps), hashed while written."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.f = _HashingFile(path.with_name(path.name + ".tmp"))
        self.tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        self.f.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.tokens += int(tokens.size)

    def close(self) -> dict:
        self.f.close()
        self.path.with_name(self.path.name + ".tmp").replace(self.path)
        return {"path": self.path.name, "tokens": self.tokens, "bytes": self.f.size,
                "sha256": self.f.sha.hexdigest()}




def check_file(path: Path, *, size: int, sha256: str, data_dir: Path, what: str) -> None:
    """Raise ShardError naming the file and the --verify command on any size/hash mismatch."""
    if not path.is_file():
        raise ShardError(f"{what} {path} is missing; {verify_hint(data_dir)}")
    actual = path.stat().st_size
    if actual != size:
        raise ShardError(f"{what} {path} has {actual:,} bytes, manifest says {size:,} "
                         f"(truncated or replaced); {verify_hint(data_dir)}")
    if sha256_file(path) != sha256:
        raise ShardError(f"{what} {path} fails its sha256 check (corrupted); "
                         f"{verify_hint(data_dir)}")


def iter_shard(path: Path) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(key, tokens, meta) of every sample of one shard, in order."""
    pending: dict[str, dict] = {}
    try:
        with tarfile.open(path, mode="r") as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                pending.setdefault(key, {})[ext] = data
                s = pending[key]
                if "tokens.npy" in s and "json" in s:
                    del pending[key]
                    toks = np.load(io.BytesIO(s["tokens.npy"]), allow_pickle=False)
                    yield key, toks, json.loads(s["json"])
    except (tarfile.TarError, ValueError, OSError) as e:
        raise ShardError(f"shard {path} cannot be read ({e})") from e
    if pending:
        raise ShardError(f"shard {path}: samples {sorted(pending)} lack tokens.npy or json")
