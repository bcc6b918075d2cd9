"""One measured point of bench/scaling.py, run in a fresh process so its peak memory is its own.

    python bench/scaling_points.py '{"kind": "train", "memory": "lamemo", "mem_len": 256, ...}'

prints one JSON line: the timings and `peak_mib`, the growth of this process's peak RSS
(`resource.getrusage`) over its baseline read after every import, i.e. what the point itself
allocated at its peak (model, optimizer state, activations, buffers).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lamemo_ds.evaluation import ModelScorer, run_eval
from lamemo_ds.model import LaMemoLM, ModelConfig


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def model_config(p: dict, memory: str) -> ModelConfig:
    d = p["d_model"]
    return ModelConfig(vocab_size=p.get("vocab", 256), n_layer=p["layers"], d_model=d,
                       n_head=p["heads"], d_head=d // p["heads"], d_inner=4 * d,
                       dropout=p.get("dropout", 0.0), memory=memory, segment_len=p["seg_len"],
                       mem_len=p["mem_len"], attention_impl="eager")


def tokens(p: dict, n_seg: int) -> torch.Tensor:
    """Random tokens [B, n_seg * N + 1]: segment s is inputs [:, sN:(s+1)N], targets shifted."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, p.get("vocab", 256), (p["batch"], n_seg * p["seg_len"] + 1),
                         generator=g)


def train_point(p: dict) -> dict:
    """Median seconds of a forward + backward + Adam step, memory carried between steps."""
    torch.manual_seed(0)
    model = LaMemoLM(model_config(p, p["memory"])).train()
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-4, fused=True)
    n, n_seg = p["seg_len"], p["warmup"] + p["steps"]
    data, state, times = tokens(p, n_seg), None, []
    for s in range(n_seg):
        t0 = time.perf_counter()
        out = model(data[:, s * n:(s + 1) * n], state, targets=data[:, s * n + 1:(s + 1) * n + 1])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state = out.state
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[p["warmup"]:])
    return {"step_s": step_s, "tokens_per_s": p["batch"] * n / step_s}


def eval_point(p: dict) -> dict:
    """Tokens/s of the package's evaluation (`run_eval` over a `ModelScorer`) with an eval
    memory of `eval_mem` (the model is built with the training `mem_len`)."""
    torch.manual_seed(0)
    model = LaMemoLM(model_config(p, p["memory"]))
    n, b = p["seg_len"], p["batch"]
    data = tokens(p, p["segments"] + 1)
    batches = [SimpleNamespace(input=data[:, s * n:(s + 1) * n],
                               target=data[:, s * n + 1:(s + 1) * n + 1],
                               reset=torch.full((b,), s == 0), index=s)
               for s in range(p["segments"] + 1)]
    scorer = ModelScorer(model, mem_len=p["eval_mem"], clamp_len=p["clamp_len"])
    run_eval(scorer, batches[:1])  # warm-up: allocator, first-call costs
    t0 = time.perf_counter()
    res = run_eval(scorer, batches[1:])
    dt = time.perf_counter() - t0
    return {"tokens_per_s": res.tokens / dt, "seconds": dt}


def ckpt_point(p: dict) -> dict:
    """Save and load time of one training checkpoint (DeepSpeed engine on CPU/gloo, one
    process) through the package's CheckpointManager, as the trainer does it."""
    from lamemo_ds.checkpoint.manager import DS_TAG, CheckpointManager
    from lamemo_ds.config.derive import World, resolve
    from lamemo_ds.config.load import dump_config, load_config
    from lamemo_ds.parallel.dist import Comm, DistEnv, _free_port, init_distributed
    from lamemo_ds.parallel.engine import build_engine

    d, layers = p["d_model"], p["layers"]
    cfg = load_config("debug", [f"model.d_model={d}", f"model.n_layer={layers}",
                                "model.n_head=4", f"model.d_head={d // 4}",
                                f"model.d_inner={4 * d}", "model.vocab_size=256",
                                f"parallel.zero_stage={p['zero_stage']}"])
    init_distributed(DistEnv(master_port=_free_port()), backend="gloo")
    model = LaMemoLM(cfg.model)
    params = model.num_parameters()  # before ZeRO-3 partitions them away
    engine = build_engine(model, cfg, resolve(cfg, World())).engine
    x = torch.randint(0, 256, (2, cfg.model.segment_len))
    engine.backward(engine(x, targets=x).loss)  # one step: the optimizer state exists
    engine.step()
    with tempfile.TemporaryDirectory(dir=p.get("tmp")) as tmp:
        mgr = CheckpointManager(tmp, keep_last=2, comm=Comm(), log=lambda msg: None)
        save = lambda folder, tag: engine.save_checkpoint(folder, tag=tag, save_latest=False)  # noqa: E731
        t0 = time.perf_counter()
        path = mgr.save(1, save_weights=save, state={}, config_text=dump_config(cfg), meta={})
        t_save = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        t0 = time.perf_counter()
        found = mgr.find_latest()  # verifies every file's sha256, as a resume does
        mgr.check_safe(found)
        engine.load_checkpoint(str(found.path), tag=DS_TAG)
        t_load = time.perf_counter() - t0
    return {"params": params, "save_s": t_save,
            "load_s": t_load, "bytes": size}


def prepare_point(p: dict) -> dict:
    """`lamemo prepare --corpus files` of a generated text folder, MB/s of UTF-8 text."""
    from lamemo_ds.data.prepare import PrepareOptions, prepare

    o = PrepareOptions(corpus="files", input=p["input"], tokenizer=p["tokenizer"],
                       pattern="*.txt", bpe_vocab=p.get("bpe_vocab", 8192))
    t0 = time.perf_counter()
    m, _ = prepare(o, p["out"], workers=p["workers"], force=True, progress=False)
    dt = time.perf_counter() - t0
    mb = m["stats"]["text_bytes"] / 1e6
    return {"seconds": dt, "text_mb": mb, "mb_per_s": mb / dt}


def loader_point(p: dict) -> dict:
    """Target tokens/s of the ordered stream loader (bench/loader.py's measurement)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import loader

    return loader.bench_loader(p["data"], rows=p["rows"], seg_len=p["seg_len"],
                               seconds=p["seconds"])


POINTS = {"train": train_point, "eval": eval_point, "ckpt": ckpt_point,
          "prepare": prepare_point, "loader": loader_point}


def measure(p: dict) -> dict:
    """Point `p` with its peak RSS growth (`peak_mib`) over the peak before it."""
    torch.set_num_threads(p.get("threads", 1))
    base = peak_rss_mib()
    out = POINTS[p["kind"]](p)
    out["peak_mib"] = peak_rss_mib() - base
    return out


def main() -> int:
    print(json.dumps(measure(json.loads(sys.argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
