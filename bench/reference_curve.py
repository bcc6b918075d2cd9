"""The authors' LaMemo trained like one of our runs: their curve to overlay on ours (issue 23.5).

Takes one of our run folders (`bench/quality.py` writes them, e.g. runs/quality/stdlib/
lamemo-seed1) and trains the authors' `MemTransformerLM` (github.com/thu-coai/LaMemo,
`pytorch/mem_transformer.py` from your clone, loaded by bench/reference_model.py) with every
setting of its `config.yaml`, writing the JSON shape of `quality.py`'s `train_one` (evals with
step, train_seconds, bpc, bpc_reset, gain_bpc, by_segment...; train_curve of (step, train bpc)).

Like with like, point by point:
- weights: their model starts from the very weights our trainer starts from at that seed
  (`LaMemoLM(cfg.model)` after `seed_all(train.seed)`, mapped with `to_reference`); so the
  first step's loss is ours to float precision. `--init theirs` draws fresh weights instead,
  from our init's distributions by role at our init_std (reference_model.build_from_config).
  Dropout draws come from the same seed but differ in order from ours.
- batches: our trainer's streams (`build_streams`: same segments, rows and seed); their model is
  time-major, so each [B, N] batch is transposed. Their `mems` are carried per micro-batch slot
  as their train_ddp.py carries them, and cleared exactly when our memory is reset: when the
  stream reports `reset` (the first segment of every epoch; streams never reset at document
  boundaries).
- loss and optimizer: their train_ddp.py backpropagates (loss + mem_loss) / 2 with mem_loss
  all zero (calc_mem_loss off), i.e. half the gradient of the mean NLL; with Adam that changes
  only the clipping threshold (and eps). We backpropagate the mean NLL / grad_accum, as our
  engine does, so clipping at train.grad_clip means the same. Adam, the warmup and schedule
  are our own functions (`build_optimizer`, `build_scheduler` over `lr_at`), fp32 whatever the
  run's precision. `--steps N` stops early but keeps the schedule of train.max_steps, so the
  points lie on the full run's curve.
- evaluation: `evaluation.run_eval` over our valid-split segment iterator (`eval_streams`,
  eval batch size and protocol lengths, train.eval_max_segments), memory carried and reset
  (eval.memory_gain), at train.eval_interval steps and at the end; train_seconds counts
  training only. The JSON is rewritten after every evaluation.

    python bench/reference_curve.py --run runs/quality/stdlib/lamemo-seed1 \\
        --reference-dir ../LaMemo/pytorch --out runs/quality/stdlib/reference-lamemo-seed1.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import reference_model  # bench/, beside this script: the authors' code from your clone
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lamemo_ds.config.derive import World, resolve  # noqa: E402
from lamemo_ds.config.load import load_config  # noqa: E402
from lamemo_ds.config.schema import ConfigError  # noqa: E402
from lamemo_ds.data.recall import recall_scorer  # noqa: E402
from lamemo_ds.evaluation import SegmentScore, memory_passes, run_eval  # noqa: E402
from lamemo_ds.model import LaMemoLM  # noqa: E402
from lamemo_ds.parallel.engine import build_optimizer  # noqa: E402
from lamemo_ds.parallel.schedule import build_scheduler  # noqa: E402
from lamemo_ds.train.state import rank_seed, seed_all  # noqa: E402
from lamemo_ds.train.trainer import build_streams, eval_streams  # noqa: E402

LN2 = math.log(2)


class UserError(Exception):
    """A bad argument or run folder: one line on stderr, exit 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="one of our run folders (holds config.yaml)")
    p.add_argument("--reference-dir", required=True, help="the pytorch/ folder of a "
                   "thu-coai/LaMemo clone")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--steps", type=int, help="stop after N steps (the schedule stays the run's)")
    p.add_argument("--init", choices=("ours", "theirs"), default="ours",
                   help="ours: our initial weights at the run's seed (default); theirs: "
                   "fresh draws of our init's distributions")
    p.add_argument("--tiny", action="store_true", help="CI size: at most 6 steps, evals of 2 "
                   "segments at steps 3 and 6")
    return p.parse_args(argv)


def load_run(a: argparse.Namespace):
    """The run's config (data path made absolute) and plan, with --steps / --tiny applied to
    how far we go and how much we evaluate (never to the schedule)."""
    path = Path(a.run) / "config.yaml"
    if not path.is_file():
        raise UserError(f"--run {a.run}: no config.yaml there; pass a run folder written by "
                        "`lamemo train` (e.g. runs/quality/stdlib/lamemo-seed1)")
    try:
        cfg = load_config(path)
    except ConfigError as e:
        raise UserError(f"--run {a.run}: {e}") from e
    if cfg.model.memory not in reference_model.ATTN_TYPE:
        raise UserError(f"--run {a.run}: model.memory={cfg.model.memory!r}, which the "
                        "reference lacks; pass a lamemo or xl run")
    data = Path(cfg.data.path)
    if not data.is_absolute():
        data = data if data.exists() else REPO / data
    if not (data / "manifest.json").is_file():
        raise UserError(f"data.path {cfg.data.path}: no prepared corpus there (run from the "
                        "folder the run was trained from, or prepare it)")
    cfg = replace(cfg, data=replace(cfg.data, path=str(data)))
    steps = min(a.steps or cfg.train.max_steps, cfg.train.max_steps)
    every, segments = cfg.train.eval_interval, cfg.train.eval_max_segments
    if a.tiny:
        steps, every, segments = min(steps, 6), 3, 2
    return cfg, resolve(cfg, World()), steps, every, segments


class ReferenceScorer:
    """`evaluation.SegmentScorer` of their model: their `mems` carried from segment to segment,
    cleared on a stream start (`reset`) or for every segment (`fresh`, memory="reset")."""

    global_sums = False

    def __init__(self, model: torch.nn.Module, ev):
        self.model, self.ev, self.mems = model, ev, ()

    def start(self) -> None:
        self.mems, self.was_training = (), self.model.training
        self.saved = _set_window(self.model, mem_len=self.ev.mem_len,
                                 clamp_len=self.ev.clamp_len, same_length=self.ev.same_length)
        self.model.eval()

    def __call__(self, x, y, reset, *, fresh: bool) -> SegmentScore:
        if fresh or _all_reset(reset):
            self.mems = ()
        ret, _ = self.model(x.t().contiguous(), y.t().contiguous(), *self.mems)  # [N, B]
        self.mems = tuple(ret[1:])
        nll = ret[0].t()  # [B, N]
        return SegmentScore(nll.double().sum(), nll.numel(), nll)

    def close(self) -> None:
        for (module, name), value in self.saved.items():
            setattr(module, name, value)
        self.mems = ()
        self.model.train(self.was_training)


def _set_window(model: torch.nn.Module, **window) -> dict:
    """Set mem_len / clamp_len / same_length on their model and its layers (each keeps its
    own copy); returns the old values to restore."""
    saved = {}
    for module in model.modules():
        for name, value in window.items():
            if hasattr(module, name):
                saved[module, name] = getattr(module, name)
                setattr(module, name, value)
    return saved


def _all_reset(reset: torch.Tensor) -> bool:
    """True when every row starts a stream; our streams reset all rows together, and their
    memory cannot be cleared for some rows only."""
    if bool(reset.any()) and not bool(reset.all()):
        raise ValueError("a batch resets the memory of some rows only: the reference cannot")
    return bool(reset.all())


def evaluate(model, cfg, plan, segments: int, mask) -> dict:
    """Valid split, memory carried (and reset with eval.memory_gain), as our trainer's _eval."""
    def one_pass(mode: str):
        loader = eval_streams(cfg, plan, cfg.data.valid_split, 0)
        try:
            return run_eval(ReferenceScorer(model, plan.eval), loader, max_segments=segments,
                            memory=mode, target_mask=mask)
        finally:
            loader.close()

    modes = ("carried", "reset") if cfg.eval.memory_gain else ("carried",)
    res = memory_passes(one_pass, modes, memory_kind=cfg.model.memory)
    c, r = res["carried"], res.get("reset")
    row = {"bpc": c.bits_per_token, "by_segment": [v / LN2 for v in c.by_segment],
           "bpc_reset": r.bits_per_token if r else None}
    if r is not None:
        row.update(gain_bpc=r.bits_per_token - c.bits_per_token,
                   by_segment_reset=[v / LN2 for v in r.by_segment])
    if c.subset_bits is not None:
        row.update(recall_bits=c.subset_bits, recall_bits_reset=r.subset_bits if r else None)
    return row


def train_step(model, opt, sched, batch, slots: list, plan, clip: float) -> float | None:
    """One optimizer step over every micro-batch slot; the mean loss, or None when skipped
    (non-finite loss or gradient: no update, no memory committed, as our trainer)."""
    mb, gas = plan.micro_batch, plan.grad_accum
    if _all_reset(batch.reset):
        slots[:] = [() for _ in range(gas)]
    opt.zero_grad(set_to_none=True)
    new, total = [], 0.0
    for m in range(gas):
        x = batch.input[m * mb:(m + 1) * mb].t().contiguous()  # [N, mb] time-major
        y = batch.target[m * mb:(m + 1) * mb].t().contiguous()
        ret = model(x, y, *slots[m])
        loss = ret[0].float().mean()  # their mem_loss (ret[1]) is all zero: left out
        (loss / gas).backward()
        new.append(tuple(ret[2:]))
        total += loss.item() / gas
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not (math.isfinite(total) and math.isfinite(float(norm))):
        return None
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    opt.step()
    sched.step()
    slots[:] = new
    return total


def run(a: argparse.Namespace) -> dict:
    """Train their model as the run in `a.run` was trained; the record (also written to
    a.out after every evaluation)."""
    cfg, plan, steps, every, segments = load_run(a)
    if not Path(a.reference_dir, "mem_transformer.py").is_file():
        raise UserError(f"--reference-dir {a.reference_dir}: no mem_transformer.py there; pass "
                        "the pytorch/ folder of a clone of https://github.com/thu-coai/LaMemo")
    module = reference_model.load(a.reference_dir)
    seed_all(cfg.train.seed)  # as our Trainer: identical initial weights, then dropout's seed
    ours = LaMemoLM(cfg.model) if a.init == "ours" else None
    try:
        model = reference_model.build_from_config(module, cfg.model, init_from=ours).train()
    except ValueError as e:
        raise UserError(f"--run {a.run}: {e}") from e
    seed_all(rank_seed(cfg.train.seed, 0))
    opt = build_optimizer(model.parameters(), cfg.optim, skip_nonfinite=False)
    sched = build_scheduler(opt, cfg.optim, total_steps=cfg.train.max_steps)
    mask = recall_scorer(cfg.data.path, cfg.data.valid_split)
    record = {"memory": cfg.model.memory, "seed": cfg.train.seed, "seconds": 0.0,
              "threads": torch.get_num_threads(), "evals": [], "train_curve": [],
              "source": "reference", "reference": reference_model.fingerprint(a.reference_dir),
              "run": str(a.run), "init": a.init, "max_steps": cfg.train.max_steps,
              "skipped_steps": 0}
    streams = build_streams(cfg, plan, 0)
    slots: list = [() for _ in range(plan.grad_accum)]
    t_start, train_s, interval = time.time(), 0.0, []
    log_every = max(1, cfg.train.log_interval)
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            loss = train_step(model, opt, sched, next(streams), slots, plan, cfg.train.grad_clip)
            train_s += time.perf_counter() - t0
            if loss is None:
                record["skipped_steps"] += 1
            else:
                interval.append(loss)
            if (step % log_every == 0 or step == steps) and interval:
                bpc = sum(interval) / len(interval) / LN2
                record["train_curve"].append((step, bpc))
                print(f"reference {cfg.model.memory} step {step}/{steps} | train bpc {bpc:.4f} | "
                      f"lr {sched.get_last_lr()[0]:.2e} | {train_s:.0f} s", flush=True)
                interval = []
            if (every and step % every == 0) or step == steps:
                row = evaluate(model, cfg, plan, segments, mask)
                record["evals"].append({"step": step, "train_seconds": round(train_s, 3), **row})
                print(f"reference eval step {step}: valid bpc {row['bpc']:.4f}", flush=True)
                record["seconds"] = round(time.time() - t_start, 1)
                _write(a.out, record)
    finally:
        streams.close()
    return record


def _write(path: str, record: dict) -> None:
    from lamemo_ds.fileio import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record, indent=1).encode())


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        run(a)
    except (UserError, FileNotFoundError) as e:
        print(f"reference_curve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
