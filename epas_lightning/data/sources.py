"""Where documents come from: input files and folders, the train/val split, and reading each document.

Inputs are files or directories of text/markdown/code files (one document per file), JSONL (``.jsonl``,
``.jsonl.gz``, ``.jsonl.zst``, ``.json.gz``, ``.json.zst``; one document per line, text in a configurable field) and
parquet (one document per row); a UTF-8 byte order mark starting a file is not text. A text file that looks binary
(NUL bytes) is a bad document, like an undecodable one: skipped with its name, or fatal with ``--on-bad fail``.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from epas_lightning.data.layout import DATASET_KIND, META_FILENAME, is_prepared_dataset
from epas_lightning.data.streams import compression, open_binary
from epas_lightning.errors import DataError
from epas_lightning.outputs import MARKER, read_marker

log = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset(
    {
        *(".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".html", ".htm", ".xml", ".csv", ".tsv", ".json"),
        *(".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cxx", ".cu", ".java", ".js", ".ts", ".jsx", ".tsx"),
        *(".go", ".rs", ".rb", ".php", ".swift", ".kt", ".scala", ".sh", ".bash", ".lua", ".pl", ".r", ".jl", ".hs"),
        *(".ml", ".sql", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".css", ".el", ".ex", ".erl", ".dart", ".proto"),
    }
)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".json.gz", ".json.zst")
"""Compressed ``.json`` shards are JSON Lines too (C4, Dolma); a plain ``.json`` file is one text document."""
SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "dist-packages"})
BINARY_SNIFF_BYTES = 8192
"""A text file with a NUL byte among its first bytes is binary (git's rule)."""
MAX_DOCUMENT_BYTES = 16 * 2**20
"""A larger document (text file, JSON line, parquet value) is a bad document: a tokenizer encodes a document at once,
in many times its size of memory, so one huge document (a whole corpus in one file) would exhaust the machine's."""


class DataPreparationError(DataError):
    """Input that cannot be prepared; ``where`` names the file."""


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
    """``train`` or ``val`` (every document), or ``hash`` (each document by the hash of its text,
    :func:`document_hash`)."""
    start: int = 0
    """Where this part of the file starts (:mod:`~epas_lightning.data.parts`): a byte offset at a line start (JSONL)
    or a row group (parquet)."""
    stop: int | None = None
    """Where the part ends, before that byte or row group; ``None``: at the end of the file."""
    first_record: int = 1
    """The number of its first line or row in the file: records keep the keys they are split by and the names that
    name bad ones."""
    stamp: tuple[int, int] | None = None
    """The whole file's ``(size, mtime_ns)`` when it was found (:func:`file_stamp`): a file that changes while it is
    prepared is found out (:func:`check_unchanged`); ``None``: not checked."""
    held: frozenset[float] = frozenset()
    """The hashes of documents held out beside those below the fraction (a ``hash`` file's): the text file held out
    where none hashed below it, so that a record with its text is held out too. Of a ``train`` file, those of the
    validation documents (``--val-input``): a copy of one is left out of training."""


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
    """The files of ``inputs`` (files or directories, walked in sorted order; hidden entries and the folders this
    project wrote skipped). Each real file is read once, where it is first found: a linked file (a symbolic or a hard
    link), or one under two inputs, is not a second document."""
    files: list[InputFile] = []
    read: set[tuple[int, int] | str] = set()
    flag = "--val-input" if split == "val" else "--input"
    for raw in inputs:
        if isinstance(raw, str) and not raw.strip():  # `--input "$DATA"`, DATA unset: Path("") is the current folder
            raise no_input_given(f"{flag} {raw!r}")
        root = Path(raw).expanduser()
        if root.is_file():
            _check_no_output(root, f"{flag} {root}")
            found = [(root, root.name, file_kind(root, explicit=True))]
        elif root.is_dir():
            found = _folder_files(root, f"{flag} {root}")
        elif root.exists():  # a pipe (`--input <(zcat corpus.jsonl.gz)`), a socket, a device: no size, no parts
            raise DataPreparationError(
                "input is neither a file nor a folder (a pipe?)", f"{flag} {root}", "write it to a file first"
            )
        elif str(raw) == "null":  # `--input null`: no input, not a file's name
            raise no_input_given(f"{flag} null")
        else:
            what = "input is a broken link" if root.is_symlink() else "input does not exist"
            raise DataPreparationError(what, f"{flag} {root}", "check the path")
        for path, key, kind in found:
            if (identity := file_identity(path)) not in read:
                read.add(identity)
                stamp = file_stamp(path)
                files.append(InputFile(str(path), key, kind, stamp[0], split, stamp=stamp))  # type: ignore[arg-type]
    _warn_json_records(files)
    return files


def no_input_given(where: str) -> DataPreparationError:
    """The error for an input flag given no file or folder (``--input null``, ``input: []``)."""
    return DataPreparationError("no input given", where, "give one or more files or folders (text, JSONL or parquet)")


def file_identity(path: str | Path) -> tuple[int, int] | str:
    """What makes paths one file: its device and inode, which its hard links, its symbolic links and a second input
    that reaches it share; its resolved path where the file system numbers no inodes (or it is gone: reading it says
    so)."""
    with contextlib.suppress(OSError):
        if (st := os.stat(path)).st_ino:
            return st.st_dev, st.st_ino
    return os.path.realpath(path)


def file_stamp(path: str | Path) -> tuple[int, int]:
    """``(size, mtime_ns)`` of ``path``: writing it, or putting another file in its place, changes it (not its inode:
    some network file systems number a file anew as they please)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def check_unchanged(files: Sequence[InputFile]) -> None:
    """Fail, naming the first, if an input file changed since it was found (written to, cut short, replaced, removed):
    its parts, cut by its old bytes, and its splits, read one after the other, would hold records twice or not at
    all, or records of two files, in a dataset called complete."""
    checked: set[str] = set()
    for f in files:
        if f.stamp is None or f.path in checked:
            continue
        checked.add(f.path)
        if (change := _change(f.path, f.stamp)) is not None:
            raise DataPreparationError(
                f"an input file changed while it was prepared ({change}): the dataset would hold part of it, or parts "
                "of two versions",
                f.path,
                "prepare again once nothing writes to it (copy a file that keeps growing aside first)",
            )


def _change(path: str, was: tuple[int, int]) -> str | None:
    """How the file at ``path`` changed since its stamp was ``was``, in words; ``None``: it did not."""
    try:
        now = file_stamp(path)
    except FileNotFoundError:
        return "it is gone"
    except OSError as e:
        return f"it can no longer be looked at: {e.strerror or e}"
    if now[0] != was[0]:
        return f"it {'grew' if now[0] > was[0] else 'was cut'} from {was[0]:,} to {now[0]:,} bytes"
    return "it was written to, or replaced" if now[1] != was[1] else None


_JSON_SNIFF_BYTES = 2**16


def _warn_json_records(files: Sequence[InputFile]) -> None:
    """One line for each way of holding records met in ``.json`` files, each read as one text document of JSON."""
    held: dict[str, list[str]] = {"lines": [], "array": []}
    for f in files:
        if f.kind == "text" and (layout := _json_records_layout(f.path)) is not None:
            held[layout].append(f.path)
    for layout, fix in (
        ("lines", "name them .jsonl to read a document per line"),
        ("array", "write the records as JSON Lines (one a line, named .jsonl) to read a document per record"),
    ):
        if paths := held[layout]:
            what = "JSON Lines" if layout == "lines" else "a JSON array of records"
            log.warning(
                f"{_count(paths, '.json file')} hold{'s' * (len(paths) == 1)} {what} (e.g. {paths[0]}), each read as "
                f"one text document of JSON: {fix}"
            )


def _json_records_layout(path: str) -> str | None:
    """``lines`` for a ``.json`` file that starts with two lines that are JSON objects each (as ``datasets``'
    ``to_json`` writes), ``array`` for one that starts a JSON array with an object (as pandas' ``to_json(orient=
    "records")`` writes); ``None`` for any other (one JSON document, a config)."""
    if not path.lower().endswith(".json"):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(_JSON_SNIFF_BYTES).decode("utf-8", "replace")
    except OSError:
        return None
    lines = head.split("\n")[:2]
    if len(lines) == 2 and all(isinstance(_first_json_value(line, whole=True), dict) for line in lines):
        return "lines"
    text = head.lstrip("\ufeff \t\r\n")
    if text.startswith("[") and isinstance(_first_json_value(text[1:]), dict):
        return "array"
    return None


def _first_json_value(text: str, whole: bool = False) -> object:
    """The JSON value ``text`` starts with (after blanks), or ``None``; with ``whole``, only one that is all of it."""
    try:
        return json.loads(text) if whole else json.JSONDecoder().raw_decode(text.lstrip())[0]
    except (ValueError, RecursionError):
        return None


def _output_kind(folder: Path) -> str | None:
    """The kind of output of this project that ``folder`` is (its marker's; ``dataset`` for one prepared before output
    folders carried a marker), or ``None`` (also for one this user may not look into: listing it says so)."""
    if (record := read_marker(folder)) is not None:
        return str(record.get("kind"))
    try:
        return DATASET_KIND if is_prepared_dataset(folder) else None
    except OSError:
        return None


def _listed_output_kind(folder: str, dirnames: list[str], filenames: list[str]) -> str | None:
    """:func:`_output_kind` of a folder just listed: nothing more is read of one that has neither a marker nor a
    prepared dataset's layout."""
    if MARKER in filenames or (META_FILENAME in filenames and {"train", "val"} <= set(dirnames)):
        return _output_kind(Path(folder))
    return None


