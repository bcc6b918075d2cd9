"""Process discovery and process groups for every launcher we support.

One function, `discover()`, turns whatever the launcher left in the environment into a `DistEnv`:

- torchrun and the deepspeed launcher: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
- Slurm srun: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS; MASTER_ADDR is the first host of
  SLURM_JOB_NODELIST (compressed lists like ``node[01-03,07]`` are expanded here); MASTER_PORT is
  derived from SLURM_JOB_ID so that concurrent jobs on one node do not collide;
- mpirun (MPICH/Open MPI): rank and size from mpi4py; rank 0's host name is broadcast as the
  master address unless MASTER_ADDR is set (override it when the host name does not resolve);
- nothing: a single process on 127.0.0.1.

This is the only module (with cli.py) that reads environment variables.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch

DEFAULT_PORT = 29500
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job (found by `discover`)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "single"


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm host list: 'a[01-03,07],b5' -> ['a01', 'a02', 'a03', 'a07', 'b5'].

    Zero padding of ranges is kept ('01-03' gives 01, 02, 03). Commas inside brackets belong to
    the range list, commas outside separate hosts.
    """
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", text):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{i:0{width}d}{suffix}")
    return hosts


def _first_slurm_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_hostlist(nodelist)[0]


def slurm_port(job_id: str) -> int:
    """A port in [15000, 35000) derived from the job id (stable for all tasks of a job)."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN


def _from_mpi(env: Mapping[str, str]) -> DistEnv:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    addr = env.get("MASTER_ADDR") or comm.bcast(socket.gethostname() if rank == 0 else None,
                                                 root=0)
    local = int(env.get("MPI_LOCALRANKID", env.get("OMPI_COMM_WORLD_LOCAL_RANK", "-1")))
    if local < 0:
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    return DistEnv(rank=rank, local_rank=local, world_size=size, master_addr=addr,
                   master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)), launcher="mpirun")


def _under_mpi(env: Mapping[str, str]) -> bool:
    return any(k in env for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK",
                                  "PMIX_RANK", "HYDI_CONTROL_FD"))


def _mpi_launched_inside_slurm(env: Mapping[str, str]) -> bool:
    """mpirun inside a Slurm allocation starts its proxies with srun, so every rank also sees
    SLURM_PROCID=0 / SLURM_NTASKS=1: the MPI variables are the truth then. (Under plain srun with
    a PMI plugin, PMI_SIZE equals SLURM_NTASKS and either source gives the same answer.)"""
    if "SLURM_NTASKS" not in env:
        return True
    if any(k in env for k in ("HYDI_CONTROL_FD", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_RANK")):
        return True
    size = env.get("PMI_SIZE") or env.get("OMPI_COMM_WORLD_SIZE")
    return size is not None and size != env["SLURM_NTASKS"]


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (see the module docstring for the order of preference)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "CROSS_RANK" in env or "DS_ACCELERATOR" in env else "torchrun"
        return DistEnv(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                       world_size=int(env["WORLD_SIZE"]),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)), launcher=launcher)
    if _under_mpi(env) and _mpi_launched_inside_slurm(env):
        return _from_mpi(env)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(
            env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else slurm_port(
            env.get("SLURM_JOB_ID", "0"))
        return DistEnv(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
                       world_size=int(env["SLURM_NTASKS"]), master_addr=addr, master_port=port,
                       launcher="srun")
    if _under_mpi(env):
        return _from_mpi(env)
    return DistEnv(master_port=int(env.get("MASTER_PORT", 0)) or _free_port())


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_launcher(launcher_pid: int, launcher: str) -> bool:
    """Make the kernel SIGKILL this worker when the process that started it exits.

    A worker must never train on without its launcher: orphans of a killed torchrun keep writing
    checkpoints into the run folder the restarted job uses. The parent is torchrun's agent, the
    deepspeed launcher's launch.py, mpirun's proxy (hydra_pmi_proxy / orted) or srun's
    slurmstepd; killing the outer `deepspeed` or `mpirun` command ends those in turn, and the
    worker follows. SIGKILL, not SIGTERM: with the launcher gone the collectives of a graceful
    save can only hang; the newest complete checkpoint is untouched by a kill. `launcher_pid` is
    the parent seen when the process started: if it is already gone (the parent changed), the
    worker exits at once. Linux only (prctl); elsewhere, and for a process started without a
    launcher (launcher "single"), nothing is done. Returns True when armed.
    """
    if launcher == "single" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != launcher_pid:  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def abort_mpi_job(code: int, *, last_words: Callable[[], object] | None = None) -> None:
    """Under mpirun, end every rank of the job now, with exit code `code`; elsewhere nothing.

    A rank that fails under mpirun exits through mpi4py's MPI_Finalize, which waits for the other
    ranks while they wait in a collective for the failed one: the job hangs until the process-group
    timeout (30 minutes by default) and holds its allocation. torchrun's agent and `srun
    --kill-on-bad-exit` end the other ranks themselves; MPI does it only on MPI_Abort. Called on
    a failing exit (the command has already printed why and run its own cleanup). MPI is only
    looked at when this process imported it (`discover` under mpirun) and has more than one rank;
    `last_words` (e.g. printing the traceback) runs just before the abort.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return
    if mpi.COMM_WORLD.Get_size() < 2:
        return
    if last_words is not None:
        last_words()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi.COMM_WORLD.Abort(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(denv: DistEnv, *, backend: str, timeout_s: int = 1800) -> None:
    """Start the default process group (and DeepSpeed's view of it) from a DistEnv.

    The variables torch and DeepSpeed expect are exported first, so DeepSpeed's own discovery
    (which we switch off) would agree with ours.
    """
    import deepspeed

    from .ds_adapter import skip_cpu_shm_kernel

    os.environ.update(RANK=str(denv.rank), LOCAL_RANK=str(denv.local_rank),
                      WORLD_SIZE=str(denv.world_size),
                      MASTER_ADDR=denv.master_addr, MASTER_PORT=str(denv.master_port))
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend, init_method=f"tcp://{denv.master_addr}:{denv.master_port}",
            rank=denv.rank, world_size=denv.world_size, timeout=timedelta(seconds=timeout_s))
    skip_cpu_shm_kernel()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s))


def device_for(denv: DistEnv) -> torch.device:
    """The device of this rank: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", denv.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id `scontrol requeue` takes for this job: ARRAYID_TASKID for an array task (the
    plain job id of the first task would requeue the whole array), else SLURM_JOB_ID."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


class Comm:
    """The few collectives the trainer and checkpoint manager need, over the default group.

    With world size 1 and no process group every call is local, so single-process tools (tests
    of the checkpoint manager, conversion) use the same code path.
    """

    def __init__(self, device: torch.device | None = None):
        self.active = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.active else 0
        self.world_size = torch.distributed.get_world_size() if self.active else 1
        self.device = device or torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce a tensor over all ranks (returns a new tensor; op: sum or max)."""
        if not self.active:
            return t.clone()
        out = t.detach().to(self.device).clone()
        red = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(out, op=red)
        return out.to(t.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one rank."""
        return bool(self.all_reduce(torch.tensor([float(flag)]), op="max").item() > 0)

    def broadcast_int(self, value: int, src: int = 0) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(t, src=src)
        return int(t.item())
