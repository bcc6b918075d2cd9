"""`lamemo eval`: perplexity and bits per character of a model over a prepared split.

    lamemo eval --model out/ --data data/enwik8 --split test --protocol paper
    lamemo eval --model runs/x --data data/enwik8 --memory reset     # a training run's checkpoint
    lamemo eval --model out/ --data data/enwik8 --split test --protocol xl \
        --seg-len 80 --mem-len 2100 --clamp-len 820

The model is a `lamemo convert` folder (consolidated or hf) or a DeepSpeed training checkpoint
(a run folder, its checkpoints/ or one step-N/). `--memory both` (default) evaluates twice, with
the memory carried between segments and with an empty memory before every segment, and reports
the memory gain loss(reset) - loss(carried); `carried` or `reset` runs one pass. On a recall
corpus (`lamemo prepare --corpus recall`) the retrieval cost in bits per key symbol is reported
too, next to log2(alphabet), the cost of a model that cannot see the key.

Protocols (docs/algorithm.md §6): `paper` evaluates with the training segment and memory
lengths; `xl` with Transformer-XL's longer memory (flags, else the `eval:` section of the
training config stored with the model). The result names the protocol and every length it used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..checkpoint.safe_load import add_trust_argument

    p.add_argument("--model", required=True, help="folder written by `lamemo convert`, or a "
                   "DeepSpeed checkpoint (run folder, its checkpoints/ or a step-N/)")
    p.add_argument("--from", dest="src_format", choices=["auto", "consolidated", "hf",
                                                          "deepspeed"], default="auto",
                   help="format of --model (auto: config.json means consolidated/hf, "
                   "otherwise a DeepSpeed checkpoint)")
    p.add_argument("--memory", choices=["both", "carried", "reset"], default="both",
                   help="carried: memory passed between segments; reset: empty memory before "
                   "every segment (same model, same tokens); both (default): the two, and the "
                   "memory gain")
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
    p.add_argument("--no-verify", action="store_true",
                   help="use the model even if a file fails its manifest's sha256 check")
    add_trust_argument(p)


def protocol_settings(args, cfg, run_config) -> dict:
    """Segment/memory lengths, clamp and same_length for the chosen protocol."""
    mem_len = 0 if cfg.memory == "none" else cfg.mem_len  # none keeps no memory whatever it says
    paper = {"segment_len": cfg.segment_len, "mem_len": mem_len,
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
        from ..config.errors import UserError

        raise UserError("--protocol xl needs --mem-len (and usually --seg-len, --clamp-len); "
                        "none is stored in the model's training config")
    defaults = {**paper, "same_length": True}
    return {k: defaults[k] if v is None else v for k, v in picks.items()}


def _batches(args, seg_len: int):
    from ..data.streams import OrderedStreams

    return OrderedStreams(args.data, args.split, seg_len=seg_len, rows=args.batch_size,
                          loop=False)


def load_model(path: str, fmt: str, *, verify: bool = True):
    """(LaMemoLM in eval mode, training RunConfig or None) from any format eval accepts;
    `verify` checks the files against the model's sha256 manifest first."""
    import torch

    from ..config.load import load_config
    from ..convert.convert import RUN_CONFIG_NAME, read_source

    folder = Path(path)
    if fmt == "auto":
        fmt = "consolidated" if (folder / "config.json").is_file() else "deepspeed"
    if fmt == "deepspeed":
        # DeepSpeed's consolidation prints progress on stdout, which holds only the JSON result
        with contextlib.redirect_stdout(sys.stderr):
            loaded = read_source("deepspeed", folder, quiet=True, verify=verify)
        return loaded.model.float().eval(), loaded.run_config
    from ..checkpoint.safetensors_io import load_model_folder

    model, _ = load_model_folder(folder, dtype=torch.float32, verify=verify)
    run_cfg_path = folder / RUN_CONFIG_NAME
    return model, load_config(run_cfg_path) if run_cfg_path.is_file() else None


def _one_pass(args, model, s: dict, memory: str, scorer, device: str):
    from tqdm import tqdm

    from ..evaluation import evaluate

    batches = _batches(args, s["segment_len"])
    n_seg = len(batches)
    if args.max_segments:
        n_seg = min(n_seg, args.max_segments)
    bar = tqdm(total=n_seg * args.batch_size * s["segment_len"], unit="tok",
               desc=f"eval {args.split} ({memory} memory)", disable=args.no_progress,
               file=sys.stderr)
    try:
        return evaluate(model.to(device), batches, mem_len=s["mem_len"],
                        clamp_len=s["clamp_len"], same_length=s["same_length"],
                        max_segments=args.max_segments, progress=bar.update, memory=memory,
                        target_mask=scorer)
    finally:
        bar.close()
        batches.close()