def _check_no_output(root: Path, where: str) -> None:
    """Refuse an input folder that is, or an input file or folder that lies inside, an output of this project: its
    files are no documents (a prepared dataset, or its ``meta.json``, given for its corpus, most likely)."""
    root = root.absolute()
    for folder in (root, *root.parents):
        if (kind := _output_kind(folder)) is None:
            continue
        what = f"is an output of epas_lightning ({kind})"
        if folder != root:
            what = f"lies inside an output of epas_lightning ({kind}: {folder})"
        fix = "give the documents to prepare"
        if kind == DATASET_KIND:
            fix = f"give the corpus it was prepared from (its {META_FILENAME} lists the inputs)"
        raise DataPreparationError(f"the input {what}, not documents", where, fix)


def _folder_files(root: Path, where: str) -> list[tuple[Path, str, str]]:
    """``(path, key, kind)`` of the files under ``root`` that are read; one warning line for each sort left out
    (files of no known kind, broken links, folders that cannot be listed, folders this project wrote). A ``root``
    that cannot be listed, or that this project wrote, is an error."""
    _check_no_output(root, where)
    found: list[tuple[Path, str, str]] = []
    unknown: list[Path] = []
    broken: list[Path] = []
    unlisted: list[OSError] = []
    outputs: list[tuple[str, str]] = []

    def cannot_list(e: OSError) -> None:
        if e.filename == os.fspath(root):
            reason = f"the folder cannot be listed ({e.strerror or e})"
            raise DataPreparationError(reason, where, "check its permissions")
        unlisted.append(e)

    seen = {os.path.realpath(root)}  # linked folders are followed, each real folder read once (no link loops)
    for dirpath, dirnames, filenames in os.walk(root, onerror=cannot_list, followlinks=True):
        if kind := _listed_output_kind(dirpath, dirnames, filenames):
            outputs.append((dirpath, kind))
            dirnames.clear()
            continue
        kept = []
        for name in sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(".")):
            if (real := os.path.realpath(os.path.join(dirpath, name))) not in seen:
                seen.add(real)
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(n for n in filenames if not n.startswith(".")):
            path = Path(dirpath) / name
            if not path.is_file():
                if path.is_symlink() and not path.exists():
                    broken.append(path)
            elif (kind := file_kind(path, explicit=False)) is None:
                unknown.append(path)
            else:
                found.append((path, path.relative_to(root).as_posix(), kind))
    if unknown:
        _warn_unknown(unknown, where)
    if broken:
        log.warning(f"Left out {_count(broken, 'broken link')} under {where} (e.g. {broken[0]}): check the links")
    if unlisted:
        e = unlisted[0]
        log.warning(
            f"Left out {_count(unlisted, 'folder')} under {where} that cannot be listed (e.g. {e.filename}: "
            f"{e.strerror or e}): check their permissions"
        )
    if outputs:
        folder, kind = outputs[0]
        log.warning(
            f"Left out {_count(outputs, 'folder')} under {where} that epas_lightning wrote (e.g. {folder}, its {kind} "
            "output): what it writes is not documents"
        )
    return found


