"""Data: ``prepare`` (any corpus into litdata token streams), the built-in stdlib corpus, ``TokenDataModule``.

Each name is imported on first use, so ``prepare`` and ``heldout_loader`` do not load Lightning for ``TokenDataModule``.
"""

from typing import TYPE_CHECKING

from epas_lightning.lazy import lazy_exports

if TYPE_CHECKING:
    from epas_lightning.data.builtin import prepare_builtin_corpus
    from epas_lightning.data.datamodule import TokenDataModule
    from epas_lightning.data.prepare import prepare_dataset
    from epas_lightning.data.token_data import heldout_loader
    from epas_lightning.data.tokenizer import load_tokenizer

__all__, __getattr__, __dir__ = lazy_exports(__name__)
