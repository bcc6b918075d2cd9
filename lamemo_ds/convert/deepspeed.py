"""The deepspeed format: `lamemo train` checkpoints, read into one model and written for a layout.

Reading (`read_deepspeed`): a run folder, its checkpoints/ or one step-N/ folder of any ZeRO
stage or pipeline layout -> the fp32 model (checkpoint/deepspeed_files.py reads and verifies the
files) with the training config and the tokenizer of its data.

`--to deepspeed`: a model into a `lamemo train` checkpoint for a new layout (ZeRO stage, world
size, pipeline stages), to resume or fine-tune on another cluster shape.

The checkpoint must be the one the trainer itself would write, so it is written by the trainer's
own builders (train/trainer.py): `world_size` processes (torch.distributed.run) each build the
parallel strategy of the new layout (data or pipeline parallel) around the loaded weights
(before deepspeed.initialize, so the fp32 masters and ZeRO partitions start from them), the
stream loader and the training state (fresh memory, the LR schedule at the step), and save
through CheckpointManager (manifest, `latest`). Optimizer moments start at zero.

Output folder = a run folder: config.yaml (train.output_dir = this folder) and
checkpoints/step-N/...; resume with `lamemo train --config OUT/config.yaml`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from ..checkpoint.deepspeed_files import find_run_config, read_state_dict
from ..checkpoint.manager import RUN_CONFIG, CheckpointError
from ..config.load import dump_config, load_config, to_dict
from ..config.schema import RunConfig
from ..data.tokenizer import tokenizer_files
from ..export.tied import tied_aliases
from .consolidated import build_model
from .loaded import Loaded

SOURCE = ".source"


def _strip_prefix(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix ('module.', 'model.', ...) so names match LaMemoLM's."""
    if expected & set(sd):
        return sd
    for key in sd:
        for name in expected:
            if key.endswith("." + name):
                prefix = key[: -len(name)]
                return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def read_deepspeed(path: Path, *, run_config: RunConfig | None = None, quiet: bool = False,
                   check_manifest: bool = True) -> Loaded:
    """A DeepSpeed checkpoint -> Loaded with the fp32 model and the training config."""
    from ..model import LaMemoLM

    step, sd, what = read_state_dict(path, quiet, check_manifest=check_manifest)
    run_cfg = find_run_config(step, run_config)
    if not quiet:
        print(f"read  {step}: {what}", flush=True)
    with torch.device("meta"):
        ref = LaMemoLM(run_cfg.model)
    aliases = tied_aliases(ref)
    sd = _strip_prefix(sd, set(ref.state_dict()))
    sd = {k: v for k, v in sd.items() if k not in aliases}
    model = build_model(run_cfg.model, sd, str(step), dtype=torch.float32)
    data_dir = Path(run_cfg.data.path)
    toks = tokenizer_files(data_dir) if data_dir.is_dir() else {}
    notes = [] if toks else [f"no tokenizer found in data.path={data_dir}"]
    return Loaded(model=model, source=str(step), run_config=run_cfg, tokenizer_files=toks,
                  notes=notes)


def new_run_config(loaded, *, run_config: RunConfig | None, overrides: list[str],
                   final: Path) -> RunConfig:
    """The run config of the new layout: the given one, else the source's, plus --set; the
    model section always comes from the weights; output_dir points at the output folder."""
    base = to_dict(run_config or loaded.run_config or RunConfig())
    base["model"] = to_dict(loaded.model.config)
    base.setdefault("train", {})["output_dir"] = str(final.resolve())
    return load_config(None, overrides, base=base)


def write_deepspeed(loaded, tmp: Path, *, final: Path, quiet: bool = False,
                    run_config: RunConfig | None = None, overrides: list[str] | None = None,
                    world_size: int | None = None, step: int = 0) -> list[str]:
    """Launch the writer ranks; returns the files written (relative to the output)."""
    from .consolidated import write_consolidated

    cfg = new_run_config(loaded, run_config=run_config, overrides=overrides or [], final=final)
    world = world_size or cfg.parallel.pipeline_stages
    (tmp / SOURCE).mkdir()
    write_consolidated(loaded, tmp / SOURCE, dtype=torch.float32, max_shard_bytes=0)
    (tmp / RUN_CONFIG).write_text(dump_config(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={world}", "-m", "lamemo_ds.convert.deepspeed",
           str(tmp), str(step)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if not quiet:
        print(f"write ZeRO-{cfg.parallel.zero_stage}, {world} process(es), step {step}",
              flush=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise CheckpointError(f"writing the DeepSpeed checkpoint failed (exit {r.returncode}):\n"
                              f"{(r.stdout + r.stderr)[-4000:]}")
    import shutil

    shutil.rmtree(tmp / SOURCE)
    return sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())


def _rank_main(out: Path, step: int) -> None:
    """One writer rank (run under torch.distributed.run): the trainer's own builders make the
    strategy of the new layout around the loaded weights, the streams and the training state at
    `step` (fresh memory, the schedule at `step`), and the checkpoint manager saves them."""
    from ..checkpoint.manager import CheckpointManager
    from ..config.derive import World, resolve
    from ..parallel import dist
    from ..train.state import RNG, Progress, rank_seed
    from ..train.trainer import (
        Hooks,
        build_parallel,
        build_streams,
        checkpoint_meta,
        training_state,
    )
    from .consolidated import load_model_folder

    cfg = load_config(out / RUN_CONFIG)
    denv = dist.discover()
    plan = resolve(cfg, World(world_size=denv.world_size, cuda=torch.cuda.is_available()))
    dist.init_distributed(denv, backend=plan.backend)
    device = dist.device_for(denv)
    comm = dist.Comm(device if plan.backend == "nccl" else None)
    model, _ = load_model_folder(out / SOURCE, dtype=torch.float32)
    model.train()
    parallel = build_parallel(cfg, plan, comm=comm, device=device, hooks=Hooks(), model=model)
    streams = build_streams(cfg, plan, parallel.dp_rank, prefetch=1)
    rng = RNG()
    rng.seed(rank_seed(cfg.train.seed, comm.rank))  # the trainer's per-rank dropout seed
    state = training_state(progress=Progress(step=step), streams=streams, parallel=parallel,
                           rng=rng)
    state["lr"].advance_to(step)
    mgr = CheckpointManager(out / "checkpoints", keep_last=cfg.checkpoint.keep_last, comm=comm,
                            log=lambda *a: None)
    try:
        mgr.save(step, save_weights=parallel.save_weights, state=state,
                 config_text=dump_config(cfg),
                 meta=checkpoint_meta(cfg, plan, parallel,
                                      converted_by="lamemo convert --to deepspeed"))
    finally:
        streams.close()
    comm.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), int(sys.argv[2]))
