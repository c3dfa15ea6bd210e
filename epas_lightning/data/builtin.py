"""Built-in corpus: the Python standard library of the running interpreter, tokenized into litdata streams.

The corpus ships with every Python install, so the demo trains on real text without any download. One cache entry
(one directory) holds everything a :class:`~epas_lightning.data.TokenDataModule` needs::

    <entry>/
        tokenizer.json   byte-level BPE trained on the train files only
        train/           litdata token stream (index.json + chunk-*.bin), one BOS ... EOS document per file
        val/             the same for the held-out files
        files.json       relative paths of the train and val files
        meta.json        written last: an entry is complete only when this file exists

An entry is built in a temporary sibling directory and renamed into place, under a file lock, so an interrupted
build never leaves a directory that looks complete and concurrent callers (several ranks) build it only once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import random
import shutil
import signal
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)
META_FILENAME = "meta.json"
TOKENIZER_FILENAME = "tokenizer.json"
FILES_FILENAME = "files.json"
TOKEN_DTYPE = np.int32
CHUNK_BYTES = "8MB"
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_SHARDS_PER_WORKER = 4


@dataclass(frozen=True)
class SourceFile:
    """One decodable source file of the corpus."""

    rel_path: str
    """Path relative to the corpus root, with forward slashes (stable across platforms)."""
    path: str
    """Absolute path."""
    n_bytes: int


@dataclass(frozen=True)
class TokenizeShard:
    """A group of files tokenized by one ``litdata.optimize`` work item (batching amortises per-item overhead)."""

    tokenizer_path: str
    file_paths: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------------------
# Cache location
# ---------------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$EPAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/epas_lightning``, else ``~/.cache/epas_lightning``."""
    if env_dir := os.environ.get("EPAS_CACHE_DIR"):
        return Path(env_dir).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "epas_lightning"


def builtin_entry_name(vocab_size: int, max_bytes: int | None = None, val_fraction: float = 0.02) -> str:
    """Cache entry name, e.g. ``stdlib-py3.11-v4096-all-1a2b3c4d``; every input that changes the data is hashed."""
    key = {
        "format": FORMAT_VERSION,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "vocab_size": vocab_size,
        "max_bytes": max_bytes,
        "val_fraction": val_fraction,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    size = "all" if max_bytes is None else f"{max_bytes}B"
    return f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-v{vocab_size}-{size}-{digest}"


def builtin_entry_path(
    vocab_size: int, cache_dir: str | Path | None = None, max_bytes: int | None = None, val_fraction: float = 0.02
) -> Path:
    """Where :func:`prepare_builtin_corpus` puts (or finds) the entry for these arguments."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / builtin_entry_name(vocab_size, max_bytes, val_fraction)


def is_complete_entry(path: str | Path) -> bool:
    """An entry is complete once ``meta.json`` exists: it is written last."""
    return (Path(path) / META_FILENAME).is_file()


def load_meta(path: str | Path) -> dict:
    """Read the ``meta.json`` of a prepared data directory."""
    return json.loads((Path(path) / META_FILENAME).read_text())


# ---------------------------------------------------------------------------------------------------------------------
# Collecting and splitting files
# ---------------------------------------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """Directory holding the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: str | Path) -> list[str]:
    """All ``*.py`` files under ``root`` as sorted relative POSIX paths, skipping installed packages."""
    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        rel_paths += [(rel_dir / name).as_posix() for name in filenames if name.endswith(".py")]
    return sorted(rel_paths)


def collect_source_files(root: str | Path, max_bytes: int | None = None) -> tuple[list[SourceFile], int]:
    """Read the sources in sorted order, keeping UTF-8 files until ``max_bytes`` would be exceeded.

    Returns:
        The kept files and the number of files skipped because they are not valid UTF-8.
    """
    files: list[SourceFile] = []
    total_bytes = n_undecodable = 0
    for rel_path in list_source_files(root):
        path = os.path.join(root, rel_path)
        data = Path(path).read_bytes()
        if max_bytes is not None and total_bytes + len(data) > max_bytes:
            break
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            n_undecodable += 1
            continue
        files.append(SourceFile(rel_path, path, len(data)))
        total_bytes += len(data)
    return files, n_undecodable


