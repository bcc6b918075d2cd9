"""`lamemo model-info`: what a config costs before you train it."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config.load import add_config_arguments

    add_config_arguments(p)
    p.add_argument("--preset", help="a built-in model preset instead of --config "
                   "(wt103_base, enwik8_base, text8_base, debug)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def model_summary(cfg) -> dict:
    import torch

    from ..model import LaMemoLM
    from ..model.flops import segment_flops, state_bytes_per_stream

    with torch.device("meta"):
        n_params = LaMemoLM(cfg).num_parameters()
    fl = segment_flops(cfg)
    return {
        "memory": cfg.memory, "variant": cfg.variant, "parameters": n_params,
        "flops_per_target_token_fwd_bwd": fl.per_target_token,
        "flops_per_segment_fwd_per_stream": fl.forward_per_segment,
        "segment_len": cfg.segment_len, "mem_len": cfg.mem_len,
        "state_bytes_per_stream_fp32": state_bytes_per_stream(cfg),
        "state_bytes_per_stream_bf16": state_bytes_per_stream(cfg, bytes_per_elem=2),
    }


def run(args) -> int:
    from ..config import ModelConfig, load_config
    from ..model.presets import preset

    if args.preset:
        cfg: ModelConfig = preset(args.preset)
    else:
        from ..data.contract import resolve_data

        run_cfg = load_config(args.config, args.overrides)
        if run_cfg.model.vocab_size == "auto":  # the number lives in the data's manifest
            run_cfg = resolve_data(run_cfg)[0]
        cfg = run_cfg.model
    s = model_summary(cfg)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"model       : memory={s['memory']} variant={s['variant']} "
          f"N={s['segment_len']} mem_len={s['mem_len']}")
    print(f"parameters  : {s['parameters']:,} ({s['parameters'] / 1e6:.1f}M)")
    print(f"FLOPs/token : {s['flops_per_target_token_fwd_bwd'] / 1e9:.3f} GFLOP "
          "(forward+backward per target token, incl. position term and look-ahead)")
    print(f"state/stream: {s['state_bytes_per_stream_fp32'] / 2**20:.2f} MiB fp32, "
          f"{s['state_bytes_per_stream_bf16'] / 2**20:.2f} MiB bf16")
    return 0
