"""The on-disk layout of a prepared dataset, in one place: names, ``meta.json``, and the completeness checks.

::

    <dataset>/
        train/                 litdata TokensLoader stream (index.json + chunk-*.bin): BOS + tokens + EOS per document
        val/                   the held-out documents, the same way
        tokenizer.json | tokenizer.model   the tokenizer the tokens came from
        meta.json              written last: tokenizer kind, vocab size, BOS/EOS ids, documents/tokens/bytes/seconds

``val_split`` in ``meta.json`` says how ``val/`` was held out: ``text-hash`` (each document by the hash of its text, so
copies of a text are on one side), ``val-input`` (the ``--val-input`` files). A folder prepared before it was recorded
has none: its documents were held out by the hash of their file's path (a record: of ``file#line``), unless it names
``val_inputs``.

A dataset is complete once ``meta.json`` exists; ``prepare`` and the built-in corpus write it last, in a folder that is
renamed into place only when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from epas_lightning.data.tokenizer import HF_FILENAME, tokenizer_in, tokenizer_sha256
from epas_lightning.errors import DataError

FORMAT_VERSION = 1
META_FILENAME = "meta.json"
INDEX_FILENAME = "index.json"
REQUIRED_ENTRIES = (f"train/{INDEX_FILENAME}", f"val/{INDEX_FILENAME}", META_FILENAME)
DATASET_KIND = "dataset"
"""The output kind of a prepared dataset (see :mod:`epas_lightning.outputs`)."""
PREPARE_AGAIN = "prepare the data again"
"""The fix of a folder damaged since ``prepare`` wrote it (an unreadable, corrupt or truncated file)."""


class DataCheckError(DataError):
    """A prepared data directory that cannot be read as it is (corrupt or truncated chunks, mismatched tokenizers)."""


def load_meta(path: str | Path) -> dict:
    """Read the ``meta.json`` of a prepared data directory."""
    meta_path = Path(path) / META_FILENAME
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DataCheckError(f"unreadable {META_FILENAME} ({e})", meta_path, PREPARE_AGAIN) from e
    if not isinstance(meta, dict):
        raise DataCheckError(f"{META_FILENAME} is not a JSON object", meta_path, PREPARE_AGAIN)
    return meta


def write_meta(directory: Path, meta: dict) -> None:
    """Write ``meta.json``: the last file of a build, which marks it complete."""
    (directory / META_FILENAME).write_text(json.dumps(meta, indent=2) + "\n")


def is_complete(path: str | Path) -> bool:
    """A dataset is complete once ``meta.json`` exists: it is written last."""
    return (Path(path) / META_FILENAME).is_file()


def is_prepared_dataset(path: Path) -> bool:
    """A complete folder written by ``prepare`` (also before output folders carried a marker)."""
    if not is_complete(path):
        return False
    try:
        meta = load_meta(path)
    except DataCheckError:
        return False
    return meta.get("format_version") == FORMAT_VERSION and "tokenizer_sha256" in meta


def tokenizer_file(data_dir: Path, meta: dict | None = None) -> Path:
    """The tokenizer file of a prepared data directory."""
    meta = load_meta(data_dir) if meta is None else meta
    name = meta.get("tokenizer", HF_FILENAME)
    if not isinstance(name, str) or not name or Path(name).name != name:  # a TypeError traceback, or a file elsewhere
        raise DataCheckError(
            f"{META_FILENAME} names no tokenizer file of its folder (tokenizer: {name!r})",
            data_dir / META_FILENAME,
            PREPARE_AGAIN,
        )
    return data_dir / name


def check_recorded_tokenizer(data_dir: Path, where: str | Path) -> None:
    """A :class:`DataCheckError` unless the tokenizer file of the complete ``data_dir`` is the one its ``meta.json``
    records (its hash, with a sentencepiece model's added tokens): a file replaced since, another vocabulary, reads
    the ids as other tokens, and checkpoints and exports would ship it as the model's. A ``meta.json`` that records
    no hash is taken as it is."""
    if tokenizer_changed(data_dir):
        file = tokenizer_file(data_dir)
        beside = "" if file.suffix == ".json" else " (or the added tokens named beside it)"
        raise DataCheckError(
            f"the tokenizer file {file.name}{beside} changed since the data was prepared ({META_FILENAME} records "
            "another hash): the data's token ids stand for other tokens in it",
            where,
            "prepare the data again with the tokenizer to use (or put the original file back)",
        )


def tokenizer_changed(data_dir: Path) -> bool:
    """Whether the tokenizer file of the complete ``data_dir`` is another than the one its ``meta.json`` records (its
    hash); ``False`` where it records none."""
    meta = load_meta(data_dir)
    recorded = meta.get("tokenizer_sha256")
    return isinstance(recorded, str) and tokenizer_sha256(tokenizer_file(data_dir, meta)) != recorded


def missing_entries(data_dir: Path) -> list[str]:
    """The parts of a prepared data directory that ``data_dir`` lacks."""
    missing = [name for name in REQUIRED_ENTRIES if not (data_dir / name).is_file()]
    if META_FILENAME not in missing:
        try:
            meta = load_meta(data_dir)
        except DataCheckError:
            return [*missing, META_FILENAME]
        if not (tokenizer := tokenizer_file(data_dir, meta)).is_file():
            missing.append(tokenizer.name)
    elif tokenizer_in(data_dir) is None:
        missing.insert(-1, HF_FILENAME)
    return missing


def check_stream(stream_dir: Path) -> None:
    """Fail, naming the file, when a token stream's ``index.json`` is unreadable, not a token stream's or lists no
    chunk, or a chunk is missing, truncated or holds fewer tokens than the index says."""
    index_path = stream_dir / INDEX_FILENAME
    try:
        index = json.loads(index_path.read_text())
        chunks, data_format = index["chunks"], index["config"]["data_format"]
        token_bytes = _token_itemsize(data_format)
        sized = [
            (stream_dir / c["filename"], int(c["chunk_bytes"]), int(c["chunk_size"]), int(c["dim"])) for c in chunks
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataCheckError(f"not a readable litdata index ({e})", index_path, PREPARE_AGAIN) from e
    if token_bytes is None:
        raise DataCheckError(f"not a token stream (data format {data_format})", index_path, PREPARE_AGAIN)
    if not chunks:  # litdata failed on it with an AssertionError traceback ("No chunks found")
        raise DataCheckError("the token stream holds no tokens (no chunks)", index_path, PREPARE_AGAIN)
    for path, chunk_bytes, items, tokens in sized:
        if not path.is_file():
            raise DataCheckError(f"chunk listed in {index_path} is missing", path, PREPARE_AGAIN)
        if (size := path.stat().st_size) != chunk_bytes:
            raise DataCheckError(
                f"corrupt or truncated chunk: {size} bytes, {index_path} says {chunk_bytes}",
                path,
                PREPARE_AGAIN,
            )
        if (items + 2) * 4 + tokens * token_bytes > size:  # a header of uint32 counts and offsets, then the tokens
            raise DataCheckError(
                f"corrupt chunk: it holds fewer tokens than {index_path} says ({tokens})",
                path,
                PREPARE_AGAIN,
            )


def _token_itemsize(data_format: object) -> int | None:
    """Bytes per token of a litdata token stream's ``data_format`` (``["no_header_tensor:<dtype>"]``), else ``None``."""
    from litdata.constants import _NUMPY_DTYPES_MAPPING, _TORCH_DTYPES_MAPPING

    if not (isinstance(data_format, list) and len(data_format) == 1 and isinstance(data_format[0], str)):
        return None
    kind, _, dtype = data_format[0].partition(":")
    mapping = {"no_header_tensor": _TORCH_DTYPES_MAPPING, "no_header_numpy": _NUMPY_DTYPES_MAPPING}.get(kind, {})
    if not dtype.isdigit() or int(dtype) not in mapping:
        return None
    return mapping[int(dtype)].itemsize


def count_stream_tokens(stream_dir: str | Path) -> int:
    """Number of tokens in a litdata token stream, from its ``index.json``."""
    index = json.loads((Path(stream_dir) / INDEX_FILENAME).read_text())
    return sum(chunk["dim"] for chunk in index["chunks"])
