"""Prepared token streams, checked and batched: the part of ``TokenDataModule`` that needs no Lightning, so that
``evaluate``, ``bench`` and ``analyze`` read held-out data (:func:`heldout_loader`) without loading it."""

from __future__ import annotations

import atexit
import math
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from epas_lightning.data.builtin import builtin_entry_path, check_builtin_vocab, prepare_builtin_corpus, reusable
from epas_lightning.data.layout import (
    INDEX_FILENAME,
    PREPARE_AGAIN,
    DataCheckError,
    check_recorded_tokenizer,
    check_stream,
    is_complete,
    load_meta,
    missing_entries,
    tokenizer_file,
)
from epas_lightning.data.tokenizer import (
    RecordedTokenizer,
    TextTokenizer,
    load_tokenizer,
    same_token_ids,
    tokenizer_sha256,
)
from epas_lightning.errors import ConfigError, DataError, check_path_name
from epas_lightning.loss import PAD
from epas_lightning.model.config import LlamaConfig, check_token_ids
from epas_lightning.outputs import interrupted_build
from epas_lightning.runtime import check_counts
from epas_lightning.safe_load import plain_numbers
from epas_lightning.seeds import SEED_FIX, TRAINING_SEEDS, seed_out_of_range
from epas_lightning.worker_processes import never_collect_inherited_objects, print_stack_on_crash

if TYPE_CHECKING:
    from litdata import StreamingDataLoader
    from torch.utils.data import DataLoader

DEFAULT_BUILTIN_VOCAB_SIZE = 4096
PREPARE = "create it with `python -m epas_lightning prepare --input ... --output ...`"
HOW_TO_CREATE = f"{PREPARE}, or leave data.data_dir unset to train on the built-in corpus"


def check_prepared(data_dir: Path, where: str, fix: str, incomplete: str | None = None) -> Path:
    """``data_dir`` if it is a complete prepared data directory with the tokenizer it records, else a
    :class:`DataError` at ``where``; ``incomplete``: the fix of one that lacks a part, where not ``fix`` (a folder
    known complete before, damaged since)."""
    check_path_name(data_dir, where)  # Path.exists() of one raised "File name too long"
    if data_dir.exists() and not data_dir.is_dir():  # a raw corpus file, or the folder's meta.json
        raise DataError("data directory is a file, not a folder", where, fix)
    if not data_dir.is_dir():
        leftover = interrupted_build(data_dir)
        beside = f" (an interrupted prepare left {leftover.name} beside it)" if leftover else ""
        raise DataError(f"data directory does not exist{beside}", where, fix)
    if is_complete(data_dir):
        load_meta(data_dir)  # an unreadable meta.json says so, rather than counting as missing
    if missing := missing_entries(data_dir):
        raise DataError(f"incomplete data directory: missing {', '.join(missing)}", where, incomplete or fix)
    check_recorded_tokenizer(data_dir, where)
    return data_dir


def check_data_dir(data_dir: Path) -> Path:
    """A folder ``data.data_dir`` names: :func:`check_prepared`, said as ``data.data_dir``."""
    return check_prepared(data_dir, f"data.data_dir {data_dir}", HOW_TO_CREATE)


def val_stream(val_dir: Path) -> Path:
    """The held-out token stream ``data.val_dir`` names: the folder itself, or a prepared directory's ``val``."""
    for stream in (val_dir, val_dir / "val"):
        if (stream / "index.json").is_file():
            return stream
    raise DataError(
        "neither a token stream (index.json) nor a prepared directory (val/index.json)",
        f"data.val_dir {val_dir}",
        "give a folder `epas prepare` wrote (or its val/ folder), or leave data.val_dir unset",
    )


def check_data_section(data_dir: str | list[str] | None, val_dir: str | None, vocab_size: int | None) -> None:
    """The folders a ``data`` section names, checked as ``setup`` checks them, and without one the built-in corpus's
    vocabulary. The command line calls it before Lightning builds a Trainer, so that a mistyped path is the only line
    a refused command prints."""
    folders = [data_dir] if isinstance(data_dir, str | Path) else list(data_dir or [])
    for folder in folders:
        check_data_dir(Path(folder).expanduser())
    if not folders and isinstance(vocab_size, int):
        check_builtin_vocab(vocab_size)
    if val_dir is not None:
        val_stream(Path(val_dir).expanduser())


