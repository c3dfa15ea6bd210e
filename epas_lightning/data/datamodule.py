"""``TokenDataModule``: fixed-length blocks from a prepared litdata token stream."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn

from epas_lightning.data.builtin import (
    META_FILENAME,
    TOKENIZER_FILENAME,
    builtin_entry_path,
    is_complete_entry,
    load_meta,
    prepare_builtin_corpus,
)

if TYPE_CHECKING:
    from litdata import StreamingDataLoader

DEFAULT_BUILTIN_VOCAB_SIZE = 4096
REQUIRED_ENTRIES = ("train/index.json", "val/index.json", TOKENIZER_FILENAME, META_FILENAME)


def missing_entries(data_dir: Path) -> list[str]:
    """The parts of a prepared data directory that ``data_dir`` lacks."""
    return [name for name in REQUIRED_ENTRIES if not (data_dir / name).is_file()]


class TokenDataModule(LightningDataModule):
    """Batches of ``seq_len + 1`` consecutive tokens from a prepared token stream (inputs and shifted targets).

    Each batch is an integer tensor of shape ``(batch_size, seq_len + 1)``: the model reads ``batch[:, :-1]`` and
    predicts ``batch[:, 1:]``. Tokens are stored as int32 and cast to int64 once the batch is on the device. Training
    batches are shuffled and the loader's position is saved in checkpoints, so a resumed run continues the stream
    mid-epoch.

    Args:
        data_dir: Prepared data directory with ``train/``, ``val/``, ``tokenizer.json`` and ``meta.json``. Leave
            unset to use the built-in corpus: the Python standard library of the running interpreter, tokenized
            once into the cache (no download).
        seq_len: Tokens per training sequence (the model's context length).
        batch_size: Sequences per batch on each device.
        vocab_size: The model's vocabulary size. The tokenizer must not have more tokens. With the built-in corpus
            it is also the size of the BPE vocabulary trained for it (default 4096 when unset).
        num_workers: Dataloader worker processes (0 loads in the main process).
        seed: Seed of the shuffling order of the training stream.
        max_bytes: Built-in corpus only: use just the first files totalling at most this many bytes (fast tests).
        cache_dir: Built-in corpus only: where prepared corpora are cached. Default: ``$EPAS_CACHE_DIR``, else
            ``$XDG_CACHE_HOME/epas_lightning`` or ``~/.cache/epas_lightning``.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        vocab_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        max_bytes: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}.")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.vocab_size = vocab_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_bytes = max_bytes
        self.cache_dir = cache_dir
        self.use_builtin = data_dir is None
        self.data_dir: Path | None = None if data_dir is None else Path(data_dir).expanduser()
        self.tokenizer: Any = None
        self.meta: dict | None = None

    @property
    def builtin_vocab_size(self) -> int:
        return self.vocab_size if self.vocab_size is not None else DEFAULT_BUILTIN_VOCAB_SIZE

    def prepare_data(self) -> None:
        """Build the built-in corpus once (local rank 0; a file lock makes concurrent calls safe)."""
        if self.use_builtin:
            self.data_dir = prepare_builtin_corpus(self.builtin_vocab_size, self.cache_dir, self.max_bytes)

    def setup(self, stage: str | None = None) -> None:
        """Locate and check the data, load ``meta.json`` and the tokenizer."""
        if self.tokenizer is not None:
            return
        self.data_dir = self.resolve_data_dir()
        self.meta = load_meta(self.data_dir)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(self.data_dir / TOKENIZER_FILENAME))
        self.check_vocab_size()

    def resolve_data_dir(self) -> Path:
        """The complete data directory to read, building the built-in corpus if ``prepare_data`` did not run."""
        if self.use_builtin:
            entry = builtin_entry_path(self.builtin_vocab_size, self.cache_dir, self.max_bytes)
            if not is_complete_entry(entry):
                entry = prepare_builtin_corpus(self.builtin_vocab_size, self.cache_dir, self.max_bytes)
            return entry
        assert self.data_dir is not None
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"Data directory {self.data_dir} does not exist. {self._how_to_create()}")
        if missing := missing_entries(self.data_dir):
            raise FileNotFoundError(
                f"Data directory {self.data_dir} is incomplete: missing {', '.join(missing)}. {self._how_to_create()}"
            )
        return self.data_dir

    @staticmethod
    def _how_to_create() -> str:
        return (
            "Create it with the `prepare` command (or `epas_lightning.data.prepare_builtin_corpus`), "
            "or leave `data_dir` unset to use the built-in Python standard library corpus."
        )

    def check_vocab_size(self) -> None:
        """Fail before training if the tokenizer can emit ids outside the model's embedding table."""
        n_tokens = self.tokenizer.get_vocab_size()
        if self.vocab_size is not None and n_tokens > self.vocab_size:
            raise ValueError(
                f"The tokenizer in {self.data_dir} has {n_tokens} tokens but the model's vocab_size is "
                f"{self.vocab_size}. Set the model's vocab_size to at least {n_tokens} or use a smaller tokenizer."
            )

    def train_dataloader(self) -> StreamingDataLoader:
        return self._dataloader("train", shuffle=True)

    def val_dataloader(self) -> StreamingDataLoader:
        loader = self._dataloader("val", shuffle=False)
        if len(loader) == 0:
            rank_zero_warn(
                f"The validation stream in {self.data_dir} holds fewer than batch_size={self.batch_size} sequences "
                f"of {self.seq_len + 1} tokens: validation will be skipped."
            )
        return loader

    def test_dataloader(self):
        """The held-out split (there is no separate test split): ``test`` reports held-out loss and perplexity."""
        return self._dataloader("val", shuffle=False)

    def _dataloader(self, split: str, shuffle: bool) -> StreamingDataLoader:
        from litdata import StreamingDataLoader, StreamingDataset
        from litdata.streaming.item_loader import TokensLoader

        if self.data_dir is None or self.tokenizer is None:
            raise RuntimeError("Call `setup()` before requesting a dataloader.")
        dataset = StreamingDataset(
            str(self.data_dir / split),
            item_loader=TokensLoader(block_size=self.seq_len + 1),
            shuffle=shuffle,
            drop_last=True,
            seed=self.seed,
        )
        return StreamingDataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
        )

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        """Tokens are stored as int32; embeddings and cross-entropy targets want int64 (cast on the device)."""
        return batch.long()
