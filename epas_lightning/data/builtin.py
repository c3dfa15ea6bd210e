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

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import sysconfig
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from epas_lightning.data.layout import (
    META_FILENAME,
    check_recorded_tokenizer,
    is_complete,
    load_meta,
    tokenizer_changed,
    write_meta,
)
from epas_lightning.data.prepare import BuildOptions, TokenizerChoice, build_dataset
from epas_lightning.data.sources import DataPreparationError, InputFile, plan_split
from epas_lightning.data.tokenizer import MIN_BPE_VOCAB, TRAINED_BOS_TOKEN, TRAINED_EOS_TOKEN
from epas_lightning.data.writing import WorkerLost, default_num_workers
from epas_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 4
"""Part of the cache key: raised when preparation changes the tokens (2: a file's UTF-8 byte order mark is dropped; 3:
files held out by the hash of their text, not of their path; 4: a whitespace-only file is left out)."""
BOS_TOKEN = TRAINED_BOS_TOKEN
EOS_TOKEN = TRAINED_EOS_TOKEN
FILES_FILENAME = "files.json"
SOURCE = "python-stdlib"
"""The ``source`` the ``meta.json`` of an entry we built records."""
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class SourceFile:
    """One decodable source file of the corpus."""

    rel_path: str
    """Path relative to the corpus root, with forward slashes (stable across platforms)."""
    path: str
    """Absolute path."""
    n_bytes: int


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


def split_train_val(files: Sequence[SourceFile], val_fraction: float) -> tuple[list[SourceFile], list[SourceFile]]:
    """Hold out whole files as ``prepare`` does (:func:`~epas_lightning.data.sources.plan_split`): those whose text
    hashes below ``val_fraction``, with every copy of their text, at least one and never an empty one."""
    fix = "raise it, or leave it unset for the whole corpus"
    if (n := sum(1 for f in files if f.n_bytes)) < 2:
        raise ConfigError(f"need at least 2 non-empty files to hold one out, got {n}", "data.max_bytes", fix)
    try:
        planned = plan_split([InputFile(f.path, f.rel_path, "text", f.n_bytes) for f in files], val_fraction)
    except DataPreparationError as e:
        raise ConfigError(str(e).rstrip("."), "data.max_bytes", fix) from e
    held = {f.path for f in planned if f.split == "val"}
    return [f for f in files if f.path not in held], [f for f in files if f.path in held]


# ---------------------------------------------------------------------------------------------------------------------
# Building a cache entry
# ---------------------------------------------------------------------------------------------------------------------


def build_entry(
    build_dir: Path, vocab_size: int, max_bytes: int | None, val_fraction: float, num_workers: int, progress: bool
) -> dict:
    """Write a complete entry into ``build_dir`` (``meta.json`` last) and return its metadata.

    The files go through the same preparation as any corpus (:func:`~epas_lightning.data.prepare.build_dataset`):
    each file is one document, held out whole by the hash of its text, with a byte-level BPE trained on the train files.
    """
    root = stdlib_root()
    files, n_undecodable = collect_source_files(root, max_bytes)
    if n_undecodable:
        log.warning("Skipped %d standard library files that are not valid UTF-8.", n_undecodable)
    train, val = split_train_val(files, val_fraction)
    log.info(
        "Preparing the built-in corpus (once: later runs reuse it): %d train / %d val files, %.1f MB of Python from %s",
        len(train),
        len(val),
        _mb(files),
        root,
    )
    inputs = [
        InputFile(f.path, f.rel_path, "text", f.n_bytes, split)
        for split, group in (("train", train), ("val", val))
        for f in group
    ]
    meta = build_dataset(
        build_dir,
        inputs,
        TokenizerChoice(train_vocab_size=vocab_size),
        BuildOptions(val_fraction=val_fraction, on_bad="fail", num_workers=num_workers, progress=progress),
    )
    (build_dir / FILES_FILENAME).write_text(
        json.dumps({"train": [f.rel_path for f in train], "val": [f.rel_path for f in val]}, indent=1)
    )
    meta |= {
        "source": SOURCE,
        "source_root": str(root),
        "python_version": platform.python_version(),
        "requested_vocab_size": vocab_size,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "max_bytes": max_bytes,
        "skipped_undecodable_files": n_undecodable,
    }
    write_meta(build_dir, meta)
    return meta


def _mb(files: Sequence[SourceFile]) -> float:
    return sum(f.n_bytes for f in files) / 1e6


def _build_prefix(entry: Path) -> str:
    """Builds happen in hidden siblings, so listing the cache shows complete entries only."""
    return f".{entry.name}.tmp-"


