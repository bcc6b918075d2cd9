"""Learning-rate schedules as pure functions of the step (reference: cosine to min_lr, no warmup).

`lr_at(optim, step=, total=)` is the whole schedule; `build_scheduler` wraps it in a LambdaLR
beside the optimizer it drives (parallel/engine.py); its position is part of the Stateful
training state (train/state.py: LRSchedule), so resumed runs continue the same curve.
"""

from __future__ import annotations

import math

import torch

from ..config.schema import OptimConfig


def lr_at(opt: OptimConfig, *, step: int, total: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    if opt.warmup_steps and step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return opt.lr
    if opt.schedule == "inv_sqrt":
        return opt.lr * math.sqrt(max(opt.warmup_steps, 1) / max(step + 1, 1))
    span = max(total - opt.warmup_steps, 1)
    frac = min(max(step - opt.warmup_steps, 0) / span, 1.0)
    if opt.schedule == "linear":
        return opt.min_lr + (opt.lr - opt.min_lr) * (1.0 - frac)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1.0 + math.cos(math.pi * frac))


def build_scheduler(optimizer: torch.optim.Optimizer, opt: OptimConfig, *,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_at` (the optimizer's base lr must be opt.lr)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(opt, step=s, total=total_steps) / opt.lr)
