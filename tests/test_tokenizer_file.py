"""`lamemo prepare --tokenizer-file`: a Hugging Face tokenizer.json (GPT-2 and Llama style BPE,
trained here on local text, no network) tokenizes the data, travels with it and is recorded in
the manifest; our tokenizer description lives in lamemo_tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lamemo_ds.data.manifest import load_manifest, open_tokens
from lamemo_ds.data.tokenizer import (
    LEGACY_FILE,
    PRETRAINED_FILE,
    TOKENIZER_FILE,
    ByteTokenizer,
    load_tokenizer,
    tokenizer_files,
    tokenizer_id,
)

TEXT = ("The quick brown fox jumps over the lazy dog.\nPack my box with five dozen jugs.\n"
        "Ünïcödé — and numbers 12345.\n")
DOCS = {"a.txt": TEXT * 5, "b.txt": "Sphinx of black quartz, judge my vow.\n" * 7,
        "c.txt": "no trailing newline"}


def gpt2_style(path: Path) -> Path:
    """A byte-level BPE with GPT-2's end-of-text token, saved as a tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT * 3, *DOCS.values()], trainer=trainer)
    tok.save(str(path))
    return path


def llama_style(path: Path) -> Path:
    """A SentencePiece-style BPE (metaspace, `<s>`/`</s>`), saved as a tokenizer.json."""
    from tokenizers import SentencePieceBPETokenizer

    tok = SentencePieceBPETokenizer()
    tok.train_from_iterator([TEXT * 3, *DOCS.values()], vocab_size=300,
                            special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.save(str(path))
    return path


def _tree(root: Path) -> Path:
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.integration
@pytest.mark.parametrize(("make", "eos"), [(gpt2_style, "<|endoftext|>"), (llama_style, "</s>")])
def test_prepare_with_a_saved_tokenizer_json(tmp_path, lamemo, make, eos):
    from tokenizers import Tokenizer

    tok_file = make(tmp_path / "tokenizer.json")
    hf = Tokenizer.from_file(str(tok_file))
    out = tmp_path / "data"
    r = lamemo("prepare", "--corpus", "files", "--input", str(_tree(tmp_path / "src")),
               "--valid-frac", "0", "--test-frac", "0", "--tokenizer-file", str(tok_file),
               "--out", str(out), "--quiet", "--workers", "2")
    assert r.returncode == 0, r.stderr
    m = load_manifest(out)
    assert m.tokenizer["kind"] == "pretrained" and m.tokenizer["source"] == "tokenizer.json"
    assert m.vocab_size == m.tokenizer["vocab_size"] == hf.get_vocab_size()
    assert m.tokenizer["eos_id"] == hf.token_to_id(eos)
    assert m.tokenizer["id"] == tokenizer_id(out)
    assert set(tokenizer_files(out)) == {TOKENIZER_FILE, PRETRAINED_FILE}  # travels with data
    want = []
    for name in sorted(DOCS):  # every document, as the tokenizer itself encodes it, then EOS
        want += hf.encode(DOCS[name], add_special_tokens=False).ids + [hf.token_to_id(eos)]
    assert open_tokens(out, "train").tolist() == want
    tok = load_tokenizer(out)
    assert tok.kind == "pretrained" and tok.decode(want).startswith(TEXT)
    r = lamemo("prepare", "--corpus", "files", "--input", str(tmp_path / "src"),
               "--valid-frac", "0", "--test-frac", "0", "--tokenizer-file", str(tok_file),
               "--out", str(out), "--quiet")
    assert r.returncode == 0 and "already prepared" in r.stdout
    # other file content (here the same tokenizer, re-indented) is another option
    tok_file.write_text(json.dumps(json.loads(tok_file.read_text()), indent=1))
    r = lamemo("prepare", "--corpus", "files", "--input", str(tmp_path / "src"),
               "--valid-frac", "0", "--test-frac", "0", "--tokenizer-file", str(tok_file),
               "--out", str(out), "--quiet")
    assert r.returncode == 2 and "tokenizer_file_sha256" in r.stderr


@pytest.mark.unit
def test_tokenizer_file_user_errors(tmp_path, lamemo):
    src = _tree(tmp_path / "src")
    base = ("prepare", "--corpus", "files", "--input", str(src), "--out", str(tmp_path / "o"))
    no_eos = tmp_path / "no_eos.json"
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(no_eos))
    (tmp_path / "junk.json").write_text("{}")
    cases = [
        (["--tokenizer-file", str(tmp_path / "missing.json")], "missing.json: not found"),
        (["--tokenizer-file", str(tmp_path / "junk.json")], "not a Hugging Face tokenizer.json"),
        (["--tokenizer-file", str(no_eos)], "--eos-token"),
        (["--tokenizer-file", str(no_eos), "--eos-token", "</s>"], "'</s>' is not in"),
        (["--tokenizer", "char", "--tokenizer-file", str(no_eos)], "exclude each other"),
        (["--tokenizer", "pretrained"], "needs --tokenizer-file"),
    ]
    for extra, msg in cases:
        r = lamemo(*base, *extra)
        assert r.returncode == 2, (extra, r.stderr)
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.unit
def test_legacy_tokenizer_json_still_reads(tmp_path):
    """Folders prepared before the rename hold our description as tokenizer.json."""
    (tmp_path / LEGACY_FILE).write_text(json.dumps(ByteTokenizer().spec()))
    assert load_tokenizer(tmp_path).kind == "byte"
    assert set(tokenizer_files(tmp_path)) == {TOKENIZER_FILE}  # copied under the new name
    (tmp_path / "hf").mkdir()
    gpt2_style(tmp_path / "hf" / LEGACY_FILE)
    with pytest.raises(FileNotFoundError):  # an HF tokenizer.json alone is not ours
        load_tokenizer(tmp_path / "hf")