def _count(items: Sequence, noun: str) -> str:
    return f"{len(items)} {noun}{'s' * (len(items) > 1)}"


def _warn_unknown(paths: list[Path], where: str) -> None:
    """One line for the files of a folder that are not read: how many, their commonest suffixes, an example."""
    suffixes = Counter(p.suffix.lower() or "no suffix" for p in paths).most_common(5)
    counts = ", ".join(f"{suffix}: {n}" for suffix, n in suffixes)
    log.warning(
        f"Left out {_count(paths, 'file')} of no known kind under {where} ({counts}; e.g. {paths[0]}): prepare reads "
        "text and code files, .jsonl[.gz|.zst], .json.gz|.zst, .ndjson and .parquet (a file given as an input is read "
        "as text whatever its suffix)"
    )


def stable_unit_hash(text: str) -> float:
    """A hash of ``text`` in ``[0, 1)`` that is the same in every process (unlike the salted builtin ``hash``); a file
    name's undecodable bytes (kept as surrogates) hash as those bytes."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2**64


def holds_text(document: str) -> bool:
    """Whether a document is one to keep: not empty, nor whitespace alone (which tokenizes to a few tokens of spaces
    between BOS and EOS). Every other one is left out where it is read, as an empty one always was."""
    return bool(document) and not document.isspace()


def document_hash(text: str) -> float:
    """The hash a document is split by: of its text as it is tokenized, so that copies of one text (two records, two
    files, a file and a record) are held out together or not at all."""
    return stable_unit_hash(text)


def _text_file_hash(f: InputFile) -> float | None:
    """:func:`document_hash` of a text file's document as :func:`iter_documents` reads it, ``None`` for one that holds
    no text (empty, a byte order mark alone, whitespace: :func:`holds_text`); a file that is a bad document (too
    large, unreadable, binary, not UTF-8) hashes by its key: it is skipped in its split, as it is read there."""
    texts = [text for _, text in iter_documents(f, "", lambda bad: None)]
    if not texts:
        return stable_unit_hash(f.key)
    return document_hash(texts[0]) if holds_text(texts[0]) else None


HASH_THREADS = 16
"""Threads that read text files for :func:`plan_split`."""
MANY_TEXT_FILES = 10_000
"""From this many text files on, :func:`plan_split` says it reads them (it takes a while on a network file system)."""


ALL_EMPTY = "the input files are all empty or whitespace"
"""What ``prepare`` says of inputs without one document to keep (:func:`holds_text`)."""


def plan_split(files: list[InputFile], val_fraction: float, where: str = "--input") -> list[InputFile]:
    """Hold out each document whose text hashes below ``val_fraction`` (:func:`document_hash`), so that every copy of
    a text lands on one side: text files whole (read here for it), JSONL/parquet records as they are read
    (:func:`split_documents`). Of two or more text files at least one is held out (the one of the lowest hash, with
    its copies) and one is not; never an empty one (no document: an empty ``__init__.py`` left the val split without
    any). Text files alone, none holding text, are :data:`ALL_EMPTY` (``where``: the inputs)."""
    to_hash = [f for f in files if f.kind == "text" and f.n_bytes]
    if len(to_hash) >= MANY_TEXT_FILES:
        log.info("Reading %d text files to hold out by their text (copies together)...", len(to_hash))
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:  # mostly waiting on the file system (a network one)
        hashes = dict(zip((f.path for f in to_hash), pool.map(_text_file_hash, to_hash), strict=True))
    text = [f for f in files if hashes.get(f.path) is not None]
    records = [f for f in files if f.kind != "text"]
    empty = [with_split(f, "train") for f in files if f.kind == "text" and hashes.get(f.path) is None]
    if not text and not records:  # whitespace alone: the val split came out empty ("raise --val-fraction")
        raise DataPreparationError(ALL_EMPTY, where, "give files that hold text")
    distinct = {hashes[f.path] for f in text}
    if len(distinct) == 1 and not records:
        what = "only one document: none can be held out for validation"
        if len(text) > 1:
            what = f"the {len(text)} text files are copies of one document: none can be held out for validation "
            what += "without training on a copy"
        raise DataPreparationError(what, text[0].path, "pass --val-input")
    held = {h for h in distinct if h < val_fraction}
    forced = {min(distinct)} if not held and len(text) >= 2 and len(distinct) > 1 else set()
    held |= forced
    if len(text) >= 2 and held == distinct:
        raise DataPreparationError(
            f"val_fraction={val_fraction} leaves no training files.", "--val-fraction", "hold out a smaller fraction"
        )
    text = [with_split(f, "val" if hashes[f.path] in held else "train") for f in text]
    return text + empty + [replace(f, held=frozenset(forced)) for f in records]


def with_split(f: InputFile, split: str) -> InputFile:
    return replace(f, split=split)


def check_text_field(f: InputFile, text_field: str) -> None:
    """Fail early, naming the file, when the first record has no ``text_field``. A file that cannot be read is a bad
    document, met when its documents are read."""
    if f.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(f.path)
        except Exception:
            return
        if text_field not in schema.names:
            raise DataPreparationError(
                f"no column {text_field!r} (columns: {schema.names})", f.path, "name the text column with --text-field"
            )
        if not _holds_text(column_type := schema.field(text_field).type):  # else every row is skipped, one by one
            raise DataPreparationError(
                f"column {text_field!r} holds {column_type}, not text", f.path, "name the text column with --text-field"
            )
    elif f.kind == "jsonl":
        with contextlib.suppress(StopIteration, BadDocument):
            lineno, record = next(_jsonl_records(f))
            if isinstance(record, BadDocument) and record.reason == _CR_BAD:  # else the file is one bad record
                raise DataPreparationError(_CR_LINES, f.path, _CR_FIX)
            if not isinstance(record, BadDocument):
                value = record.get(text_field) if isinstance(record, dict) else None
                if value is not None and not isinstance(value, str):  # else every record is skipped, one by one
                    fix = "name the text field with --text-field"
                    raise DataPreparationError(_not_text(text_field, value), f"{f.path}:{lineno}", fix)
                _record_text(record, text_field, f.path, lineno)


def _holds_text(column_type: object) -> bool:
    """Whether a parquet column of this arrow type holds strings (or nulls only)."""
    import pyarrow as pa

    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    return pa.types.is_null(column_type) or str(column_type) in ("string", "large_string", "string_view")


class BadDocument(Exception):
    """An unreadable file or record; skipped with a warning or fatal, depending on ``on_bad``."""

    def __init__(self, where: str, reason: str, key: str | None = None) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason
        self.key = key
        """A bad record's document key (it belongs to that key's split); ``None`` for a whole file."""


def _open_binary(f: InputFile) -> io.BufferedIOBase:
    if compression(f.path) == "zst":
        try:
            import zstandard  # noqa: F401
        except ImportError as e:
            raise DataPreparationError(
                "reading .zst needs zstandard", f.path, "pip install 'epas_lightning[zstd]'"
            ) from e
    return open_binary(f.path, f.start, f.stop)


def _jsonl_records(f: InputFile) -> Iterator[tuple[int, object]]:
    """``(line number, record)`` for each non-blank line; a line that is not JSON gives a :class:`BadDocument` as its
    record, and the lines after it are still read. A file that cannot be read raises one: named by the file if nothing
    was read, else by the line it breaks off at (a download cut short), the lines before it kept."""
    lineno = f.first_record - 1
    try:
        with _open_binary(f) as stream:
            for lineno, line in enumerate(_lines(stream, MAX_DOCUMENT_BYTES), start=f.first_record):
                if isinstance(line, str):  # not held: read past
                    yield lineno, BadDocument(f"{f.path}:{lineno}", line)
                    continue
                if lineno == 1:  # a BOM is no text (a file that starts with it, then a blank line, too)
                    line = line.removeprefix(codecs.BOM_UTF8)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    reason = _CR_BAD if _records_end_with_cr(line) else f"not a UTF-8 JSON line ({e})"
                    record = BadDocument(f"{f.path}:{lineno}", reason)
                except (ValueError, RecursionError) as e:  # past Python's limits: an int of 5000 digits, deep nesting
                    record = BadDocument(f"{f.path}:{lineno}", f"a JSON line Python's json cannot read ({e})")
                yield lineno, record
    except (OSError, EOFError, ValueError, *_decompression_errors()) as e:
        if isinstance(e, DataPreparationError | BadDocument):
            raise
        if lineno == 0:
            raise BadDocument(f.path, f"unreadable ({type(e).__name__}: {e})") from e
        reason = f"unreadable from this line on ({type(e).__name__}: {e}): the lines before it were kept, the rest lost"
        raise BadDocument(f"{f.path}:{lineno + 1}", reason) from e


def _decompression_errors() -> tuple[type[Exception], ...]:
    """What a corrupt compressed file raises beyond ``OSError``/``ValueError``: zstandard's error, once it is loaded."""
    zstandard = sys.modules.get("zstandard")
    return (zstandard.ZstdError,) if zstandard is not None else ()


