"""``prepare``: tokenize any corpus into the litdata layout that :class:`~epas_lightning.data.TokenDataModule` reads.

Inputs are files or directories of text/markdown/code files (one document per file), JSONL (``.jsonl``,
``.jsonl.gz``, ``.jsonl.zst``; one document per line, text in a configurable field) and parquet (one document per
row). The output directory::

    <output>/
        train/                 litdata TokensLoader stream: BOS + tokens + EOS per document, int32
        val/                   the held-out documents (a hash split by document, or a separate --val-input)
        tokenizer.json | tokenizer.model   the tokenizer the tokens came from (copied, or trained on the train split)
        meta.json              written last: tokenizer kind, vocab size, BOS/EOS ids, documents/tokens/bytes/seconds

It is built in a hidden sibling directory and renamed into place, with ``meta.json`` written last, so an interrupted
run never leaves a directory that looks complete. The built-in standard-library corpus goes through the same code.

    python -m epas_lightning prepare --input corpus/ --output data/my --tokenizer path/to/tokenizer.model
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from epas_lightning.data.tokenizer import (
    HF_FILENAME,
    SENTENCEPIECE_FILENAME,
    file_sha256,
    load_tokenizer,
    load_tokenizer_once,
    train_byte_level_bpe,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILENAME = "meta.json"
TOKEN_DTYPE = np.int32
CHUNK_BYTES = "8MB"
TEXT_SUFFIXES = frozenset(
    {
        *(".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".html", ".htm", ".xml", ".csv", ".tsv", ".json"),
        *(".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cxx", ".cu", ".java", ".js", ".ts", ".jsx", ".tsx"),
        *(".go", ".rs", ".rb", ".php", ".swift", ".kt", ".scala", ".sh", ".bash", ".lua", ".pl", ".r", ".jl", ".hs"),
        *(".ml", ".sql", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".css", ".el", ".ex", ".erl", ".dart", ".proto"),
    }
)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")
SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "dist-packages"})
ON_BAD_CHOICES = ("skip", "fail")
_DOCS_PER_BATCH = 256
_BYTES_PER_WORK_ITEM = 32 * 2**20


class DataPreparationError(ValueError):
    """Input that cannot be prepared; the message names the file."""


# ---------------------------------------------------------------------------------------------------------------------
# Input files and documents
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """One input file and the split its documents go to."""

    path: str
    key: str
    """Stable name (path relative to its input root) that the hash split of documents is keyed on."""
    kind: str
    """``text`` (the file is one document), ``jsonl`` or ``parquet`` (one document per record)."""
    n_bytes: int
    split: str = "hash"
    """``train`` or ``val`` (every document), or ``hash`` (each document by the hash of its key)."""


def file_kind(path: Path, explicit: bool) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if path.suffix.lower() in TEXT_SUFFIXES or explicit:
        return "text"
    return None


def discover_files(inputs: Sequence[str | Path], split: str = "hash") -> list[InputFile]:
    """The files of ``inputs`` (files or directories, walked in sorted order; hidden entries skipped)."""
    files: list[InputFile] = []
    for raw in inputs:
        root = Path(raw).expanduser()
        if root.is_file():
            kind = file_kind(root, explicit=True)
            files.append(InputFile(str(root), root.name, kind, root.stat().st_size, split))  # type: ignore[arg-type]
            continue
        if not root.is_dir():
            raise DataPreparationError(f"Input {root} does not exist.")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith(".") or not path.is_file() or (kind := file_kind(path, explicit=False)) is None:
                    continue
                files.append(InputFile(str(path), path.relative_to(root).as_posix(), kind, path.stat().st_size, split))
    return files


def stable_unit_hash(text: str) -> float:
    """A hash of ``text`` in ``[0, 1)`` that is the same in every process (unlike the salted builtin ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def split_by_hash(items: Sequence, key: Callable[[object], str], val_fraction: float) -> tuple[list, list]:
    """Hold out the items whose key hashes below ``val_fraction``, and always at least one."""
    if len(items) < 2:
        raise ValueError(f"Need at least 2 files to split into train and val, got {len(items)}.")
    val_keys = {key(f) for f in items if stable_unit_hash(key(f)) < val_fraction}
    if not val_keys:
        val_keys = {key(min(items, key=lambda f: stable_unit_hash(key(f))))}
    if len(val_keys) == len(items):
        raise ValueError(f"val_fraction={val_fraction} leaves no training files.")
    return [f for f in items if key(f) not in val_keys], [f for f in items if key(f) in val_keys]


def plan_split(files: list[InputFile], val_fraction: float) -> list[InputFile]:
    """Text files are held out whole (by path hash); JSONL/parquet records by the hash of ``file#index``."""
    text = [f for f in files if f.kind == "text"]
    records = [f for f in files if f.kind != "text"]
    if len(text) == 1 and not records:
        raise DataPreparationError(
            f"Only one document ({text[0].path}): cannot hold one out for validation. Pass --val-input."
        )
    if len(text) >= 2:
        train, val = split_by_hash(text, lambda f: f.key, val_fraction)
        text = [_with_split(f, "train") for f in train] + [_with_split(f, "val") for f in val]
    else:
        text = [_with_split(f, "train") for f in text]
    return text + records


def _with_split(f: InputFile, split: str) -> InputFile:
    return InputFile(f.path, f.key, f.kind, f.n_bytes, split)


def check_text_field(f: InputFile, text_field: str) -> None:
    """Fail early, naming the file, when the first record has no ``text_field``."""
    if f.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(f.path).names
        except Exception as e:
            raise DataPreparationError(f"{f.path}: not a readable parquet file ({e}).") from e
        if text_field not in names:
            raise DataPreparationError(f"{f.path}: no column {text_field!r} (columns: {names}); set --text-field.")
    elif f.kind == "jsonl":
        with contextlib.suppress(StopIteration, BadDocument):
            lineno, record = next(_jsonl_records(f))
            _record_text(record, text_field, f.path, lineno)


class BadDocument(Exception):
    """An unreadable file or record; skipped with a warning or fatal, depending on ``on_bad``."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise DataPreparationError(f"{path}: reading .zst needs `pip install zstandard`.") from e
        return zstandard.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115


def _jsonl_records(f: InputFile) -> Iterator[tuple[int, object]]:
    try:
        with _open_binary(f.path) as stream:
            for lineno, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise BadDocument(f"{f.path}:{lineno}", f"not a UTF-8 JSON line ({e})") from e
    except (OSError, EOFError, ValueError) as e:
        if isinstance(e, DataPreparationError | BadDocument):
            raise
        raise BadDocument(f.path, f"unreadable ({type(e).__name__}: {e})") from e


def _record_text(record: object, text_field: str, path: str, lineno: int) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        fields = list(record) if isinstance(record, dict) else type(record).__name__
        raise DataPreparationError(
            f"{path}:{lineno}: no string field {text_field!r} (found {fields}); set --text-field."
        )
    return record[text_field]


def iter_documents(f: InputFile, text_field: str, on_bad: Callable[[BadDocument], None]) -> Iterator[tuple[str, str]]:
    """``(key, text)`` for each document of ``f``. Bad records go to ``on_bad``, which may raise."""
    if f.kind == "text":
        try:
            yield f.key, Path(f.path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            on_bad(BadDocument(f.path, f"not valid UTF-8 ({e})"))
        except OSError as e:
            on_bad(BadDocument(f.path, f"unreadable ({e.strerror or e})"))
    elif f.kind == "jsonl":
        records = _jsonl_records(f)
        while True:
            try:
                lineno, record = next(records)
            except StopIteration:
                return
            except BadDocument as bad:
                on_bad(bad)
                if bad.where == f.path:  # the whole file is unreadable (truncated archive, I/O error)
                    return
                continue
            yield f"{f.key}#{lineno}", _record_text(record, text_field, f.path, lineno)
    else:
        import pyarrow.parquet as pq

        try:
            index = 0
            for batch in pq.ParquetFile(f.path).iter_batches(columns=[text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    index += 1
                    yield f"{f.key}#{index}", text or ""
        except DataPreparationError:
            raise
        except Exception as e:
            on_bad(BadDocument(f.path, f"unreadable parquet ({type(e).__name__}: {e})"))


def split_documents(
    files: Sequence[InputFile], split: str, val_fraction: float, text_field: str, on_bad: Callable
) -> Iterator[str]:
    """The texts of ``split`` (``train`` or ``val``) among ``files``, in order; empty documents are dropped."""
    for f in files:
        if f.split not in (split, "hash"):
            continue
        for key, text in iter_documents(f, text_field, on_bad):
            if text and (f.split != "hash" or (stable_unit_hash(key) < val_fraction) == (split == "val")):
                yield text


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizing into litdata streams
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    """One ``litdata.optimize`` input: some files, tokenized for one split by one worker."""

    files: tuple[InputFile, ...]
    split: str
    val_fraction: float
    text_field: str
    tokenizer_path: str
    bos_token: str | None
    eos_token: str | None
    on_bad: str
    stats_dir: str


def tokenize_work_item(item: WorkItem) -> Iterator[torch.Tensor]:
    """``litdata.optimize`` work function: one ``BOS + tokens + EOS`` int32 tensor per document.

    Writes ``documents/bytes/tokens/skipped`` to a file in ``item.stats_dir`` (workers are separate processes), and
    the message of a fatal input error to ``error-*.txt`` there, so the parent can re-raise it cleanly.
    """
    import torch

    tokenizer = load_tokenizer_once(item.tokenizer_path, item.bos_token, item.eos_token)
    stats = {"documents": 0, "bytes": 0, "tokens": 0, "skipped": []}

    def on_bad(bad: BadDocument) -> None:
        if item.on_bad == "fail":
            raise DataPreparationError(f"{bad} (pass --on-bad skip to skip it)")
        stats["skipped"].append([bad.where, bad.reason])

    def encode(texts: list[str]) -> Iterator[torch.Tensor]:
        for ids in tokenizer.encode_batch(texts):
            stats["tokens"] += len(ids) + 2
            yield torch.from_numpy(np.array([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=TOKEN_DTYPE))

    try:
        batch: list[str] = []
        for text in split_documents(item.files, item.split, item.val_fraction, item.text_field, on_bad):
            stats["documents"] += 1
            stats["bytes"] += len(text.encode("utf-8"))
            batch.append(text)
            if len(batch) >= _DOCS_PER_BATCH:
                yield from encode(batch)
                batch = []
        yield from encode(batch)
    except DataPreparationError as e:
        # Returning (not raising) lets litdata shut down cleanly: after a worker raises, it leaves an orphaned
        # helper process behind. The parent raises the error once ``optimize`` returns.
        Path(item.stats_dir, f"error-{uuid.uuid4().hex}.txt").write_text(str(e))
        return
    Path(item.stats_dir, f"{uuid.uuid4().hex}.json").write_text(json.dumps(stats))


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


def make_work_groups(files: Sequence[InputFile], n_groups: int) -> list[tuple[InputFile, ...]]:
    """Cut the (ordered) files into at most ``n_groups`` contiguous groups of roughly equal byte size."""
    n_groups = max(1, min(n_groups, len(files)))
    target = sum(f.n_bytes for f in files) / n_groups
    groups: list[list[InputFile]] = [[]]
    filled = 0
    for f in files:
        if groups[-1] and filled >= target * len(groups) and len(groups) < n_groups:
            groups.append([])
        groups[-1].append(f)
        filled += f.n_bytes
    return [tuple(g) for g in groups]


@contextlib.contextmanager
def isolated_litdata(scratch_dir: Path) -> Iterator[None]:
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


def write_split(
    files: Sequence[InputFile],
    split: str,
    output_dir: Path,
    *,
    tokenizer_path: Path,
    val_fraction: float,
    text_field: str = "text",
    bos_token: str | None = None,
    eos_token: str | None = None,
    on_bad: str = "skip",
    num_workers: int = 1,
    progress: bool = False,
) -> dict:
    """Tokenize the ``split`` documents of ``files`` into a litdata token stream; returns its statistics."""
    from litdata import optimize
    from litdata.streaming.item_loader import TokensLoader

    files = [f for f in files if f.split in (split, "hash")]
    scratch = output_dir.parent / f".scratch-{output_dir.name}"
    stats_dir = scratch / "stats"
    stats_dir.mkdir(parents=True)
    n_groups = max(max(1, num_workers) * 4, sum(f.n_bytes for f in files) // _BYTES_PER_WORK_ITEM)
    groups = make_work_groups(files, n_groups=n_groups)
    items = [
        WorkItem(g, split, val_fraction, text_field, str(tokenizer_path), bos_token, eos_token, on_bad, str(stats_dir))
        for g in groups
    ]
    with isolated_litdata(scratch / "litdata"), progress_bar(stats_dir, len(items), split, enabled=progress):
        try:
            optimize(
                fn=tokenize_work_item,
                inputs=items,
                output_dir=str(output_dir),
                chunk_bytes=CHUNK_BYTES,
                item_loader=TokensLoader(),
                num_workers=max(1, min(num_workers, len(items))),
                keep_data_ordered=True,
                start_method=worker_start_method(),
                verbose=False,
            )
        except RuntimeError as e:
            raise RuntimeError(f"Tokenizing the {split} split into {output_dir} failed: {e}") from e
    if errors := sorted(stats_dir.glob("error-*.txt")):
        raise DataPreparationError(errors[0].read_text())
    stats = {"documents": 0, "bytes": 0, "tokens": 0, "skipped": []}
    for path in stats_dir.glob("*.json"):
        for key, value in json.loads(path.read_text()).items():
            stats[key] += value
    shutil.rmtree(scratch, ignore_errors=True)
    stats["skipped"].sort()
    stats["files"] = len({f.path for f in files} - {where.split(":")[0] for where, _ in stats["skipped"]})
    if stats["documents"] == 0:
        shutil.rmtree(output_dir, ignore_errors=True)
        return stats
    stats["tokens"] = count_stream_tokens(output_dir)
    return stats


@contextlib.contextmanager
def progress_bar(stats_dir: Path, total: int, split: str, enabled: bool) -> Iterator[None]:
    """A tqdm bar over work items, fed from the statistics files that workers write when they finish one."""
    if not enabled:
        yield
        return
    import threading

    from tqdm.auto import tqdm

    done = threading.Event()

    def poll(bar: tqdm) -> None:
        while True:
            finished = done.wait(0.5)
            paths = list(stats_dir.glob("*.json"))
            tokens = 0
            for path in paths:
                with contextlib.suppress(OSError, ValueError):
                    tokens += json.loads(path.read_text())["tokens"]
            bar.n = len(paths)
            bar.set_postfix_str(f"{tokens:,} tokens", refresh=True)
            if finished:
                return

    with tqdm(total=total, desc=f"Tokenizing {split}", unit="shard", dynamic_ncols=True) as bar:
        thread = threading.Thread(target=poll, args=(bar,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def count_stream_tokens(stream_dir: str | Path) -> int:
    """Number of tokens in a litdata token stream, from its ``index.json``."""
    index = json.loads((Path(stream_dir) / "index.json").read_text())
    return sum(chunk["dim"] for chunk in index["chunks"])


# ---------------------------------------------------------------------------------------------------------------------
# A whole dataset
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


@dataclass
class TokenizerChoice:
    """Either a local tokenizer file (``path``) or ``train_vocab_size`` to train a byte-level BPE on the train split."""

    path: str | None = None
    train_vocab_size: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.train_vocab_size is None):
            raise ValueError("Give a tokenizer file or a vocabulary size to train one (--train-tokenizer), not both.")


@dataclass
class BuildOptions:
    val_fraction: float = 0.01
    text_field: str = "text"
    on_bad: str = "skip"
    num_workers: int = field(default_factory=default_num_workers)
    progress: bool = False


def _raise_bad(bad: BadDocument) -> None:
    raise DataPreparationError(f"{bad} (pass --on-bad skip to skip it)")


def build_dataset(build_dir: Path, files: list[InputFile], tokenizer: TokenizerChoice, options: BuildOptions) -> dict:
    """Write ``train/``, ``val/`` and the tokenizer into ``build_dir``; return the metadata (the caller writes it last).

    ``files`` carry their split (``train``/``val``/``hash``, see :func:`plan_split`).
    """
    if options.on_bad not in ON_BAD_CHOICES:
        raise ValueError(f"on_bad must be one of {ON_BAD_CHOICES}, got {options.on_bad!r}.")
    if not 0.0 <= options.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {options.val_fraction}.")
    timer = StepTimer()
    for f in files:
        check_text_field(f, options.text_field)
    if tokenizer.path is not None:
        loaded = load_tokenizer(tokenizer.path, tokenizer.bos_token, tokenizer.eos_token)
        tokenizer_path = build_dir / (HF_FILENAME if loaded.kind == "hf" else SENTENCEPIECE_FILENAME)
        shutil.copyfile(loaded.path, tokenizer_path)
        source = str(loaded.path)
    else:
        skipped: list = []
        on_bad = _raise_bad if options.on_bad == "fail" else skipped.append
        texts = split_documents(files, "train", options.val_fraction, options.text_field, on_bad)
        trained = train_byte_level_bpe(texts, tokenizer.train_vocab_size)  # type: ignore[arg-type]
        tokenizer_path = build_dir / HF_FILENAME
        trained.save(str(tokenizer_path))
        loaded = load_tokenizer(tokenizer_path)
        source = "trained"
        timer.lap("train_tokenizer")

    common = {
        "tokenizer_path": tokenizer_path,
        "val_fraction": options.val_fraction,
        "text_field": options.text_field,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "on_bad": options.on_bad,
        "num_workers": options.num_workers,
        "progress": options.progress,
    }
    splits = {}
    for split in ("val", "train"):  # val first: a split that comes out empty fails before the long part
        splits[split] = write_split(files, split, build_dir / split, **common)
        if splits[split]["documents"] == 0:
            hint = "raise --val-fraction or pass --val-input" if split == "val" else "check the inputs"
            raise DataPreparationError(f"The {split} split has no documents: {hint}.")
        timer.lap(f"tokenize_{split}")
    for split, stats in splits.items():
        for where, reason in stats["skipped"][:20]:
            log.warning("Skipped %s: %s", where, reason)
        if len(stats["skipped"]) > 20:
            log.warning("... and %d more skipped in the %s split.", len(stats["skipped"]) - 20, split)
    seconds = timer.total()
    n_tokens = sum(s["tokens"] for s in splits.values())
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_path.name,
        "tokenizer_kind": loaded.kind,
        "tokenizer_source": source,
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "vocab_size": loaded.vocab_size,
        "bos_id": loaded.bos_id,
        "eos_id": loaded.eos_id,
        "bos_token_override": tokenizer.bos_token,
        "eos_token_override": tokenizer.eos_token,
        "token_dtype": np.dtype(TOKEN_DTYPE).name,
        "val_fraction": options.val_fraction,
        "text_field": options.text_field,
        "splits": {name: {k: v for k, v in s.items() if k != "skipped"} for name, s in splits.items()},
        "skipped": {name: len(s["skipped"]) for name, s in splits.items()},
        "documents": sum(s["documents"] for s in splits.values()),
        "tokens": n_tokens,
        "bytes": sum(s["bytes"] for s in splits.values()),
        "seconds": seconds,
        "tokens_per_second": round(n_tokens / max(seconds, 1e-9)),
        "seconds_by_step": timer.laps,
    }


def write_meta(directory: Path, meta: dict) -> None:
    """Write ``meta.json``: the last file of a build, which marks it complete."""
    (directory / META_FILENAME).write_text(json.dumps(meta, indent=2) + "\n")


def prepare_dataset(
    input: str | Path | Sequence[str | Path],
    output: str | Path,
    tokenizer: str | Path | None = None,
    *,
    train_tokenizer: bool = False,
    vocab_size: int | None = None,
    val_input: str | Path | Sequence[str | Path] | None = None,
    val_fraction: float = 0.01,
    text_field: str = "text",
    bos_token: str | None = None,
    eos_token: str | None = None,
    on_bad: str = "skip",
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Tokenize a corpus into ``output`` (``train/``, ``val/``, the tokenizer, ``meta.json``); see the module doc.

    Args:
        input: Files or directories: text/code files, ``.jsonl[.gz|.zst]``, ``.parquet``.
        output: The dataset directory to create.
        tokenizer: A local ``tokenizer.json``, sentencepiece ``tokenizer.model``, or a directory holding one.
        train_tokenizer: Train a byte-level BPE of ``vocab_size`` tokens on the train split instead.
        val_input: Separate validation inputs. Otherwise ``val_fraction`` of the documents are held out by hash
            (whole files for text inputs, records for JSONL/parquet).
        text_field: The JSONL field / parquet column holding the text.
        on_bad: ``skip`` (warn) or ``fail`` on an unreadable or non-UTF-8 file or record.
        overwrite: Replace an existing ``output``.
    """
    inputs = [input] if isinstance(input, str | Path) else list(input)
    output = Path(output).expanduser().absolute()
    if output.exists() and not overwrite:
        raise FileExistsError(f"Output {output} already exists; pass --overwrite to replace it.")
    if train_tokenizer != (tokenizer is None):
        raise ValueError("Pass either a tokenizer file (--tokenizer) or --train-tokenizer with --vocab-size.")
    if train_tokenizer and vocab_size is None:
        raise ValueError("--train-tokenizer needs --vocab-size.")
    files = discover_files(inputs)
    if not files:
        raise DataPreparationError(f"No input files found in {', '.join(map(str, inputs))}.")
    if val_input is not None:
        val_inputs = [val_input] if isinstance(val_input, str | Path) else list(val_input)
        val_files = discover_files(val_inputs, split="val")
        if not val_files:
            raise DataPreparationError(f"No validation files found in {', '.join(map(str, val_inputs))}.")
        files = [_with_split(f, "train") for f in files] + val_files
    else:
        files = plan_split(files, val_fraction)
    if sum(f.n_bytes for f in files) == 0:
        raise DataPreparationError(f"The input files are all empty: {', '.join(map(str, inputs))}.")
    choice = TokenizerChoice(
        path=None if tokenizer is None else str(tokenizer),
        train_vocab_size=vocab_size if train_tokenizer else None,
        bos_token=bos_token,
        eos_token=eos_token,
    )
    options = BuildOptions(val_fraction, text_field, on_bad, num_workers or default_num_workers(), progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    build_dir = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    build_dir.mkdir()
    try:
        meta = build_dataset(build_dir, files, choice, options)
        meta["inputs"] = [str(p) for p in inputs]
        meta["val_inputs"] = None if val_input is None else [str(p) for p in val_inputs]
        write_meta(build_dir, meta)
        if output.exists():
            old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(output, old)
            os.replace(build_dir, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(build_dir, output)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return output


def summary_line(output: Path, meta: dict) -> str:
    s = meta["splits"]
    return (
        f"Prepared {output}: {meta['documents']:,} documents ({s['train']['documents']:,} train / "
        f"{s['val']['documents']:,} val), {meta['tokens']:,} tokens, {meta['bytes'] / 1e6:,.1f} MB of text in "
        f"{meta['seconds']:.1f} s ({meta['tokens_per_second']:,} tokens/s); tokenizer {meta['tokenizer']} "
        f"({meta['tokenizer_kind']}, vocab {meta['vocab_size']})."
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m epas_lightning prepare",
        description="Tokenize a corpus (text/code files, JSONL, parquet) into litdata streams for TokenDataModule.",
    )
    p.add_argument(
        "--input", nargs="+", required=True, help="files or directories (.txt/.md/code, .jsonl[.gz|.zst], .parquet)"
    )
    p.add_argument("--output", required=True, help="dataset directory to create (train/, val/, tokenizer, meta.json)")
    p.add_argument("--tokenizer", help="local tokenizer.json, sentencepiece tokenizer.model, or a directory with one")
    p.add_argument("--train-tokenizer", action="store_true", help="train a byte-level BPE on the train split")
    p.add_argument("--vocab-size", type=int, help="vocabulary size of the trained tokenizer")
    p.add_argument("--val-input", nargs="+", help="separate validation inputs (default: hold out --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="documents held out by hash (default 0.01)")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column with the text (default text)")
    p.add_argument("--bos-token", help="BOS token of an HF tokenizer (default: detected, e.g. <s>)")
    p.add_argument("--eos-token", help="EOS token of an HF tokenizer (default: detected, e.g. </s>)")
    p.add_argument("--on-bad", choices=ON_BAD_CHOICES, default="skip", help="unreadable/non-UTF-8 input (default skip)")
    p.add_argument("--num-workers", type=int, help="tokenizer processes (default: CPU cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = prepare_dataset(
            args.input,
            args.output,
            args.tokenizer,
            train_tokenizer=args.train_tokenizer,
            vocab_size=args.vocab_size,
            val_input=args.val_input,
            val_fraction=args.val_fraction,
            text_field=args.text_field,
            bos_token=args.bos_token,
            eos_token=args.eos_token,
            on_bad=args.on_bad,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (DataPreparationError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    print(summary_line(output, json.loads((output / META_FILENAME).read_text())))
    return 0
