"""The model–data contract, checked before any process starts or anything is written.

A model reads token ids; a data folder (`lamemo prepare`) says in its manifest.json how many ids
exist and which tokenizer made them. `lamemo train`, `lamemo eval` and `lamemo generate` check the
two against each other here, and that the folder, its manifest and the splits they read exist and
hold enough tokens, so a mistake is one line (exit 2) instead of a traceback at step 1 or a wrong
number with exit 0. `model.vocab_size: auto` takes the number from the manifest.
"""

from __future__ import annotations

from pathlib import Path

from ..config.derive import Plan, with_data_vocab
from ..config.errors import UserError
from ..config.schema import RunConfig
from .manifest import MANIFEST, Manifest, load_manifest
from .shards import ShardError
from .tokenizer import tokenizer_id


class DataError(UserError):
    """A data folder, split or model–data pairing that cannot work; the message names the fix."""


def data_folder(path: str | Path, *, flag: str = "data.path",
                split_flag: str = "data.train_split / data.valid_split") -> Manifest:
    """The manifest of the prepared data folder `path` (`flag` names where the path came from,
    `split_flag` where the split is chosen); a missing folder or manifest, or a split folder
    given for its parent, is a DataError."""
    d = Path(path)
    if not d.is_dir():
        what = "is not a folder" if d.exists() else "does not exist"
        raise DataError(f"{flag}={path} {what}: prepare the data first, e.g. "
                        f"`lamemo prepare --corpus stdlib --out {path}`")
    if not (d / MANIFEST).is_file():
        if (d.parent / MANIFEST).is_file():
            raise DataError(f"{flag}={path} is the {d.name!r} split folder of {d.parent}: give "
                            f"the data folder itself, {flag}={d.parent}, and choose the split "
                            f"with {split_flag}")
        raise DataError(f"{flag}={path} holds no {MANIFEST} (not a finished `lamemo prepare` "
                        f"output): prepare it, e.g. `lamemo prepare --corpus stdlib --out {path}`")
    try:
        return load_manifest(d)
    except ShardError as e:
        raise DataError(str(e)) from e


def require_split(m: Manifest, split: str, *, flag: str, streams: int, seg_len: int) -> None:
    """`split` exists in `m` and holds at least one segment for each of `streams` streams."""
    if split not in m.splits:
        raise DataError(f"{flag}={split!r}: {m['_dir']} has no such split (it has "
                        f"{', '.join(sorted(m.splits))})")
    tokens = int(m.splits[split]["tokens"])
    need = streams * (seg_len + 1)
    if tokens < need:
        what = "is empty" if tokens == 0 else f"has only {tokens:,} tokens"
        raise DataError(f"{flag}={split!r}: the split of {m['_dir']} {what}; {streams} "
                        f"stream(s) of one segment ({seg_len} + 1 tokens) need {need:,}: prepare "
                        "more data for it, or read fewer streams / shorter segments")


def check_vocab(model_vocab: int, m: Manifest, *, model_tokenizer: str | None = None,
                model: str = "the model") -> None:
    """The model's vocabulary size (and tokenizer id, when known) equal the data's."""
    kind = m.tokenizer.get("kind", "?")
    if model_vocab != m.vocab_size:
        raise DataError(f"{model} has vocab_size {model_vocab} but the data {m['_dir']} has "
                        f"vocab_size {m.vocab_size} ({kind} tokenizer): use data prepared with "
                        "the model's tokenizer, or (training) set model.vocab_size="
                        f"{m.vocab_size} or model.vocab_size=auto")
    data_tok = m.tokenizer.get("id")
    if model_tokenizer and data_tok and model_tokenizer != data_tok:
        raise DataError(f"{model} was trained with tokenizer {model_tokenizer[:12]} but the data "
                        f"{m['_dir']} was prepared with tokenizer {data_tok[:12]} (same "
                        "vocab_size, different ids): use data prepared with the model's tokenizer")


def folder_tokenizer(folder: str | Path) -> str | None:
    """The tokenizer id of a folder holding a tokenizer (a data folder or an export); None when
    it holds none."""
    try:
        return tokenizer_id(folder)
    except (FileNotFoundError, NotADirectoryError):
        return None


def resolve_data(cfg: RunConfig) -> tuple[RunConfig, Manifest]:
    """(cfg with `vocab_size: auto` resolved, the manifest of data.path), the vocabulary checked."""
    m = data_folder(cfg.data.path)
    cfg = with_data_vocab(cfg, m.vocab_size)
    check_vocab(cfg.model.vocab_size, m, model="the config's model")
    return cfg, m


def check_training_data(cfg: RunConfig, plan: Plan, m: Manifest) -> None:
    """The training split feeds every stream of every data-parallel rank, and the validation
    split (evaluated at least once, at the end) holds a segment for every evaluation stream."""
    require_split(m, cfg.data.train_split, flag="data.train_split",
                  streams=plan.dp_size * plan.rows_per_rank, seg_len=plan.seg_len)
    require_split(m, cfg.data.valid_split, flag="data.valid_split",
                  streams=plan.dp_size * plan.eval.batch_size, seg_len=plan.eval.segment_len)