def _remove_stale_builds(entry: Path) -> None:
    """Delete leftovers of interrupted builds (hidden, named by us; the caller holds the entry's lock), and set aside
    an entry without its metadata."""
    for stale in entry.parent.glob(f"{_build_prefix(entry)}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if entry.exists() and not is_complete(entry):  # builds are renamed into place whole: this one is not ours
        kept = _set_aside(entry, "incomplete")
        log.warning(
            "The built-in corpus entry %s is incomplete (no %s): building it again (what it held is kept at %s; "
            "delete it once you no longer need it).",
            entry,
            META_FILENAME,
            kept,
        )


def _set_aside(entry: Path, why: str) -> Path:
    """Move ``entry`` to a hidden sibling named for ``why``, kept (never deleted), and return where it went."""
    kept = entry.parent / f".{entry.name}.{why}-{uuid.uuid4().hex[:8]}"
    os.replace(entry, kept)
    return kept


def _build_locked(
    entry: Path, vocab_size: int, max_bytes: int | None, val_fraction: float, num_workers: int | None, progress: bool
) -> dict:
    """Build ``entry`` in a hidden sibling and rename it into place (the caller holds its lock); its metadata."""
    _remove_stale_builds(entry)
    build_dir = entry.parent / f"{_build_prefix(entry)}{uuid.uuid4().hex[:8]}"
    build_dir.mkdir()  # unlike mkdtemp's 0700, honours the umask: the cache may be shared
    try:
        workers = num_workers or default_num_workers()
        meta = build_entry(build_dir, vocab_size, max_bytes, val_fraction, workers, progress)
        os.replace(build_dir, entry)
    except WorkerLost as e:  # its advice names prepare's --num-workers, which fit's first use does not take
        shutil.rmtree(build_dir, ignore_errors=True)
        raise DataPreparationError(
            e.what.replace("nothing was written", "the built-in corpus was not prepared"),
            f"{workers} worker processes preparing {entry}",
            ("the system may have run out of memory: " if e.killed else "")
            + "run it again (the corpus is prepared once, on first use), or find what ended the worker",
        ) from None
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return meta


def reusable(entry: Path) -> bool:
    """Whether ``entry`` is complete with the tokenizer it was built with. One that cannot be checked (an unreadable
    ``meta.json``) counts as reusable: reading it says what is wrong, in one line."""
    try:
        return is_complete(entry) and not tokenizer_changed(entry)
    except DataError:
        return True


def _set_aside_altered(entry: Path) -> bool:
    """Move a complete ``entry`` whose tokenizer file changed since its build to a hidden sibling, kept (the file in it
    is not ours), so that it is built again; refuse one whose ``meta.json`` does not say we built it (the caller holds
    the entry's lock). Whether ``entry`` stays, to be used as it is: one not ours whose file was put back meanwhile
    (a build could not replace it)."""
    if not is_complete(entry):
        return False
    if load_meta(entry).get("source") != SOURCE:
        fix = f"move it out of {entry.parent}: its {META_FILENAME} names no {SOURCE} source, so it is no entry we built"
        try:
            check_recorded_tokenizer(entry, entry)
        except DataError as e:
            raise DataError(e.what, e.where, fix) from None
        return True
    kept = _set_aside(entry, "replaced")
    log.warning(
        "The built-in corpus entry %s holds another tokenizer file than it was built with: building it again (the "
        "altered entry is kept at %s; delete it once you no longer need it).",
        entry,
        kept,
    )
    return False


def unwritable_cache(error: OSError, root: Path, cache_dir: str | Path | None) -> ConfigError:
    """The one line for a cache folder the built-in corpus cannot be written to (a file, read-only, full), naming the
    setting that chose it."""
    if cache_dir is not None:
        where = f"data.cache_dir {cache_dir}"
    elif env_dir := os.environ.get("EPAS_CACHE_DIR"):
        where = f"EPAS_CACHE_DIR {env_dir}"
    else:
        where = str(root)
    return ConfigError(
        f"cannot write the built-in corpus cache ({error.strerror or error}: {error.filename})",
        where,
        "set data.cache_dir (or EPAS_CACHE_DIR) to a writable folder with room, or free space there",
    )


def check_builtin_vocab(vocab_size: int) -> None:
    """The built-in corpus's tokenizer needs room for the 256 bytes, BOS and EOS."""
    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(
            f"the built-in corpus trains a byte-level BPE of vocab_size tokens, at least {MIN_BPE_VOCAB} (256 bytes, "
            f"BOS, EOS), not {vocab_size}",
            "model.config.vocab_size",
            f"raise it to {MIN_BPE_VOCAB} or more",
        )


def prepare_builtin_corpus(
    vocab_size: int,
    cache_dir: str | Path | None = None,
    max_bytes: int | None = None,
    val_fraction: float = 0.02,
    num_workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Tokenize the running interpreter's standard library into a cached train/val token stream.

    Args:
        vocab_size: Size of the byte-level BPE vocabulary, including ``<|bos|>`` and ``<|eos|>``.
        cache_dir: Parent directory of the cache entries. Default: :func:`default_cache_dir`.
        max_bytes: Use only the first files (in sorted order) totalling at most this many bytes, for fast tests.
        val_fraction: Approximate fraction of files held out for validation (at least one file).
        num_workers: Processes for tokenization. Default: the CPU cores available.
        progress: Log each step and show progress bars while building.

    Returns:
        The complete entry directory (``train/``, ``val/``, ``tokenizer.json``, ``files.json``, ``meta.json``).
    """
    check_builtin_vocab(vocab_size)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    from filelock import FileLock

    entry = builtin_entry_path(vocab_size, cache_dir, max_bytes, val_fraction)
    if reusable(entry):
        log.info("Reusing prepared corpus at %s", entry)
        return entry
    lock_path = entry.parent / ".locks" / f"{entry.name}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_path)):
            if reusable(entry):  # another process built it while we waited
                log.info("Reusing prepared corpus at %s", entry)
                return entry
            if _set_aside_altered(entry):  # not ours, its tokenizer file put back meanwhile
                return entry
            meta = _build_locked(entry, vocab_size, max_bytes, val_fraction, num_workers, progress)
    except OSError as e:
        if not Path(e.filename or "/").is_relative_to(entry.parent):
            raise
        raise unwritable_cache(e, entry.parent, cache_dir) from e
    splits = meta["splits"]
    log.info(
        "Prepared the built-in corpus in %.1f s: %s train / %s val tokens, vocab %d, at %s",
        meta["seconds"],
        f"{splits['train']['tokens']:,}",
        f"{splits['val']['tokens']:,}",
        meta["vocab_size"],
        entry,
    )
    return entry
