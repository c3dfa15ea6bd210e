"""Tokenizers for data preparation and checking: a local HF ``tokenizer.json``, a sentencepiece ``tokenizer.model``
(LLaMA, TinyLlama), or a byte-level BPE trained on the corpus. One small interface for all of them."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epas_lightning.data.added_tokens import (
    AddedToken,
    FolderTokens,
    folder_tokens,
    split_encoder,
    with_added_tokens,
    without_texts,
)
from epas_lightning.data.stop_tokens import stop_ids_beside
from epas_lightning.errors import DataError, os_reason

log = logging.getLogger(__name__)

HF_FILENAME = "tokenizer.json"
SENTENCEPIECE_FILENAME = "tokenizer.model"
TRAINED_BOS_TOKEN = "<|bos|>"
TRAINED_EOS_TOKEN = "<|eos|>"
TRAINED_SPECIAL_TOKENS = (TRAINED_BOS_TOKEN, TRAINED_EOS_TOKEN)
"""The special tokens of the byte-level BPE ``prepare --train-tokenizer`` trains."""
MIN_BPE_VOCAB = 256 + 2
"""The smallest byte-level BPE we train: the 256 byte tokens, BOS and EOS."""
# Tried in order when the BOS/EOS token is not named: ours, LLaMA/TinyLlama, LLaMA-3, GPT-2 style (one token for both).
BOS_CANDIDATES = (TRAINED_BOS_TOKEN, "<s>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
EOS_CANDIDATES = (TRAINED_EOS_TOKEN, "</s>", "<|end_of_text|>", "<|endoftext|>", "<|eot_id|>")
SPACE = "\u2581"
"""Sentencepiece's whitespace symbol."""


class TokenizerError(DataError):
    """A tokenizer file that cannot be used (missing, unknown format, no BOS/EOS token)."""


Drop = tuple[str, str, int]
"""A tokenizer fitted to a model with special added tokens dropped: its resolved path (a relative one, an absolute one
and a symlink to the file are one key), :attr:`TextTokenizer.sha256` and the model's rows."""
_DROPS_WARNED: set[Drop] = set()
"""The drops this process warned of: once each, however often it fits the tokenizer (serve fits it at startup, in its
HTTP process and in its worker)."""


def drops_warned() -> frozenset[Drop]:
    """The drops this process warned of, for a process it spawns (:func:`warned_before`)."""
    return frozenset(_DROPS_WARNED)


def warned_before(drops: frozenset[Drop]) -> None:
    """Take ``drops`` (:func:`drops_warned` of the process that started this one) as warned of in this process."""
    _DROPS_WARNED.update(drops)


