"""The pipeline-parallel strategy of the trainer (parallel.pipeline_stages > 1).

The trainer (train/trainer.py) runs the job as for data parallelism; this strategy makes:
- a step: `engine.train_batch` over the step's micro-batches (slot m = micro-batch m); the
  memory it wrote is committed on every stage only if every rank applied the step
  (`strategy.settle_step`);
- an evaluation: the trainer's `evaluation.run_eval` with a `PipelineScorer` (`engine.eval_batch`
  with the stages' separate evaluation banks);
- the weights of a checkpoint: the layer files plus layer_map.json. A checkpoint of another
  layout (P or world size changed, or a data-parallel one) loads its weights through the layer
  map and restarts the optimizer moments; the trainer resets the memory and re-partitions the
  streams, and says so.
The memory of this rank's stages is one Stateful (parallel.pipeline.StageMemory).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.layer_map import logical_state_dict, write_layer_map
from ..checkpoint.manager import DS_TAG
from ..config.derive import Plan
from ..config.schema import RunConfig
from ..evaluation import SegmentScore
from ..model import LaMemoLM
from ..parallel.pipeline_engine import (
    build_pipeline_engine,
    load_logical,
    micro_batches,
    record_grad_norm,
    train_batch,
)
from .strategy import Hooks, StepResult, settle_step


class PipelineScorer:
    """`engine.eval_batch` of one segment from the evaluation banks; the training memory is left
    untouched. A fresh memory flags every row as a stream start (no memory row is valid). The
    engine averages the last stage's mean over data-parallel ranks and broadcasts it to every
    stage, so the score is already a sum over all ranks (every rank scores as many tokens)."""

    global_sums = True

    def __init__(self, engine, device: torch.device, *, dp_size: int):
        self.engine, self.pipe, self.device, self.dp_size = engine, engine.module, device, dp_size

    def start(self) -> None:
        self.pipe.reset_memory("eval")
        self.engine.reset_activation_shape()  # eval shapes (mem_len, rows) may differ

    def __call__(self, x, y, reset, *, fresh: bool) -> SegmentScore:
        if fresh:
            reset = torch.ones_like(reset)
        items = micro_batches(x.to(self.device), y.to(self.device), reset.to(self.device),
                              micro_batch=x.shape[0])
        mean = float(self.engine.eval_batch(iter(items), num_micro_batches=1))
        n = y.numel() * self.dp_size
        return SegmentScore(torch.tensor(mean * n, dtype=torch.float64), n)

    def close(self) -> None:
        self.engine.reset_activation_shape()
        self.pipe.reset_memory("eval")


class PipelineParallel:
    """A DeepSpeed PipelineEngine over `LaMemoPipe` stages built from the given LaMemoLM."""

    layout_change = "weights loaded through the layer map, optimizer moments restarted"

    def __init__(self, cfg: RunConfig, plan: Plan, *, comm, device: torch.device, hooks: Hooks,
                 model: LaMemoLM):
        self.cfg, self.plan, self.comm, self.device, self.hooks = cfg, plan, comm, device, hooks
        self.rank = comm.rank
        self.bundle = build_pipeline_engine(model.to(device), cfg, plan)
        self.engine = self.bundle.engine
        self.fp32_grad_norm = record_grad_norm(self.engine)
        self.pipe = self.engine.module
        self.memory = self.pipe.memory
        self._step = 0  # the trainer's step and the micro-batch index, for the loss hook
        self._micro = 0
        self.pipe.loss_hook = self._hooked_loss
        self.dp_rank = self.engine.grid.data_parallel_id  # stages of a replica read alike

    def _hooked_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Hooks.loss on the last stage, as the data-parallel strategy applies it."""
        micro, self._micro = self._micro, self._micro + 1
        return self.hooks.loss(self._step, micro, loss)

    # ------------------------------------------------------------------------- one step
    def train_step(self, batch, *, step: int, stop_requested: bool) -> StepResult:
        self._step, self._micro = step, 0
        items = micro_batches(batch.input.to(self.device), batch.target.to(self.device),
                              batch.reset.to(self.device), micro_batch=self.plan.micro_batch)
        loss = train_batch(self.engine, items)
        applied = settle_step(self.engine, self.comm, self.memory, loss=loss, step=step)
        gn = self.engine.get_global_grad_norm()
        gn = self.fp32_grad_norm() if gn is None else gn
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
                          stop=agreed[0].item() > 0, alphas=alphas)

    # ------------------------------------------------------------------------- evaluation
    def eval_scorer(self) -> PipelineScorer:
        """The segment scorer of evaluation.run_eval: the stages' separate evaluation banks."""
        return PipelineScorer(self.engine, self.device, dp_size=self.plan.dp_size)

    def target_mask(self, split: str) -> None:
        """The last stage reports a mean loss per micro-batch, so recall key symbols are not
        scored apart here (`lamemo eval` on the checkpoint does)."""
        return None

    # ------------------------------------------------------------------------- checkpoints
    def layout(self) -> dict:
        return {"world_size": self.comm.world_size, "pipeline_stages": self.plan.pp_size,
                "dp_size": self.plan.dp_size, "micro_batch": self.plan.micro_batch,
                "grad_accum": self.plan.grad_accum, "parts": list(self.pipe.parts)}

    def same_layout(self, meta: dict) -> bool:
        keys = ("world_size", "pipeline_stages", "micro_batch", "grad_accum")
        now = self.layout()
        return all(meta[k] == now[k] for k in keys)

    def save_weights(self, folder: str, tag: str) -> None:
        """DeepSpeed's layer files, plus the layer map (layer file -> model names)."""
        self.engine.save_checkpoint(folder, tag=tag, save_latest=False)
        if self.rank == 0:
            write_layer_map(f"{folder}/{tag}", self.pipe.layer_map())

    def load_weights(self, path: str | Path, *, same_layout: bool) -> None:
        """This layout: DeepSpeed's own files (optimizer included); another: the weights by
        name through the layer map (or a data-parallel checkpoint's module)."""
        if same_layout:
            loaded, _ = self.engine.load_checkpoint(str(path), tag=DS_TAG)
            if loaded is None:
                raise RuntimeError(f"DeepSpeed could not load {path}/{DS_TAG}")
        else:
            load_logical(self.pipe, logical_state_dict(f"{path}/{DS_TAG}"))
