"""The training loop under pipeline parallelism (parallel.pipeline_stages > 1).

Same job as `Trainer` (fit/_loop, metrics, signals and the checkpoint manager are inherited);
what differs is how a step, an evaluation and the per-rank state are made:
- a step is `engine.train_batch` over the step's micro-batches (slot m = micro-batch m), and the
  memory it wrote is committed on every stage only if every rank applied the step;
- evaluation runs `engine.eval_batch` with the stages' separate eval banks;
- the per-rank checkpoint state holds this stage's memory; the DeepSpeed folder holds the layer
  files plus layer_map.json. A checkpoint of another layout (P or world size changed, or a
  data-parallel one) loads its weights through the layer map, restarts the optimizer moments,
  resets memory and re-partitions the streams, and says so.
"""

from __future__ import annotations

import math
import time

import torch

from ..checkpoint.manager import DS_TAG
from ..config.derive import Plan
from ..config.schema import RunConfig
from ..data.streams import OrderedStreams
from ..evaluation import EvalResult
from ..model import LaMemoLM
from ..parallel.pipeline_engine import (
    build_pipeline_engine,
    load_logical,
    logical_state_dict,
    micro_batches,
    train_batch,
    write_layer_map,
)
from .trainer import Hooks, StepResult, Trainer, rng_state, seed_all, set_rng_state