def check_same_separators(folders: list[tuple[Path, dict]], what: str) -> None:
    """A :class:`DataCheckError` unless the prepared ``folders`` (each with its ``meta.json``) wrap their documents in
    the same BOS and EOS ids: one tokenizer file prepared with other ``--bos-token``/``--eos-token`` ends the documents
    of each with another id, and a model trained on them, or scored on them, learns no one end. A ``meta.json`` that
    records no ids (not written by ``prepare``) is left out: nothing can be said of it."""
    ids = {folder: (meta.get("bos_id"), meta.get("eos_id")) for folder, meta in folders}
    ids = {folder: pair for folder, pair in ids.items() if None not in pair}
    if len(set(ids.values())) > 1:
        raise DataCheckError(
            f"{what} wrap their documents in other BOS/EOS token ids ("
            + ", ".join(f"{bos}/{eos}" for bos, eos in ids.values())
            + ")",
            ", ".join(map(str, ids)),
            "prepare them with the same --bos-token and --eos-token",
        )


def check_data_flag(data: str | Path | None, flag: str = "--data") -> None:
    """A command's ``--data``: unset (the checkpoint's own data), or a complete prepared directory."""
    if data is not None:
        check_prepared(Path(data).expanduser(), f"{flag} {data}", PREPARE)


def check_tokenized_with(data_dir: Path, tokenizer: Path, where: str, fix: str, whose: str = "the model's") -> None:
    """A :class:`DataError` unless the prepared ``data_dir`` holds the ids of ``tokenizer`` (``whose``): with another
    vocabulary its ids stand for other tokens, and losses on it (or training on it) mean nothing."""
    data_tokenizer = tokenizer_file(data_dir)
    if not same_token_ids(data_tokenizer, tokenizer):
        raise DataError(
            f"prepared with another tokenizer ({data_tokenizer}) than {whose} ({tokenizer}): its ids stand for "
            "other tokens",
            where,
            fix,
        )


def holds_recorded_tokenizer(data_dir: Path, tokenizer: RecordedTokenizer) -> bool:
    """Whether the prepared folder ``data_dir`` holds the very tokenizer file a checkpoint recorded (its hash)."""
    return tokenizer_sha256(tokenizer_file(data_dir)) == tokenizer.sha256


def check_tokenized_as(
    data_dir: Path, tokenizer: Path | RecordedTokenizer, where: str, fix: str, whose: str = "the model's"
) -> None:
    """:func:`check_tokenized_with`, where ``tokenizer`` may be the one a checkpoint recorded: compared by its ids
    while its file is the one it trained with; where the file changed since (its data folder prepared again), the
    data's tokenizer must be the very file it recorded (its hash; ``fix`` then names no file); where nothing can be
    said of it, nothing is."""
    if isinstance(tokenizer, RecordedTokenizer):
        if tokenizer.changed():
            if not holds_recorded_tokenizer(data_dir, tokenizer):
                raise DataError(
                    f"{whose} tokenizer {tokenizer.path} changed since the checkpoint was saved (its data folder "
                    "prepared again?): the data's ids may stand for other tokens than the ones the weights learned",
                    where,
                    "use data prepared with the tokenizer the checkpoint trained with",
                )
            return
        if not tokenizer.path.is_file():
            return
        tokenizer = tokenizer.path
    check_tokenized_with(data_dir, tokenizer, where, fix, whose)


@dataclass(frozen=True)
class HeldOut:
    """The held-out data a run validated on, as its checkpoint records it (:meth:`TokenData.heldout`): the ``val``
    splits of ``data_dirs`` (several: mixed in full, in the order ``seed`` draws, as ``fit`` validates a mixture), or
    the stream of ``val_dir`` instead. What the commands read without ``--data``."""

    data_dirs: tuple[Path, ...]
    val_dir: Path | None = None
    seed: int = 42

    def to_record(self) -> dict[str, Any]:
        return {"data_dirs": [str(d) for d in self.data_dirs], "val_dir": _str_or_none(self.val_dir), "seed": self.seed}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> HeldOut | None:
        """The held-out data of a record :meth:`to_record` wrote (checked by :mod:`~epas_lightning.provenance`)."""
        if not record:
            return None
        val_dir = record["val_dir"]
        return cls(tuple(map(Path, record["data_dirs"])), None if val_dir is None else Path(val_dir), record["seed"])

    def missing(self) -> Path | None:
        """The first folder it needs that is no longer there (or a file now), if any: the ``val_dir``, or the data
        folders it is read with (:meth:`data_folders`)."""
        needed = (*([] if self.val_dir is None else [self.val_dir]), *self.data_folders())
        return next((d for d in needed if not d.is_dir()), None)

    def data_folders(self) -> tuple[Path, ...]:
        """The data folders it is read with: ``data_dirs``; where one of them is gone, a ``val_dir`` that is (or is
        in) a prepared folder is read with that folder alone, as what ``fit`` validated on does not need them (the
        ``val_dir`` replaced their ``val`` splits, and ``fit`` found its tokenizer the same as theirs)."""
        return (alone,) if (alone := self.alone()) is not None else self.data_dirs

    def alone(self) -> Path | None:
        """The prepared folder of a ``val_dir`` read without the data folders, one of which is gone (else ``None``)."""
        if self.val_dir is None or not self.val_dir.is_dir() or all(d.is_dir() for d in self.data_dirs):
            return None
        return next((d for d in (self.val_dir, self.val_dir.parent) if is_complete(d)), None)

    def folders(self) -> tuple[Path, ...]:
        """The folders it reads: the ``val_dir``, or the data folders."""
        return (self.val_dir,) if self.val_dir is not None else self.data_dirs

    def __str__(self) -> str:
        """What ``--data`` would be for it: the ``val_dir``, or the data folders."""
        return ", ".join(map(str, self.folders()))


