"""`lamemo prepare`: write document-ordered shards of a corpus, or `--verify` a prepared folder."""

from __future__ import annotations

import argparse
import sys

from ..config.errors import EXIT_USER_ERROR


def _size(text: str) -> int:
    """'64M', '512K', '1G' or a plain byte count."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B")
    return int(float(t[:-1]) * mult[t[-1]]) if t and t[-1] in mult else int(t)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..data.prepare import CORPORA

    p.add_argument("--corpus", choices=CORPORA, default="stdlib",
                   help="corpus format; 'stdlib' (default, also 'files' without --input) is "
                   "this Python's standard library source tree, the demo corpus")
    p.add_argument("--input", help="raw corpus: enwik8(.zip), text8(.zip), wikitext-103 folder "
                   "or zip, a books folder, a JSONL file/folder, or a folder of text files")
    p.add_argument("--out", help="output folder (manifest.json, lamemo_tokenizer.json, "
                   "split/shard-*.tar)")
    p.add_argument("--tokenizer", choices=("byte", "char", "word", "bpe", "pretrained"),
                   default=None, help="byte (default), char, word, bpe (trained on the train "
                   "split) or pretrained (with --tokenizer-file)")
    p.add_argument("--tokenizer-file", metavar="PATH", help="use this Hugging Face "
                   "tokenizer.json (GPT-2/Llama-style BPE); it is copied into the data folder")
    p.add_argument("--eos-token", help="with --tokenizer-file: its end-of-document token "
                   "(default: the first of <|endoftext|>, </s>, <|end_of_text|>, <eos> it has)")
    p.add_argument("--verify", metavar="DIR", help="re-check every shard of a prepared folder")
    p.add_argument("--shard-size", type=_size, default="64M", help="max bytes per shard")
    p.add_argument("--split-sizes", default=None,
                   help="enwik8/text8: train,valid,test sizes in bytes/chars (default "
                   "90000000,5000000,5000000); recall: tokens per split (default "
                   "4000000,131072,131072)")
    p.add_argument("--valid-frac", type=float, default=0.05,
                   help="files/books/jsonl without given splits: fraction of documents (by "
                   "name hash) in valid; same for --test-frac")
    p.add_argument("--test-frac", type=float, default=0.05)
    p.add_argument("--pattern", help="file name glob (files: '*', books: '*.txt', stdlib: '*.py')")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--min-freq", type=int, default=1, help="char/word: rarer types -> <unk>")
    p.add_argument("--bpe-vocab", type=int, default=8192, help="BPE vocabulary size")
    p.add_argument("--max-docs", type=int, help="at most this many documents per split")
    p.add_argument("--max-bytes", type=_size, help="stop a split after this much text")
    g = p.add_argument_group("--corpus recall (a key written once, recalled `gap` tokens later)")
    g.add_argument("--recall-gap", default="48", help="tokens between a key symbol's two "
                   "copies: N or a range LO-HI (make it larger than the segment length)")
    g.add_argument("--recall-key-len", type=int, default=6, help="symbols per key")
    g.add_argument("--recall-alphabet", default="0123456789abcdef", help="key symbols")
    g.add_argument("--recall-filler", default=".", help="text repeated between the copies")
    g.add_argument("--recall-episodes", type=int, default=16, help="keys per document")
    g.add_argument("--recall-spacing", type=int, default=16,
                   help="at most this many filler tokens after an episode (random)")
    g.add_argument("--recall-seed", type=int, default=0, help="generator seed")
    g.add_argument("--recall-pairs", type=int, default=None, help="multi-query recall: K keys "
                   "pending at once, written as NAME=VALUE lines and queried again in random "
                   "order, each --recall-gap tokens later (default: single #KEY episodes)")
    g.add_argument("--recall-names", default="ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                   help="with --recall-pairs: the symbols a key's name is drawn from")
    g.add_argument("--recall-fresh-names", action="store_true", help="with --recall-pairs: no "
                   "episode reuses a name of the episode before it (a query's name then matches "
                   "one line within reach, not also the last episode's stale value)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    p.add_argument("--force", action="store_true", help="overwrite an existing prepared folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data.corpora import CorpusError
    from ..data.prepare import PrepareError, PrepareOptions, prepare
    from ..data.recall import DEFAULT_SIZES
    from ..data.shards import ShardError

    if args.verify:
        return _verify(args.verify)
    if not args.out:
        print("lamemo prepare: give --out DIR (or --verify DIR)", file=sys.stderr)
        return EXIT_USER_ERROR
    _check_ranges(args)
    problem = _check_tokenizer(args)
    if problem:
        print(f"lamemo prepare: error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    sizes_text = args.split_sizes or (",".join(map(str, DEFAULT_SIZES))
                                      if args.corpus == "recall" else "90000000,5000000,5000000")
    try:
        sizes = tuple(_size(s) for s in sizes_text.split(","))
    except (ValueError, IndexError):
        sizes = ()
    if len(sizes) != 3:
        print(f"lamemo prepare: --split-sizes wants 3 numbers, got {sizes_text!r}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        recall = _recall_spec(args) if args.corpus == "recall" else None
    except CorpusError as e:
        print(f"lamemo prepare: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    o = PrepareOptions(
        corpus=args.corpus, input=args.input, tokenizer=args.tokenizer,
        tokenizer_file=args.tokenizer_file, eos_token=args.eos_token,
        shard_bytes=args.shard_size, sizes=sizes, valid_frac=args.valid_frac,
        test_frac=args.test_frac, pattern=args.pattern, text_field=args.text_field,
        min_freq=args.min_freq, bpe_vocab=args.bpe_vocab, max_docs=args.max_docs,
        max_bytes=args.max_bytes, recall=recall)
    try:
        m, wrote = prepare(o, args.out, workers=args.workers, force=args.force,
                           progress=not args.quiet)
    except (CorpusError, PrepareError) as e:  # the input or the options: a user error
        print(f"lamemo prepare: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ShardError as e:  # an earlier output is damaged
        print(f"lamemo prepare: error: {e}", file=sys.stderr)
        return 1
    _report(m, args.out, wrote)
    return 0


def _check_tokenizer(args: argparse.Namespace) -> str | None:
    """Settle --tokenizer from --tokenizer-file (in place) and load the file once to check it;
    returns what is wrong, or None."""
    from ..data.tokenizer import load_pretrained

    if args.tokenizer_file is None:
        if args.tokenizer == "pretrained":
            return "--tokenizer pretrained needs --tokenizer-file PATH (a tokenizer.json)"
        if args.eos_token is not None:
            return "--eos-token is for --tokenizer-file; the other tokenizers use <eos>"
        args.tokenizer = args.tokenizer or "byte"
        return None
    if args.tokenizer not in (None, "pretrained"):
        return (f"--tokenizer {args.tokenizer} and --tokenizer-file exclude each other; "
                "drop one of them")
    args.tokenizer = "pretrained"
    try:
        load_pretrained(args.tokenizer_file, eos_token=args.eos_token)
    except ValueError as e:
        return str(e)
    return None


def _check_ranges(args: argparse.Namespace) -> None:
    """Numbers that cannot work (UserError: one line, exit 2), before anything is read."""
    from ..config.errors import UserError

    rules = (("--valid-frac", args.valid_frac, 0 <= args.valid_frac < 1, "in [0, 1)"),
             ("--test-frac", args.test_frac, 0 <= args.test_frac < 1, "in [0, 1)"),
             ("--valid-frac + --test-frac", args.valid_frac + args.test_frac,
              args.valid_frac + args.test_frac < 1, "below 1 (train keeps the rest)"),
             ("--workers", args.workers, args.workers >= 1, ">= 1"),
             ("--max-docs", args.max_docs, args.max_docs is None or args.max_docs >= 1, ">= 1"),
             ("--min-freq", args.min_freq, args.min_freq >= 1, ">= 1"),
             ("--bpe-vocab", args.bpe_vocab, args.bpe_vocab >= 2, ">= 2"))
    for flag, value, ok, allowed in rules:
        if not ok:
            raise UserError(f"{flag} {value}: must be {allowed}")


def _recall_spec(args: argparse.Namespace):
    """The recall generator's knobs from the flags, checked before anything is written."""
    from ..data.recall import RecallSpec, parse_gap

    lo, hi = parse_gap(args.recall_gap)
    return RecallSpec(gap_min=lo, gap_max=hi, key_len=args.recall_key_len,
                      alphabet=args.recall_alphabet, filler=args.recall_filler,
                      episodes=args.recall_episodes, spacing=args.recall_spacing,
                      seed=args.recall_seed, pairs=args.recall_pairs,
                      names=args.recall_names,
                      fresh_names=args.recall_fresh_names).check(args.tokenizer)


