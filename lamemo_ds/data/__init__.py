"""Data: corpus readers, tokenizers, webdataset shards, manifest and the ordered stream loader.

`lamemo prepare` turns a raw corpus into document-ordered shards (prepare.py); the trainer reads
them back as S = dp_size x rows contiguous token streams (streams.py).

Rule: data/ knows files and tokens, not models or processes: it imports config/ and fileio only,
and never torch.distributed or deepspeed (the contract in pyproject.toml).
"""
