"""`lamemo convert` (and tools/convert_checkpoint.py): move a model between checkpoint formats
and layouts. The formats and their readers and writers: lamemo_ds/convert/registry.py.

    lamemo convert --from deepspeed runs/x --to consolidated out/   # the run's newest checkpoint
    lamemo convert --from deepspeed runs/x/checkpoints/step-1000 --to consolidated out/
    lamemo convert --from consolidated out/ --to hf out-hf/
    lamemo convert --from consolidated out/ --to deepspeed ckpt/ --set parallel.zero_stage=3
    lamemo convert --from reference model.pt --config configs/enwik8_base.yaml \
        --to consolidated out/
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..checkpoint.safe_load import add_trust_argument
    from ..config.load import add_config_arguments
    from ..convert.registry import FORMATS, FORMATS_IN, FORMATS_OUT

    formats = "; ".join(f"{name}: {f.help}" for name, f in FORMATS.items())
    p.add_argument("--from", dest="src_format", required=True, choices=FORMATS_IN,
                   help=f"format of the input ({formats})")
    p.add_argument("input", help="input: a run folder, its checkpoints/ or one step-N/ "
                   "(deepspeed; a run stands for its newest complete checkpoint), a model folder "
                   "(consolidated, hf), or reference.pt or its folder (reference)")
    p.add_argument("--to", dest="dst_format", required=True, choices=FORMATS_OUT,
                   help="format of the output")
    p.add_argument("output", help="output folder (must not exist or be empty, unless --force)")
    add_config_arguments(p)
    p.add_argument("--preset", help="model preset describing a bare reference state dict")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "fp64"],
                   help="dtype of the written weights (default: the input's; fp32 from "
                        "DeepSpeed master weights)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="split safetensors above this size, with an index (default 2GB; 0: never)")
    p.add_argument("--world-size", type=int, default=None,
                   help="--to deepspeed: processes of the new layout (default: "
                        "parallel.pipeline_stages x 1 data-parallel rank)")
    p.add_argument("--step", type=int, default=0,
                   help="--to deepspeed: step number of the written checkpoint, where the LR "
                   "schedule continues (default 0)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-verify", action="store_true",
                   help="read the input even if a file fails its manifest's sha256 check")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    add_trust_argument(p)


def _configs(args):
    """(ModelConfig or None, RunConfig or None) from --config/--set/--preset."""
    from ..config.load import load_config, to_dict
    from ..model.presets import preset

    if not (args.preset or args.config or args.overrides):
        return None, None
    base = {"model": to_dict(preset(args.preset))} if args.preset else None
    run = load_config(args.config, args.overrides, base=base)
    # A training config travels with the model only when the user gave one (not a bare preset).
    return run.model, run if args.config else None


def run(args) -> int:
    from ..checkpoint.manager import CheckpointError
    from ..convert.convert import check_output, parse_dtype, parse_size, read_source, write_target

    try:
        check_output(args.output, force=args.force)
        model_cfg, run_cfg = _configs(args)
        dtype = parse_dtype(args.dtype) if args.dtype else None
        loaded = read_source(args.src_format, args.input, model_config=model_cfg,
                             run_config=run_cfg, quiet=args.quiet, verify=not args.no_verify)
        if dtype is None and args.src_format == "deepspeed":
            import torch

            dtype = torch.float32
        options = {"run_config": run_cfg, "overrides": args.overrides,
                   "world_size": args.world_size, "step": args.step}
        write_target(args.dst_format, loaded, args.output, dtype=dtype,
                     max_shard_bytes=parse_size(args.max_shard_size), force=args.force,
                     quiet=args.quiet, deepspeed_options=options)
    except CheckpointError as e:
        print(f"lamemo convert: {e}; nothing was written", file=sys.stderr)
        return 1
    return 0
