"""The training loop: one optimizer step = one segment of every stream.

Each rank owns micro_batch × grad_accum streams; micro-batch m of every step carries the same
streams (slot m of the memory bank), so every stream's memory continues its own text. The memory
of a step is committed only when DeepSpeed applied the step; a non-finite loss or gradient on
any rank makes every rank skip the step alike (the reduced gradients are non-finite everywhere).

`Trainer` runs the job (streams, training state, metrics, signals, checkpoints); how a step, an
evaluation and the weights are made is its parallel strategy (train/strategy.py):
`DataParallel` here, `PipelineParallel` in train/pipeline.py. The builders below
(`build_parallel`, `build_streams`, `training_state`, `checkpoint_meta`) make the same pieces
for `lamemo convert --to deepspeed`, which writes a checkpoint the trainer resumes from.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict

import torch

from ..checkpoint.manager import DS_TAG, CheckpointManager, Found
from ..config.derive import Plan
from ..config.load import dump_config
from ..config.schema import RunConfig
from ..data.manifest import load_manifest
from ..data.recall import recall_scorer
from ..data.streams import OrderedStreams
from ..evaluation import EvalResult, ModelScorer, Units, memory_passes, run_eval
from ..model import LaMemoLM
from ..model.bank import MemoryBank
from ..model.flops import segment_flops
from ..parallel.engine import build_engine
from .metrics import Interval, Metrics, peak_tflops
from .signals import EXIT_OK, EXIT_PREEMPTED, StopFlag, requeue_slurm
from .state import RNG, LRSchedule, Progress, rank_seed, seed_all
from .strategy import Hooks, StepResult

__all__ = ["DataParallel", "Hooks", "NonFiniteAbort", "StepResult", "Trainer", "build_parallel",
           "build_streams", "checkpoint_meta", "training_state"]


class NonFiniteAbort(RuntimeError):
    """Too many consecutive steps were skipped for non-finite loss or gradients."""


class DataParallel:
    """The data-parallel strategy: a DeepSpeed engine around the LaMemoLM itself (ZeRO 0-3,
    checkpoint keys are the model's own names), the memory of every slot in one MemoryBank."""

    layout_change = "weights and optimizer re-partitioned by DeepSpeed"

    def __init__(self, cfg: RunConfig, plan: Plan, *, comm, device: torch.device, hooks: Hooks,
                 model: LaMemoLM):
        self.cfg, self.plan, self.comm, self.device, self.hooks = cfg, plan, comm, device, hooks
        self.rank = comm.rank
        model.activation_checkpointing = cfg.train.activation_checkpointing
        self.bundle = build_engine(model.to(device), cfg, plan)
        self.engine = self.bundle.engine
        self.dp_rank = self.rank
        self.memory = MemoryBank(device)
        self.scorers: dict = {}  # split -> recall key-symbol mask (None: not a recall corpus)

    # ------------------------------------------------------------------------- one step
    def train_step(self, batch, *, step: int, stop_requested: bool) -> StepResult:
        """Forward/backward every slot, step, agree on loss/skip/stop across ranks."""
        mb = self.plan.micro_batch
        x = batch.input.to(self.device, non_blocking=True)  # [A*mb, N]
        y = batch.target.to(self.device, non_blocking=True)
        reset = batch.reset.to(self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        alpha_sum: list[torch.Tensor] = []
        for m in range(self.plan.grad_accum):
            rows = slice(m * mb, (m + 1) * mb)
            state = self.memory.get(m)
            if state is None:  # the first step, or the memory was reset
                state = self.engine.module.init_state(mb, device=self.device)
            out = self.engine(x[rows], state.reset(reset[rows]), targets=y[rows],
                              return_logits=False)
            loss = self.hooks.loss(step, m, out.loss)
            self.engine.backward(loss)
            if m == self.plan.grad_accum - 1:
                own_norm = self._plain_grad_norm()
            self.engine.step()
            self.memory.put(m, out.state)
            loss_sum += loss.detach().double()
            alpha_sum = [a.float() + (alpha_sum[i] if alpha_sum else 0)
                         for i, a in enumerate(out.alpha)]
        agreed = self.comm.all_reduce(torch.stack([loss_sum.cpu(), torch.tensor(
            float(stop_requested), dtype=torch.float64)]))
        loss_mean = agreed[0].item() / (self.plan.grad_accum * self.plan.dp_size)
        applied = self.engine.was_step_applied()
        if applied and not math.isfinite(loss_mean):
            raise RuntimeError(f"step {step + 1}: non-finite loss {loss_mean} but "
                               "DeepSpeed applied the update; parameters may be corrupt")
        self.memory.settle(applied)
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else own_norm
        return StepResult(loss=loss_mean, skipped=not applied, grad_norm=gn,
                          stop=agreed[1].item() > 0,
                          alphas=[a.item() / self.plan.grad_accum for a in alpha_sum])

    def _plain_grad_norm(self) -> float:
        """Pre-clip global gradient norm on the ZeRO-0 fp32 path, where DeepSpeed clips without
        reporting it (gradients are already all-reduced, so every rank gets the same value)."""
        if not (self.plan.zero_stage == 0 and self.plan.precision == "fp32"):
            return float("nan")
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    # ------------------------------------------------------------------------- evaluation
    def eval_scorer(self) -> ModelScorer:
        """The segment scorer of evaluation.run_eval: the engine with a fresh evaluation memory
        (the training memory bank is left untouched)."""
        ev = self.plan.eval
        return ModelScorer(self.engine, mem_len=ev.mem_len, clamp_len=ev.clamp_len,
                           same_length=ev.same_length)

    def target_mask(self, split: str):
        """On a recall corpus the key symbols are scored apart (None otherwise)."""
        return self._scorer(split)

    def _scorer(self, split: str):
        """The recall key-symbol mask of `split` (None unless the data is a recall corpus)."""
        if split not in self.scorers:
            self.scorers[split] = recall_scorer(self.cfg.data.path, split)
        return self.scorers[split]

    # ------------------------------------------------------------------------- checkpoints
    def layout(self) -> dict:
        """How this run is laid out (saved in the checkpoint meta; compared on resume)."""
        return {"world_size": self.comm.world_size, "dp_size": self.plan.dp_size,
                "micro_batch": self.plan.micro_batch, "grad_accum": self.plan.grad_accum}

    def same_layout(self, meta: dict) -> bool:
        stages = meta.get("pipeline_stages", 1)
        if stages > 1:
            raise RuntimeError(
                f"the checkpoint was written with parallel.pipeline_stages={stages}; resume it "
                f"with --set parallel.pipeline_stages={stages}, or write it for this layout with "
                "`lamemo convert --from deepspeed RUN --to deepspeed NEW` (see tools/)")
        return (meta["world_size"] == self.comm.world_size
                and meta["micro_batch"] * meta["grad_accum"] == self.plan.rows_per_rank)

    def save_weights(self, folder: str, tag: str) -> None:
        self.engine.save_checkpoint(folder, tag=tag, save_latest=False)

    def load_weights(self, path, *, same_layout: bool) -> None:
        """DeepSpeed's files (it re-partitions ZeRO states for another world size)."""
        loaded, _ = self.engine.load_checkpoint(str(path), tag=DS_TAG)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {path}/{DS_TAG}")


# ----------------------------------------------------------------------------- builders
def build_parallel(cfg: RunConfig, plan: Plan, *, comm, device: torch.device, hooks: Hooks,
                   model: LaMemoLM):
    """The strategy of `plan` around `model` (collective: every rank calls it with the same
    weights): DataParallel, or PipelineParallel when parallel.pipeline_stages > 1."""
    if plan.pp_size > 1:
        from .pipeline import PipelineParallel

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
        old = {k: found.meta.get(k, 1 if k == "pipeline_stages" else None) for k in keys}
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
