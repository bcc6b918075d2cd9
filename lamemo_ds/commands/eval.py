"""`lamemo eval`: perplexity and bits per character of an exported model over a prepared split.

    lamemo eval --model out/ --data data/enwik8 --split test --protocol paper
    lamemo eval --model out/ --data data/enwik8 --split test --protocol xl \
        --seg-len 80 --mem-len 2100 --clamp-len 820

Protocols (SPEC §6): `paper` evaluates with the training segment and memory lengths; `xl` with
Transformer-XL's longer memory (flags, else the `eval:` section of the training config stored
with the model). The result names the protocol and every length it used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="folder written by `lamemo convert`")
    p.add_argument("--data", required=True, help="folder written by `lamemo prepare`")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--protocol", choices=["paper", "xl"], default="paper",
                   help="paper: training N and mem_len; xl: longer memory (see --mem-len)")
    p.add_argument("--seg-len", type=int, default=None, help="segment length (xl protocol)")
    p.add_argument("--mem-len", type=int, default=None, help="memory length (xl protocol)")
    p.add_argument("--clamp-len", type=int, default=None, help="clamp distances (xl protocol)")
    p.add_argument("--same-length", choices=["true", "false"], default=None,
                   help="every query sees the same number of keys (xl default: true)")
    p.add_argument("--batch-size", type=int, default=8, help="streams evaluated together")
    p.add_argument("--max-segments", type=int, default=0,
                   help="stop after this many segments per stream (0: the whole split)")
    p.add_argument("--output", help="also write the JSON result to this file")
    p.add_argument("--record", action="store_true",
                   help="store the result in the model folder (eval.json, README card)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def protocol_settings(args, cfg, run_config) -> dict:
    """Segment/memory lengths, clamp and same_length for the chosen protocol."""
    paper = {"segment_len": cfg.segment_len, "mem_len": cfg.mem_len,
             "clamp_len": cfg.clamp_len, "same_length": cfg.same_length}
    if args.protocol == "paper":
        return paper
    stored = run_config.eval if run_config is not None else None
    same = None if args.same_length is None else args.same_length == "true"
    picks = {
        "segment_len": args.seg_len if args.seg_len is not None else
        getattr(stored, "segment_len", None),
        "mem_len": args.mem_len if args.mem_len is not None else getattr(stored, "mem_len", None),
        "clamp_len": args.clamp_len if args.clamp_len is not None else
        getattr(stored, "clamp_len", None),
        "same_length": same if same is not None else getattr(stored, "same_length", None),
    }
    if picks["mem_len"] is None:
        raise SystemExit("lamemo eval: --protocol xl needs --mem-len (and usually --seg-len, "
                         "--clamp-len); none is stored in the model's training config")
    defaults = {**paper, "same_length": True}
    return {k: defaults[k] if v is None else v for k, v in picks.items()}


def _batches(args, seg_len: int):
    from ..data.streams import OrderedStreams

    return OrderedStreams(args.data, args.split, seg_len=seg_len, rows=args.batch_size,
                          loop=False)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from ..checkpoint.convert import RUN_CONFIG_NAME, record_eval
    from ..checkpoint.safetensors_io import CheckpointError, load_model_folder
    from ..config.load import load_config
    from ..evaluation import evaluate

    try:
        model, _ = load_model_folder(args.model, dtype=torch.float32)
    except CheckpointError as e:
        print(f"lamemo eval: {e}", file=sys.stderr)
        return 1
    run_cfg_path = Path(args.model) / RUN_CONFIG_NAME
    run_config = load_config(run_cfg_path) if run_cfg_path.is_file() else None
    s = protocol_settings(args, model.config, run_config)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    batches = _batches(args, s["segment_len"])
    total = None
    if hasattr(batches, "__len__"):
        n_seg = len(batches)
        if args.max_segments:
            n_seg = min(n_seg, args.max_segments)
        total = n_seg * args.batch_size * s["segment_len"]
    bar = tqdm(total=total, unit="tok", desc=f"eval {args.split}", disable=args.no_progress,
               file=sys.stderr)
    result = evaluate(model, batches, mem_len=s["mem_len"], clamp_len=s["clamp_len"],
                      same_length=s["same_length"], max_segments=args.max_segments,
                      progress=bar.update)
    bar.close()
    out = {"model": str(args.model), "data": str(args.data), "split": args.split,
           "protocol": args.protocol, **s, "batch_size": args.batch_size, **result.as_dict()}
    print(f"{args.split}: loss {result.loss:.4f}  ppl {result.ppl:.3f}  bpc {result.bpc:.4f}  "
          f"({result.tokens:,} tokens, protocol {args.protocol}, N={s['segment_len']}, "
          f"mem_len={s['mem_len']})", file=sys.stderr)
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if args.record:
        record_eval(Path(args.model), model, out)
    return 0
