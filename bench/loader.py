"""Stream-loader throughput beside a raw sequential memmap read of the same tokens; prepare MB/s.

Usage: python bench/loader.py [--data DIR] [--rows 32] [--seg-len 512] [--seconds 5] [--tiny]
Without --data it prepares the stdlib demo corpus (byte tokenizer) into a temp folder first and
reports that prepare's throughput. --tiny: a few hundred documents and one second per timing (CI).
Targets (issue 3): >= 10M target tokens/s per process and >= 25% of the memmap figure.
Both sides run back to back in this one process, so outside load hits both (the loader, which
uses a second thread, somewhat harder): compare the ratio, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_prepare(out: Path, tiny: bool) -> dict:
    from lamemo_ds.data.prepare import PrepareOptions, prepare

    o = PrepareOptions(corpus="stdlib", max_docs=300 if tiny else None)
    t0 = time.perf_counter()
    m, _ = prepare(o, out, workers=2, force=True, progress=False)
    dt = time.perf_counter() - t0
    return {"prepare_mb_per_s": m["stats"]["text_bytes"] / dt / 1e6,
            "prepare_seconds": dt, "prepare_text_mb": m["stats"]["text_bytes"] / 1e6}


def bench_loader(data: str, *, rows: int, seg_len: int, seconds: float) -> dict:
    """Real `Batch`es (int64 tensors) through next() with the prefetch thread, default chunk."""
    from lamemo_ds.data.streams import OrderedStreams

    n = 0
    with OrderedStreams(data, "train", seg_len=seg_len, rows=rows, prefetch=8) as s:
        next(s)  # start the prefetch thread outside the timing
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            b = next(s)
            n += b.target.numel()
        dt = time.perf_counter() - t0
    return {"loader_tokens_per_s": n / dt, "loader_chunk_batches": s.chunk}


def bench_memmap(data: str, *, rows: int, seg_len: int, seconds: float) -> float:
    """The physical anchor: sequential [rows * N] slices of the token file, cast to int64."""
    from lamemo_ds.data.manifest import load_manifest

    m = load_manifest(data)
    path = Path(data) / "train" / m.splits["train"]["flat"]["path"]
    tokens = np.memmap(path, dtype=m.dtype, mode="r")
    step, n, pos = rows * seg_len, 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if pos + step > len(tokens):
            pos = 0
        x = np.asarray(tokens[pos:pos + step], dtype=np.int64)
        n += x.size
        pos += step
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a prepared folder (default: prepare the stdlib demo)")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--seg-len", type=int, default=512)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--tiny", action="store_true", help="small corpus, short timings (CI)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args()
    seconds = 1.0 if args.tiny else args.seconds
    res: dict = {"rows": args.rows, "seg_len": args.seg_len}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "demo")
            res |= bench_prepare(Path(data), args.tiny)
        kw = dict(rows=args.rows, seg_len=args.seg_len, seconds=seconds)
        res |= bench_loader(data, **kw)
        res["memmap_tokens_per_s"] = bench_memmap(data, **kw)
    res["loader_fraction_of_memmap"] = res["loader_tokens_per_s"] / res["memmap_tokens_per_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()},
                     indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"loader {res['loader_tokens_per_s'] / 1e6:.1f} M target tok/s "
          f"(target >= 10), memmap {res['memmap_tokens_per_s'] / 1e6:.1f} M tok/s, "
          f"ratio {res['loader_fraction_of_memmap']:.0%} (target >= 25%; "
          f"{res['loader_chunk_batches']} batches per prefetch chunk)")


if __name__ == "__main__":
    main()
