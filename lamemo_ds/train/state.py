"""The training state, each piece Stateful (`state_dict()` / `load_state_dict(d)`).

A checkpoint saves, per rank, one dict of them (checkpoint.manager.CheckpointManager.save):

    progress  Progress          optimizer steps done, skipped steps in total and in a row
    streams   OrderedStreams    every stream's position (data/streams.py)
    memory    MemoryBank        the memory of every stream slot (model/bank.py), or StageMemory,
                                the banks of a pipeline stage (parallel/pipeline.py)
    rng       RNG               python, numpy, torch (and cuda) generators of this rank
    lr        LRSchedule        the learning-rate schedule's position

`training_state` (train/trainer.py) builds that dict for the trainer and for `lamemo convert
--to deepspeed` alike.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import torch

# Rank r's dropout (and every other random draw of training) is seeded with
# seed + DROPOUT_SEED_STRIDE * (r + 1): a prime stride keeps ranks apart from each other and
# from the parameter seed. After a resume into another layout the step is added as well.
DROPOUT_SEED_STRIDE = 7919


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s random draws (dropout); `step` after a change of layout."""
    return seed + DROPOUT_SEED_STRIDE * (rank + 1) + step


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (every device) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RNG:
    """The random generators of this process: python, numpy, torch and, with CUDA, every GPU's."""

    def seed(self, seed: int) -> None:
        seed_all(seed)

    def state_dict(self) -> dict:
        """Tensors, numbers and tuples only: a checkpoint loads without unpickling objects
        (checkpoint/safe_load.py), so numpy's state is spelled out rather than pickled."""
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        st = {"python": random.getstate(),
              "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
              "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def load_state_dict(self, st: dict) -> None:
        random.setstate(st["python"])
        n = st["numpy"]
        if isinstance(n, dict):
            n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                 n["gauss"])
        np.random.set_state(n)  # else the tuple of an old-format file (--trust-checkpoint)
        torch.set_rng_state(st["torch"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])


class Progress:
    """Optimizer steps done (`step`), steps skipped for a non-finite loss or gradient in all
    (`skipped_total`) and in a row (`consecutive_skips`), and the wall time spent in training
    steps, evaluations excluded (`train_seconds`: equal-time comparisons of runs)."""

    FIELDS = ("step", "skipped_total", "consecutive_skips")

    def __init__(self, step: int = 0, skipped_total: int = 0, consecutive_skips: int = 0,
                 train_seconds: float = 0.0):
        self.step = step
        self.skipped_total = skipped_total
        self.consecutive_skips = consecutive_skips
        self.train_seconds = train_seconds

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.FIELDS}, "train_seconds": self.train_seconds}

    def load_state_dict(self, d: dict) -> None:
        for k in self.FIELDS:
            setattr(self, k, int(d[k]))
        self.train_seconds = float(d["train_seconds"])


class LRSchedule:
    """The position of a learning-rate scheduler (a LambdaLR over parallel.schedule.lr_at).

    Loading also sets the optimizer's learning rates, so a resumed step uses the rate of its
    step even where the optimizer state was not restored (another layout: moments restarted).
    """

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.scheduler.load_state_dict(d)
        self._apply()

    def advance_to(self, step: int) -> None:
        """Put the schedule at optimizer step `step` (a checkpoint written for that step)."""
        self.scheduler.last_epoch = step - 1
        with warnings.catch_warnings():  # "step() before optimizer.step()": no step has run
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self._apply()

    def _apply(self) -> None:
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
