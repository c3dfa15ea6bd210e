"""Data: ``prepare`` (any corpus into litdata token streams), the built-in stdlib corpus, ``TokenDataModule``.

Each name is imported on first use, so ``prepare`` does not load Lightning for ``TokenDataModule``.
"""

from epas_lightning.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".builtin": ["prepare_builtin_corpus"],
        ".datamodule": ["TokenDataModule", "heldout_loader"],
        ".prepare": ["prepare_dataset"],
        ".tokenizer": ["load_tokenizer"],
    },
)
