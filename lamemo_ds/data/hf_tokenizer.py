"""Our tokenizers in Hugging Face's format: the tokenizer.json + tokenizer_config.json an HF export
ships, so `transformers.AutoTokenizer.from_pretrained(export)` gives the ids we trained on.

- bpe / pretrained: already a `tokenizers` Tokenizer; written as it is.
- byte: a byte-level BPE without merges whose 256 symbols have ids 0..255 (the byte values),
  plus `<eos>` = 256: every UTF-8 byte is one token, as in ByteTokenizer.
- char: every character one pre-token, looked up in the vocabulary (unknown -> `<unk>`).
- word: whitespace-split words; every '\\n' becomes `<eos>` (our word tokenizer also ends a last
  line without '\\n' with `<eos>`; the HF one does not).

Decoding with `skip_special_tokens=True` drops `<eos>`, as our decode does.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tokenizer import EOS, UNK, BpeTokenizer, ByteTokenizer, Tokenizer, VocabTokenizer

HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS = "special_tokens_map.json"


def byte_symbols() -> list[str]:
    """The printable stand-in of every byte 0..255, in byte order (GPT-2's byte-level alphabet:
    printable Latin-1 bytes stand for themselves, the others are shifted above U+0100)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, shifted = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shifted)
            shifted += 1
    return [out[b] for b in range(256)]


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {sym: b for b, sym in enumerate(byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])  # id 256: the next free id
    return tok


def _vocab_tokenizer(vt: VocabTokenizer):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=dict(vt.index), unk_token=UNK))
    if vt.kind == "char":
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        tok.normalizer = normalizers.Replace("\n", f" {EOS} ")
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS, UNK])  # already in the vocabulary: their ids stay
    return tok


def hf_tokenizer(tok: Tokenizer):
    """The `tokenizers.Tokenizer` that encodes text as `tok` does (see the module docstring)."""
    if isinstance(tok, BpeTokenizer):
        return tok.tok
    if isinstance(tok, ByteTokenizer):
        return _byte_tokenizer()
    return _vocab_tokenizer(tok)


def eos_token(tok: Tokenizer) -> str:
    return tok.eos_token if isinstance(tok, BpeTokenizer) else EOS


def write_hf_tokenizer(tok: Tokenizer, out: str | Path) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out`."""
    out = Path(out)
    hf = hf_tokenizer(tok)
    if hf.token_to_id(eos_token(tok)) != tok.eos_id:
        raise ValueError(f"HF tokenizer puts {eos_token(tok)} at {hf.token_to_id(eos_token(tok))}, "
                         f"ours at {tok.eos_id}")
    (out / HF_TOKENIZER).write_text(hf.to_str())
    special = {"eos_token": eos_token(tok)}
    if isinstance(tok, VocabTokenizer):
        special["unk_token"] = UNK
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False, **special,
}
    (out / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (out / HF_SPECIAL_TOKENS).write_text(json.dumps(special, indent=2) + "\n")
    return [HF_TOKENIZER, HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS]
