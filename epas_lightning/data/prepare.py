"""``prepare``: tokenize any corpus into the layout :class:`~epas_lightning.data.TokenDataModule` reads.

The layout is described in :mod:`epas_lightning.data.layout`; where documents come from in
:mod:`epas_lightning.data.sources`; how they become token streams in :mod:`epas_lightning.data.writing`. This module
assembles a dataset: the tokenizer (copied, or trained on the train split), both splits, ``meta.json`` last, all in a
folder built beside the output and renamed into place (:mod:`epas_lightning.outputs`), so an interrupted run never
leaves a dataset that looks complete and ``--overwrite`` never replaces a folder this command did not write. The
built-in standard-library corpus goes through the same code.

    python -m epas_lightning prepare --input corpus/ --output data/my --tokenizer path/to/tokenizer.model
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from epas_lightning.data.layout import (
    DATASET_KIND,
    FORMAT_VERSION,
    is_prepared_dataset,
    load_meta,
    write_meta,
)
from epas_lightning.data.parts import cut_into_parts
from epas_lightning.data.sources import (
    ALL_EMPTY,
    BadDocument,
    DataPreparationError,
    InputFile,
    check_text_field,
    check_unchanged,
    discover_files,
    document_hash,
    file_identity,
    no_input_given,
    plan_split,
    split_documents,
    with_split,
)
from epas_lightning.data.tokenizer import (
    HF_FILENAME,
    MIN_BPE_VOCAB,
    TRAINED_SPECIAL_TOKENS,
    check_tokenizer_flag,
    copy_tokenizer,
    load_tokenizer,
    resolve_tokenizer_path,
    tokenizer_sha256,
    train_byte_level_bpe,
)
from epas_lightning.data.writing import TOKEN_DTYPE, default_num_workers, part_bytes, write_split
from epas_lightning.errors import ConfigError
from epas_lightning.outputs import output_folder, writing_into

log = logging.getLogger(__name__)

ON_BAD_CHOICES = ("skip", "fail")


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
            raise ConfigError(
                "give a tokenizer file or a vocabulary size to train one, not both",
                "--tokenizer / --train-tokenizer",
                "pass --tokenizer FILE, or --train-tokenizer --vocab-size N",
            )


@dataclass
class BuildOptions:
    val_fraction: float = 0.01
    text_field: str = "text"
    on_bad: str = "skip"
    num_workers: int = field(default_factory=default_num_workers)
    progress: bool = False
    val_inputs: Sequence[str | Path] = ()
    """The ``--val-input`` paths, if given: an empty val split names them."""


def _raise_bad(bad: BadDocument) -> None:
    raise DataPreparationError(bad.reason, bad.where, "pass --on-bad skip to skip it")


def check_val_fraction(val_fraction: float, val_input: bool = False) -> None:
    """A share of the documents to hold out: some always are (a dataset has a ``val/`` split, which fit validates
    on), so 0 only goes with ``--val-input``, whose files are held out instead of a share."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(
            f"val_fraction must be in (0, 1), got {val_fraction}",
            "--val-fraction",
            "give the share of documents held out for validation, e.g. 0.01",
        )
    if val_fraction == 0 and not val_input:
        raise ConfigError(
            "--val-fraction 0 holds out no documents, but a dataset needs a val split (fit validates on it)",
            "--val-fraction",
            "give a share above 0, e.g. 0.01, or pass the validation files with --val-input",
        )


@contextlib.contextmanager
def changes_named(files: list[InputFile]) -> Iterator[None]:
    """A bad record that stops the build (``--on-bad fail``) is said to be an input file's change where one changed
    (cut short mid-line, replaced): the record is not what is wrong."""
    try:
        yield
    except DataPreparationError:
        check_unchanged(files)
        raise