def stable_unit_hash(text: str) -> float:
    """A hash of ``text`` in ``[0, 1)`` that is the same in every process (unlike the salted builtin ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def split_train_val(files: Sequence[SourceFile], val_fraction: float) -> tuple[list[SourceFile], list[SourceFile]]:
    """Hold out whole files: those whose path hash is below ``val_fraction``, and always at least one."""
    if len(files) < 2:
        raise ValueError(f"Need at least 2 files to split into train and val, got {len(files)}; raise max_bytes.")
    val_paths = {f.rel_path for f in files if stable_unit_hash(f.rel_path) < val_fraction}
    if not val_paths:
        val_paths = {min(files, key=lambda f: stable_unit_hash(f.rel_path)).rel_path}
    if len(val_paths) == len(files):
        raise ValueError(f"val_fraction={val_fraction} leaves no training files.")
    train = [f for f in files if f.rel_path not in val_paths]
    val = [f for f in files if f.rel_path in val_paths]
    return train, val


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def read_texts(files: Sequence[SourceFile]) -> Iterator[str]:
    """The files' contents, one string each, read lazily."""
    for f in files:
        yield Path(f.path).read_text(encoding="utf-8")


def train_byte_level_bpe(files: Sequence[SourceFile], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (never an unknown token) with ``vocab_size`` entries including the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(read_texts(files), trainer=trainer, length=len(files))
    return tokenizer


_TOKENIZERS_BY_PATH: dict[str, Any] = {}


def load_tokenizer_once(path: str) -> Tokenizer:
    """Load a ``tokenizer.json`` once per process (a worker tokenizes several shards)."""
    if path not in _TOKENIZERS_BY_PATH:
        from tokenizers import Tokenizer

        _TOKENIZERS_BY_PATH[path] = Tokenizer.from_file(path)
    return _TOKENIZERS_BY_PATH[path]


def tokenize_shard(shard: TokenizeShard) -> Iterator[torch.Tensor]:
    """``litdata.optimize`` work function: yield one ``BOS + tokens + EOS`` tensor per file of the shard.

    Tensors (not NumPy arrays) make the stream's items tensors too, like the dataloader's batches.
    """
    import torch

    tokenizer = load_tokenizer_once(shard.tokenizer_path)
    bos, eos = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
    texts = [Path(p).read_text(encoding="utf-8") for p in shard.file_paths]
    for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
        yield torch.from_numpy(np.array([bos, *encoding.ids, eos], dtype=TOKEN_DTYPE))


# ---------------------------------------------------------------------------------------------------------------------
# Writing token streams with litdata
# ---------------------------------------------------------------------------------------------------------------------


def default_num_workers() -> int:
    """CPU cores available to this process."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_start_method() -> str:
    """``fork`` on Linux: workers start instantly and never re-import ``__main__``.

    Under ``spawn`` (litdata's default) each worker re-imports torch, and a script without an
    ``if __name__ == "__main__"`` guard would re-run its top level in every worker.
    """
    return "fork" if sys.platform.startswith("linux") else "spawn"


def make_shards(files: Sequence[SourceFile], tokenizer_path: Path, n_shards: int) -> list[TokenizeShard]:
    """Cut the (ordered) files into at most ``n_shards`` contiguous groups of roughly equal byte size."""
    n_shards = max(1, min(n_shards, len(files)))
    target = sum(f.n_bytes for f in files) / n_shards
    groups: list[list[str]] = [[]]
    filled = 0
    for f in files:
        if groups[-1] and filled >= target * len(groups) and len(groups) < n_shards:
            groups.append([])
        groups[-1].append(f.path)
        filled += f.n_bytes
    return [TokenizeShard(str(tokenizer_path), tuple(g)) for g in groups]


@contextlib.contextmanager
def _isolated_litdata(scratch_dir: Path) -> Iterator[None]:
    """Undo ``litdata.optimize``'s process-wide side effects.

    It reseeds the global ``random``/NumPy/torch RNGs (which would override a user's ``seed_everything`` on the first
    run only), forces the multiprocessing start method, installs a SIGINT handler, sets an env var, and wipes its
    shared scratch dirs under ``/tmp`` (which would break concurrent builds). Give it private scratch dirs instead.
    """
    import torch

    rng_states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    start_method = multiprocessing.get_start_method(allow_none=True)
    sigint_handler = signal.getsignal(signal.SIGINT)
    litdata_logger = logging.getLogger("litdata")
    litdata_level = litdata_logger.level
    litdata_logger.setLevel(logging.WARNING)
    env_overrides = {
        "DATA_OPTIMIZER_CACHE_FOLDER": str(scratch_dir / "chunks"),
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(scratch_dir / "data"),
        "DATA_OPTIMIZER_NUM_WORKERS": None,
        # Forked workers must not use the tokenizer's thread pool (already started by training): say so quietly.
        "TOKENIZERS_PARALLELISM": "false",
    }
    saved_env = {k: os.environ.get(k) for k in env_overrides}
    for key, value in env_overrides.items():
        if value is not None:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        signal.signal(signal.SIGINT, sigint_handler)
        litdata_logger.setLevel(litdata_level)
        multiprocessing.set_start_method(start_method, force=True)
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.random.set_rng_state(rng_states[2])
        shutil.rmtree(scratch_dir, ignore_errors=True)


def write_token_stream(files: Sequence[SourceFile], tokenizer_path: Path, output_dir: Path, num_workers: int) -> int:
    """Tokenize ``files`` into a litdata ``TokensLoader`` stream at ``output_dir``; returns the number of tokens."""
    from litdata import optimize
    from litdata.streaming.item_loader import TokensLoader

    num_workers = max(1, min(num_workers, len(files)))
    shards = make_shards(files, tokenizer_path, n_shards=num_workers * _SHARDS_PER_WORKER)
    with _isolated_litdata(output_dir.parent / f".litdata-scratch-{output_dir.name}"):
        optimize(
            fn=tokenize_shard,
            inputs=shards,
            output_dir=str(output_dir),
            chunk_bytes=CHUNK_BYTES,
            item_loader=TokensLoader(),
            num_workers=min(num_workers, len(shards)),
            keep_data_ordered=True,
            start_method=worker_start_method(),
            verbose=False,
        )
    return count_stream_tokens(output_dir)


def count_stream_tokens(stream_dir: str | Path) -> int:
    """Number of tokens in a litdata token stream, from its ``index.json``."""
    index = json.loads((Path(stream_dir) / "index.json").read_text())
    return sum(chunk["dim"] for chunk in index["chunks"])


# ---------------------------------------------------------------------------------------------------------------------
# Building a cache entry
# ---------------------------------------------------------------------------------------------------------------------


class StepTimer:
    """Wall-clock seconds per named step."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 2)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)


def split_summary(files: Sequence[SourceFile], n_tokens: int) -> dict[str, int]:
    return {"files": len(files), "bytes": sum(f.n_bytes for f in files), "tokens": n_tokens}


def build_entry(build_dir: Path, vocab_size: int, max_bytes: int | None, val_fraction: float, num_workers: int) -> dict:
    """Write a complete entry into ``build_dir`` (``meta.json`` last) and return its metadata."""
    timer = StepTimer()
    root = stdlib_root()
    files, n_undecodable = collect_source_files(root, max_bytes)
    if n_undecodable:
        log.warning("Skipped %d standard library files that are not valid UTF-8.", n_undecodable)
    train, val = split_train_val(files, val_fraction)
    log.info("Corpus: %d train / %d val files (%.1f MB) from %s", len(train), len(val), _mb(files), root)
    timer.lap("collect")

    tokenizer = train_byte_level_bpe(train, vocab_size)
    tokenizer_path = build_dir / TOKENIZER_FILENAME
    tokenizer.save(str(tokenizer_path))
    timer.lap("train_tokenizer")
    n_tokens = {
        name: write_token_stream(split, tokenizer_path, build_dir / name, num_workers)
        for name, split in (("train", train), ("val", val))
    }
    timer.lap("tokenize")
    (build_dir / FILES_FILENAME).write_text(
        json.dumps({"train": [f.rel_path for f in train], "val": [f.rel_path for f in val]}, indent=1)
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "source": "python-stdlib",
        "source_root": str(root),
        "python_version": platform.python_version(),
        "vocab_size": tokenizer.get_vocab_size(),
        "requested_vocab_size": vocab_size,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "bos_id": tokenizer.token_to_id(BOS_TOKEN),
        "eos_id": tokenizer.token_to_id(EOS_TOKEN),
        "token_dtype": np.dtype(TOKEN_DTYPE).name,
        "tokenizer": TOKENIZER_FILENAME,
        "max_bytes": max_bytes,
        "val_fraction": val_fraction,
        "skipped_undecodable_files": n_undecodable,
        "splits": {"train": split_summary(train, n_tokens["train"]), "val": split_summary(val, n_tokens["val"])},
        "seconds": timer.total(),
        "seconds_by_step": timer.laps,
    }
    (build_dir / META_FILENAME).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _mb(files: Sequence[SourceFile]) -> float:
    return sum(f.n_bytes for f in files) / 1e6


def _build_prefix(entry: Path) -> str:
    """Builds happen in hidden siblings, so listing the cache shows complete entries only."""
    return f".{entry.name}.tmp-"


def _remove_stale_builds(entry: Path) -> None:
    """Delete leftovers of interrupted builds (safe: the caller holds the entry's lock)."""
    for stale in entry.parent.glob(f"{_build_prefix(entry)}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if entry.exists() and not is_complete_entry(entry):
        log.info("Rebuilding incomplete corpus entry %s (no %s).", entry, META_FILENAME)
        shutil.rmtree(entry)


def prepare_builtin_corpus(
    vocab_size: int,
    cache_dir: str | Path | None = None,
    max_bytes: int | None = None,
    val_fraction: float = 0.02,
    num_workers: int | None = None,
) -> Path:
    """Tokenize the running interpreter's standard library into a cached train/val token stream.

    Args:
        vocab_size: Size of the byte-level BPE vocabulary, including ``<|bos|>`` and ``<|eos|>``.
        cache_dir: Parent directory of the cache entries. Default: :func:`default_cache_dir`.
        max_bytes: Use only the first files (in sorted order) totalling at most this many bytes, for fast tests.
        val_fraction: Approximate fraction of files held out for validation (at least one file).
        num_workers: Processes for tokenization. Default: the CPU cores available.

    Returns:
        The complete entry directory (``train/``, ``val/``, ``tokenizer.json``, ``files.json``, ``meta.json``).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} for a byte-level BPE.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    from filelock import FileLock

    entry = builtin_entry_path(vocab_size, cache_dir, max_bytes, val_fraction)
    if is_complete_entry(entry):
        log.info("Reusing prepared corpus at %s", entry)
        return entry
    lock_path = entry.parent / ".locks" / f"{entry.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path)):
        if is_complete_entry(entry):  # another process built it while we waited
            log.info("Reusing prepared corpus at %s", entry)
            return entry
        _remove_stale_builds(entry)
        build_dir = entry.parent / f"{_build_prefix(entry)}{uuid.uuid4().hex[:8]}"
        build_dir.mkdir()  # unlike mkdtemp's 0700, honours the umask: the cache may be shared
        try:
            meta = build_entry(build_dir, vocab_size, max_bytes, val_fraction, num_workers or default_num_workers())
            os.replace(build_dir, entry)
        except BaseException:
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
    log.info("Prepared corpus at %s in %.1f s %s: %s", entry, meta["seconds"], meta["seconds_by_step"], meta["splits"])
    return entry