def _lines(stream: io.BufferedIOBase, limit: int) -> Iterator[bytes | str]:
    """The lines of ``stream``; for a line longer than ``limit`` bytes, which is read past, never held, why it is a
    bad document (a ``str``)."""
    while line := stream.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := stream.readline(limit)) and not rest.endswith(b"\n"):
                pass
            yield _CR_BAD if _records_end_with_cr(line) else _too_large(f"a line over {limit:,} bytes")
        else:
            yield line


_CR_LINES = "JSON Lines with CR line endings (old Mac), no LF: its records run together into one line"
_CR_FIX = "convert them to LF (tr '\\r' '\\n' < FILE > NEW.jsonl)"
_CR_BAD = f"{_CR_LINES}; {_CR_FIX}"
_CR_NOT_CRLF = re.compile(rb"\r(?=[^\n])")


def _records_end_with_cr(line: bytes) -> bool:
    """Whether a line that is no JSON (or too long to be held) starts with a JSON value ended by a CR without an LF:
    records of a file with CR-only line endings, which a binary read does not split."""
    line = line.lstrip(b" \t\r\n")
    if (cr := _CR_NOT_CRLF.search(line)) is None:
        return False
    try:
        json.loads(line[: cr.start()])  # bytes: a BOM is read past
    except (ValueError, RecursionError):
        return False
    return True