class TextTokenizer:
    """Encode/decode without special tokens, plus the BOS/EOS ids that preparation wraps each document in.

    A special token's text in a text (``</s>``, ``<|endoftext|>``) is text, never its control id, for every kind (as
    sentencepiece reads it): a document quoting one is not cut there, and a prompt gives the ids training saw.

    Attributes:
        kind: ``"hf"`` (a ``tokenizer.json``) or ``"sentencepiece"`` (a ``tokenizer.model``).
        path: The tokenizer file.
        vocab_size: One more than the largest id it can emit: the model's vocabulary must be at least this large.
        backend: The underlying ``tokenizers.Tokenizer`` or ``sentencepiece.SentencePieceProcessor``.
        stop_ids: The ids generation stops at: ``eos_id`` first, then the model's other end tokens named beside the
            tokenizer file (``stop_tokens``: Llama 3 Instruct's ``<|eot_id|>``; the ``eos_token`` its
            ``tokenizer_config.json`` names).
        added: A sentencepiece model's added tokens named beside it (``added_tokens``), by id: a
            non-special one's text is its id, a special one's text is text (as the other special tokens'); each
            decodes to its text, a special one to nothing (as ``tokenizer.json``'s added tokens).
        named: The special tokens named beside the tokenizer file (``added_tokens.FolderTokens.named``).
        sha256: The file's hash as loaded, with its ``added`` tokens (:func:`tokenizer_sha256`; a checkpoint records
            it: the file may be replaced or removed later).
    """

    def __init__(
        self,
        kind: str,
        path: Path,
        backend: Any,
        bos_id: int,
        eos_id: int,
        vocab_size: int,
        tokens: FolderTokens | None = None,
    ) -> None:
        self.kind, self.path, self.backend = kind, path, backend
        self.bos_id, self.eos_id, self.vocab_size = bos_id, eos_id, vocab_size
        tokens = tokens or FolderTokens()
        self.added = tokens.added if kind == "sentencepiece" else {}
        self.named = tokens.named
        named_eos = tokens.named.get("eos_token")
        beside = [*stop_ids_beside(path), self.token_id(named_eos) if isinstance(named_eos, str) else None]
        beside = [i for i in dict.fromkeys(beside) if i is not None and 0 <= i < vocab_size and i != eos_id]
        self.stop_ids: tuple[int, ...] = (eos_id, *beside)
        self.sha256 = with_added_tokens(file_sha256(path), self.added)
        plain = {token.text: token_id for token_id, token in self.added.items() if not token.special}
        strips = {token.text: token for token in self.added.values()}
        encode = lambda text: backend.encode(text, out_type=int)  # noqa: E731
        self._encode_added = split_encoder(plain, encode, strips) if plain else None

    def token_id(self, token: str) -> int | None:
        """The id of the token ``token`` (its text as the vocabulary writes it), or ``None`` if it has none."""
        if self.kind == "hf":
            return self.backend.token_to_id(token)
        return sentencepiece_token_id(self.backend, self.added, token)

    def id_to_token(self, token_id: int) -> str:
        """The text of the token ``token_id`` as the vocabulary writes it (``<s>``, ``<|im_end|>``); ``""`` for none."""
        if self.kind == "hf":
            return self.backend.id_to_token(token_id) or ""
        if token_id in self.added:
            return self.added[token_id].text
        return self.backend.id_to_piece(token_id) if 0 <= token_id < self.backend.get_piece_size() else ""

    def encode_batch(self, texts: Sequence[str], threads: bool = True) -> list[list[int]]:
        """The ids of each text, without BOS or EOS. ``threads=False``: in this thread only, as a forked preparation
        worker must (sentencepiece starts threads for a batch; HF ``tokenizers`` is told by ``TOKENIZERS_PARALLELISM``).
        """
        if self.kind == "hf":
            return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]
        if self._encode_added is not None:
            return [self._encode_added(text) for text in texts]
        if not threads:
            return [self.backend.encode(text, out_type=int) for text in texts]
        return self.backend.encode(list(texts), out_type=int)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text], threads=False)[0]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; an id past the tokenizer (a model's vocabulary may be larger) decodes to nothing, as
        in HF ``tokenizers`` (sentencepiece raised ``IndexError``)."""
        if self.kind == "sentencepiece" and self.added:
            return self._decode_with_added(ids)
        if self.kind == "sentencepiece":
            ids = [i for i in ids if 0 <= i < self.vocab_size]
        return self.backend.decode(list(ids))

    def _decode_with_added(self, ids: Sequence[int]) -> str:
        """Sentencepiece's text of each run of its pieces, and each added token's text (none for a special one); a
        run after other text keeps the leading spaces of its first pieces (sentencepiece drops them at a text's start;
        control pieces such as ``</s>`` decode to nothing), as a ``tokenizer.json`` decodes it."""
        sp, pieces, texts, run = self.backend, self.backend.get_piece_size(), [], []

        def end_run() -> None:
            if run:
                text = sp.decode(run)
                if "".join(texts):
                    shown = "".join(sp.id_to_piece(i) for i in run if not sp.is_control(i))
                    dropped = len(shown) - len(shown.lstrip(SPACE)) - (len(text) - len(text.lstrip(" ")))
                    text = " " * dropped + text
                texts.append(text)
                run.clear()

        for i in ids:
            if 0 <= i < pieces:
                run.append(i)
            elif i in self.added:
                end_run()
                texts.append("" if self.added[i].special else self.added[i].text)
        end_run()
        return "".join(texts)

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def added_tokens(self) -> dict[int, AddedToken]:
        """The added tokens by id: a ``tokenizer.json``'s own, or a sentencepiece model's from its folder."""
        if self.kind == "sentencepiece":
            return self.added
        added = self.backend.get_added_tokens_decoder().items()
        return {i: AddedToken(t.content, t.special, t.lstrip, t.rstrip) for i, t in added}

    def own_size(self) -> int:
        """One more than the largest id of the tokenizer's model itself, without its added tokens (``vocab_size`` at
        least this)."""
        if self.kind == "sentencepiece":
            return self.backend.get_piece_size()
        return max(self.backend.get_vocab(with_added_tokens=False).values(), default=-1) + 1

    def check_fits(
        self, vocab_size: int, fix: str = "pass --tokenizer with the tokenizer the model trained with"
    ) -> None:
        """Refuse a model vocabulary of ``vocab_size`` that this tokenizer's ids can overrun (another model's
        tokenizer, or data prepared for a larger model); ``fix``: what to do. Special added tokens past it (a
        fine-tune's ``<pad>`` the model has no row for, as transformers loads it) are dropped with a warning: text
        never reads as them, the model never emits them, and they are no longer named (a template's ``pad_token``)."""
        added, own = self.added_tokens(), self.own_size()
        past = {i: token for i, token in added.items() if i >= vocab_size}
        ends = max(self.bos_id, self.eos_id) < vocab_size <= self.vocab_size
        if past and ends and own <= vocab_size:
            where = "its added_tokens" if self.kind == "hf" else "its added_tokens.json/tokenizer_config.json"
            if plain := [token.text for token in past.values() if not token.special]:
                raise DataError(
                    f"the added tokens {plain} of the tokenizer are past the model's {vocab_size} rows (text reads "
                    "as their ids)",
                    self.path,
                    f"{fix}, or remove them from {where}",
                )
            if (drop := (os.path.realpath(self.path), self.sha256, vocab_size)) not in _DROPS_WARNED:
                _DROPS_WARNED.add(drop)
                log.warning(
                    f"The special added tokens {[token.text for token in past.values()]} of {self.path} are past the "
                    f"model's {vocab_size} rows: dropped (the model never emits them; a chat template's are read as "
                    "text)"
                )
            kept = {i: token for i, token in added.items() if i < vocab_size}
            self.added = kept if self.kind == "sentencepiece" else {}
            self.named = without_texts(self.named, {token.text for token in past.values()})
            self.vocab_size = max([own, *(i + 1 for i in kept)])
            self.stop_ids = tuple(i for i in self.stop_ids if i < self.vocab_size)
        if self.vocab_size > vocab_size:
            raise DataError(
                f"the tokenizer has {self.vocab_size} tokens but the model's vocab_size is {vocab_size}", self.path, fix
            )

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, path='{self.path}', vocab_size={self.vocab_size})"


REPLACEMENT = "\ufffd"
"""What a decoder shows for the bytes of a character that is not complete yet."""
CONTEXT_TOKENS = 8
"""Tokens before a continuation that :func:`decode_continuation` decodes with it."""


def decode_continuation(decode: Callable[[list[int]], str], context: Sequence[int], ids: Sequence[int]) -> str:
    """The text the tokens ``ids`` add after the tokens ``context`` (a prompt).

    Decoded alone, ``ids`` lose the space of a word-initial first token with tokenizers that drop a text's dummy
    prefix (sentencepiece, LLaMA-style ``tokenizer.json``): a prompt "Hello" went on as "Helloworld". Decoded after
    the last tokens of ``context``, they keep it; a character that ``ids`` complete is part of their text.
    """
    context, ids = list(context[-CONTEXT_TOKENS:]), list(ids)
    if not context:
        return decode(ids)
    head, text = decode(context), decode(context + ids)
    for start in (head, head.rstrip(REPLACEMENT)):
        if text.startswith(start):
            return text[len(start) :]
    return decode(ids)


HASHED: dict[tuple[str, int, int, int, int, int], str] = {}
"""The hashes :func:`file_sha256` took, by the file's path, device, inode, size and modification and change times."""
RACY_NS = 2_000_000_000
"""A file changed this recently (ns) is hashed again at every call: a second write within its clock tick could leave
its size and times as they were (git's "racily clean" files)."""


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the file ``path``, read once per process while it stays as it was (same path, inode, size and
    times): one command compares a tokenizer with several records (its data folder's, a val_dir's, a checkpoint's)."""
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if (digest := HASHED.get(key)) is None:
            digest = sha256_of(Path(path))
            if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > RACY_NS:
                HASHED[key] = digest
        return digest
    except OSError as e:
        raise unreadable(path, e) from e


def tokenizer_sha256(path: str | Path) -> str:
    """The hash of what gives a tokenizer file's text its ids, as :attr:`TextTokenizer.sha256` records it: the file's
    (:func:`file_sha256`) and, for a sentencepiece model, the added tokens past its pieces named beside it."""
    return with_added_tokens(file_sha256(path), _added_beside(Path(path)))


def _added_beside(path: Path) -> dict[int, AddedToken]:
    """The added tokens a sentencepiece model ``path`` gets from its folder (none for a ``tokenizer.json``)."""
    if _is_hf_file(path) or not (added := folder_tokens(path).added):
        return {}
    import sentencepiece as spm

    try:
        return added_past_pieces(spm.SentencePieceProcessor(model_file=str(path)), added)
    except Exception:  # not a tokenizer: load_tokenizer says so where it is read
        return {}


def sha256_of(path: Path) -> str:
    """The SHA-256 of the file ``path``'s bytes, read now."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unreadable(path: str | Path, error: OSError) -> TokenizerError:
    """The one line for a tokenizer file that cannot be read (another user's, say)."""
    fix = "make it readable for this user" if isinstance(error, PermissionError) else None
    return TokenizerError(f"cannot read the tokenizer file ({os_reason(error)})", path, fix)


@dataclass(frozen=True)
class RecordedTokenizer:
    """The tokenizer file a checkpoint trained with, as it recorded it: the path, and the file's hash as read
    (``None`` in checkpoints from before the hash was recorded)."""

    path: Path
    sha256: str | None = None

    def changed(self) -> bool:
        """Whether the file is no longer the one trained with: another file (its hash), or removed from a folder
        that is still there (the data folder prepared again, with another kind of tokenizer). Without a hash, or
        with its folder gone (moved with the data), nothing can be said."""
        if not self.sha256 or not self.path.parent.is_dir():
            return False
        return not self.path.is_file() or tokenizer_sha256(self.path) != self.sha256


def tokenizer_in(folder: Path) -> Path | None:
    """The ``tokenizer.json`` (first) or ``tokenizer.model`` of a model or data folder, if it holds one."""
    return next((folder / name for name in (HF_FILENAME, SENTENCEPIECE_FILENAME) if (folder / name).is_file()), None)


def resolve_tokenizer_path(path: str | Path) -> Path:
    """A tokenizer file, or a model directory holding ``tokenizer.json`` or ``tokenizer.model``."""
    if path is None:  # LoadedModel.tokenizer_path of a checkpoint that records none: a TypeError from pathlib
        raise TokenizerError(
            "no tokenizer path given (None: the checkpoint records no tokenizer, or it no longer exists)",
            "tokenizer",
            "pass the tokenizer file the model trained with",
        )
    path = Path(path).expanduser()
    if path.is_dir():
        if (found := tokenizer_in(path)) is not None:
            return found
        raise TokenizerError(
            f"no {HF_FILENAME} or {SENTENCEPIECE_FILENAME} in the tokenizer folder",
            path,
            f"pass a {HF_FILENAME} or {SENTENCEPIECE_FILENAME}, or a folder holding one",
        )
    if path.exists() and not path.is_file():  # a pipe or device: read more than once, it would be empty
        raise TokenizerError(
            "tokenizer is not a regular file (a pipe or device)", path, "save it to a file and pass that file"
        )
    if not path.is_file():
        raise TokenizerError("tokenizer file does not exist", path, "check the path")
    try:
        path.open("rb").close()
    except OSError as e:
        raise unreadable(path, e) from e
    return path


def check_tokenizer_flag(path: Path | None, flag: str = "--tokenizer") -> None:
    """A command's ``--tokenizer``: unset (the checkpoint's own), or a tokenizer file or a folder holding one, that
    opens as a tokenizer (checked before any model loads)."""
    if path is not None:
        try:
            _open(resolve_tokenizer_path(path))
        except TokenizerError as e:
            raise TokenizerError(e.what, f"{flag} {path}", e.fix) from e


def standard_filename(tokenizer: TextTokenizer) -> str:
    """The name a tokenizer file gets in folders we write: ``tokenizer.json`` or ``tokenizer.model``."""
    return HF_FILENAME if tokenizer.kind == "hf" else SENTENCEPIECE_FILENAME


def copy_tokenizer(tokenizer: TextTokenizer, folder: Path) -> str:
    """Copy the tokenizer file into ``folder`` under its standard name, with the chat template, the end tokens and the
    added and named special tokens found beside it (what ``transformers`` reads from a tokenizer's folder); the name it
    got."""
    import shutil

    from epas_lightning.data.added_tokens import keep_folder_tokens
    from epas_lightning.data.chat_template import keep_chat_template
    from epas_lightning.data.stop_tokens import keep_stop_ids

    name = standard_filename(tokenizer)
    shutil.copyfile(tokenizer.path, Path(folder) / name)
    keep_chat_template(tokenizer.path, folder)
    keep_stop_ids(tokenizer.path, folder)
    keep_folder_tokens(tokenizer.path, folder)
    return name


def _pick(named: str | None, candidates: Sequence[str], lookup, what: str, path: Path) -> int:
    for token in (named,) if named else candidates:
        token_id = lookup(token)
        if token_id is not None:
            return token_id
    tried = repr(named) if named else ", ".join(candidates)
    found = f"no {what} token (tried {tried})" if tried else f"the model defines no {what} token"
    raise TokenizerError(found, path, f"name one of its tokens with --{what.lower()}-token")


def load_tokenizer(
    path: str | Path,
    bos_token: str | None = None,
    eos_token: str | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> TextTokenizer:
    """Load a local ``tokenizer.json`` (HF ``tokenizers``) or sentencepiece model; never downloads anything.

    BOS/EOS: ``bos_id``/``eos_id`` when given (the ids a checkpoint recorded: what its documents were wrapped in), else
    the tokens named, else the usual candidates.
    """
    path = resolve_tokenizer_path(path)
    kind, backend = _open(path)
    tokens = folder_tokens(path)
    if kind == "hf":
        backend.encode_special_tokens = True  # see TextTokenizer: special-token text is text
        vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        bos = _recorded(bos_id, "BOS", vocab_size, path)
        bos = _pick(bos_token, BOS_CANDIDATES, backend.token_to_id, "BOS", path) if bos is None else bos
        eos = _recorded(eos_id, "EOS", vocab_size, path)
        eos = _pick(eos_token, EOS_CANDIDATES, backend.token_to_id, "EOS", path) if eos is None else eos
        return TextTokenizer("hf", path, backend, bos, eos, vocab_size, tokens)
    sp = backend
    added = added_past_pieces(sp, tokens.added)

    def sp_lookup(token: str) -> int | None:
        return sentencepiece_token_id(sp, added, token)

    vocab_size = max([sp.get_piece_size(), *(i + 1 for i in added)])
    bos = _recorded(bos_id, "BOS", vocab_size, path)
    if bos is None:
        bos = sp.bos_id() if bos_token is None and sp.bos_id() >= 0 else _pick(bos_token, (), sp_lookup, "BOS", path)
    eos = _recorded(eos_id, "EOS", vocab_size, path)
    if eos is None:
        eos = sp.eos_id() if eos_token is None and sp.eos_id() >= 0 else _pick(eos_token, (), sp_lookup, "EOS", path)
    return TextTokenizer("sentencepiece", path, sp, bos, eos, vocab_size, FolderTokens(added, tokens.named))


def added_past_pieces(sp: Any, added: dict[int, AddedToken]) -> dict[int, AddedToken]:
    """The ``added`` tokens of a sentencepiece model ``sp`` past its pieces (the others are its pieces)."""
    return {i: token for i, token in added.items() if i >= sp.get_piece_size()}


def sentencepiece_token_id(sp: Any, added: dict[int, AddedToken], token: str) -> int | None:
    """The id of ``token`` among a sentencepiece model's added tokens (first, as transformers looks) and pieces."""
    if (token_id := next((i for i, added_token in added.items() if added_token.text == token), None)) is not None:
        return token_id
    token_id = sp.piece_to_id(token)
    return token_id if token_id != sp.unk_id() or token == sp.id_to_piece(sp.unk_id()) else None


NOT_A_TOKENIZER_FIX = (
    "pass a tokenizer.json (HF tokenizers) or tokenizer.model (sentencepiece), or a folder holding one"
)


def _open(path: Path) -> tuple[str, Any]:
    """The kind of a tokenizer file (``"hf"`` or ``"sentencepiece"``) and its loaded backend."""
    if _is_hf_file(path):
        try:
            pipeline = hf_pipeline(path)
        except Exception as e:
            raise TokenizerError(f"not a readable HF tokenizer.json ({e})", path, NOT_A_TOKENIZER_FIX) from e
        if not pipeline.get_vocab_size(with_added_tokens=True):  # load_tokenizer's size was max() of nothing
            raise TokenizerError(
                "the HF tokenizer.json holds no tokens (an empty vocabulary)", path, NOT_A_TOKENIZER_FIX
            )
        return "hf", pipeline
    import sentencepiece as spm

    try:
        return "sentencepiece", spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise TokenizerError(
            f"neither a tokenizer.json nor a sentencepiece model ({e})", path, NOT_A_TOKENIZER_FIX
        ) from e


def hf_pipeline(path: str | Path, below: int | None = None):  # noqa: ANN201
    """The ``tokenizers.Tokenizer`` of a ``tokenizer.json``, giving every id of a text: without the truncation and
    padding the file may have been saved with (``transformers`` saves the ones last used), which cut every document
    at their ``max_length`` and padded it to their length. ``below``: without the added tokens of that id or more
    (those :meth:`TextTokenizer.check_fits` dropped: their text is text)."""
    import json

    from tokenizers import Tokenizer

    if below is None:
        pipeline = Tokenizer.from_file(str(path))
    else:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        record["added_tokens"] = [token for token in record.get("added_tokens") or [] if token["id"] < below]
        pipeline = Tokenizer.from_str(json.dumps(record))
    pipeline.no_truncation()
    pipeline.no_padding()
    return pipeline


def _is_hf_file(path: Path) -> bool:
    """Whether the tokenizer file ``path`` is a ``tokenizer.json`` (else a sentencepiece model)."""
    with path.open("rb") as f:
        head = f.read(64).lstrip()
    return path.suffix == ".json" or head.startswith(b"{")


def _tokens_by_id(path: Path) -> tuple[dict[int, str], dict[int, AddedToken] | None]:
    """Each id's token text, and a sentencepiece model's added tokens (``None`` for a ``tokenizer.json``)."""
    kind, backend = _open(path)
    if kind == "hf":
        return {token_id: token for token, token_id in backend.get_vocab(with_added_tokens=True).items()}, None
    added = added_past_pieces(backend, folder_tokens(path).added)
    pieces = {token_id: backend.id_to_piece(token_id) for token_id in range(backend.get_piece_size())}
    return pieces | {token_id: token.text for token_id, token in added.items()}, added


def same_token_ids(a: str | Path, b: str | Path) -> bool:
    """Whether two tokenizer files give every id the same token: the same file (with the same added tokens beside a
    sentencepiece model), or one vocabulary in two files (a model's ``tokenizer.json`` and ``tokenizer.model``)."""
    a, b = resolve_tokenizer_path(a), resolve_tokenizer_path(b)
    if tokenizer_sha256(a) == tokenizer_sha256(b):
        return True
    (tokens_a, added_a), (tokens_b, added_b) = _tokens_by_id(a), _tokens_by_id(b)
    return tokens_a == tokens_b and (added_a is None or added_b is None or added_a == added_b)


def _recorded(token_id: int | None, what: str, vocab_size: int, path: Path) -> int | None:
    """A checkpoint's recorded BOS/EOS id, checked to be one of the tokenizer's ids."""
    if token_id is not None and not 0 <= token_id < vocab_size:
        raise TokenizerError(
            f"the checkpoint's {what} id {token_id} is not in this tokenizer ({vocab_size} ids)",
            path,
            "pass the tokenizer the model was trained with",
        )
    return token_id


LONGEST_TRAINING_RUN = 256
"""Runs of non-space characters longer than this are cut into pieces of this length for BPE training only: the
trainer's time grows with the longest pre-token times the merges (a megabyte-long word in a minified file or a data
blob took minutes per merge batch), and no merge ever gets that long. Encoding is unchanged."""

_LONG_RUN = re.compile(rf"\S{{{LONGEST_TRAINING_RUN + 1},}}")


def cut_long_runs(text: str) -> str:
    """``text`` with every run of non-space characters longer than ``LONGEST_TRAINING_RUN`` split by spaces."""
    n = LONGEST_TRAINING_RUN
    return _LONG_RUN.sub(lambda run: " ".join(run[0][i : i + n] for i in range(0, len(run[0]), n)), text)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None, show_progress: bool = False):
    """Train a byte-level BPE (never an unknown token) with ``vocab_size`` entries including ``<|bos|>``/``<|eos|>``;
    very long runs of non-space characters are cut for the training (``cut_long_runs``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise TokenizerError(
            f"vocab_size must be at least {MIN_BPE_VOCAB} for a byte-level BPE, got {vocab_size}",
            "vocab_size",
            f"give {MIN_BPE_VOCAB} or more (256 bytes, BOS, EOS and the merges)",
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TRAINED_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(map(cut_long_runs, texts), trainer=trainer, length=length)
    return tokenizer


_LOADED: dict[tuple, TextTokenizer] = {}


def load_tokenizer_once(
    path: str,
    bos_token: str | None = None,
    eos_token: str | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    fits: int | None = None,
) -> TextTokenizer:
    """:func:`load_tokenizer`, once per process (a preparation worker tokenizes several work items, a server every
    request); ``fits``: fitted once to a model of that vocabulary size (:meth:`TextTokenizer.check_fits`)."""
    key = (path, bos_token, eos_token, bos_id, eos_id, fits)
    if key not in _LOADED:
        tokenizer = load_tokenizer(path, bos_token, eos_token, bos_id, eos_id)
        if fits is not None:
            tokenizer.check_fits(fits)
        _LOADED[key] = tokenizer
    return _LOADED[key]