def build_dataset(build_dir: Path, files: list[InputFile], tokenizer: TokenizerChoice, options: BuildOptions) -> dict:
    """Write ``train/``, ``val/`` and the tokenizer into ``build_dir``; return the metadata (the caller writes it last).

    ``files`` carry their split (``train``/``val``/``hash``, see :func:`plan_split`).
    """
    if options.on_bad not in ON_BAD_CHOICES:
        raise ConfigError(
            f"on_bad must be one of {ON_BAD_CHOICES}, got {options.on_bad!r}",
            "--on-bad",
            f"use {' or '.join(ON_BAD_CHOICES)}",
        )
    check_val_fraction(options.val_fraction, bool(options.val_inputs))
    timer = StepTimer()
    for f in files:
        check_text_field(f, options.text_field)
    whole = len(files)
    files = cut_into_parts(files, part_bytes(files, options.num_workers))  # one large file: read by every worker
    if options.progress and len(files) > whole:
        cut = {f.path for f in files if f.start or f.stop is not None}
        n_parts = len(files) - whole + len(cut)
        log.info(f"Cut {len(cut)} large file{'s' * (len(cut) > 1)} into {n_parts} parts for the workers to share.")
    if tokenizer.path is not None:
        loaded = load_tokenizer(tokenizer.path, tokenizer.bos_token, tokenizer.eos_token)
        tokenizer_path = build_dir / copy_tokenizer(loaded, build_dir)
        source = str(loaded.path)
    else:
        skipped: list = []
        on_bad = _raise_bad if options.on_bad == "fail" else skipped.append
        texts = split_documents(files, "train", options.val_fraction, options.text_field, on_bad)
        if options.progress:
            log.info("Training a %d-token byte-level BPE on the train split ...", tokenizer.train_vocab_size)
        show = options.progress and sys.stderr.isatty()
        with changes_named(files):
            trained = train_byte_level_bpe(texts, tokenizer.train_vocab_size, show_progress=show)
        tokenizer_path = build_dir / HF_FILENAME
        trained.save(str(tokenizer_path))
        loaded = load_tokenizer(tokenizer_path, tokenizer.bos_token, tokenizer.eos_token)  # the ids documents get
        source = "trained"
        timer.lap("train_tokenizer")
        if options.progress:
            log.info("Trained the tokenizer in %.1f s.", timer.laps["train_tokenizer"])

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
        with changes_named(files):
            splits[split] = stats = write_split(files, split, build_dir / split, **common)
        check_unchanged(files)  # before what it lost is called skipped, or an empty split
        if copies := stats["copies_of_val"]:
            log.warning(
                "Left out %d training document%s that %s copies of validation documents: not trained on.",
                copies,
                "" if copies == 1 else "s",
                "is" if copies == 1 else "are",
            )
        for where, reason in stats["skipped"][:20]:  # before an empty split fails: they may be why
            log.warning("Skipped %s: %s", where, reason)
        if len(stats["skipped"]) > 20:
            log.warning("... and %d more skipped in the %s split.", len(stats["skipped"]) - 20, split)
        given = split == "val" and options.val_inputs
        where = "--val-input " + " ".join(map(str, options.val_inputs)) if given else "--input"
        if stats["documents"] == 0 and stats["copies_of_val"] and not stats["skipped"]:
            raise DataPreparationError(
                f"the {split} split has no documents: every one it held is a copy of a validation document",
                where,
                "give --val-input files apart from the --input ones",
            )
        if stats["documents"] == 0 and stats["skipped"]:
            raise DataPreparationError(
                f"the {split} split has no documents: every one it held was skipped (said above)",
                where,
                "fix or leave out the skipped files",
            )
        if stats["documents"] == 0:
            hint = "raise --val-fraction or pass --val-input" if split == "val" else "check the inputs"
            hint = "give validation files that hold text" if given else hint
            raise DataPreparationError(f"the {split} split has no documents", where, hint)
        timer.lap(f"tokenize_{split}")
    seconds = timer.total()
    n_tokens = sum(s["tokens"] for s in splits.values())
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_path.name,
        "tokenizer_kind": loaded.kind,
        "tokenizer_source": source,
        "tokenizer_sha256": tokenizer_sha256(tokenizer_path),
        "vocab_size": loaded.vocab_size,
        "bos_id": loaded.bos_id,
        "eos_id": loaded.eos_id,
        "bos_token_override": tokenizer.bos_token,
        "eos_token_override": tokenizer.eos_token,
        "token_dtype": np.dtype(TOKEN_DTYPE).name,
        "val_fraction": options.val_fraction,
        "val_split": "val-input" if options.val_inputs else "text-hash",
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
        input: Files or directories: text/code files, ``.jsonl[.gz|.zst]``, ``.json.gz|.zst``, ``.ndjson``,
            ``.parquet``.
        output: The dataset directory to create; it may not contain or lie inside an input.
        tokenizer: A local ``tokenizer.json``, sentencepiece ``tokenizer.model``, or a directory holding one.
        train_tokenizer: Train a byte-level BPE of ``vocab_size`` tokens on the train split instead.
        vocab_size: Vocabulary size of the trained tokenizer.
        val_input: Separate validation inputs (their files are held out from ``input`` too). Otherwise
            ``val_fraction`` of the documents are held out by the hash of their text (whole files for text inputs,
            records for JSONL/parquet), so that every copy of a text is on one side.
        val_fraction: Fraction of the documents held out for validation when there is no ``val_input``, above 0
            (a dataset has a ``val/`` split).
        text_field: The JSONL field / parquet column holding the text.
        bos_token, eos_token: The tokens documents start and end with (default: the tokenizer's own).
        on_bad: ``skip`` (warn) or ``fail`` on an unreadable, binary or non-UTF-8 file or record.
        num_workers: Tokenizer processes (default: the CPU cores available); they share a large JSONL or parquet
            file, cut into parts. The chunks, and so the sequences a fit reads, depend on it (see ``prepare --help``).
        overwrite: Replace ``output`` if it is a dataset prepared by this command (never anything else).
        progress: Log each step and show progress bars.
    """
    inputs = [input] if isinstance(input, str | Path) else list(input)
    val_inputs = [] if val_input is None else [val_input] if isinstance(val_input, str | Path) else list(val_input)
    output = Path(output).expanduser().absolute()
    if not inputs:
        raise no_input_given("--input")
    if train_tokenizer != (tokenizer is None):
        raise ConfigError(
            "pass either a tokenizer file or --train-tokenizer with --vocab-size",
            "--tokenizer",
            "pass --tokenizer FILE, or --train-tokenizer --vocab-size N (not both)",
        )
    if train_tokenizer and vocab_size is None:
        raise ConfigError(
            "--train-tokenizer needs the size of the vocabulary to train",
            "--vocab-size",
            f"add --vocab-size N, at least {MIN_BPE_VOCAB} (e.g. 32000)",
        )
    if train_tokenizer and vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(
            f"a byte-level BPE needs at least {MIN_BPE_VOCAB} tokens (256 bytes, BOS, EOS), not {vocab_size}",
            "--vocab-size",
            f"give --vocab-size {MIN_BPE_VOCAB} or more",
        )
    if train_tokenizer and vocab_size > (most := int(np.iinfo(TOKEN_DTYPE).max) + 1):  # was an OverflowError
        raise ConfigError(
            f"the token streams hold ids as {np.dtype(TOKEN_DTYPE).name}: at most {most} tokens, not {vocab_size}",
            "--vocab-size",
            "give a smaller --vocab-size (e.g. 32000)",
        )
    if not train_tokenizer and vocab_size is not None:
        raise ConfigError(
            "--vocab-size sizes a tokenizer to train; the --tokenizer given has its own",
            "--vocab-size",
            "drop it, or train one with --train-tokenizer instead of --tokenizer",
        )
    check_tokenizer_flag(None if tokenizer is None else Path(tokenizer))
    from epas_lightning.runtime import check_counts  # torch: not for prepare --help

    check_counts({"--num-workers": num_workers})
    check_val_fraction(val_fraction, bool(val_inputs))
    for flag, token in (("--bos-token", bos_token), ("--eos-token", eos_token)):
        if token == "":  # was taken as not given, and recorded as the override
            raise ConfigError("an empty token names none of the tokenizer's", flag, "name a token, or leave it out")
        if train_tokenizer and token not in (None, *TRAINED_SPECIAL_TOKENS):  # found missing after the training
            raise ConfigError(
                f"a trained tokenizer's special tokens are {' and '.join(TRAINED_SPECIAL_TOKENS)}, not {token!r}",
                flag,
                "leave it out, or name one of those",
            )
    everything = [*inputs, *val_inputs]
    ours = is_prepared_dataset  # also one prepared before output folders carried a marker
    with output_folder(output, DATASET_KIND, overwrite, everything, unmarked_ours=ours) as build:
        files = leave_out_tokenizer(discover_files(inputs), tokenizer)
        if not files:
            raise DataPreparationError(
                "no input files found",
                "--input " + " ".join(map(str, inputs)),
                "give text, JSONL or parquet files, or folders holding some (hidden ones are skipped)",
            )
        if val_inputs:
            val_files = leave_out_tokenizer(discover_files(val_inputs, split="val"), tokenizer)
            if not val_files:
                raise DataPreparationError(
                    "no validation files found",
                    "--val-input " + " ".join(map(str, val_inputs)),
                    "give text, JSONL or parquet files, or folders holding some (hidden ones are skipped)",
                )
            held_out = {file_identity(f.path) for f in val_files}  # a link to one too: validated on, not trained on
            train_files = [with_split(f, "train") for f in files if file_identity(f.path) not in held_out]
            if not train_files:
                raise DataPreparationError(
                    "every input file is a validation file too: none is left to train on",
                    "--val-input " + " ".join(map(str, val_inputs)),
                    "pass validation files apart from the --input ones",
                )
            if held_out := len(files) - len(train_files):
                log.warning(
                    "%d of the --input files %s --val-input files too: %s held out, not trained on.",
                    held_out,
                    "is" if held_out == 1 else "are",
                    "it is" if held_out == 1 else "they are",
                )
            files = with_held_documents(train_files, val_files, text_field) + val_files
        else:
            files = plan_split(files, val_fraction, "--input " + " ".join(map(str, inputs)))
        if sum(f.n_bytes for f in files) == 0:
            raise DataPreparationError(ALL_EMPTY, "--input " + " ".join(map(str, inputs)), "give files that hold text")
        choice = TokenizerChoice(
            path=None if tokenizer is None else str(tokenizer),
            train_vocab_size=vocab_size if train_tokenizer else None,
            bos_token=bos_token,
            eos_token=eos_token,
        )
        options = BuildOptions(
            val_fraction, text_field, on_bad, num_workers or default_num_workers(), progress, val_inputs=val_inputs
        )
        meta = build_dataset(build, files, choice, options)
        meta["inputs"] = [str(p) for p in inputs]
        meta["val_inputs"] = [str(p) for p in val_inputs] or None
        with writing_into(build):
            write_meta(build, meta)
    return output


def with_held_documents(train_files: list[InputFile], val_files: list[InputFile], text_field: str) -> list[InputFile]:
    """``train_files`` holding the hashes of the documents of ``val_files`` (read here for them): a copy of one in a
    training file (a shard copied as the validation file, a record found in both) is left out of training, as the
    hash split holds copies of a text out together."""
    texts = split_documents(val_files, "val", 0.0, text_field, lambda bad: None)  # bad ones: said when written
    held = frozenset(map(document_hash, texts))
    return [replace(f, held=held) for f in train_files]


def leave_out_tokenizer(files: list[InputFile], tokenizer: str | Path | None) -> list[InputFile]:
    """``files`` without the ``--tokenizer`` file, which an input folder may hold (a model's ``tokenizer.json`` beside
    its texts): it is the vocabulary, not a document of the corpus."""
    if tokenizer is None:
        return files
    path = resolve_tokenizer_path(tokenizer)
    kept = [f for f in files if file_identity(f.path) != file_identity(path)]
    if len(kept) < len(files):
        log.warning("Left out %s, the --tokenizer file, found among the inputs: it is not a document.", path)
    return kept


def summary_line(output: Path, meta: dict) -> str:
    """The line ``prepare`` ends with; it counts the bad files and records skipped, whose warnings may have scrolled
    away above a long run's progress."""
    s = meta["splits"]
    n_skipped = sum(meta.get("skipped", {}).values())
    things = "file or record" if n_skipped == 1 else "files or records"
    skipped = f", {n_skipped:,} bad {things} skipped (see the warnings)" if n_skipped else ""
    if copies := s["train"].get("copies_of_val"):
        skipped += f", {copies:,} copies of validation documents left out of training"
    return (
        f"Prepared {output}: {meta['documents']:,} documents ({s['train']['documents']:,} train / "
        f"{s['val']['documents']:,} val){skipped}, {meta['tokens']:,} tokens, {meta['bytes'] / 1e6:,.1f} MB of text in "
        f"{meta['seconds']:.1f} s ({meta['tokens_per_second']:,} tokens/s); tokenizer {meta['tokenizer']} "
        f"({meta['tokenizer_kind']}, vocab {meta['vocab_size']})."
    )


def prepare_command(
    input: list[Path],
    output: Path,
    tokenizer: Path | None = None,
    train_tokenizer: bool = False,
    vocab_size: int | None = None,
    val_input: list[Path] | None = None,
    val_fraction: float = 0.01,
    text_field: str = "text",
    bos_token: str | None = None,
    eos_token: str | None = None,
    on_bad: Literal["skip", "fail"] = "skip",
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    json: bool = False,
) -> None:
    """Tokenize a corpus (text/code files, JSONL, parquet) into the token streams that fit trains on.

    Writes train/ and val/ litdata token streams (BOS + tokens + EOS per document), the tokenizer and meta.json into
    --output, built beside it and renamed into place when complete.

    Args:
        input: Files or folders: text/markdown/code files (one document each), .jsonl[.gz|.zst], .json.gz|.zst,
            .ndjson and .parquet (one document per record). Repeat the flag for several.
        output: The dataset folder to create; it may not contain or lie inside an input.
        tokenizer: A local tokenizer.json, sentencepiece tokenizer.model, or a folder holding one.
        train_tokenizer: Train a byte-level BPE on the train split instead (with --vocab-size).
        vocab_size: Vocabulary size of the trained tokenizer.
        val_input: Separate validation inputs (default: hold out --val-fraction of the documents by the hash of
            their text, so that copies of a document are all held out or none); their files are held out from
            --input too.
        val_fraction: Fraction of the documents held out for validation, above 0 (text files are held out whole,
            and at least one of them); not used with --val-input.
        text_field: The JSONL field / parquet column with the text.
        bos_token: BOS token to wrap documents in (default: the tokenizer's own, e.g. <s>).
        eos_token: EOS token to end documents with (default: the tokenizer's own, e.g. </s>).
        on_bad: An unreadable, binary or non-UTF-8 file or record is skipped with a warning, or stops the run.
        num_workers: Tokenizer processes (default: the CPU cores available); they share a large JSONL or parquet
            file, cut into parts. Each writes its own chunks, and a training sequence never spans two: another count
            stores the same tokens in the same order, cut into other sequences, so fit reads other batches (and
            validates on slightly other sequences). Give the same count to prepare a dataset again exactly.
        overwrite: Replace --output if it is a dataset this command prepared (never anything else).
        progress: Show a progress bar.
        json: End with one JSON line of what was written (the output folder and its meta.json).
    """
    out = prepare_dataset(
        input,
        output,
        tokenizer,
        train_tokenizer=train_tokenizer,
        vocab_size=vocab_size,
        val_input=val_input,
        val_fraction=val_fraction,
        text_field=text_field,
        bos_token=bos_token,
        eos_token=eos_token,
        on_bad=on_bad,
        num_workers=num_workers,
        overwrite=overwrite,
        progress=progress,
    )
    from epas_lightning.runtime import emit_json  # torch: not for prepare --help

    meta = load_meta(out)
    print(summary_line(out, meta))
    emit_json({"output": str(out), **meta}, json)