def data_record(data: str | Path | HeldOut | None) -> list[str] | None:
    """The held-out data a command read, for its JSON output: the folders (one, or a mixture's several, in order; a
    list either way, so that readers need not split a string), or ``None`` for none."""
    if data is None:
        return None
    return [str(folder) for folder in (data.folders() if isinstance(data, HeldOut) else [data])]


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


class CheckedBatches:
    """A loader whose batches each pass ``check`` as they are read; its length is the loader's."""

    def __init__(self, loader: DataLoader, check: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.loader, self.check = loader, check

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return map(self.check, self.loader)


class TokenData:
    """The data directories of :class:`~epas_lightning.data.TokenDataModule` (its arguments, documented there):
    located, built (the built-in corpus), checked, and read as batches of ``seq_len + 1`` tokens."""

    def __init__(
        self,
        data_dir: str | list[str] | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        vocab_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        weights: list[float] | None = None,
        val_dir: str | None = None,
        max_bytes: int | None = None,
        cache_dir: str | None = None,
        resume_position: bool = True,
    ) -> None:
        super().__init__()
        # numpy numbers (a sweep's) as the Python ints they hold: torch's sampler and the corpus cache's key refuse them
        seq_len, batch_size, vocab_size, num_workers, seed, max_bytes = plain_numbers(
            [seq_len, batch_size, vocab_size, num_workers, seed, max_bytes]
        )
        counts = {"batch_size": batch_size, "seq_len": seq_len, "num_workers": num_workers, "seed": seed}
        counts |= {} if vocab_size is None else {"vocab_size": vocab_size}  # "512" failed comparing int and str
        if wrong := {name: n for name, n in counts.items() if not isinstance(n, int) or isinstance(n, bool)}:
            name = next(iter(wrong))  # "8" or 64.0 failed comparing str and int, or later in the loader
            raise ConfigError(
                f"{name} must be a whole number, got {wrong[name]!r}",
                f"data.{name}",
                "give it without quotes or a decimal point",
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}", "data.batch_size", "set 1 or more")
        if vocab_size is not None and vocab_size < 1:  # "the tokenizer has 512 tokens but the vocab_size is 0"
            raise ConfigError(f"vocab_size must be at least 1, got {vocab_size}", "data.vocab_size", "leave it unset")
        if seq_len < 1:  # linked from the model's block_size on the command line
            raise ConfigError(
                f"seq_len must be at least 1, got {seq_len}",
                "data.seq_len (model.config.block_size)",
                "set model.config.block_size to 1 or more",
            )
        if num_workers < 0:
            raise ConfigError(
                f"num_workers must be 0 or more, got {num_workers}", "data.num_workers", "0 loads in the main process"
            )
        if problem := seed_out_of_range(seed, TRAINING_SEEDS):  # litdata's numpy shuffle refused it in a traceback
            raise ConfigError(problem, "data.seed", SEED_FIX)
        dirs = [data_dir] if isinstance(data_dir, str | Path) else list(data_dir or [])
        if weights is not None:
            check_weights(weights, len(dirs))
        if dirs:
            check_no_builtin_settings(max_bytes, cache_dir)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.vocab_size = vocab_size
        self.num_workers = num_workers
        self.seed = seed
        self.weights = weights
        self.max_bytes = max_bytes
        self.cache_dir = cache_dir
        self.resume_position = resume_position
        self._fresh_position = False  # a resume told to start this data from its beginning
        self._position_settled = False  # the settings of a resumed position were checked (or it was set aside)
        self.use_builtin = not dirs
        self.data_dirs: list[Path] = [Path(d).expanduser() for d in dirs]
        self.val_dir: Path | None = None if val_dir is None else Path(val_dir).expanduser()
        self.tokenizer: TextTokenizer | None = None
        self.meta: dict | None = None

    @property
    def data_dir(self) -> Path | None:
        """The (first) prepared data directory."""
        return self.data_dirs[0] if self.data_dirs else None

    @property
    def builtin_vocab_size(self) -> int:
        return self.vocab_size if self.vocab_size is not None else DEFAULT_BUILTIN_VOCAB_SIZE

    def prepare_data(self) -> None:
        """Build the built-in corpus once (local rank 0; a file lock makes concurrent calls safe)."""
        self.check_fits_model()
        if self.use_builtin:
            self.data_dirs = [
                prepare_builtin_corpus(self.builtin_vocab_size, self.cache_dir, self.max_bytes, progress=True)
            ]

    def setup(self, stage: str | None = None) -> None:
        """Locate and check the data (complete, chunks intact, one tokenizer, vocab fits the model)."""
        self.check_fits_model()
        if self.tokenizer is not None:
            return
        self.data_dirs = [self.resolve_data_dir(d) for d in (self.data_dirs or [None])]
        check_each_once(self.data_dirs)
        try:
            self._check_and_load()
        except DataCheckError as e:  # "prepare the data again" cannot be done to the built-in corpus's cache entry
            if not self.use_builtin or not Path(e.where or "").is_relative_to(self.data_dirs[0]):
                raise
            fix = f"delete the cache entry {self.data_dirs[0]}: the next run builds it again"
            raise DataCheckError(e.what, e.where, fix) from e

    def _check_and_load(self) -> None:
        """Check the located data (complete, chunks intact, one tokenizer, vocab fits the model) and load its
        tokenizer."""
        metas = [load_meta(d) for d in self.data_dirs]
        tokenizer_files = [tokenizer_file(d, m) for d, m in zip(self.data_dirs, metas, strict=True)]
        if len(self.data_dirs) > 1 and len({tokenizer_sha256(f) for f in tokenizer_files}) > 1:
            raise DataCheckError(
                "the data directories to mix were tokenized differently",
                ", ".join(map(str, tokenizer_files)),
                "prepare them with the same --tokenizer",
            )
        if len(self.data_dirs) > 1:
            check_same_separators(list(zip(self.data_dirs, metas, strict=True)), "the data directories to mix")
        if (val_data := self._prepared_val_dir()) is not None:
            check_recorded_tokenizer(val_data, f"data.val_dir {self.val_dir}")
            val_tokenizer = tokenizer_file(val_data)
            if tokenizer_sha256(val_tokenizer) != tokenizer_sha256(tokenizer_files[0]):
                raise DataCheckError(
                    "data.val_dir was tokenized differently from data.data_dir",
                    f"{val_tokenizer}, {tokenizer_files[0]}",
                    "prepare them with the same --tokenizer",
                )
            pairs = [(self.data_dirs[0], metas[0]), (val_data, load_meta(val_data))]
            check_same_separators(pairs, "data.data_dir and data.val_dir")
        self.check_model_tokenizer()
        for stream in self.train_streams() + self.val_streams():
            check_stream(stream)
        self.meta = metas[0]
        self.tokenizer = load_tokenizer(tokenizer_files[0], *self._special_tokens(self.meta))
        self.check_vocab_size()

    @staticmethod
    def _special_tokens(meta: dict) -> tuple[str | None, str | None]:
        """BOS/EOS tokens the data was prepared with when they were named (sentencepiece/HF defaults otherwise)."""
        return meta.get("bos_token_override"), meta.get("eos_token_override")

    def train_streams(self) -> list[Path]:
        return [d / "train" for d in self.data_dirs]

    def val_streams(self) -> list[Path]:
        if self.val_dir is None:
            return [d / "val" for d in self.data_dirs]
        return [val_stream(self.val_dir)]

    def _prepared_val_dir(self) -> Path | None:
        """The prepared directory that ``val_dir`` is or holds the stream of (``None``: unset, or a bare stream)."""
        if self.val_dir is None:
            return None
        return next((d for d in (self.val_dir, self.val_dir.parent) if is_complete(d)), None)

    def resolve_data_dir(self, data_dir: Path | None) -> Path:
        """The complete data directory to read, building the built-in corpus if ``prepare_data`` did not run."""
        if data_dir is None or self.use_builtin:
            entry = builtin_entry_path(self.builtin_vocab_size, self.cache_dir, self.max_bytes)
            if not reusable(entry):  # missing, or its tokenizer file replaced since
                entry = prepare_builtin_corpus(self.builtin_vocab_size, self.cache_dir, self.max_bytes, progress=True)
            return entry
        return check_data_dir(data_dir)

    def check_model_tokenizer(self) -> None:
        """Check that the located data holds the ids of the tokenizer its model starts from: ``TokenDataModule``
        does, under a trainer; alone there is no model to check against."""

    def check_fits_model(self) -> None:
        """Check the data against the model that runs it, before any data is read: ``TokenDataModule`` does, under a
        trainer; alone there is no model to check against."""

    def check_vocab_size(self) -> None:
        """Fail before training if the tokenizer can emit ids outside the model's embedding table."""
        assert self.tokenizer is not None
        if self.vocab_size is not None:
            self.tokenizer.check_fits(self.vocab_size, self.vocab_size_fix())

    def vocab_size_fix(self) -> str:
        """What to do where the tokenizer has more ids than the model's ``vocab_size``."""
        assert self.tokenizer is not None
        return f"set model.config.vocab_size to at least {self.tokenizer.vocab_size}, or use a smaller tokenizer"

    def check_batch(self, batch: torch.Tensor, heldout: bool = False) -> torch.Tensor:
        """``batch`` (of the held-out data if ``heldout``, else of the training data), unless it holds token ids
        outside the model's vocabulary: a chunk corrupted in place (its size and index still agreeing) passes every
        earlier check. A held-out batch may end in pad rows (whole rows of :data:`~epas_lightning.loss.PAD`, left
        out of the check); anywhere else that id is refused as any other outside the vocabulary."""
        if self.vocab_size is None or not batch.numel():
            return batch
        data = batch
        if heldout and batch.dim() == 2 and bool((pad := (batch == PAD).all(dim=1)).any()):
            data = batch[~pad]
        if data.numel():
            low, high = (int(v) for v in torch.aminmax(data))
            fix = "the token stream is corrupt or of another tokenizer: prepare the data again"
            check_token_ids(low, high, self.vocab_size, self._read_from(heldout), fix)
        return batch

    def _read_from(self, heldout: bool) -> str:
        """The folders a batch came from: the ``val_dir`` for a held-out batch where set, else the data folders (a
        mixture's batch may come from any: the first was named, where another's chunk was corrupt)."""
        if heldout and self.val_dir is not None:
            return str(self.val_dir)
        return ", ".join(map(str, self.data_dirs)) or "the built-in corpus"

    def heldout(self) -> HeldOut:
        """The held-out data :meth:`heldout_dataloader` reads (call :meth:`setup` first), for the checkpoint."""
        val_dir = None if self.val_dir is None else self.val_dir.resolve()
        return HeldOut(tuple(d.resolve() for d in self.data_dirs), val_dir, self.seed)

    def heldout_dataloader(self, one_process: bool = False) -> DataLoader:
        """The held-out split in stored order (call :meth:`setup` first), every sample once
        (:class:`~epas_lightning.data.heldout.HeldOutBatches`): under several ranks each reads its own part, in as many
        batches as every other rank (the last ones filled with pad rows), so that validation and test end together.
        ``one_process``: all of it here whatever ranks there are, its last batch short instead of padded."""
        from torch.utils.data import DataLoader

        from epas_lightning.data.heldout import HeldOutBatches

        if self.tokenizer is None:
            raise RuntimeError("Call `setup()` before requesting a dataloader.")
        world_size, rank = (1, 0) if one_process else self._heldout_rank()
        batches = HeldOutBatches(
            self.val_streams(), self.seq_len, self.batch_size, self.seed, world_size, rank, pad=not one_process
        )
        return self._loader(DataLoader, batches, batch_size=None)  # HeldOutBatches batches

    def _heldout_rank(self) -> tuple[int, int]:
        """The ranks the held-out split is dealt to (``world_size``, ``global_rank``): :meth:`_ranks`, or without them
        litdata's (the process group's, or the environment's), as the training stream is dealt."""
        if (ranks := self._ranks()) is not None:
            return ranks[0], ranks[1]
        from litdata.utilities.env import _DistributedEnv

        env = _DistributedEnv.detect()
        return env.world_size, env.global_rank

    def _ranks(self) -> tuple[int, int, int] | None:
        """The ranks the loaders deal the data to (``world_size``, ``global_rank``, ``num_nodes``); ``None``:
        litdata's (the process group's, unless ``WORLD_SIZE``, ``GLOBAL_RANK`` or ``NNODES`` in the environment say
        otherwise). ``TokenDataModule`` gives its trainer's."""
        return None

    def _dataloader(
        self, streams: list[Path], shuffle: bool, weights: list[float] | None = None, loader: type | None = None
    ) -> StreamingDataLoader:
        from litdata import StreamingDataLoader

        from epas_lightning.data.heldout import stream_dataset
        from epas_lightning.data.mixing import SizedCombinedStreamingDataset

        if self.tokenizer is None:
            raise RuntimeError("Call `setup()` before requesting a dataloader.")
        datasets = [stream_dataset(stream, self.seq_len, shuffle, self.seed) for stream in streams]
        if (ranks := self._ranks()) is not None:
            _deal_to(datasets, *ranks)
        dataset: Any = datasets[0]
        if len(datasets) > 1:
            dataset = SizedCombinedStreamingDataset(
                datasets, seed=self.seed, weights=weights, iterate_over_all=weights is None
            )
        return self._loader(loader or StreamingDataLoader, dataset, batch_size=self.batch_size, drop_last=True)

    def _loader(self, loader: type, dataset: Any, **options: Any) -> Any:
        """``loader`` over ``dataset`` with ``num_workers`` data workers (started by :func:`start_data_worker`, ended
        with this process) and pinned memory on a CUDA machine: the training and the held-out loaders alike."""
        if self.num_workers > 0:
            end_data_workers_at_exit()
            never_collect_inherited_objects()
        return loader(
            dataset,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=start_data_worker,
            **options,
        )


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))
"""Ctrl+C, a scheduler's stop and SLURM's requeue signal (``SIGUSR1``): ``fit``'s main process answers them."""