def _too_large(what: str) -> str:
    return (
        f"{what}, larger than the {MAX_DOCUMENT_BYTES // 2**20} MiB a document may be (tokenizing it would take many "
        "times that in memory): split it into documents of their own (files, or JSONL lines)"
    )


def _record_text(record: object, text_field: str, path: str, lineno: int) -> str:
    """The record's text; a record without the field stops the run (the wrong --text-field), one whose value is not
    text (null, a number, a lone surrogate) is a bad record."""
    if not isinstance(record, dict) or text_field not in record:
        fields = list(record) if isinstance(record, dict) else type(record).__name__
        raise DataPreparationError(
            f"no field {text_field!r} (found {fields})", f"{path}:{lineno}", "name it with --text-field"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise BadDocument(f"{path}:{lineno}", _not_text(text_field, text))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a JSON "\ud83d" escape: tokenizers and UTF-8 writers cannot take it
        reason = f"{text_field!r} holds a lone surrogate ({text[e.start]!r} at character {e.start}), not Unicode text"
        raise BadDocument(f"{path}:{lineno}", reason) from e
    return text


def _not_text(text_field: str, value: object) -> str:
    return f"{text_field!r} is {'null' if value is None else type(value).__name__}, not text"


def iter_documents(f: InputFile, text_field: str, on_bad: Callable[[BadDocument], None]) -> Iterator[tuple[str, str]]:
    """``(key, text)`` for each document of ``f``. Bad records go to ``on_bad``, which may raise."""
    if f.kind == "text":
        try:
            if (size := os.path.getsize(f.path)) > MAX_DOCUMENT_BYTES:
                on_bad(BadDocument(f.path, _too_large(f"{size:,} bytes")))
                return
            data = Path(f.path).read_bytes()
            if b"\0" in data[:BINARY_SNIFF_BYTES]:
                utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))  # Windows' "Unicode"
                reason = "UTF-16 text, not UTF-8: convert it (iconv -f UTF-16 -t UTF-8)"
                on_bad(BadDocument(f.path, reason if utf16 else "looks binary (NUL bytes), not text"))
                return
            yield f.key, data.decode("utf-8-sig")  # a leading BOM is no text
        except UnicodeDecodeError as e:
            on_bad(BadDocument(f.path, f"not valid UTF-8 ({e})"))
        except OSError as e:
            on_bad(BadDocument(f.path, f"unreadable ({e.strerror or e})"))
    elif f.kind == "jsonl":
        try:
            for lineno, record in _jsonl_records(f):
                key = f"{f.key}#{lineno}"
                try:
                    if isinstance(record, BadDocument):
                        raise record
                    text = _record_text(record, text_field, f.path, lineno)
                except BadDocument as bad:
                    bad.key = key
                    on_bad(bad)
                    continue
                yield key, text
        except BadDocument as bad:  # the file cannot be read (or read on: a truncated archive, an I/O error)
            on_bad(bad)
    else:
        import pyarrow.parquet as pq

        start = f.first_record
        try:
            parquet = pq.ParquetFile(f.path)
            groups = None if f.start == 0 and f.stop is None else range(f.start, f.stop or parquet.num_row_groups)
            for batch in parquet.iter_batches(columns=[text_field], batch_size=1024, row_groups=groups):
                for index, text in enumerate(batch.column(0).to_pylist(), start=start):
                    key = f"{f.key}#{index}"
                    if not isinstance(text, str):
                        on_bad(BadDocument(f"{f.path} row {index}", _not_text(text_field, text), key))
                    elif len(text) > MAX_DOCUMENT_BYTES // 4 and (size := len(text.encode())) > MAX_DOCUMENT_BYTES:
                        on_bad(BadDocument(f"{f.path} row {index}", _too_large(f"{size:,} bytes"), key))
                    else:
                        yield key, text
                start += batch.num_rows
        except DataPreparationError:
            raise
        except Exception as e:
            if start == 1:
                on_bad(BadDocument(f.path, f"unreadable parquet ({type(e).__name__}: {e})"))
            else:  # the rows before were kept
                reason = f"unreadable parquet from this row on ({type(e).__name__}: {e}): the rows before it were kept"
                on_bad(BadDocument(f"{f.path} row {start}", reason))


