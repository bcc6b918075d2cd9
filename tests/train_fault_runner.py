"""One rank of a training run with injected faults (launched by tests via train_support.spawn).

  --kill-at STEP --fault-rank R    SIGKILL rank R right after optimizer step STEP
  --signal-at STEP --fault-rank R  send SIGUSR1 to rank R after step STEP (preemption)
  --nan-at STEP --fault-rank R     make rank R's loss NaN in step STEP (0-based step index)
  --crash-phase NAME --crash-step S  SIGKILL every rank after checkpoint save phase NAME of step S
  --dump-params PATH               write this rank's parameters to PATH.rankR.pt after each step
  --hold-phase NAME --hold-step S --hold-file PATH
                                   in checkpoint save phase NAME of step S, rank 0 creates PATH
                                   and every rank reaching it sleeps (the kill drill kills there)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

from lamemo_ds.commands.train import train
from lamemo_ds.parallel.dist import discover
from lamemo_ds.train.trainer import Hooks


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--fault-rank", type=int, default=1)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--signal-at", type=int)
    p.add_argument("--nan-at", type=int)
    p.add_argument("--crash-phase")
    p.add_argument("--crash-step", type=int)
    p.add_argument("--dump-params")
    p.add_argument("--hold-phase")
    p.add_argument("--hold-step", type=int)
    p.add_argument("--hold-file")
    a = p.parse_args()
    rank = discover().rank
    mine = rank == a.fault_rank
    state = {"step": 0}

    def loss_hook(step: int, micro: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if mine and step == a.nan_at else loss

    def step_end(trainer, step: int) -> None:
        state["step"] = step
        if mine and step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if mine and step == a.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        if a.dump_params:  # overwritten every step: the file holds the last step's parameters
            params = {n: t.detach().clone() for n, t in trainer.engine.module.state_dict().items()}
            torch.save(params, f"{a.dump_params}.rank{rank}.pt")

    def save_phase(name: str) -> None:
        if name == a.crash_phase and state["step"] == a.crash_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if name == a.hold_phase and state["step"] == a.hold_step:
            if rank == 0:
                Path(a.hold_file).write_text(str(os.getpid()))
            time.sleep(600)

    return train(a.config, a.overrides, Hooks(loss=loss_hook, step_end=step_end,
                                              save_phase=save_phase))


if __name__ == "__main__":
    sys.exit(main())
