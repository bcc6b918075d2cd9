"""`lamemo train`: train LaMemo (or xl / none) with DeepSpeed on prepared shards.

Launch with torchrun, the deepspeed launcher, `mpirun -np N`, or Slurm srun (see parallel/dist.py);
a plain `lamemo train` is one process. The config is checked completely, against the world size
the launcher reports, before any process group starts. Exit codes: see train/signals.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..checkpoint.safe_load import add_trust_argument
    from ..config.load import add_config_arguments

    add_config_arguments(p, required=True)
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch even if train.output_dir has checkpoints")
    add_trust_argument(p)


def run(args) -> int:
    overrides = list(args.overrides) + (["checkpoint.resume=false"] if args.no_resume else [])
    return train(args.config, overrides)


def train(config: str | None, overrides: list[str], hooks=None) -> int:
    """Load and check the config, start the process group, train; returns the exit code.

    `hooks` (train.trainer.Hooks) is the fault-injection point of the tests. The trainer picks
    its parallel strategy (data or pipeline parallel) from the plan.
    """
    from ..config.load import dump_config, load_config
    from ..fileio import require_shared_folder

    cfg = load_config(config, overrides)  # unknown keys and bad values fail here, quickly
    import torch

    from ..config.deepspeed import deepspeed_config
    from ..config.derive import World, resolve
    from ..parallel import dist
    from ..train.signals import EXIT_NONFINITE

    denv = dist.discover()
    plan = resolve(cfg, World(world_size=denv.world_size, cuda=torch.cuda.is_available()))
    deepspeed_config(cfg, plan)  # a bad parallel.deepspeed_config fails here, before any group
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls torch collectives that torch marks deprecated: noise in every log
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    dist.init_distributed(denv, backend=plan.backend)
    device = dist.device_for(denv)
    comm = dist.Comm(device if plan.backend == "nccl" else None)
    from ..train.trainer import NonFiniteAbort, Trainer

    if comm.rank == 0:
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
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