def _report(m: dict, out: str, wrote: bool) -> None:
    if not wrote:
        print(f"{out}: already prepared with these options (nothing to do; --force rewrites)")
    st = m["stats"]
    print(f"{out}: corpus {m['corpus']}, tokenizer {m['tokenizer']['kind']} "
          f"(vocab {m['vocab_size']}, {m['dtype']}), {st['documents']:,} documents, "
          f"{st['tokens']:,} tokens, {st['text_bytes'] / 1e6:.1f} MB text "
          f"in {st['seconds']:.1f} s ({st['mb_per_s']:.1f} MB/s)")
    for name, s in m["splits"].items():
        print(f"  {name:6s} {s['documents']:>9,} docs {s['tokens']:>13,} tokens "
              f"{len(s['shards']):>4} shards")
    skipped = {k: v for k, v in st["clean"].items() if k != "examples" and v}
    for k, v in skipped.items():
        ex = ", ".join(st["clean"]["examples"].get(k, [])[:3])
        print(f"  repaired/skipped: {k} = {v:,} (e.g. {ex})")


def _verify(path: str) -> int:
    from ..data.contract import data_folder
    from ..data.manifest import verify

    m = data_folder(path, flag="--verify", split_flag="the split")  # missing: exit 2
    problems = verify(path)
    n = sum(len(s["shards"]) for s in m.splits.values())
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    print(f"{path}: {n} shards, {len(problems)} problem(s)")
    return 1 if problems else 0
