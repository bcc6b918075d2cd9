"""What the trainer asks of a parallel strategy (`Strategy`), and what a step reports.

The trainer (train/trainer.py) runs the job: streams, training state, metrics, signals and
checkpoints. How a step, an evaluation and the weights are made depends on the layout, and is a
strategy: `DataParallel` (train/data_parallel.py: the DeepSpeed engine around the LaMemoLM,
ZeRO 0-3) or `PipelineParallel` (train/pipeline_parallel.py: a PipelineEngine over LaMemoPipe
stages). Both end a step with `settle_step`: the one place that decides whether a step was
applied (every rank alike) and that refuses an applied step with a non-finite loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from ..checkpoint.manager import Stateful
from ..evaluation import SegmentScorer


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
    wait_s: float = 0.0
    alphas: list[float] = field(default_factory=list)


class StepMemory(Stateful, Protocol):
    """The training memory of this rank (model/bank.py MemoryBank, parallel/pipeline.py
    StageMemory): the memory a step wrote is kept or dropped by `settle`."""

    def settle(self, applied: bool) -> None: ...

    def reset(self, which: str) -> None: ...


class Strategy(Protocol):
    """A parallel layout of training, built collectively by every rank around one LaMemoLM."""

    engine: Any  # the DeepSpeed engine (DeepSpeedEngine or PipelineEngine)
    bundle: Any  # parallel.engine.EngineBundle: engine, optimizer, schedule, DeepSpeed config
    dp_rank: int  # the data-parallel rank whose streams this rank reads
    memory: StepMemory
    layout_change: ClassVar[str]  # what a resume into another layout does, in words

    def train_step(self, batch, *, step: int, stop_requested: bool) -> StepResult:
        """One optimizer step over `batch` (a segment of every stream of this rank); every
        rank returns the same loss, skip and stop."""

    def eval_scorer(self) -> SegmentScorer:
        """The model side of evaluation.run_eval, with a memory apart from training's."""

    def target_mask(self, split: str) -> Any:
        """Recall key symbols of `split` scored apart (None: not a recall corpus / not
        supported by this layout)."""

    def layout(self) -> dict:
        """How this run is laid out (checkpoint meta, compared on resume)."""

    def same_layout(self, meta: dict) -> bool:
        """Whether a checkpoint's meta has this layout (else its weights are re-mapped)."""

    def save_weights(self, folder: str, tag: str) -> None:
        """DeepSpeed's files of this rank (+ the layer map of a pipeline)."""

    def load_weights(self, path: str | Path, *, same_layout: bool) -> None:
        """Load a checkpoint's weights (and optimizer, when `same_layout`)."""


def settle_step(engine, comm, memory: StepMemory, *, loss: float, step: int) -> bool:
    """Whether the step DeepSpeed just made was applied on every rank (collective).

    A non-finite loss or gradient makes DeepSpeed skip the step; a step skipped on any rank
    (a pipeline stage sees only its own gradients) counts as skipped everywhere, and the memory
    the step wrote is kept only for an applied step. An applied step with a non-finite loss
    means the guard failed: stop before the corrupt parameters are saved.
    """
    applied = not comm.any(not engine.was_step_applied())
    if applied and not math.isfinite(loss):
        raise RuntimeError(f"step {step + 1}: non-finite loss {loss} but DeepSpeed applied the "
                           "update; parameters may be corrupt")
    memory.settle(applied)
    return applied
