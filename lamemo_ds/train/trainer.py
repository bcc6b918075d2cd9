"""The training loop: one optimizer step = one segment of every stream.

Each rank owns micro_batch × grad_accum streams; micro-batch m of every step carries the same
streams (slot m of the memory bank), so every stream's memory continues its own text. The memory
of a step is committed only when DeepSpeed applied the step; a non-finite loss or gradient on
any rank makes every rank skip the step alike (the reduced gradients are non-finite everywhere).

`Trainer` runs the job (streams, training state, metrics, signals, checkpoints); how a step, an
evaluation and the weights are made is its parallel strategy (train/strategy.py:
`Strategy`): `DataParallel` (train/data_parallel.py) or `PipelineParallel`
(train/pipeline_parallel.py). The builders below
(`build_parallel`, `build_streams`, `training_state`, `checkpoint_meta`) make the same pieces
for `lamemo convert --to deepspeed`, which writes a checkpoint the trainer resumes from.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict

import torch

from ..checkpoint.manager import CheckpointManager, Found
from ..config.derive import Plan
from ..config.load import dump_config
from ..config.schema import RunConfig
from ..data.manifest import load_manifest
from ..data.streams import OrderedStreams
from ..evaluation import EvalResult, Units, memory_passes, run_eval
from ..model import LaMemoLM
from ..model.flops import segment_flops
from .data_parallel import DataParallel
from .metrics import Interval, Metrics, peak_tflops
from .signals import EXIT_OK, EXIT_PREEMPTED, StopFlag, requeue_slurm
from .state import RNG, LRSchedule, Progress, rank_seed, seed_all
from .strategy import Hooks, StepResult, Strategy

__all__ = ["DataParallel", "Hooks", "NonFiniteAbort", "StepResult", "Trainer", "build_parallel",
           "build_streams", "checkpoint_meta", "training_state"]


class NonFiniteAbort(RuntimeError):
    """Too many consecutive steps were skipped for non-finite loss or gradients."""


# ----------------------------------------------------------------------------- builders
def build_parallel(cfg: RunConfig, plan: Plan, *, comm, device: torch.device, hooks: Hooks,
                   model: LaMemoLM) -> Strategy:
    """The strategy of `plan` around `model` (collective: every rank calls it with the same
    weights): DataParallel, or PipelineParallel when parallel.pipeline_stages > 1."""
    if plan.pp_size > 1:
        from .pipeline_parallel import PipelineParallel

        return PipelineParallel(cfg, plan, comm=comm, device=device, hooks=hooks, model=model)
    return DataParallel(cfg, plan, comm=comm, device=device, hooks=hooks, model=model)


def build_streams(cfg: RunConfig, plan: Plan, dp_rank: int, *,
                  prefetch: int | None = None) -> OrderedStreams:
    """The training streams of data-parallel rank `dp_rank`."""
    return OrderedStreams(
        cfg.data.path, cfg.data.train_split, seg_len=plan.seg_len, rows=plan.rows_per_rank,
        dp_rank=dp_rank, dp_size=plan.dp_size, seed=cfg.train.seed,
        random_roll=cfg.data.random_roll, prefetch=prefetch or cfg.data.prefetch)


def eval_streams(cfg: RunConfig, plan: Plan, split: str, dp_rank: int) -> OrderedStreams:
    """The evaluation streams of `split` for data-parallel rank `dp_rank` (no looping)."""
    ev = plan.eval
    return OrderedStreams(cfg.data.path, split, seg_len=ev.segment_len, rows=ev.batch_size,
                          dp_rank=dp_rank, dp_size=plan.dp_size, prefetch=cfg.data.prefetch,
                          loop=False)


def training_state(*, progress: Progress, streams: OrderedStreams, parallel, rng: RNG) -> dict:
    """The Stateful pieces a checkpoint saves per rank, by name (see train/state.py)."""
    return {"progress": progress, "streams": streams, "memory": parallel.memory, "rng": rng,
            "lr": LRSchedule(parallel.bundle.scheduler)}


def checkpoint_meta(cfg: RunConfig, plan: Plan, parallel, **extra) -> dict:
    """meta.json of a checkpoint: the layout, ZeRO stage, precision, memory kind (+ extra)."""
    return dict(parallel.layout(), zero_stage=plan.zero_stage, precision=plan.precision,
                model_memory=cfg.model.memory, **extra)


def _progress_field(name: str) -> property:
    """Trainer.<name> reads and writes Trainer.progress.<name>."""
    return property(lambda self: getattr(self.progress, name),
                    lambda self, value: setattr(self.progress, name, value),
                    doc=f"progress.{name} (train/state.py: Progress)")


class Trainer:
    """Builds the strategy, streams, training state and monitors from a config; `fit()` runs
    the job. `model` (default: a fresh LaMemoLM seeded with train.seed) gives the weights."""

    def __init__(self, cfg: RunConfig, plan: Plan, *, comm, device: torch.device,
                 hooks: Hooks | None = None, slurm_job_id: str | None = None,
                 model: LaMemoLM | None = None):
        self.cfg, self.plan, self.comm, self.device = cfg, plan, comm, device
        self.hooks = hooks or Hooks()
        self.slurm_job_id = slurm_job_id
        self.rank = comm.rank
        self.log = print if self.rank == 0 else (lambda *a, **k: None)
        self.progress = Progress()
        self.rng = RNG()
        seed_all(cfg.train.seed)  # identical initial parameters on every rank
        self.parallel = build_parallel(cfg, plan, comm=comm, device=device, hooks=self.hooks,
                                       model=model if model is not None else LaMemoLM(cfg.model))
        self.engine, self.bundle = self.parallel.engine, self.parallel.bundle
        self.rng.seed(rank_seed(cfg.train.seed, self.rank))  # dropout differs between ranks
        self._build_io()

    def _build_io(self) -> None:
        """Training streams of this data-parallel rank, the training state, metrics and the
        checkpoint manager."""
        cfg = self.cfg
        self.loader = build_streams(cfg, self.plan, self.parallel.dp_rank)
        self.state = training_state(progress=self.progress, streams=self.loader,
                                    parallel=self.parallel, rng=self.rng)
        manifest = load_manifest(cfg.data.path)
        units = {split: Units.from_manifest(manifest, split) for split in manifest.splits}
        self.metrics = Metrics(cfg.train.output_dir, enabled=self.rank == 0,
                               tensorboard=cfg.logging.tensorboard, units=units)
        self.ckpt = CheckpointManager(f"{cfg.train.output_dir}/checkpoints",
                                      keep_last=cfg.checkpoint.keep_last, comm=self.comm,
                                      log=self.log, on_phase=self.hooks.save_phase)
        self.flops_per_token = segment_flops(cfg.model).per_target_token
        self.peak = peak_tflops(cfg.logging.peak_tflops)

    # the step counters live in the Stateful `progress`
    step = _progress_field("step")
    skipped_total = _progress_field("skipped_total")
    consecutive_skips = _progress_field("consecutive_skips")
    train_seconds = _progress_field("train_seconds")

    # ------------------------------------------------------------------------- one step
    def train_step(self, stop_requested: bool) -> StepResult:
        """Read the step's batch (every rank, also pipeline middle stages: identical loader state
        everywhere), then let the strategy make the step."""
        t0 = time.perf_counter()
        batch = next(self.loader)
        wait = time.perf_counter() - t0
        r = self.parallel.train_step(batch, step=self.step, stop_requested=stop_requested)
        r.wait_s = wait
        return r

    def evaluate(self, split: str, *, max_segments: int = 0, stop=None,
                 memory: str = "carried", progress=None) -> EvalResult:
        """Loss over `split` from a fresh evaluation memory, every data-parallel rank scoring its
        streams with the strategy's scorer (evaluation.run_eval, as `lamemo eval`); `stop`
        (collective) ends it early on a preemption signal; `progress(done, total)` counts
        segments."""
        loader = eval_streams(self.cfg, self.plan, split, self.parallel.dp_rank)
        total = min(len(loader), max_segments) if max_segments else len(loader)
        done = itertools.count(1)
        try:
            return run_eval(self.parallel.eval_scorer(), loader, max_segments=max_segments,
                            all_reduce=self.comm.all_reduce, stop=stop, memory=memory,
                            target_mask=self.parallel.target_mask(split),
                            progress=progress and (lambda _n: progress(next(done), total)))
        finally:
            loader.close()

    # ------------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        self.metrics.flush()  # the history up to this step survives a kill after the save
        meta = checkpoint_meta(self.cfg, self.plan, self.parallel, time=time.time())
        path = self.ckpt.save(self.step, save_weights=self.parallel.save_weights,
                              state=self.state, config_text=dump_config(self.cfg), meta=meta)
        self.log(f"checkpoint {path} (step {self.step})")

    def resume(self) -> bool:
        """Load the newest verified checkpoint, if any; True when one was loaded."""
        found = self.ckpt.find_latest()
        if found is None:
            return False
        self.ckpt.require_meta(found, [k for k in self.parallel.layout() if k != "parts"])
        same = self.parallel.same_layout(found.meta)
        self.ckpt.check_safe(found)  # before DeepSpeed unpickles any file (README: Trust model)
        self.parallel.load_weights(found.path, same_layout=same)
        if same:
            self.ckpt.load_state(found, self.rank, self.state)
        else:
            self._resume_other_layout(found)
        self.log(f"resumed from {found.path} at step {self.step}")
        return True

    def _resume_other_layout(self, found: Found) -> None:
        """Streams re-partitioned from rank 0's positions, the schedule and counters kept, the
        memory reset and the random generators re-seeded for the step."""
        self.ckpt.load_state(found, 0, self.state, names=("progress", "streams", "lr"))
        self.parallel.memory.reset("train")
        self.rng.seed(rank_seed(self.cfg.train.seed, self.rank, found.step))
        keys = [k for k in self.parallel.layout() if k != "parts"]
        old = {k: found.meta[k] for k in keys}
        now = {k: self.parallel.layout()[k] for k in keys}
        self.log(f"resume: layout changed ({old} -> {now}): {self.parallel.layout_change}, "
                 "memory reset, streams re-partitioned")

    # ------------------------------------------------------------------------- the job
    def fit(self) -> int:
        """Train to max_steps; returns the process exit code (see train/signals.py)."""
        cfg = self.cfg
        if self.rank == 0:  # the run lock is held: no other writer is filling them
            for p in self.ckpt.remove_stale_temps():
                self.log(f"removed {p}: a checkpoint save that never finished")
        resumed = cfg.checkpoint.resume and self.resume()
        self.metrics.open(self.step)  # one history: steps after the checkpoint are re-run
        self.metrics.text("config", dump_config(cfg))
        self.metrics.text("plan", self.plan.describe())
        self.log(f"plan: {self.plan.describe()}")
        flag = StopFlag().install()
        try:
            return self._loop(flag, saved_step=self.step if resumed else -1)
        finally:
            flag.restore()
            self.loader.close()
            self.metrics.close()

    def _loop(self, flag: StopFlag, *, saved_step: int = -1) -> int:
        """Steps to max_steps; `saved_step`: the step whose checkpoint exists (resumed from)."""
        cfg, t = self.cfg, self.cfg.train
        meter, last_saved = Interval(), saved_step
        while self.step < t.max_steps:
            t0 = time.perf_counter()
            r = self.train_step(flag.is_set)
            self.train_seconds += time.perf_counter() - t0
            self.step += 1
            meter.add(r, tokens=self.plan.tokens_per_step)
            self._count_skip(r)
            lr = self.bundle.scheduler.get_last_lr()[0]
            self.metrics.step(self.step, loss=r.loss, skipped=r.skipped, lr=lr)
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                self._log_interval(meter, lr)
                meter.reset()
            self.hooks.step_end(self, self.step)
            if r.stop:
                return self._preempted()
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.max_steps:
                if self._eval(cfg.data.valid_split, t.eval_max_segments, flag):
                    return self._preempted()
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                self.save()
                last_saved = self.step
        if last_saved != self.step:  # before the final eval: a failing one never loses it
            self.save()
        if self._eval(cfg.data.valid_split, t.eval_max_segments, flag):
            return self._preempted(saved=True)  # this step is saved already: not twice
        self.metrics.summary(step=self.step, tokens=self.step * self.plan.tokens_per_step,
                             train_seconds=self.train_seconds)
        return EXIT_OK

    def _count_skip(self, r: StepResult) -> None:
        if not r.skipped:
            self.consecutive_skips = 0
            return
        self.skipped_total += 1
        self.consecutive_skips += 1
        self.log(f"step {self.step}: skipped (non-finite loss or gradient, loss {r.loss}); "
                 f"{self.consecutive_skips} in a row")
        limit = self.cfg.train.max_consecutive_skips
        if self.consecutive_skips >= limit:
            raise NonFiniteAbort(
                f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                f"(train.max_consecutive_skips={limit}) at step {self.step}; lower optim.lr, "
                "check the data, or use fp32/bf16. No checkpoint of this state was written.")

    def _log_interval(self, meter: Interval, lr: float) -> None:
        """Means over the interval (loss token-weighted), step/total, tokens seen, ETA."""
        perf = meter.summary(tokens_per_step=self.plan.tokens_per_step,
                             flops_per_token=self.flops_per_token,
                             world_size=self.comm.world_size, peak=self.peak)
        scale = getattr(self.bundle.optimizer, "cur_scale", None)
        split = self.cfg.data.train_split
        units = self.metrics.units(split).scores(meter.loss)
        left = (self.cfg.train.max_steps - self.step) * perf["perf/step_time_s"]
        scalars = {"train/loss": meter.loss, **{f"train/{k}": v for k, v in units.items()},
                   "train/lr": lr, "train/grad_norm": meter.grad_norm,
                   "train/loss_scale": float(scale) if scale is not None else None,
                   "train/skipped_steps": float(self.skipped_total), **perf,
                   "progress/tokens": float(self.step * self.plan.tokens_per_step),
                   "progress/elapsed_s": self.train_seconds, "progress/eta_s": left}
        self.metrics.interval(self.step, scalars, meter.mean_alphas(),
                              max_steps=self.cfg.train.max_steps, split=split)

    def _eval(self, split: str, max_segments: int, flag: StopFlag) -> bool:
        """Evaluate (with carried memory, then reset memory for the memory gain) and log, with
        progress lines on the way; True when a stop signal interrupted it (nothing logged)."""
        modes = ("carried", "reset") if self.cfg.eval.memory_gain else ("carried",)
        results = memory_passes(
            lambda mode: self.evaluate(split, max_segments=max_segments, memory=mode,
                                       stop=lambda: self.comm.any(flag.is_set),
                                       progress=self.metrics.eval_progress(self.step, split,
                                                                           mode)),
            modes, memory_kind=self.cfg.model.memory)
        if any(r.interrupted for r in results.values()):
            self.log(f"evaluation of {split} interrupted by a stop signal")
            return True
        self.metrics.eval(self.step, split, results["carried"], reset=results.get("reset"),
                          train_seconds=self.train_seconds, settings=asdict(self.plan.eval))
        return False

    def _preempted(self, *, saved: bool = False) -> int:
        """Save (unless this step's checkpoint exists already), requeue under Slurm, exit."""
        if saved:
            self.log(f"stop signal received: step {self.step} is saved; exiting")
        else:
            self.log(f"stop signal received: saving step {self.step} and exiting")
            self.save()
        requeued = False
        if self.rank == 0:
            requeued = requeue_slurm(self.slurm_job_id, self.log)
        requeued = bool(self.comm.broadcast_int(int(requeued)))
        return EXIT_OK if requeued else EXIT_PREEMPTED
