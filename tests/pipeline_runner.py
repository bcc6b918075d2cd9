"""One rank of the pipeline equivalence tests (started by tests/test_pipeline_equivalence.py).

`--stages 1`: the data-parallel DeepSpeed engine (one process holds every stream);
`--stages P`: the pipeline engine. Both train the same identically seeded model for `--steps`
steps on the same seeded random streams with memory carried, and write to `--out`:
losses (per step), the gradient of every parameter at step 1 under its LaMemoLM name, and the
tied weights of this rank after the last step: `rank-R.pt` holds one such dict per `--case`.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import shlex
from pathlib import Path

import torch

from lamemo_ds.config.derive import World, resolve
from lamemo_ds.config.schema import ModelConfig, OptimConfig, ParallelConfig, RunConfig, TrainConfig
from lamemo_ds.model import LaMemoLM
from lamemo_ds.parallel import dist


def make_cfg(a) -> RunConfig:
    model = ModelConfig(vocab_size=64, n_layer=a.layers, n_head=2, d_model=16, d_head=8,
                        d_inner=32, dropout=0.0, memory=a.memory, segment_len=6, mem_len=5,
                        attention_impl="eager", cutoffs=(32,) if a.adaptive else (),
                        div_val=2 if a.adaptive else 1)
    train = TrainConfig(micro_batch_size=a.micro, grad_accum=a.accum, max_steps=a.steps,
                        seed=7, activation_checkpointing=a.ckpt, grad_clip=0.25)
    return RunConfig(model=model, optim=OptimConfig(lr=1e-3, schedule="constant"), train=train,
                     parallel=ParallelConfig(zero_stage=a.zero, pipeline_stages=a.stages))


def step_data(step: int, *, streams: int, seg_len: int, vocab: int):
    """Tokens of every global stream for `step` ([S, N] inputs and targets), seeded."""
    g = torch.Generator().manual_seed(1000 + step)
    t = torch.randint(0, vocab, (streams, seg_len + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def capture_grads(engine, names: dict[int, str], into: dict) -> None:
    """Record every parameter's gradient when the first optimizer step runs."""
    opt = engine.optimizer
    inner = opt.step

    def step(*args, **kwargs):
        if not into:
            for p in (q for g in opt.param_groups for q in g["params"]):
                if p.grad is not None and id(p) in names:
                    into[names[id(p)]] = p.grad.detach().clone()
        return inner(*args, **kwargs)

    opt.step = step


def run_reference(cfg, plan, a) -> dict:
    from lamemo_ds.parallel.engine import build_engine

    torch.manual_seed(cfg.train.seed)
    model = LaMemoLM(cfg.model)
    model.activation_checkpointing = a.ckpt
    names = {id(p): n for n, p in model.named_parameters()}
    bundle = build_engine(model, cfg, plan)
    eng, grads, losses = bundle.engine, {}, []
    capture_grads(eng, names, grads)
    mb = plan.micro_batch
    states = [model.init_state(mb) for _ in range(plan.grad_accum)]
    alphas = []  # per step: each layer's mean alpha over the step's micro-batches
    for step in range(a.steps):
        x, y = step_data(step, streams=plan.global_batch, seg_len=cfg.model.segment_len,
                         vocab=cfg.model.vocab_size)
        total, alpha = 0.0, None
        for m in range(plan.grad_accum):
            rows = slice(m * mb, (m + 1) * mb)
            out = eng(x[rows], states[m], targets=y[rows], return_logits=False)
            eng.backward(out.loss)
            eng.step()
            states[m] = out.state
            total += out.loss.item()
            alpha = [a.item() + b for a, b in zip(out.alpha, alpha or [0.0] * len(out.alpha))]
        losses.append(total / plan.grad_accum)
        alphas.append([a / plan.grad_accum for a in alpha])
    tied = {"word_emb": model.word_emb.emb_layers[0].weight.detach().clone()}
    return {"losses": losses, "grads": grads, "tied": tied, "alphas": alphas}