def start_data_worker(worker_id: int) -> None:
    """A data worker's start: it leaves the stop signals to the main process, and a crash of its own (a
    segmentation fault in native code) prints the Python stack of each of its threads, where torch prints only that
    one happened."""
    leave_stop_signals_to_the_main_process(worker_id)
    print_stack_on_crash()


_data_workers_end_at_exit = False


def end_data_workers_at_exit() -> None:
    """Have the data workers still running when this process exits end with it (once per process). A loader's
    iterator can outlive the program: a script whose top level raised with one in a global. multiprocessing's exit
    handler (registered earlier, so run after this one) ends its daemonic processes with ``SIGTERM``, which data
    workers ignore (:func:`leave_stop_signals_to_the_main_process`), then waits for them: the process hung at exit
    for good instead of printing the traceback and ending."""
    global _data_workers_end_at_exit
    if not _data_workers_end_at_exit:
        atexit.register(end_data_workers)
        _data_workers_end_at_exit = True


def end_data_workers() -> None:
    """Kill this process's data workers that are still running (they ignore ``SIGTERM``): torch names each
    ``pt_data_worker`` (on Linux, where it forks them). Torch's ``SIGCHLD`` handler is let go first: it raised "worker
    killed by signal" into the next exit handler."""
    workers = [p for p in multiprocessing.active_children() if p.daemon and process_name(p.pid) == "pt_data_worker"]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
        worker.join()