def summarize(results: dict, kind: str, spec) -> dict:
    """The JSON fields of a (carried and/or reset) evaluation: the first pass's numbers at top
    level, each pass under its name, the memory gain, and the recall cost when scored."""
    from ..evaluation import memory_gain

    main = results.get("carried") or results["reset"]
    out = dict(main.as_dict())
    if len(results) == 2:
        out["reset"] = results["reset"].as_dict()
        out.update(memory_gain(results["carried"], results["reset"]))
        if kind == "none":
            out["memory_gain_note"] = "model.memory=none: carried and reset are the same model"
    if spec is not None:
        out["recall"] = {"bits_per_key_symbol": {k: r.subset_bits for k, r in results.items()},
                         "chance_bits": spec.bits_per_symbol, "key_symbols": main.subset_tokens,
                         "gap": [spec.gap_min, spec.gap_max]}
    return out


def _report(split: str, out: dict, s: dict, protocol: str) -> None:
    for name in ("carried", "reset"):
        r = out if out["memory"] == name else out.get(name)
        if r is not None:
            print(f"{split} ({name} memory): loss {r['loss']:.4f}  ppl {r['ppl']:.3f}  "
                  f"bpc {r['bpc']:.4f}  ({r['tokens']:,} tokens, protocol {protocol}, "
                  f"N={s['segment_len']}, mem_len={s['mem_len']})", file=sys.stderr)
    if "memory_gain_bpc" in out:
        note = f" ({out['memory_gain_note']})" if "memory_gain_note" in out else ""
        print(f"memory gain: {out['memory_gain_bpc']:+.4f} bpc (loss(reset) - loss(carried)), "
              f"ppl ratio {out['memory_ppl_ratio']:.3f}{note}", file=sys.stderr)
    if "recall" in out:
        rc = out["recall"]
        bits = ", ".join(f"{k} {v:.3f}" for k, v in rc["bits_per_key_symbol"].items())
        print(f"recall: bits per key symbol: {bits} (chance {rc['chance_bits']:.3f}; "
              f"{rc['key_symbols']:,} key symbols, gap {rc['gap'][0]}-{rc['gap'][1]})",
              file=sys.stderr)


def tokenizer_folder(model_path: str | Path, run_config) -> Path | None:
    """Where the tokenizer of a model is: its export folder (convert copies the tokenizer
    there), else the data folder it was trained on; None when neither holds one."""
    from ..data.contract import folder_tokenizer

    for folder in (Path(model_path), Path(run_config.data.path) if run_config else None):
        if folder is not None and folder_tokenizer(folder) is not None:
            return folder
    return None


def _check_args(args) -> None:
    """The flags alone, before anything is read (UserError: exit 2)."""
    from ..config.errors import UserError

    if args.record and not (Path(args.model) / "config.json").is_file():
        raise UserError(f"--record stores the result in a `lamemo convert` folder; {args.model} "
                        "is not one (convert it first, or drop --record)")
    if args.record and args.max_segments:
        raise UserError(f"--record stores a score of the whole split; --max-segments "
                        f"{args.max_segments} scores part of it (drop one of the two)")
    for flag, value in (("--batch-size", args.batch_size), ("--seg-len", args.seg_len)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--max-segments", args.max_segments), ("--mem-len", args.mem_len)):
        if value is not None and value < 0:
            raise UserError(f"{flag} must be >= 0, got {value}")


def _check_data(args, model, run_config, s: dict) -> None:
    """The model–data contract (data/contract.py) for this model, data folder and split."""
    from ..data.contract import check_vocab, data_folder, folder_tokenizer, require_split

    m = data_folder(args.data, flag="--data", split_flag="--split")
    require_split(m, args.split, flag="--split", streams=args.batch_size,
                  seg_len=s["segment_len"])
    tok = tokenizer_folder(args.model, run_config)
    check_vocab(model.config.vocab_size, m, model=f"the model {args.model}",
                model_tokenizer=folder_tokenizer(tok) if tok else None)


def run(args) -> int:
    import torch

    from ..checkpoint.safetensors_io import CheckpointError
    from ..convert.convert import record_eval
    from ..data.contract import data_folder
    from ..data.recall import recall_scorer
    from ..evaluation import memory_passes

    _check_args(args)
    data_folder(args.data, flag="--data", split_flag="--split")  # before the model is read
    try:
        model, run_config = load_model(args.model, args.src_format, verify=not args.no_verify)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"lamemo eval: {e}", file=sys.stderr)
        return 1
    s = protocol_settings(args, model.config, run_config)
    _check_data(args, model, run_config, s)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = recall_scorer(args.data, args.split)
    modes = ("carried", "reset") if args.memory == "both" else (args.memory,)
    kind = model.config.memory
    results = memory_passes(lambda mode: _one_pass(args, model, s, mode, scorer, device), modes,
                            memory_kind=kind)
    out = {"model": str(args.model), "data": str(args.data), "split": args.split,
           "protocol": args.protocol, **s, "batch_size": args.batch_size,
           **summarize(results, kind, scorer.spec if scorer else None)}
    _report(args.split, out, s, args.protocol)
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if args.record:
        record_eval(Path(args.model), model, out)
    return 0
