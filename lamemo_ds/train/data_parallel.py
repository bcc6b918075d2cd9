"""The data-parallel strategy of the trainer (parallel.pipeline_stages == 1, ZeRO 0-3).

- a step: forward/backward of every slot through the DeepSpeed engine around the LaMemoLM
  itself, one `engine.step()` per micro-batch (DeepSpeed steps at the accumulation boundary);
  the memory each slot wrote waits in the MemoryBank until `settle_step` keeps or drops it;
- an evaluation: `evaluation.ModelScorer` over the engine with a fresh evaluation memory;
- the weights of a checkpoint: DeepSpeed's own files (checkpoint keys are the model's names);
  DeepSpeed re-partitions ZeRO states for another world size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.manager import DS_TAG
from ..config.derive import Plan
from ..config.schema import RunConfig
from ..data.recall import recall_scorer
from ..evaluation import ModelScorer
from ..model import LaMemoLM
from ..model.bank import MemoryBank
from ..parallel.engine import build_engine
from .strategy import Hooks, StepResult, settle_step


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
        applied = settle_step(self.engine, self.comm, self.memory, loss=loss_mean, step=step)
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
        return {"world_size": self.comm.world_size, "pipeline_stages": 1,
                "dp_size": self.plan.dp_size, "micro_batch": self.plan.micro_batch,
                "grad_accum": self.plan.grad_accum}

    def same_layout(self, meta: dict) -> bool:
        stages = meta["pipeline_stages"]
        if stages > 1:
            raise RuntimeError(
                f"the checkpoint was written with parallel.pipeline_stages={stages}; resume it "
                f"with --set parallel.pipeline_stages={stages}, or write it for this layout with "
                "`lamemo convert --from deepspeed RUN --to deepspeed NEW` (see tools/)")
        return (meta["world_size"] == self.comm.world_size
                and meta["micro_batch"] * meta["grad_accum"] == self.plan.rows_per_rank)

    def save_weights(self, folder: str, tag: str) -> None:
        self.engine.save_checkpoint(folder, tag=tag, save_latest=False)

    def load_weights(self, path: str | Path, *, same_layout: bool) -> None:
        """DeepSpeed's files (it re-partitions ZeRO states for another world size)."""
        loaded, _ = self.engine.load_checkpoint(str(path), tag=DS_TAG)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {path}/{DS_TAG}")