def process_name(pid: int | None) -> str | None:
    """A process's name (Linux's ``/proc/PID/comm``), or ``None`` where it is gone or the system has none."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A data worker's start: it ignores :data:`STOP_SIGNALS`. Slurm's time limit signals every process of the job,
    and Ctrl+C the terminal's process group: a worker died of it, and ``fit`` ended in torch's traceback without a
    checkpoint instead of stopping after the step with one. The main process ends its workers when it stops."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


BUILTIN_SETTINGS = {
    "max_bytes": ("limits the built-in corpus only; data.data_dir is read whole", "trainer.max_steps shortens a run"),
    "cache_dir": ("is where the built-in corpus is cached; data.data_dir is read where it is", None),
}
"""The settings of the built-in corpus, which a prepared ``data_dir`` leaves unused: what each is for, and where a
run of a prepared folder has it."""


def check_no_builtin_settings(max_bytes: int | None, cache_dir: str | None) -> None:
    """A :class:`ConfigError` for a built-in corpus setting given beside a prepared ``data_dir``, which would leave it
    unused without a word (``max_bytes`` does not cut a prepared folder short)."""
    for name, value in (("max_bytes", max_bytes), ("cache_dir", cache_dir)):
        if value is None:
            continue
        what, instead = BUILTIN_SETTINGS[name]
        raise ConfigError(
            f"data.{name} {what}",
            f"data.{name} {value}",
            f"remove it{f' ({instead})' if instead else ''}, or leave data.data_dir unset to train on the built-in "
            "corpus",
        )


def check_weights(weights: list[float], n_dirs: int) -> None:
    """A :class:`ConfigError` unless ``weights`` are ``n_dirs`` finite, non-negative numbers, not all zero (NaN passed
    every comparison and failed in the loader: "cannot convert float NaN to integer"; a string or a lone number failed
    in a ``TypeError`` traceback)."""
    if not n_dirs:
        raise ConfigError(
            "weights mix several data_dir, but none is set (the built-in corpus is one stream)",
            "data.weights",
            "set data.data_dir to a list of prepared directories, or leave data.weights unset",
        )
    valid = _are_numbers(weights) and len(weights) == n_dirs and all(map(math.isfinite, weights))
    if not valid or min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(
            f"weights must be {n_dirs} finite non-negative numbers, not all zero (one per data_dir), got {weights}",
            "data.weights",
            f"give one weight per data_dir, e.g. [{', '.join(['1'] * n_dirs)}]",
        )


def _are_numbers(values: object) -> bool:
    """A list (or tuple) of real numbers: no string, bool or lone number."""
    return isinstance(values, list | tuple) and all(isinstance(v, Real) and not isinstance(v, bool) for v in values)


def check_each_once(data_dirs: list[Path]) -> None:
    """A :class:`ConfigError` for a folder listed twice in ``data_dirs`` (also by another path to it): a mixture reads
    each entry as a stream of its own, so every sample of that folder came twice an epoch, in the same order."""
    resolved = [data_dir.resolve() for data_dir in data_dirs]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise ConfigError(
                f"one folder is listed twice ({data_dirs[resolved.index(path)]}, {data_dirs[i]}): a mixture reads "
                "each entry as a stream of its own, so its samples would come twice an epoch",
                "data.data_dir",
                "list each folder once (data.weights set how much of each an epoch reads)",
            )


def check_seq_len(seq_len: int, config: LlamaConfig, fitting: bool = False, where: str = "data.seq_len") -> None:
    """A :class:`ConfigError` unless sequences of ``seq_len`` fit the model: its ``block_size`` for training, within
    its context length otherwise."""
    if seq_len > config.context_length or (fitting and seq_len != config.block_size):
        limit = f"block_size ({config.block_size})" if fitting else f"context length ({config.context_length})"
        trained = f" (it trained at {config.block_size})" if config.block_size < config.context_length else ""
        raise ConfigError(  # an HF folder's block_size is its context length: it never trained at that
            f"the data's seq_len ({seq_len}) {'is not' if fitting else 'exceeds'} the model's {limit}",
            where,
            "set it to model.config.block_size, the sequence length the model trains at"
            if fitting
            else f"use at most {config.context_length}{trained}",
        )


def _deal_to(datasets: list[Any], world_size: int, global_rank: int, num_nodes: int) -> None:
    """Have litdata deal each of ``datasets`` to these ranks, not to the ones it detects when it is made."""
    from litdata.utilities.env import _DistributedEnv

    for dataset in datasets:
        dataset.distributed_env = _DistributedEnv(world_size=world_size, global_rank=global_rank, num_nodes=num_nodes)


def heldout_loader(
    data_dir: str | Path | HeldOut | None,
    seq_len: int,
    batch_size: int,
    vocab_size: int | None = None,
    tokenizer: str | Path | RecordedTokenizer | None = None,
    own_data: bool = False,
) -> CheckedBatches:
    """The whole validation split of a prepared data directory (``None``: the built-in corpus; a checkpoint's
    :class:`HeldOut`: what its run validated on, read as ``fit`` reads it), read in this process whatever ranks the
    environment names, checked and in a fixed order: batches of (B, seq_len + 1) int32 tokens, each checked for ids
    outside ``vocab_size`` as it is read, every sequence once (the last batch holds what is left: fewer rows where the
    split is no multiple of B, and no pad rows). Iterating it again yields the same batches. A split without one
    sequence is a :class:`DataError`; so are a missing or incomplete ``data_dir``, one prepared with another
    vocabulary than ``tokenizer`` (the model's, when known: the one its checkpoint recorded, checked as
    :func:`check_tokenized_as` does) and a ``batch_size`` below 1, named as the commands' ``--data`` and
    ``--batch-size``. ``own_data``: the checkpoint records the data it trained on, which the commands read when
    ``--data`` is unset (the refusal of another tokenizer's data says so)."""
    held_out = data_dir if isinstance(data_dir, HeldOut) else None
    with _as_recorded(held_out):
        for folder in held_out.data_folders() if held_out else []:
            check_prepared(folder, str(folder), PREPARE, PREPARE_AGAIN)  # complete when its run read it
        if held_out is not None:
            _check_recorded_val_stream(held_out.val_dir)
        if held_out is not None and (alone := held_out.alone()) is not None:
            _check_tokenized_as_recorded(alone, tokenizer)
    if held_out is None:
        check_data_flag(data_dir)
    check_counts({"--batch-size": batch_size})
    data, folders = _heldout_data(data_dir, seq_len, batch_size, vocab_size)
    if tokenizer is not None:
        tokenizer = tokenizer if isinstance(tokenizer, RecordedTokenizer) else Path(tokenizer)
        fix = f"prepare it with --tokenizer {getattr(tokenizer, 'path', tokenizer)}"
        fix += ", or leave --data unset for the checkpoint's own data" if own_data else ""
        if held_out is not None:  # the run's own, prepared again since it validated on it
            fix = f"pass --data with a folder prepared with --tokenizer {getattr(tokenizer, 'path', tokenizer)}"
        for folder in folders:
            check_tokenized_as(folder, tokenizer, str(folder) if held_out else f"--data {data_dir}", fix)
    data.prepare_data()
    with _as_recorded(held_out):
        data.setup("validate")
    loader = data.heldout_dataloader(one_process=True)
    if len(loader) == 0:
        raise DataError(
            f"the validation split holds no sequence of {seq_len + 1} tokens",
            data.val_streams()[0],
            "lower --seq-len, or hold out more data",
        )
    return CheckedBatches(loader, partial(data.check_batch, heldout=True))


@contextmanager
def _as_recorded(held_out: HeldOut | None) -> Iterator[None]:
    """A :class:`DataError` reading the held-out data a checkpoint records (``held_out``) says whose it is, and to
    pass ``--data``: it spoke of the ``data.val_dir`` to leave unset or the folder to prepare, as to ``fit``'s user.
    Data damaged since it was prepared (a corrupt or missing chunk, a missing part of its folder) says so still:
    ``--data`` is another way round it, not its fix."""
    try:
        yield
    except DataError as e:
        if held_out is None:
            raise
        where = f"{e.where}, the held-out data the checkpoint's run validated on"
        fix = "pass --data with a folder prepared with the model's tokenizer"
        if e.fix == PREPARE_AGAIN:  # corrupt, not of another tokenizer
            fix = f"{PREPARE_AGAIN}, or pass --data with another folder prepared with the model's tokenizer"
        raise DataError(e.what, where, fix) from e


def _heldout_data(
    data_dir: str | Path | HeldOut | None, seq_len: int, batch_size: int, vocab_size: int | None
) -> tuple[TokenData, list[Path]]:
    """The data :func:`heldout_loader` reads (not set up), and the prepared folders whose tokenizer it is read with."""
    settings = {"seq_len": seq_len, "batch_size": batch_size, "vocab_size": vocab_size}
    if not isinstance(data_dir, HeldOut):
        data = TokenData(str(data_dir) if data_dir is not None else None, **settings)
        return data, [] if data_dir is None else [Path(data_dir).expanduser()]
    dirs, val_dir = [str(d) for d in data_dir.data_folders()], _str_or_none(data_dir.val_dir)
    data = TokenData(dirs, seed=data_dir.seed, val_dir=val_dir, **settings)
    return data, list(dict.fromkeys([*data_dir.data_folders(), *filter(None, [data._prepared_val_dir()])]))


def _check_recorded_val_stream(val_dir: Path | None) -> None:
    """A :class:`DataError` to prepare it again where the recorded ``val_dir``, a prepared folder or the ``val``
    stream of one, lost its stream's ``index.json`` since its run validated on it; a ``val_dir`` of no prepared
    folder is left to :meth:`TokenData.val_streams`."""
    if val_dir is None or any((stream / INDEX_FILENAME).is_file() for stream in (val_dir, val_dir / "val")):
        return
    if (folder := next((d for d in (val_dir, val_dir.parent) if is_complete(d)), None)) is not None:
        stream = val_dir / "val" if folder == val_dir else val_dir
        missing = (stream / INDEX_FILENAME).relative_to(folder)
        raise DataError(f"incomplete data directory: missing {missing}", folder, PREPARE_AGAIN)


def _check_tokenized_as_recorded(alone: Path, tokenizer: str | Path | RecordedTokenizer | None) -> None:
    """A :class:`DataError` unless the prepared folder ``alone`` of a recorded ``val_dir``, read without the data
    folders (gone, with the tokenizer file the checkpoint names), holds the tokenizer file the checkpoint recorded
    (its hash): ``fit`` refused a ``val_dir`` of any other file than theirs. Without a hash nothing can be said."""
    if not isinstance(tokenizer, RecordedTokenizer) or not tokenizer.sha256:
        return
    if not holds_recorded_tokenizer(alone, tokenizer):
        raise DataError(
            f"its tokenizer is not the file the checkpoint recorded ({tokenizer.path}, by its hash): prepared again "
            "since the run validated on it",
            alone,
            "pass --data with a folder prepared with the model's tokenizer",
        )
