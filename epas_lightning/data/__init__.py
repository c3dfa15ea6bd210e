"""Data: the built-in Python-stdlib corpus and the litdata token-stream ``TokenDataModule``."""

from epas_lightning.data.builtin import prepare_builtin_corpus
from epas_lightning.data.datamodule import TokenDataModule

__all__ = ["TokenDataModule", "prepare_builtin_corpus"]
