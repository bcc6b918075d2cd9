"""`lamemo plan`: will this config fit on that cluster, how fast, and in which layout?"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config.load import add_config_arguments

    add_config_arguments(p, required=True)
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu", choices=["h100", "h200", "a100"], default="h100",
                   help="GPU kind: sets peak bf16 TFLOP/s and memory (default h100)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="assumed model FLOP utilisation for the time estimate (default 0.4)")
    p.add_argument("--bandwidth-gbs", type=float, default=50.0,
                   help="per-GPU network bandwidth in GB/s for the communication time "
                   "(default 50, about 400 Gb/s InfiniBand)")
    p.add_argument("--eager", action="store_true",
                   help="estimate activations of the eager attention (default: fused kernels)")
    p.add_argument("--search", action="store_true",
                   help="list layouts (pipeline stages, ZeRO stage, micro-batches), fastest first")
    p.add_argument("--top", type=int, default=8, help="rows shown with --search")
    p.add_argument("--json", action="store_true", help="print JSON")


def _row(e) -> str:
    lay = e.layout
    return (f"dp={lay.dp:<3} pp={lay.pp:<2} zero={lay.zero_stage} mbs={lay.micro_batch_size:<3} "
            f"m={lay.micro_batches:<3} | mem/GPU {e.total_gib:7.2f} GiB "
            f"(states {e.model_state_gib:.2f}, act {e.activation_gib:.2f}, "
            f"lamemo {e.lamemo_state_gib:.2f}) {'fits' if e.fits else 'DOES NOT FIT'} | "
            f"step {e.step_time_s:6.3f} s, {e.tokens_per_s / 1e3:8.1f}k tok/s, "
            f"bubble {e.bubble:.2f}, comm {e.comm_gib_per_step:.2f} GiB/step")


def run(args) -> int:
    from ..config import load_config
    from ..config.schema import ConfigError
    from ..parallel.sizing import GPUS, Layout, estimate, search

    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size == "auto":  # the number lives in the data's manifest
        from ..data.contract import resolve_data

        cfg = resolve_data(cfg)[0]
    gpus = args.nodes * args.gpus_per_node
    if gpus < 1:
        raise ConfigError(f"--nodes x --gpus-per-node must be >= 1, got {gpus}")
    precision = cfg.train.precision
    fused = not args.eager
    if args.search:
        rows = search(cfg.model, gpus=gpus, gpu=args.gpu, precision=precision, mfu=args.mfu,
                      micro_batch_size=cfg.train.micro_batch_size, fused=fused,
                      bandwidth_gbs=args.bandwidth_gbs)[: args.top]
    else:
        pp = cfg.parallel.pipeline_stages
        if gpus % pp:
            raise ConfigError(f"parallel.pipeline_stages={pp} does not divide {gpus} GPUs")
        lay = Layout(dp=gpus // pp, pp=pp, zero_stage=cfg.parallel.zero_stage,
                     micro_batch_size=cfg.train.micro_batch_size,
                     micro_batches=cfg.train.grad_accum)
        rows = [estimate(cfg.model, lay, gpu=args.gpu, precision=precision, mfu=args.mfu,
                         fused=fused, bandwidth_gbs=args.bandwidth_gbs)]
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    peak, mem = GPUS[args.gpu]
    print(f"{args.nodes} node(s) x {args.gpus_per_node} {args.gpu} ({mem:.0f} GiB, "
          f"{peak:.0f} bf16 TFLOP/s, MFU {args.mfu}); {rows[0].params / 1e6:.1f}M parameters, "
          f"precision {precision}, {'fused' if fused else 'eager'} attention")
    for r in rows:
        print(_row(r))
    return 0 if rows[0].fits else 1
