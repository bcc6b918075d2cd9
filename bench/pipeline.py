"""Pipeline benchmark: step time of P=1 (data-parallel engine) vs P=2 (pipeline) on CPU.

    python bench/pipeline.py [--tiny] [--micro-batches 4] [--steps 5] [--json out.json]

The model is configs/demo.yaml's (--tiny: a 2-layer d=32 one). Each layout runs as real gloo
processes on random streams with memory carried; printed beside the 1F1B bubble estimate
(P-1)/m and the bytes one step sends between stages: per micro-batch and boundary the packed
activation [mb, M+N, d] + meta [mb, 2] int64 forward and its gradient backward.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def model_args(tiny: bool) -> dict:
    if tiny:
        return dict(vocab_size=257, n_layer=2, n_head=2, d_model=32, d_head=16, d_inner=64,
                    segment_len=16, mem_len=16)
    return dict(vocab_size=257, n_layer=4, n_head=4, d_model=128, d_head=32, d_inner=512,
                segment_len=64, mem_len=64)


def bytes_per_step(*, stages: int, micro_batches: int, micro: int, m: dict) -> int:
    rows = m["mem_len"] + m["segment_len"]
    act = micro * rows * m["d_model"] * 4  # fp32 [mb, M+N, d]
    meta = micro * 2 * 8
    return (stages - 1) * micro_batches * (2 * act + meta)


def worker(a) -> None:
    import torch

    from lamemo_ds.config.derive import World, resolve
    from lamemo_ds.config.schema import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from lamemo_ds.model import LaMemoLM
    from lamemo_ds.parallel import dist

    torch.set_num_threads(1)
    m = ModelConfig(dropout=0.0, attention_impl="eager", **model_args(a.tiny))
    cfg = RunConfig(model=m, train=TrainConfig(micro_batch_size=a.micro, grad_accum=a.m,
                                               max_steps=a.steps + 1),
                    parallel=ParallelConfig(pipeline_stages=a.stages))
    denv = dist.discover()
    plan = resolve(cfg, World(world_size=denv.world_size))
    dist.init_distributed(denv, backend="gloo")
    torch.manual_seed(0)
    model = LaMemoLM(m)
    step = _pipeline_step(model, cfg, plan) if a.stages > 1 else _dp_step(model, cfg, plan)
    times = []
    for s in range(a.steps + 1):
        x = torch.randint(0, m.vocab_size, (plan.rows_per_rank, m.segment_len + 1))
        torch.distributed.barrier()
        t0 = time.perf_counter()
        step(x[:, :-1], x[:, 1:], s == 0)
        torch.distributed.barrier()
        times.append(time.perf_counter() - t0)
    if denv.rank == 0:
        print(json.dumps({"step_s": sum(times[1:]) / a.steps}), flush=True)
    torch.distributed.destroy_process_group()
    # Leave without the interpreter's teardown: a gloo/DeepSpeed thread still joinable then
    # aborted a stage ~1 run in 8 ("terminate called without an active exception", SIGABRT)
    # after its work was done and reported.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _dp_step(model, cfg, plan):
    from lamemo_ds.parallel.engine import build_engine

    eng = build_engine(model, cfg, plan).engine
    mb = plan.micro_batch
    states = [model.init_state(mb) for _ in range(plan.grad_accum)]

    def step(x, y, first):
        for i in range(plan.grad_accum):
            rows = slice(i * mb, (i + 1) * mb)
            out = eng(x[rows], states[i], targets=y[rows], return_logits=False)
            eng.backward(out.loss)
            eng.step()
            states[i] = out.state
    return step


def _pipeline_step(model, cfg, plan):
    import torch

    from lamemo_ds.parallel.dist import Comm
    from lamemo_ds.parallel.pipeline_engine import build_pipeline_engine, micro_batches, train_batch
    from lamemo_ds.train.strategy import settle_step

    eng, comm = build_pipeline_engine(model, cfg, plan).engine, Comm()

    def step(x, y, first):
        reset = torch.full((x.shape[0],), first)
        loss = train_batch(eng, micro_batches(x, y, reset, micro_batch=plan.micro_batch))
        settle_step(eng, comm, eng.module.memory, loss=loss, step=0)
    return step


def launch(a, stages: int, tries: int = 2) -> float:
    """Run the P=`stages` workers; a port taken between choosing and binding it is retried."""
    import tempfile

    args = [sys.executable, __file__, "--worker", "--stages", str(stages), "--m", str(a.m),
            "--micro", str(a.micro), "--steps", str(a.steps)] + (["--tiny"] if a.tiny else [])
    for attempt in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        procs, errs = [], []
        for r in range(stages):
            env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RANK=str(r),
                       WORLD_SIZE=str(stages), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)
            errs.append(tempfile.TemporaryFile(mode="w+"))
            procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                          stderr=errs[-1], text=True))
        outs = [p.communicate(timeout=1200)[0] for p in procs]
        tails = []
        for e in errs:
            e.seek(0)
            tails.append(e.read()[-2000:])
            e.close()
        if not any(p.returncode for p in procs):
            line = [ln for ln in outs[0].splitlines() if ln.startswith("{")][-1]
            return json.loads(line)["step_s"]
        busy = any("address already in use" in t.lower() for t in tails)
        if not busy or attempt == tries - 1:
            detail = "\n".join(f"--- rank {r} stderr ---\n{t}" for r, t in enumerate(tails))
            raise RuntimeError(f"P={stages} benchmark failed (exit codes "
                               f"{[p.returncode for p in procs]})\n{detail}")
        print(f"port {port} was taken; retrying P={stages}", file=sys.stderr)
    raise AssertionError("unreachable")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer d=32 model (seconds)")
    p.add_argument("--m", "--micro-batches", dest="m", type=int, default=4,
                   help="micro-batches per step")
    p.add_argument("--micro", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    p.add_argument("--json", help="write the numbers to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stages", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0
    t1, t2 = launch(a, 1), launch(a, 2)
    res = {"model": "tiny" if a.tiny else "demo", "micro_batches": a.m, "micro_batch": a.micro,
           "step_s_p1": t1, "step_s_p2": t2, "speedup_p2": t1 / t2,
           "bubble_estimate_p2": (2 - 1) / a.m,
           "bytes_per_step_p2": bytes_per_step(stages=2, micro_batches=a.m, micro=a.micro,
                                               m=model_args(a.tiny))}
    for k, v in res.items():
        print(f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
