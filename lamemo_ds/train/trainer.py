"""The training loop: one optimizer step = one segment of every stream.

Each rank owns micro_batch × grad_accum streams; micro-batch m of every step carries the same
streams (slot m of the state bank), so every stream's memory continues its own text. The memory
of a step is committed only when DeepSpeed applied the step; a non-finite loss or gradient on
any rank makes every rank skip the step alike (the reduced gradients are non-finite everywhere).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config.derive import Plan
from ..config.load import dump_config
from ..config.schema import RunConfig
from ..data.recall import recall_scorer
from ..data.streams import OrderedStreams
from ..evaluation import EvalResult, evaluate
from ..model import LaMemoLM
from ..model.bank import StateBank
from ..model.flops import segment_flops
from ..parallel.engine import build_engine
from .metrics import Metrics, Throughput, peak_tflops
from .signals import EXIT_OK, EXIT_PREEMPTED, StopFlag, requeue_slurm


class NonFiniteAbort(RuntimeError):
    """Too many consecutive steps were skipped for non-finite loss or gradients."""


@dataclass
class Hooks:
    """Injection points used by fault tests and tools; the defaults do nothing.

    loss(step, micro, loss) -> loss: may replace the loss before backward (NaN injection).
    step_end(trainer, step): after each optimizer step (e.g. kill a rank at a chosen step).
    save_phase(name): after each checkpoint save phase (crash-during-save tests).
    """

    loss: Callable[[int, int, torch.Tensor], torch.Tensor] = lambda step, micro, loss: loss
    step_end: Callable[[object, int], None] = lambda trainer, step: None
    save_phase: Callable[[str], None] | None = None


@dataclass
class StepResult:
    loss: float
    skipped: bool
    grad_norm: float
    stop: bool
    wait_s: float
    alphas: list[float] = field(default_factory=list)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds the engine, loaders, banks and monitors from a config; `fit()` runs the job."""

    def __init__(self, cfg: RunConfig, plan: Plan, *, comm, device: torch.device,
                 hooks: Hooks | None = None, slurm_job_id: str | None = None):
        self.cfg, self.plan, self.comm, self.device = cfg, plan, comm, device
        self.hooks = hooks or Hooks()
        self.slurm_job_id = slurm_job_id
        self.rank = comm.rank
        self.log = print if self.rank == 0 else (lambda *a, **k: None)
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        seed_all(cfg.train.seed)  # identical initial parameters on every rank
        self._build_engine()
        seed_all(cfg.train.seed + 7919 * (self.rank + 1))  # dropout differs between ranks
        self._build_io()

    def _build_engine(self) -> None:
        """Model + DeepSpeed engine, this rank's data-parallel index, the memory bank."""
        cfg, plan, device = self.cfg, self.plan, self.device
        model = LaMemoLM(cfg.model)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        self.bundle = build_engine(model.to(device), cfg, plan, cuda=device.type == "cuda")
        self.engine = self.bundle.engine
        self.dp_rank = self.rank
        self.bank = StateBank(plan.grad_accum, lambda: self.engine.module.init_state(
            plan.micro_batch, device=device))

    def _build_io(self) -> None:
        """Training streams of this data-parallel rank, metrics and the checkpoint manager."""
        from ..checkpoint.manager import CheckpointManager

        cfg, plan = self.cfg, self.plan
        self.loader = OrderedStreams(
            cfg.data.path, cfg.data.train_split, seg_len=plan.seg_len, rows=plan.rows_per_rank,
            dp_rank=self.dp_rank, dp_size=plan.dp_size, seed=cfg.train.seed,
            random_roll=cfg.data.random_roll, prefetch=cfg.data.prefetch)
        unit = "bpc" if cfg.model.vocab_size <= 300 else "ppl"
        self.metrics = Metrics(cfg.train.output_dir, enabled=self.rank == 0,
                               tensorboard=cfg.logging.tensorboard, unit=unit)
        self.ckpt = CheckpointManager(f"{cfg.train.output_dir}/checkpoints",
                                      keep_last=cfg.checkpoint.keep_last, comm=self.comm,
                                      log=self.log, on_phase=self.hooks.save_phase)
        self.flops_per_token = segment_flops(cfg.model).per_target_token
        self.peak = peak_tflops(cfg.logging.peak_tflops)

    # ------------------------------------------------------------------------- one step
    def train_step(self, stop_requested: bool) -> StepResult:
        """Forward/backward every slot, step, agree on loss/skip/stop across ranks."""
        t0 = time.perf_counter()
        batch = next(self.loader)
        wait = time.perf_counter() - t0
        mb = self.plan.micro_batch
        x = batch.input.to(self.device, non_blocking=True)  # [A*mb, N]
        y = batch.target.to(self.device, non_blocking=True)
        reset = batch.reset.to(self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        alpha_sum: list[torch.Tensor] = []
        new_states = []
        for m in range(self.plan.grad_accum):
            rows = slice(m * mb, (m + 1) * mb)
            out = self.engine(x[rows], self.bank.get(m, reset[rows]), targets=y[rows],
                              return_logits=False)
            loss = self.hooks.loss(self.step, m, out.loss)
            self.engine.backward(loss)
            if m == self.plan.grad_accum - 1:
                own_norm = self._plain_grad_norm()
            self.engine.step()
            new_states.append(out.state)
            loss_sum += loss.detach().double()
            alpha_sum = [a.float() + (alpha_sum[i] if alpha_sum else 0)
                         for i, a in enumerate(out.alpha)]
        agreed = self.comm.all_reduce(torch.stack([loss_sum.cpu(), torch.tensor(
            float(stop_requested), dtype=torch.float64)]))
        loss_mean = agreed[0].item() / (self.plan.grad_accum * self.plan.dp_size)
        applied = self.engine.was_step_applied()
        if applied and not math.isfinite(loss_mean):
            raise RuntimeError(f"step {self.step + 1}: non-finite loss {loss_mean} but "
                               "DeepSpeed applied the update; parameters may be corrupt")
        if applied:
            self.bank.commit(new_states)
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else own_norm
        return StepResult(loss=loss_mean, skipped=not applied, grad_norm=gn,
                          stop=agreed[1].item() > 0, wait_s=wait,
                          alphas=[a.item() / self.plan.grad_accum for a in alpha_sum])

    def _plain_grad_norm(self) -> float:
        """Pre-clip global gradient norm on the ZeRO-0 fp32 path, where DeepSpeed clips without
        reporting it (gradients are already all-reduced, so every rank gets the same value)."""
        if not (self.plan.zero_stage == 0 and self.plan.precision == "fp32"):
            return float("nan")
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    # ------------------------------------------------------------------------- evaluation
    def evaluate(self, split: str, *, max_segments: int = 0, stop=None,
                 memory: str = "carried") -> EvalResult:
        """Loss over `split` with a fresh memory bank, every rank contributing its streams;
        `stop` (collective) ends it early on a preemption signal. memory="reset" empties the
        memory before every segment; on a recall corpus the key symbols are scored apart."""
        ev = self.plan.eval
        loader = OrderedStreams(
            self.cfg.data.path, split, seg_len=ev.segment_len, rows=ev.batch_size,
            dp_rank=self.rank, dp_size=self.plan.dp_size, prefetch=self.cfg.data.prefetch,
            loop=False)
        try:
            return evaluate(self.engine, loader, mem_len=ev.mem_len, clamp_len=ev.clamp_len,
                            same_length=ev.same_length, max_segments=max_segments,
                            all_reduce=self.comm.all_reduce, stop=stop, memory=memory,
                            target_mask=self._scorer(split))
        finally:
            loader.close()

    def _scorer(self, split: str):
        """The recall key-symbol mask of `split` (None unless the data is a recall corpus)."""
        cache = self.__dict__.setdefault("_scorers", {})
        if split not in cache:
            cache[split] = recall_scorer(self.cfg.data.path, split)
        return cache[split]

    # ------------------------------------------------------------------------- checkpoints
    def rank_state(self) -> dict:
        return {"step": self.step, "world_size": self.comm.world_size,
                "rows_per_rank": self.plan.rows_per_rank, "bank": self.bank.state_dict(),
                "loader": self.loader.state_dict(), "rng": rng_state(),
                "counters": {"skipped_total": self.skipped_total,
                             "consecutive_skips": self.consecutive_skips}}

    def _layout(self) -> dict:
        """How this run is laid out (saved in the checkpoint meta; compared on resume)."""
        return {"world_size": self.comm.world_size, "dp_size": self.plan.dp_size,
                "micro_batch": self.plan.micro_batch, "grad_accum": self.plan.grad_accum}

    def _save_deepspeed(self, folder: str, tag: str) -> None:
        self.engine.save_checkpoint(folder, tag=tag, save_latest=False)

    def save(self) -> None:
        meta = dict(self._layout(), zero_stage=self.plan.zero_stage,
                    precision=self.plan.precision, model_memory=self.cfg.model.memory,
                    time=time.time())
        path = self.ckpt.save(self.step, save_deepspeed=self._save_deepspeed,
                              rank_state=self.rank_state(), config_text=dump_config(self.cfg),
                              meta=meta)
        self.log(f"checkpoint {path} (step {self.step})")

    def resume(self) -> bool:
        """Load the newest verified checkpoint, if any; True when one was loaded."""
        found = self.ckpt.find_latest()
        if found is None:
            return False
        loaded, _ = self.engine.load_checkpoint(str(found.path), tag="deepspeed")
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {found.path}/deepspeed")
        same = (found.meta["world_size"] == self.comm.world_size
                and found.meta["micro_batch"] * found.meta["grad_accum"]
                == self.plan.rows_per_rank)
        if same:
            st = self.ckpt.load_rank_state(found, self.rank)
            self.bank.load_state_dict(st["bank"])
            self.loader.load_state_dict(st["loader"])
            set_rng_state(st["rng"])
        else:
            st = self.ckpt.load_rank_state(found, 0)
            self.loader.load_state_dict(st["loader"])  # re-partitions the streams
            self.bank.reset_all()
            seed_all(self.cfg.train.seed + 7919 * (self.rank + 1) + found.step)
            self.log(f"resume: layout changed (world {found.meta['world_size']} -> "
                     f"{self.comm.world_size}, rows/rank {found.meta['micro_batch']}x"
                     f"{found.meta['grad_accum']} -> {self.plan.rows_per_rank}): streams "
                     "re-partitioned, memory reset")
        self.step = found.step
        self.skipped_total = st["counters"]["skipped_total"]
        self.consecutive_skips = st["counters"]["consecutive_skips"]
        self.log(f"resumed from {found.path} at step {self.step}")
        return True

    # ------------------------------------------------------------------------- the job
    def fit(self) -> int:
        """Train to max_steps; returns the process exit code (see train/signals.py)."""
        cfg = self.cfg
        if cfg.checkpoint.resume:
            self.resume()
        self.metrics.text("config", dump_config(cfg))
        self.metrics.text("plan", self.plan.describe())
        self.log(f"plan: {self.plan.describe()}")
        flag = StopFlag().install()
        try:
            return self._loop(flag)
        finally:
            flag.restore()
            self.loader.close()
            self.metrics.close()

    def _loop(self, flag: StopFlag) -> int:
        cfg, t = self.cfg, self.cfg.train
        meter, alpha_acc, last_saved = Throughput(), [], -1
        while self.step < t.max_steps:
            r = self.train_step(flag.is_set)
            self.step += 1
            meter.steps += 1
            meter.wait += r.wait_s
            self._count_skip(r)
            lr = self.bundle.scheduler.get_last_lr()[0]
            self.metrics.step(self.step, loss=r.loss, skipped=r.skipped, lr=lr)
            alpha_acc.append(r.alphas)
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                self._log_interval(meter, r, lr, alpha_acc)
                meter.reset()
                alpha_acc = []
            self.hooks.step_end(self, self.step)
            if r.stop:
                return self._preempted()
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.max_steps:
                if self._eval(cfg.data.valid_split, t.eval_max_segments, flag):
                    return self._preempted()
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                self.save()
                last_saved = self.step
        if self._eval(cfg.data.valid_split, t.eval_max_segments, flag):
            return self._preempted()
        if last_saved != self.step:
            self.save()
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

    def _log_interval(self, meter: Throughput, r: StepResult, lr: float, alpha_acc) -> None:
        perf = meter.summary(tokens_per_step=self.plan.tokens_per_step,
                             flops_per_token=self.flops_per_token,
                             world_size=self.comm.world_size, peak=self.peak)
        scale = getattr(self.bundle.optimizer, "cur_scale", None)
        scalars = {"train/loss": r.loss, f"train/{self.metrics.unit}": self.metrics.score(r.loss),
                   "train/lr": lr, "train/grad_norm": r.grad_norm,
                   "train/loss_scale": float(scale) if scale is not None else None,
                   "train/skipped_steps": float(self.skipped_total), **perf}
        rows = [a for a in alpha_acc if a]
        alphas = [sum(col) / len(col) for col in zip(*rows)] if rows else []
        self.metrics.interval(self.step, scalars, alphas)

    def _eval(self, split: str, max_segments: int, flag: StopFlag) -> bool:
        """Evaluate (with carried memory, then reset memory for the memory gain) and log; True
        when a stop signal interrupted it (nothing is logged then)."""
        results = {}
        for memory in ("carried", "reset"):
            if memory == "reset" and not self.cfg.eval.memory_gain:
                break
            if memory == "reset" and self.cfg.model.memory == "none":
                results[memory] = results["carried"]  # the same by construction
                break
            results[memory] = self.evaluate(split, max_segments=max_segments, memory=memory,
                                            stop=lambda: self.comm.any(flag.is_set))
            if results[memory].interrupted:
                self.log(f"evaluation of {split} interrupted by a stop signal")
                return True
        self.metrics.eval(self.step, split, results["carried"], reset=results.get("reset"))
        return False

    def _preempted(self) -> int:
        self.log(f"stop signal received: saving step {self.step} and exiting")
        self.save()
        requeued = False
        if self.rank == 0:
            requeued = requeue_slurm(self.slurm_job_id, self.log)
        requeued = bool(self.comm.broadcast_int(int(requeued)))
        return EXIT_OK if requeued else EXIT_PREEMPTED
