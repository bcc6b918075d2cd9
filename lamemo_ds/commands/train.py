"""`lamemo train`: train LaMemo (or xl / none) with DeepSpeed on prepared shards.

Launch with torchrun, the deepspeed launcher, `mpirun -np N`, or Slurm srun (see parallel/dist.py);
a plain `lamemo train` is one process. The config is checked completely, against the world size
the launcher reports, before any process group starts. Exit codes: see train/signals.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

# the parent as it was when this worker started, before torch loads (dist.die_with_launcher)
LAUNCHER_PID = os.getppid()


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..checkpoint.safe_load import add_trust_argument
    from ..config.load import add_config_arguments

    add_config_arguments(p, required=True)
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch; refused if train.output_dir holds checkpoints "
                   "(a requeue would resume those), unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="start from scratch, moving the old run in train.output_dir "
                   "(checkpoints, metrics, TensorBoard logs) aside into "
                   "train.output_dir/superseded-<UTC time>/; deletes nothing")
    add_trust_argument(p)


def run(args) -> int:
    return train(args.config, list(args.overrides), no_resume=args.no_resume,
                 overwrite=args.overwrite)


def preflight(cfg, world, *, overwrite: bool = False):
    """Every check that needs no process group, before anything is written: the model–data
    contract (`vocab_size: auto` resolved), the data splits, and the run folder (a fresh start
    over old checkpoints, a resume with another model or schedule). Returns (cfg, plan)."""
    from ..checkpoint.run_folder import check_resume, refuse_fresh_start
    from ..config.derive import resolve
    from ..config.errors import UserError
    from ..data.contract import check_training_data, resolve_data

    plan = resolve(cfg, world)  # the config's own rules first (they need no data)
    cfg, manifest = resolve_data(cfg)
    check_training_data(cfg, plan, manifest)
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.output_dir={run_dir} is a file, not a folder")
    if not cfg.checkpoint.resume and not overwrite:
        refuse_fresh_start(run_dir)
    elif cfg.checkpoint.resume:
        check_resume(cfg, run_dir)
    return cfg, plan


def train(config: str | None, overrides: list[str], hooks=None, *, no_resume: bool = False,
          overwrite: bool = False) -> int:
    """Load and check the config, start the process group, train; returns the exit code.

    `hooks` (train.trainer.Hooks) is the fault-injection point of the tests. The trainer picks
    its parallel strategy (data or pipeline parallel) from the plan. `overwrite` (implies
    `no_resume`) moves an old run aside; see checkpoint/run_folder.py.
    """
    from ..config.load import load_config

    fresh = ["checkpoint.resume=false"] if no_resume or overwrite else []
    cfg = load_config(config, list(overrides) + fresh)  # unknown keys, bad values fail here
    import torch

    from ..config.deepspeed_config import deepspeed_config
    from ..config.derive import World
    from ..config.errors import EXIT_USER_ERROR
    from ..parallel import dist

    denv = dist.discover()
    dist.die_with_launcher(LAUNCHER_PID, denv.launcher)
    cfg, plan = preflight(cfg, World(world_size=denv.world_size, cuda=torch.cuda.is_available()),
                          overwrite=overwrite)
    deepspeed_config(cfg, plan)  # a bad parallel.deepspeed_config fails here, before any group
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls torch collectives that torch marks deprecated: noise in every log
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    dist.init_distributed(denv, backend=plan.backend)
    device = dist.device_for(denv)
    comm = dist.Comm(device if plan.backend == "nccl" else None)
    lock = _lock_run_folder(comm, cfg.train.output_dir, dist.slurm_job_id())
    if lock is False:
        torch.distributed.destroy_process_group()
        return EXIT_USER_ERROR
    try:
        return _train(cfg, plan, denv, comm, device, hooks, overwrite=overwrite)
    finally:
        if lock is not None:
            lock.release()


def _lock_run_folder(comm, run_dir: str, job_id: str | None):
    """Rank 0 takes the run lock before anything is written; every rank learns the outcome.
    Returns the lock (rank 0), None (other ranks) or False (refused: one line on stderr)."""
    from ..train.runlock import RunFolderLocked, abort_process, acquire

    lock, ok = None, 1
    if comm.rank == 0:
        try:
            lock = acquire(run_dir, job_id=job_id, log=lambda msg: print(msg, flush=True),
                           on_lost=abort_process)
        except RunFolderLocked as e:
            print(f"lamemo train: {e}", file=sys.stderr, flush=True)
            ok = 0
        except OSError as e:  # e.g. a read-only or missing mount
            print(f"lamemo train: cannot lock the run folder train.output_dir={run_dir} ({e}); "
                  "give a folder this user can write", file=sys.stderr, flush=True)
            ok = 0
    if comm.broadcast_int(ok) == 0:
        return False
    return lock


def _train(cfg, plan, denv, comm, device, hooks, *, overwrite: bool) -> int:
    """The run itself, under the run lock."""
    import torch

    from ..checkpoint.manager import RUN_CONFIG
    from ..checkpoint.run_folder import require_shared_folder, supersede
    from ..config.load import dump_config
    from ..fileio import atomic_write
    from ..parallel import dist
    from ..train.signals import EXIT_NONFINITE
    from ..train.trainer import NonFiniteAbort, Trainer

    if comm.rank == 0:
        out = Path(cfg.train.output_dir)
        # every rank passed preflight before the group formed: moving the old run is safe now
        moved = supersede(out) if overwrite else None
        if moved is not None:
            print(f"lamemo train: --overwrite: the old run in {out} moved to {moved}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / RUN_CONFIG, dump_config(cfg).encode())
        print(f"lamemo train: {denv.world_size} process(es) via {denv.launcher}, "
              f"output {out}", flush=True)
    require_shared_folder(comm, cfg.train.output_dir)  # checkpoints need one shared folder
    trainer = Trainer(cfg, plan, comm=comm, device=device, hooks=hooks,
                      slurm_job_id=dist.slurm_job_id())
    try:
        code = trainer.fit()
    except NonFiniteAbort as e:
        print(f"lamemo train: rank {comm.rank}: {e}", file=sys.stderr, flush=True)
        code = EXIT_NONFINITE
    comm.barrier()
    torch.distributed.destroy_process_group()
    return code
