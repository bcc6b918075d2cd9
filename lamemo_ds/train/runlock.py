"""One writer per run folder: an exclusive lock that rank 0 holds for the life of a run.

Two runs writing into one folder (a second `sbatch` of the same job, orphaned workers of a killed
launcher, a requeued job whose old processes still live) overwrite each other's checkpoints and
histories. So before anything is written, rank 0 takes

- ``<run>/.lock``: ``fcntl.flock(LOCK_EX | LOCK_NB)``, held open until the run ends; the kernel
  drops it when the process dies, however it dies;
- ``<run>/.lease.json``: who holds it (host, pid, job id, since) and a heartbeat that a daemon
  thread refreshes every `heartbeat_s`, for file systems where flock does not span hosts.

A second run is refused (`RunFolderLocked`, exit 2) while the holder is alive. The lock is stale,
and is taken over with a message, when its flock is free and the lease names this host (flock is
reliable on one host), when the lease names a process of this host that is gone, or when the
heartbeat is older than `stale_s` (the holder's host died or hangs). A clean exit removes the
lease; a killed run leaves it behind, and the next run takes over. A run that finds its lease
taken over (it hung past `stale_s`) stops writing: `lamemo train` kills itself (`abort_process`).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..fileio import atomic_write

LOCK_FILE = ".lock"
LEASE_FILE = ".lease.json"
HEARTBEAT_S = 10.0
STALE_S = 120.0
LEASE_GRACE_S = 1.0  # a new holder writes its lease this soon after its flock


class RunFolderLocked(RuntimeError):
    """Another live run holds the run folder (the message names it and the way forward)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # a zombie holds no lock and writes nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def read_lease(run_dir: str | Path) -> dict | None:
    """The lease of `run_dir` (None: no lease, or an unreadable one)."""
    try:
        lease = json.loads((Path(run_dir) / LEASE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return lease if isinstance(lease, dict) else None


def holder(lease: dict) -> str:
    """'host H, pid P, Slurm job J, since T' of a lease."""
    job = f", Slurm job {lease['job_id']}" if lease.get("job_id") else ""
    return (f"host {lease.get('host')}, pid {lease.get('pid')}{job}, "
            f"since {_when(lease.get('since', 0))}")


def stale_reason(lease: dict, *, stale_s: float, now: float | None = None) -> str | None:
    """Why the holder of `lease` is gone (None: it may still be alive)."""
    age = (now or time.time()) - lease.get("heartbeat", 0)
    if lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", 0))):
        return f"its process {lease.get('pid')} no longer exists"
    if age > stale_s:
        return f"its heartbeat stopped {age:.0f} s ago (limit {stale_s:.0f} s)"
    return None


def _try_flock(path: Path) -> int | None:
    """An open descriptor of `path` holding LOCK_EX, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@dataclass
class RunLock:
    """The lock of one run folder, held by this process (see `acquire`)."""

    run_dir: Path
    fd: int
    lease: dict
    heartbeat_s: float = HEARTBEAT_S
    on_lost: Callable[[], None] = lambda: None
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _write_lease(self) -> None:
        self.lease["heartbeat"] = time.time()
        atomic_write(self.run_dir / LEASE_FILE, json.dumps(self.lease).encode())

    def _ours(self) -> bool:
        """False once another run's lease is there (a missing lease is written again)."""
        now = read_lease(self.run_dir)
        return now is None or now.get("token") == self.lease["token"]

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._ours():
                self.lost = True
                print(f"lamemo train: the lock of {self.run_dir} was taken over by another run "
                      f"({holder(read_lease(self.run_dir) or {})}), which judged this one dead; "
                      "this run no longer owns the folder", file=sys.stderr, flush=True)
                self.on_lost()
                return
            try:
                self._write_lease()
            except OSError as e:  # a full or unreachable disk: try again at the next beat
                print(f"lamemo train: lease heartbeat failed: {e}", file=sys.stderr, flush=True)

    def start(self) -> RunLock:
        self._write_lease()
        self._thread = threading.Thread(target=self._beat, name="lamemo-run-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat, remove the lease (when still ours) and drop the flock."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if read_lease(self.run_dir) is not None and self._ours():
            (self.run_dir / LEASE_FILE).unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def abort_process() -> None:
    """`on_lost` of a training run: SIGKILL this process at once, so that two runs never write
    one folder; the launcher (torchrun, srun --kill-on-bad-exit) then ends the other ranks."""
    os.kill(os.getpid(), signal.SIGKILL)


def _refusal(run_dir: Path, lease: dict | None, *, stale_s: float) -> RunFolderLocked:
    who = holder(lease) if lease else "a process that wrote no lease yet"
    beat = ""
    if lease and "heartbeat" in lease:
        beat = f", last heartbeat {time.time() - lease['heartbeat']:.0f} s ago"
    return RunFolderLocked(
        f"run folder {run_dir} is in use by another run ({who}{beat}); wait for it to finish or "
        "stop it, or give this run another train.output_dir. A holder that is gone is taken "
        f"over automatically (same host: at once; another host: {stale_s:.0f} s after its last "
        "heartbeat)")


def acquire(run_dir: str | Path, *, job_id: str | None = None, stale_s: float = STALE_S,
            heartbeat_s: float = HEARTBEAT_S, log=print,
            on_lost: Callable[[], None] = lambda: None) -> RunLock:
    """Take the lock of `run_dir` (created if missing) or raise RunFolderLocked; writes
    nothing into a folder another run holds. `log` gets the stale-takeover message; `on_lost`
    runs (in the heartbeat thread) when another run has taken the lock over from this one."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = _try_flock(path)
    lease = read_lease(run_dir)
    if fd is None:
        # flock is held: by a live run, or by a descriptor a dead holder left to a child
        reason = stale_reason(lease, stale_s=stale_s) if lease else None
        if reason is not None:  # or by a run that took it a moment ago and writes its lease now
            time.sleep(LEASE_GRACE_S)
            lease = read_lease(run_dir)
            reason = stale_reason(lease, stale_s=stale_s) if lease else None
        if reason is None:
            raise _refusal(run_dir, lease, stale_s=stale_s)
        log(f"lamemo train: taking over the lock of {run_dir} from {holder(lease)}: {reason}")
        path.unlink(missing_ok=True)  # the old inode stays locked by whoever holds it
        fd = _try_flock(path)
        if fd is None:
            raise _refusal(run_dir, read_lease(run_dir), stale_s=stale_s)
    elif lease is not None:
        here = lease.get("host") == socket.gethostname()
        reason = "it holds no flock any more" if here else stale_reason(lease, stale_s=stale_s)
        if reason is None:  # another host's flock may not reach us: trust its heartbeat
            os.close(fd)
            raise _refusal(run_dir, lease, stale_s=stale_s)
        log(f"lamemo train: taking over the lock of {run_dir} from {holder(lease)}: {reason}")
    now = time.time()
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id, "since": now,
            "heartbeat": now, "token": secrets.token_hex(8)}
    return RunLock(run_dir=run_dir, fd=fd, lease=mine, heartbeat_s=heartbeat_s,
                   on_lost=on_lost).start()