class PipelineTrainer(Trainer):
    """Trainer whose engine is a DeepSpeed PipelineEngine over `LaMemoPipe` stages."""

    def __init__(self, cfg: RunConfig, plan: Plan, *, comm, device: torch.device,
                 hooks: Hooks | None = None, slurm_job_id: str | None = None):
        self.last_loss = float("nan")
        super().__init__(cfg, plan, comm=comm, device=device, hooks=hooks,
                         slurm_job_id=slurm_job_id)

    def _build_engine(self) -> None:
        """Pipeline stages from the same seeded LaMemoLM as P=1 (so the weights are equal)."""
        self.bundle = build_pipeline_engine(LaMemoLM(self.cfg.model).to(self.device), self.cfg,
                                            self.plan, cuda=self.device.type == "cuda")
        self.engine = self.bundle.engine
        self.pipe = self.engine.module
        self._micro = 0  # micro-batch index within the step, for the loss hook
        self.pipe.loss_hook = self._hooked_loss
        self.dp_rank = self.engine.grid.data_parallel_id  # stages of a replica read alike

    def _hooked_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Hooks.loss on the last stage, as the data-parallel trainer applies it."""
        micro, self._micro = self._micro, self._micro + 1
        return self.hooks.loss(self.step, micro, loss)

    # ------------------------------------------------------------------------- one step
    def train_step(self, stop_requested: bool) -> StepResult:
        self._micro = 0
        t0 = time.perf_counter()
        batch = next(self.loader)  # every stage reads it: identical loader state everywhere
        wait = time.perf_counter() - t0
        items = micro_batches(batch.input.to(self.device), batch.target.to(self.device),
                              batch.reset.to(self.device), micro_batch=self.plan.micro_batch)
        loss, applied = train_batch(self.engine, items)
        if applied and not math.isfinite(loss):
            raise RuntimeError(f"step {self.step + 1}: non-finite loss {loss} but DeepSpeed "
                               "applied the update; parameters may be corrupt")
        self.last_loss = loss
        gn = self.engine.get_global_grad_norm()
        # one collective for the stop flag and every layer's mean alpha (layers live on
        # different stages): [stop, alpha sums..., counts...] summed over all ranks
        local = torch.cat([torch.tensor([float(stop_requested)], dtype=torch.float64),
                           self.pipe.take_alpha_sums().flatten()])
        agreed = self.comm.all_reduce(local)
        n = self.cfg.model.n_layer
        sums, counts = agreed[1:1 + n], agreed[1 + n:]
        alphas = (sums / counts).tolist() if bool((counts > 0).all()) else []
        return StepResult(loss=loss, skipped=not applied,
                          grad_norm=float(gn) if gn is not None else float("nan"),
                          stop=agreed[0].item() > 0, wait_s=wait, alphas=alphas)

    # ------------------------------------------------------------------------- evaluation
    def evaluate(self, split: str, *, max_segments: int = 0, stop=None,
                 memory: str = "carried") -> EvalResult:
        """Loss over `split` from empty eval banks; the training memory is left untouched.
        memory="reset" flags every segment as a stream start (no memory row is valid). The last
        stage reports a mean loss per micro-batch, so recall key symbols are not scored apart
        here (`lamemo eval` on the checkpoint does)."""
        ev = self.plan.eval
        loader = OrderedStreams(
            self.cfg.data.path, split, seg_len=ev.segment_len, rows=ev.batch_size,
            dp_rank=self.dp_rank, dp_size=self.plan.dp_size, prefetch=self.cfg.data.prefetch,
            loop=False)
        by_index: dict[int, list[float]] = {}
        interrupted = False
        self.pipe.reset_memory("eval")
        self.engine.reset_activation_shape()  # eval shapes (mem_len, rows) may differ
        try:
            for i, b in enumerate(loader):
                if max_segments and i >= max_segments:
                    break
                if stop is not None and i and i % 16 == 0 and stop():
                    interrupted = True
                    break
                reset = torch.ones_like(b.reset) if memory == "reset" else b.reset
                items = micro_batches(b.input.to(self.device), b.target.to(self.device),
                                      reset.to(self.device), micro_batch=ev.batch_size)
                loss = self.engine.eval_batch(iter(items), num_micro_batches=1)
                by_index.setdefault(int(b.index), []).append(float(loss))
        finally:
            loader.close()
            self.engine.reset_activation_shape()
            self.pipe.reset_memory("eval")
        losses = [v for vals in by_index.values() for v in vals]
        tokens = len(losses) * ev.batch_size * ev.segment_len * self.plan.dp_size
        by_seg = [sum(by_index[k]) / len(by_index[k]) for k in sorted(by_index)]
        return EvalResult(loss=sum(losses) / max(len(losses), 1), tokens=tokens,
                          by_segment=by_seg, interrupted=interrupted, memory=memory)

    # ------------------------------------------------------------------------- checkpoints
    def rank_state(self) -> dict:
        return {"step": self.step, "world_size": self.comm.world_size,
                "pipeline_stages": self.plan.pp_size, "rows_per_rank": self.plan.rows_per_rank,
                "memory": self.pipe.memory_state_dict(), "loader": self.loader.state_dict(),
                "rng": rng_state(), "counters": {"skipped_total": self.skipped_total,
                                                 "consecutive_skips": self.consecutive_skips,
                                                 "train_seconds": self.train_seconds}}

    def _layout(self) -> dict:
        return {"world_size": self.comm.world_size, "pipeline_stages": self.plan.pp_size,
                "dp_size": self.plan.dp_size, "micro_batch": self.plan.micro_batch,
                "grad_accum": self.plan.grad_accum, "parts": list(self.pipe.parts)}

    def _save_deepspeed(self, folder: str, tag: str) -> None:
        """DeepSpeed's layer files, plus the layer map (layer file -> model names)."""
        self.engine.save_checkpoint(folder, tag=tag, save_latest=False)
        if self.rank == 0:
            write_layer_map(self.pipe, f"{folder}/{tag}")

    def resume(self) -> bool:
        """Load the newest verified checkpoint; True when one was loaded."""
        found = self.ckpt.find_latest()
        if found is None:
            return False
        old = {k: found.meta.get(k, 1 if k == "pipeline_stages" else None)
               for k in ("world_size", "pipeline_stages", "micro_batch", "grad_accum")}
        now = {k: v for k, v in self._layout().items() if k in old}
        if old == now:
            loaded, _ = self.engine.load_checkpoint(str(found.path), tag=DS_TAG)
            if loaded is None:
                raise RuntimeError(f"DeepSpeed could not load {found.path}/{DS_TAG}")
            st = self.ckpt.load_rank_state(found, self.rank)
            self.pipe.load_memory_state_dict(st["memory"], self.device)
            self.loader.load_state_dict(st["loader"])
            set_rng_state(st["rng"])
        else:
            st = self._resume_other_layout(found, old, now)
        self.step = found.step
        self.skipped_total = st["counters"]["skipped_total"]
        self.consecutive_skips = st["counters"]["consecutive_skips"]
        self.train_seconds = st["counters"].get("train_seconds", 0.0)
        self.log(f"resumed from {found.path} at step {self.step}")
        return True

    def _resume_other_layout(self, found, old: dict, now: dict) -> dict:
        load_logical(self.pipe, logical_state_dict(found.path / DS_TAG))
        for _ in range(found.step):  # the schedule continues where it was
            self.bundle.scheduler.step()
        st = self.ckpt.load_rank_state(found, 0)
        self.loader.load_state_dict(st["loader"])  # re-partitions the streams
        self.pipe.reset_memory("train")
        seed_all(self.cfg.train.seed + 7919 * (self.rank + 1) + found.step)
        self.log(f"resume: layout changed ({old} -> {now}): weights loaded through the layer "
                 "map, optimizer moments restarted, memory reset, streams re-partitioned")
        return st