def split_documents(
    files: Sequence[InputFile],
    split: str,
    val_fraction: float,
    text_field: str,
    on_bad: Callable,
    on_held: Callable[[], None] = lambda: None,
) -> Iterator[str]:
    """The texts of ``split`` (``train`` or ``val``) among ``files``, in order; empty documents (and whitespace-only
    ones: :func:`holds_text`) are dropped.

    A document of a ``hash`` file is in the split its text hashes to (:func:`document_hash`; every record is decoded,
    its text hashed once); a bad record, which has no text, in the one its key hashes to. ``on_bad`` hears of the bad
    records of ``split`` only (each bad record once over the two splits), and of a file of records that cannot be
    read in ``train``. A document of a ``train`` file that is a copy of a validation document (its ``held``) is left
    out, and ``on_held`` called.
    """
    val = split == "val"

    def on_bad_of_split(bad: BadDocument) -> None:
        if (stable_unit_hash(bad.key) < val_fraction if bad.key is not None else False) == val:
            on_bad(bad)

    for f in files:
        if f.split not in (split, "hash"):
            continue
        if f.split != "hash":
            for _, text in iter_documents(f, text_field, on_bad):
                if holds_text(text) and f.held and document_hash(text) in f.held:
                    on_held()
                elif holds_text(text):
                    yield text
            continue
        for _, text in iter_documents(f, text_field, on_bad_of_split):
            if holds_text(text) and ((h := document_hash(text)) < val_fraction or h in f.held) == val:
                yield text
