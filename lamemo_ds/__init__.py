"""lamemo_ds: distributed pretraining of LaMemo (look-ahead memory) language models."""

__version__ = "0.1.0"
