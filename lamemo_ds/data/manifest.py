"""manifest.json: what a prepared data folder holds, and the checks that it is intact.

The manifest is written last (atomically), so its presence means prepare finished. It lists per
split every shard (url, samples, documents, tokens, bytes, sha256, cumulative token offset) and
the flat token file the stream loader memory-maps, the UTF-8 bytes of its text (`text_bytes`:
bits per byte of BPE runs, evaluation.Units), plus corpus statistics and the tokenizer id.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from .shards import ShardError, check_file, iter_shard, verify_hint

MANIFEST = "manifest.json"
FORMAT = "lamemo-shards/1"


class Manifest(dict):
    """The parsed manifest.json (a dict) with a few typed accessors."""

    @property
    def vocab_size(self) -> int:
        return int(self["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self["tokenizer"]["eos_id"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self["dtype"])

    @property
    def splits(self) -> dict:
        return self["splits"]

    @property
    def tokenizer(self) -> dict:
        return self["tokenizer"]

    def split(self, name: str) -> dict:
        if name not in self["splits"]:
            raise KeyError(f"split {name!r} not in {self.get('_dir')}/{MANIFEST} "
                           f"(it has {sorted(self['splits'])})")
        return self["splits"][name]


def load_manifest(data_dir: str | Path) -> Manifest:
    """Read and sanity-check `data_dir/manifest.json`."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the data first, e.g. "
                                f"`lamemo prepare --corpus stdlib --out {data_dir}`")
    try:
        m = Manifest(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e}); re-run prepare with --force") from e
    if m.get("format") != FORMAT:
        raise ShardError(f"{path}: format {m.get('format')!r}, expected {FORMAT!r}; "
                         "re-run prepare with --force")
    m["_dir"] = str(data_dir)
    return m


def write_manifest(data_dir: Path, manifest: dict) -> None:
    """Atomic write (temp + fsync + rename): a crash never leaves a half manifest."""
    body = json.dumps({k: v for k, v in manifest.items() if k != "_dir"}, indent=1,
                      sort_keys=True)
    tmp = data_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(data_dir / MANIFEST)


def verify(data_dir: str | Path, *, deep: bool = True) -> list[str]:
    """Re-check every shard and flat token file; return a list of problems (empty: all good).

    deep=True also decodes every shard and checks that its samples' tokens equal the flat file.
    """
    d = Path(data_dir)
    m = load_manifest(d)
    problems = []
    for split, info in m.splits.items():
        flat = d / split / info["flat"]["path"]
        try:
            check_file(flat, size=info["flat"]["bytes"], sha256=info["flat"]["sha256"],
                       data_dir=d, what="token file")
            tokens = np.memmap(flat, dtype=m.dtype, mode="r") if deep else None
        except ShardError as e:
            problems.append(str(e))
            tokens = None
        for rec in info["shards"]:
            try:
                check_file(d / rec["url"], size=rec["bytes"], sha256=rec["sha256"],
                           data_dir=d, what="shard")
                if deep:
                    _check_contents(d / rec["url"], rec, tokens)
            except ShardError as e:
                problems.append(str(e))
    return problems


def _check_contents(path: Path, rec: dict, tokens: np.ndarray | None) -> None:
    pos, n = rec["token_offset"], 0
    for _key, toks, _meta in iter_shard(path):
        if tokens is not None and not np.array_equal(tokens[pos:pos + toks.size], toks):
            raise ShardError(f"shard {path}: tokens at offset {pos} differ from the token file")
        pos += toks.size
        n += 1
    if n != rec["samples"] or pos - rec["token_offset"] != rec["tokens"]:
        raise ShardError(f"shard {path}: {n} samples / {pos - rec['token_offset']} tokens, "
                         f"manifest says {rec['samples']} / {rec['tokens']}; "
                         f"{verify_hint(path.parent.parent)}")


def open_tokens(data_dir: str | Path, split: str, *, verify_sha: bool = True) -> np.memmap:
    """The split as one memory-mapped token array (documents separated by EOS).

    The flat file written by prepare is checked against the manifest's size and sha256; if it is
    missing or damaged it is rebuilt from the (sha256-checked) shards under a per-process temp
    name and renamed, so concurrent ranks never see a partial file.
    """
    d = Path(data_dir)
    m = load_manifest(d)
    info = m.split(split)
    flat = d / split / info["flat"]["path"]
    want = {"size": info["flat"]["bytes"], "sha256": info["flat"]["sha256"]}
    try:
        if verify_sha:
            check_file(flat, **want, data_dir=d, what="token file")
        elif not flat.is_file() or flat.stat().st_size != want["size"]:
            raise ShardError(f"token file {flat} missing or wrong size")
    except ShardError as e:
        _rebuild_flat(d, m, split, flat)
        check_file(flat, **want, data_dir=d, what="rebuilt token file")
        print(f"data: rebuilt {flat} from the {split} shards ({e})", file=sys.stderr, flush=True)
    if info["flat"]["tokens"] == 0:
        return np.zeros(0, dtype=m.dtype)
    return np.memmap(flat, dtype=m.dtype, mode="r")


def _rebuild_flat(d: Path, m: Manifest, split: str, flat: Path) -> None:
    tmp = flat.with_name(f"{flat.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for rec in m.split(split)["shards"]:
                check_file(d / rec["url"], size=rec["bytes"], sha256=rec["sha256"], data_dir=d,
                           what="shard")
                for _key, toks, _meta in iter_shard(d / rec["url"]):
                    f.write(toks.astype(m.dtype, copy=False).tobytes())
        tmp.replace(flat)
    finally:
        tmp.unlink(missing_ok=True)
