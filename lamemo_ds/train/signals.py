"""Preemption: SIGTERM / SIGUSR1 only set a flag; ranks agree at the next step boundary.

Exit codes of `lamemo train` (documented for sbatch scripts and wrappers):
  0   finished max_steps, or stopped by a signal after saving a checkpoint AND rank 0 requeued the
      Slurm job with `scontrol requeue $SLURM_JOB_ID` (the requeued job resumes by itself);
  75  (EX_TEMPFAIL) stopped by a signal after saving a checkpoint, not requeued: run the same
      command again to resume;
  3   aborted: too many consecutive non-finite steps (no checkpoint of the bad state is written);
  2   configuration error (before any process group starts), or the run folder is held by
      another live run (train/runlock.py; nothing is written then): config/errors.py
      EXIT_USER_ERROR, as for every command.
"""

from __future__ import annotations

import signal
import subprocess
from types import FrameType

EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Remembers that a stop signal arrived; the handler does nothing else (async-safe)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signum: int | None = None
        self._previous = {}
        self._signals = signals

    def install(self) -> StopFlag:
        for s in self._signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def is_set(self) -> bool:
        return self.signum is not None


def requeue_slurm(job_id: str | None, log) -> bool:
    """`scontrol requeue JOB` (rank 0 only); True when Slurm accepted it."""
    if not job_id:
        return False
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True,
                       text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        log(f"scontrol requeue {job_id} failed ({e}); exiting with {EXIT_PREEMPTED} instead")
        return False
    log(f"requeued Slurm job {job_id}")
    return True
