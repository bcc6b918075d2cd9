"""Scaling curves (issue 22): how cost grows with the work, for lamemo, xl and none, on CPU.

    python bench/scaling.py --json bench/scaling.json --plots bench   # ~20 min on 2 busy cores
    python bench/scaling.py --tiny                                     # well under a minute (CI)
    python bench/scaling.py --only train_mem,eval_mem                  # a subset of the curves

Curves (each point in a fresh process, bench/scaling_points.py, one torch thread):
- train_mem / train_seg: forward + backward + Adam step time and peak memory against the memory
  length M (N fixed) and the segment length N (M fixed);
- eval_mem: evaluation tokens/s and peak memory (`lamemo_ds.evaluation.run_eval`) against the
  evaluation memory length, clamp_len = training N + M;
- ckpt: checkpoint save and load time against parameter count, ZeRO stage 0-3 (DeepSpeed on
  CPU/gloo, one process, through CheckpointManager: sha256 manifest on save, verified on load);
- prepare: `lamemo prepare` MB/s against corpus size, every tokenizer kind, on a generated text
  corpus (under --tmp, never the repository);
- loader: stream-loader tokens/s against the number of streams;
- state: the memory state's bytes against streams and layers (computed, `state_bytes_per_stream`).

Peak memory is the growth of a point's peak RSS (getrusage) over its baseline after imports.
Timings of one curve are interleaved: at every point the models run one after the other, the
order rotating, so other jobs on the machine slow them alike. Each curve gets a log-log fit
(cost ~ x^k); lamemo's cost above xl's gets its own, the paper's claim being linear in M.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scaling_report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODELS = ("lamemo", "xl", "none")
FULL = {"train_mem": [32, 64, 128, 256, 512, 1024], "train_seg": [32, 64, 128, 256, 512],
        "eval_mem": [64, 128, 256, 512, 1024, 2048], "ckpt_d": [128, 256, 512, 1024],
        "ckpt_stages": [0, 1, 2, 3], "prepare_cap_mb": {},
        "prepare_mb": [8, 64, 1024], "loader_rows": [1, 4, 16, 64, 256]}
TINY = {"train_mem": [8, 16, 32], "train_seg": [8, 16, 32], "eval_mem": [8, 16, 32],
        "ckpt_d": [32, 64], "ckpt_stages": [0, 3], "prepare_mb": [1, 2], "prepare_cap_mb": {},
        "loader_rows": [1, 4]}
CURVES = ("train_mem", "train_seg", "eval_mem", "ckpt", "prepare", "loader", "state")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seg-len", type=int, default=128, help="N of the memory curves")
    p.add_argument("--mem-len", type=int, default=128, help="M of the segment curve and of "
                   "the evaluated models' training")
    p.add_argument("--steps", type=int, default=3, help="timed steps per point (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per point")
    p.add_argument("--tokenizers", default="byte,char,word,bpe")
    p.add_argument("--only", default=",".join(CURVES), help="curves: " + ", ".join(CURVES))
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="scratch space: a folder "
                   "scaling-PID under it holds the generated corpus, prepared data and "
                   "checkpoints, and is removed at the end")
    p.add_argument("--plots", default=str(HERE), help="folder for the PNG plots")
    p.add_argument("--tiny", action="store_true", help="seconds-long sizes (CI)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    a.sizes = TINY if a.tiny else FULL
    a.tmp = str(Path(a.tmp) / f"scaling-{os.getpid()}")
    if a.tiny:
        a.d_model, a.layers, a.heads, a.batch, a.seg_len, a.mem_len = 32, 2, 2, 2, 16, 16
        a.steps, a.tokenizers = 1, "byte,char"
    return a


def point(a, **p) -> dict:
    """One point in a fresh process (bench/scaling_points.py): its JSON result. --tiny runs it
    in this process (seconds instead of minutes; its peak memory then means little)."""
    if a.tiny:
        import scaling_points

        return scaling_points.measure(p)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(HERE / "scaling_points.py"), json.dumps(p)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"point {p} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_args(a) -> dict:
    return {"d_model": a.d_model, "layers": a.layers, "heads": a.heads, "batch": a.batch,
            "threads": a.threads}


def interleaved(a, xs: list[int], make) -> dict[str, list[dict]]:
    """At each x every model once, the order rotating: {memory: [result per x]}."""
    out: dict[str, list[dict]] = {m: [] for m in MODELS}
    for i, x in enumerate(xs):
        k = i % len(MODELS)
        for m in MODELS[k:] + MODELS[:k]:
            out[m].append(dict(point(a, **make(m, x)), x=x))
    return out


def train_curves(a) -> dict:
    base = dict(model_args(a), kind="train", warmup=1, steps=a.steps)
    res = {}
    if "train_mem" in a.only:
        res["train_mem"] = interleaved(a, a.sizes["train_mem"], lambda m, x: dict(
            base, memory=m, seg_len=a.seg_len, mem_len=x))
    if "train_seg" in a.only:
        res["train_seg"] = interleaved(a, a.sizes["train_seg"], lambda m, x: dict(
            base, memory=m, seg_len=x, mem_len=a.mem_len))
    if "eval_mem" in a.only:
        res["eval_mem"] = interleaved(a, a.sizes["eval_mem"], lambda m, x: dict(
            model_args(a), kind="eval", memory=m, seg_len=a.seg_len, mem_len=a.mem_len,
            eval_mem=x, clamp_len=a.seg_len + a.mem_len, segments=a.steps + 1))
    return res


def ckpt_curve(a) -> dict[str, list[dict]]:
    """Save/load per ZeRO stage against model width (2 layers); the stages interleaved."""
    st = a.sizes["ckpt_stages"]
    out: dict[str, list[dict]] = {f"zero{s}": [] for s in st}
    for i, d in enumerate(a.sizes["ckpt_d"]):
        for s in st[i % len(st):] + st[:i % len(st)]:
            r = point(a, kind="ckpt", d_model=d, layers=2, zero_stage=s, tmp=a.tmp,
                      threads=a.threads)
            out[f"zero{s}"].append(dict(r, x=r["params"], d_model=d))
    return out


def make_corpus(folder: Path, mb: int) -> None:
    """`mb` MB of text in 1 MB files: Zipf-distributed pseudo-words from a fixed 5,000-word
    vocabulary in lines (seeded). 16 distinct files at most, linked to fill the size: the
    tokenizers' work is the same, the disk holds 16 MB."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(22)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(5000)]
    size = min(1 << 20, mb << 20)
    for i in range(mb if mb >= 1 else 1):
        path = folder / f"doc{i:05d}.txt"
        if i >= 16:
            os.link(folder / f"doc{i % 16:05d}.txt", path)
            continue
        ids = np.minimum(rng.zipf(1.2, size=size // 5), 5000) - 1
        words = [vocab[j] for j in ids]
        lines = [" ".join(words[k:k + 12]) for k in range(0, len(words), 12)]
        path.write_text(("\n".join(lines) + "\n")[:size])


def prepare_curve(a) -> dict[str, list[dict]]:
    """MB/s per tokenizer against corpus size (every core); the tokenizers interleaved. A
    tokenizer with a cap in the sizes (none in the full run) stops at it."""
    toks, cores, cap = a.tokenizers.split(","), os.cpu_count() or 1, a.sizes["prepare_cap_mb"]
    out: dict[str, list[dict]] = {t: [] for t in toks}
    tmp = Path(a.tmp)
    for i, mb in enumerate(a.sizes["prepare_mb"]):
        corpus = tmp / f"corpus-{mb}"
        make_corpus(corpus, mb)
        for t in toks[i % len(toks):] + toks[:i % len(toks)]:
            if mb > cap.get(t, mb):
                continue
            dest = tmp / f"prepared-{t}-{mb}"
            r = point(a, kind="prepare", input=str(corpus), tokenizer=t, out=str(dest),
                      workers=cores, threads=a.threads)
            out[t].append(dict(r, x=mb, workers=cores))
            if not (t == "byte" and mb == a.sizes["prepare_mb"][0]):  # the loader reads it
                shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(corpus, ignore_errors=True)
    smallest = a.sizes["prepare_mb"][0]  # one core against every core, at the smallest size
    corpus = tmp / f"corpus-{smallest}"
    make_corpus(corpus, smallest)
    out["one_core"] = []
    for t in toks:
        r = point(a, kind="prepare", input=str(corpus), tokenizer=t, out=str(tmp / "one-core"),
                  workers=1, threads=a.threads)
        out["one_core"].append(dict(r, x=smallest, tokenizer=t, workers=1))
    shutil.rmtree(corpus, ignore_errors=True)
    return out


def loader_curve(a, data: Path) -> list[dict]:
    seconds = 0.3 if a.tiny else 1.5
    seg = 16 if a.tiny else 512
    return [dict(point(a, kind="loader", data=str(data), rows=r, seg_len=seg, seconds=seconds,
                       threads=a.threads), x=r) for r in a.sizes["loader_rows"]]


def state_table(a) -> list[dict]:
    """Bytes of the memory state (fp32) per stream and for 64 streams, by layers: computed."""
    from lamemo_ds.model import ModelConfig
    from lamemo_ds.model.flops import state_bytes_per_stream

    rows = []
    for layers in (2, 4, 12, 24, 48):
        for m in MODELS:
            cfg = ModelConfig(vocab_size=256, n_layer=layers, d_model=512, n_head=8, d_head=64,
                              d_inner=2048, memory=m, segment_len=512, mem_len=512)
            per = state_bytes_per_stream(cfg)
            rows.append({"memory": m, "layers": layers, "bytes_per_stream": per,
                         "mib_64_streams": 64 * per / 2**20})
    return rows


def run(a) -> dict:
    Path(a.tmp).mkdir(parents=True, exist_ok=True)
    res: dict = {"config": {k: v for k, v in vars(a).items() if k != "sizes"},
                 "sizes": a.sizes, "peak_memory": "peak RSS growth over the baseline after "
                 "imports, each point in a fresh process (resource.getrusage)" if not a.tiny
                 else "--tiny: every point in one process, peak RSS growth over the peak before "
                 "it (not comparable between points)"}
    t0 = time.time()
    try:
        res.update(train_curves(a))
        if "ckpt" in a.only:
            res["ckpt"] = ckpt_curve(a)
        if "prepare" in a.only or "loader" in a.only:
            res["prepare"] = prepare_curve(a)
            first = a.sizes["prepare_mb"][0]
            res["loader"] = loader_curve(a, Path(a.tmp) / f"prepared-byte-{first}")
        if "state" in a.only:
            res["state"] = state_table(a)
    finally:
        shutil.rmtree(a.tmp, ignore_errors=True)
    res["seconds"] = time.time() - t0
    return res


def main(argv=None) -> int:
    a = parse_args(argv)
    a.only = a.only.split(",")
    bad = [c for c in a.only if c not in CURVES]
    if bad:
        print(f"scaling.py: error: --only {bad[0]!r} unknown; choose from {', '.join(CURVES)}",
              file=sys.stderr)
        return 2
    res = run(a)
    res["fits"] = scaling_report.fits(res)
    res["report"] = scaling_report.text(res)
    res["plots"] = scaling_report.plots(res, Path(a.plots))
    print(res["report"])
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
