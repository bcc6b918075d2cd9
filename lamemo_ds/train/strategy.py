"""What the trainer asks of a parallel strategy, and what a step reports.

The trainer (train/trainer.py) runs the job: streams, training state, metrics, signals and
checkpoints. How a step, an evaluation and the weights are made depends on the layout, and is a
strategy: `DataParallel` (train/trainer.py: the DeepSpeed engine around the LaMemoLM, ZeRO 0-3)
or `PipelineParallel` (train/pipeline.py: a PipelineEngine over LaMemoPipe stages). Both give:

    engine, bundle, dp_rank        the DeepSpeed engine, its optimizer/schedule, the data rank
    memory                         Stateful memory of this rank (settle / reset / state_dict)
    train_step(batch, step=, stop_requested=) -> StepResult
    eval_scorer() -> evaluation.SegmentScorer   the model side of the one evaluation loop
    target_mask(split)             recall key symbols scored apart (None: not supported/needed)
    layout() -> dict               how this run is laid out (checkpoint meta)
    same_layout(meta) -> bool      whether a checkpoint's layout is this one
    save_weights(folder, tag)      DeepSpeed's files (+ the layer map of a pipeline)
    load_weights(path, same_layout=)
    layout_change                  what a resume into another layout does, in words
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


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