def run_pipeline(cfg, plan, a) -> dict:
    from lamemo_ds.parallel.dist import Comm
    from lamemo_ds.parallel.ds_adapter import is_replica
    from lamemo_ds.parallel.pipeline_engine import build_pipeline_engine, micro_batches, train_batch
    from lamemo_ds.train.strategy import settle_step

    comm = Comm()
    torch.manual_seed(cfg.train.seed)
    model = LaMemoLM(cfg.model)
    logical = {id(p): n for n, p in model.named_parameters()}
    bundle = build_pipeline_engine(model, cfg, plan)
    eng, grads, losses = bundle.engine, {}, []
    capture_grads(eng, logical, grads)
    rows = plan.rows_per_rank
    dp_id = eng.grid.data_parallel_id
    alpha_sums = []  # per step: this rank's [2, n_layer] alpha sums and counts
    for step in range(a.steps):
        x, y = step_data(step, streams=plan.global_batch, seg_len=cfg.model.segment_len,
                         vocab=cfg.model.vocab_size)
        mine = slice(dp_id * rows, (dp_id + 1) * rows)
        reset = torch.full((rows,), step == 0)
        items = micro_batches(x[mine], y[mine], reset, micro_batch=plan.micro_batch)
        loss = train_batch(eng, items)
        settle_step(eng, comm, eng.module.memory, loss=loss, step=step)
        losses.append(loss)
        alpha_sums.append(eng.module.take_alpha_sums())
    io = eng.module.tied_modules["io"]
    tied = {"word_emb": io.word_emb.emb_layers[0].weight.detach().clone(),
            "biases": torch.cat([p.detach().flatten() for p in eng.module.ctx.biases.parameters()])}
    owned = sorted(logical[id(p)] for p in eng.module.parameters() if not is_replica(p))
    return {"losses": losses, "grads": grads, "tied": tied, "stage": eng.stage_id,
            "dp": dp_id, "owned": owned, "alpha_sums": alpha_sums}


def add_case_options(p: argparse.ArgumentParser, *, default=None) -> None:
    """The options that make one case (model, batch, steps); `default` overrides every default
    (argparse.SUPPRESS: a --case string sets only what it names)."""
    def opt(name, value, **kw):
        p.add_argument(name, default=value if default is None else default, **kw)

    opt("--micro", 2, type=int)
    opt("--accum", 2, type=int)
    opt("--layers", 3, type=int)
    opt("--steps", 5, type=int)
    opt("--zero", 0, type=int)
    opt("--memory", "lamemo")
    opt("--ckpt", False, action="store_true")
    opt("--adaptive", False, action="store_true")


def parse_cases(argv=None) -> tuple[argparse.Namespace, list[argparse.Namespace]]:
    """Top-level options, and one namespace per `--case "OPTIONS"` (or the top level alone):
    several cases share one launch, since process start-up dominates these tiny runs."""
    p = argparse.ArgumentParser()
    p.add_argument("--stages", type=int, default=1)
    add_case_options(p)
    p.add_argument("--case", action="append", default=[],
                   help="options of one case, e.g. \"--memory xl --adaptive\" (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--watchdog", type=float, default=150.0)
    a = p.parse_args(argv)
    one = argparse.ArgumentParser()
    add_case_options(one, default=argparse.SUPPRESS)
    cases = [argparse.Namespace(**{**vars(a), **vars(one.parse_args(shlex.split(c)))})
             for c in a.case] or [a]
    return a, cases


def main() -> None:
    a, cases = parse_cases()
    faulthandler.dump_traceback_later(a.watchdog, exit=True)  # a hang fails loudly
    torch.set_num_threads(1)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    denv = dist.discover()
    dist.init_distributed(denv, backend="gloo")
    results = []
    for case in cases:
        cfg = make_cfg(case)
        plan = resolve(cfg, World(world_size=denv.world_size))
        run = run_pipeline if case.stages > 1 else run_reference
        results.append(run(cfg, plan, case))
        print(json.dumps({"rank": denv.rank, "losses": results[-1]["losses"]}), flush=True)
        torch.distributed.barrier()
    torch.save(results, Path(a.out) / f"rank-{denv.rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
