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

Protocols (docs/algorithm.md §6), derived by config.derive.eval_plan as in training: without
flags, the run's own `eval:` settings (from the training config stored with the model; the paper
protocol without one); `--protocol paper` the training segment and memory lengths; `--protocol
xl` the `eval:` fields, else the model's. `--seg-len`, `--mem-len`, `--clamp-len` and
`--same-length` override either (and name the protocol xl). The result names the protocol and
every length it used, and the loss in the units of the data's tokenizer (bits per byte, bits
per character, perplexity per word, or perplexity per token and bits per byte).

    lamemo eval --model out/ --data data/enwik8 --mem-len 32,64,128,256 --output sweep.json

evaluates each memory length and writes the table (sweep.json, sweep.txt) and a plot of the loss
against the evaluation memory length (sweep.png).
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
    p.add_argument("--protocol", choices=["paper", "xl"], default=None,
                   help="paper: training N and mem_len; xl: the eval section's lengths (default: "
                   "the run's own eval settings)")
    p.add_argument("--seg-len", type=int, default=None, help="evaluation segment length")
    p.add_argument("--mem-len", default=None,
                   help="evaluation memory length, or a comma list (32,64,128) for a sweep")
    p.add_argument("--clamp-len", type=int, default=None, help="clamp relative distances")
    p.add_argument("--same-length", choices=["true", "false"], default=None,
                   help="every query sees the same number of keys (default: the model's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="streams evaluated together (default: the run's eval.batch_size, or 8)")
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


def mem_lengths(text: str | None) -> list[int | None]:
    """--mem-len: None, one length, or a comma list; ValueError names a bad entry."""
    if text is None:
        return [None]
    out = []
    for part in text.split(","):
        try:
            out.append(int(part))
        except ValueError:
            raise ValueError(f"--mem-len {text!r}: {part!r} is not a whole number; give a "
                             "length (64) or a comma list (32,64,128)") from None
        if out[-1] < 0:
            raise ValueError(f"--mem-len {text!r}: {out[-1]} must be >= 0")
    return out


def protocol_settings(args, cfg, run_config, mem_len: int | None = None) -> dict:
    """Segment/memory lengths, clamp, same_length and batch size (config.derive.eval_plan)."""
    from ..config.derive import eval_plan

    same = None if args.same_length is None else args.same_length == "true"
    plan = eval_plan(cfg, run_config.eval if run_config is not None else None,
                     protocol=args.protocol, segment_len=args.seg_len, mem_len=mem_len,
                     clamp_len=args.clamp_len, same_length=same, batch_size=args.batch_size)
    return {"protocol": plan.protocol, "segment_len": plan.segment_len,
            "mem_len": plan.mem_len, "clamp_len": plan.clamp_len,
            "same_length": plan.same_length, "batch_size": plan.batch_size}


def _batches(args, s: dict):
    from ..data.streams import OrderedStreams

    return OrderedStreams(args.data, args.split, seg_len=s["segment_len"], rows=s["batch_size"],
                          loop=False)


def load_model(path: str, fmt: str, *, verify: bool = True):
    """(LaMemoLM in eval mode, training RunConfig or None) from any format eval accepts;
    `verify` checks the files against the model's sha256 manifest first."""
    import torch

    from ..config.load import load_config
    from ..convert.convert import RUN_CONFIG, read_source
    from ..convert.registry import detect_format

    folder = Path(path)
    if fmt == "auto":
        fmt = "deepspeed" if detect_format(folder) == "deepspeed" else "consolidated"
    if fmt == "deepspeed":
        # DeepSpeed's consolidation prints progress on stdout, which holds only the JSON result
        with contextlib.redirect_stdout(sys.stderr):
            loaded = read_source("deepspeed", folder, quiet=True, verify=verify)
        return loaded.model.float().eval(), loaded.run_config
    from ..convert.consolidated import load_model_folder

    model, _ = load_model_folder(folder, dtype=torch.float32, verify=verify)
    run_cfg_path = folder / RUN_CONFIG
    return model, load_config(run_cfg_path) if run_cfg_path.is_file() else None


def _one_pass(args, model, s: dict, memory: str, scorer, device: str):
    from tqdm import tqdm

    from ..evaluation import evaluate

    batches = _batches(args, s)
    n_seg = len(batches)
    if args.max_segments:
        n_seg = min(n_seg, args.max_segments)
    bar = tqdm(total=n_seg * s["batch_size"] * s["segment_len"], unit="tok",
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


def summarize(results: dict, kind: str, scorer, units) -> dict:
    """The JSON fields of a (carried and/or reset) evaluation: the first pass's numbers at top
    level, each pass under its name, the memory gain, and the recall cost when scored."""
    from ..config.schema import keeps_memory
    from ..evaluation import memory_gain

    main = results.get("carried") or results["reset"]
    out = dict(main.as_dict(units))
    if units.bytes_note:
        out["bits_per_byte_note"] = units.bytes_note
    if len(results) == 2:
        out["reset"] = results["reset"].as_dict(units)
        out.update(memory_gain(results["carried"], results["reset"]))
        if not keeps_memory(kind):
            out["memory_gain_note"] = "model.memory=none: carried and reset are the same model"
    if scorer is not None:
        spec = scorer.spec
        out["recall"] = {"bits_per_key_symbol": {k: r.subset_bits for k, r in results.items()},
                         "chance_bits": spec.bits_per_symbol, "key_symbols": main.subset_tokens,
                         "gap": [spec.gap_min, spec.gap_max]}
        out["recall"].update(_recall_groups(results, scorer))
    return out


def _recall_groups(results: dict, scorer) -> dict:
    """Bits per key symbol by group (query order and symbol), beside the elimination reader's
    (multi-query: what knowing the pending values, without any lookup by name, already buys)."""
    from ..evaluation import LN2

    names = scorer.spec.group_names()
    elim, elim_groups = scorer.elimination_bits()
    pad = [(0.0, 0)] * len(names)  # groups no evaluated target fell in
    groups = {k: (r.subset_groups or []) + pad for k, r in results.items()
              if r.subset_groups is not None}
    by = {}
    for i, name in enumerate(names):
        row = {k: g[i][0] / LN2 if g[i][1] else None for k, g in groups.items()}
        row["key_symbols"] = next(iter(groups.values()))[i][1] if groups else 0
        if elim_groups[i] is not None:
            row["elimination"] = elim_groups[i]
        by[name] = row
    return {"by_group": by, **({"elimination_bits": elim} if elim is not None else {})}


def _bits(row: dict) -> dict:
    """A by-group row's bits (carried, reset, elimination), without its symbol count."""
    return {k: v for k, v in row.items() if k != "key_symbols"}


def _report(split: str, results: dict, out: dict, s: dict, units) -> None:
    from ..evaluation import describe

    for name, r in results.items():
        print(f"{split} ({name} memory): {describe(r, units)} (protocol {s['protocol']}, "
              f"N={s['segment_len']}, mem_len={s['mem_len']})", file=sys.stderr)
    if units.bytes_note:
        print(units.bytes_note, file=sys.stderr)
    if "memory_gain_bits_per_token" in out:
        note = f" ({out['memory_gain_note']})" if "memory_gain_note" in out else ""
        print(f"memory gain: {out['memory_gain_bits_per_token']:+.4f} bits per token "
              f"(loss(reset) - loss(carried)), ppl ratio {out['memory_ppl_ratio']:.3f}{note}",
              file=sys.stderr)
    if "recall" in out:
        rc = out["recall"]
        bits = ", ".join(f"{k} {v:.3f}" for k, v in rc["bits_per_key_symbol"].items())
        print(f"recall: bits per key symbol: {bits} (chance {rc['chance_bits']:.3f}; "
              f"{rc['key_symbols']:,} key symbols, gap {rc['gap'][0]}-{rc['gap'][1]})",
              file=sys.stderr)
        if "elimination_bits" in rc:
            print(f"recall: a reader who knows the pending values but no names pays "
                  f"{rc['elimination_bits']:.3f} (elimination); recall by name must beat it",
                  file=sys.stderr)
        cells = [f"{g} " + "/".join("-" if v is None else f"{v:.2f}" for v in _bits(row).values())
                 for g, row in rc.get("by_group", {}).items()]
        if cells:
            kinds = "/".join(_bits(next(iter(rc["by_group"].values()))))
            print(f"recall by group ({kinds}): " + ", ".join(cells), file=sys.stderr)


def tokenizer_folder(model_path: str | Path, run_config) -> Path | None:
    """Where the tokenizer of a model is: its export folder (convert copies the tokenizer
    there), else the data folder it was trained on; None when neither holds one."""
    from ..data.contract import folder_tokenizer

    for folder in (Path(model_path), Path(run_config.data.path) if run_config else None):
        if folder is not None and folder_tokenizer(folder) is not None:
            return folder
    return None


def _check_args(args) -> list[int | None]:
    """The flags alone, before anything is read (UserError: exit 2); returns the memory
    lengths to evaluate (--mem-len)."""
    from ..config.errors import UserError
    from ..convert.registry import detect_format

    try:
        lengths = mem_lengths(args.mem_len)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.record and len(lengths) > 1:
        raise UserError("--record stores one result; give one --mem-len (or drop --record)")
    if args.record and detect_format(Path(args.model)) == "deepspeed":
        raise UserError(f"--record stores the result in a `lamemo convert` folder; {args.model} "
                        "is not one (convert it first, or drop --record)")
    if args.record and args.max_segments:
        raise UserError(f"--record stores a score of the whole split; --max-segments "
                        f"{args.max_segments} scores part of it (drop one of the two)")
    for flag, value in (("--batch-size", args.batch_size), ("--seg-len", args.seg_len)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.max_segments < 0:
        raise UserError(f"--max-segments must be >= 0, got {args.max_segments}")
    return lengths


def _check_data(args, m, model, run_config, s: dict) -> None:
    """The model–data contract (data/contract.py) for this model, data manifest `m` and split."""
    from ..data.contract import check_vocab, folder_tokenizer, require_split

    require_split(m, args.split, flag="--split", streams=s["batch_size"],
                  seg_len=s["segment_len"])
    tok = tokenizer_folder(args.model, run_config)
    check_vocab(model.config.vocab_size, m, model=f"the model {args.model}",
                model_tokenizer=folder_tokenizer(tok) if tok else None)


def _evaluate_one(args, model, run_config, mem_len, scorer, units, device) -> dict:
    """Every memory pass at one memory length: the JSON result (printed on stderr too)."""
    from ..evaluation import memory_passes

    s = protocol_settings(args, model.config, run_config, mem_len)
    trained = model.config.segment_len + model.config.mem_len
    if (model.config.memory == "lamemo" and s["clamp_len"] <= 0
            and s["segment_len"] + s["mem_len"] > trained):
        print(f"lamemo eval: note: mem_len {s['mem_len']} with N={s['segment_len']} reaches "
              f"relative distances beyond the {trained} (N + M) seen in training and clamp_len "
              f"is off; lamemo's look-ahead memory degrades there: add --clamp-len {trained} "
              "(bench/RESULTS.md, the eval memory sweep)", file=sys.stderr)
    modes = ("carried", "reset") if args.memory == "both" else (args.memory,)
    kind = model.config.memory
    results = memory_passes(lambda mode: _one_pass(args, model, s, mode, scorer, device), modes,
                            memory_kind=kind)
    out = {"model": str(args.model), "data": str(args.data), "split": args.split, **s,
           **summarize(results, kind, scorer, units)}
    _report(args.split, results, out, s, units)
    return out


def run(args) -> int:
    import torch

    from ..checkpoint.manager import CheckpointError
    from ..convert.convert import record_eval
    from ..data.contract import data_folder
    from ..data.recall import recall_scorer
    from ..evaluation import Units
    from .mem_sweep import write_sweep

    lengths = _check_args(args)
    manifest = data_folder(args.data, flag="--data", split_flag="--split")  # before the model
    try:
        model, run_config = load_model(args.model, args.src_format, verify=not args.no_verify)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"lamemo eval: {e}", file=sys.stderr)
        return 1
    _check_data(args, manifest, model, run_config,
                protocol_settings(args, model.config, run_config, lengths[0]))
    units = Units.from_manifest(manifest, args.split)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = recall_scorer(args.data, args.split, grouped=True)
    rows = [_evaluate_one(args, model, run_config, m, scorer, units, device) for m in lengths]
    out = rows[0] if len(rows) == 1 else write_sweep(rows, units, args.output)
    text = json.dumps(out, indent=2)
    print(text)
    if args.output and len(rows) == 1:
        Path(args.output).write_text(text + "\n")
    if args.record:
        record_eval(Path(args.model), model, out)
    return 0
