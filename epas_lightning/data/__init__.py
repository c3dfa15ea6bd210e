"""Data: ``prepare`` (any corpus into litdata token streams), the built-in stdlib corpus, ``TokenDataModule``."""

from epas_lightning.data.builtin import prepare_builtin_corpus
from epas_lightning.data.datamodule import TokenDataModule, heldout_loader
from epas_lightning.data.prepare import prepare_dataset
from epas_lightning.data.tokenizer import load_tokenizer

__all__ = ["TokenDataModule", "heldout_loader", "load_tokenizer", "prepare_dataset", "prepare_builtin_corpus"]
