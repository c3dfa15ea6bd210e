"""The added and named special tokens of a tokenizer's folder, read as ``transformers`` reads them, and kept with the
tokenizer file wherever we copy it (``prepare``, ``consolidate``), as its chat template is.

A sentencepiece ``tokenizer.model`` holds only its pieces: LLaMA-2, Mistral and Phi-3 fine-tunes without a
``tokenizer.json`` add their chat tokens (``<|im_end|>`` = 32000, Phi-3's ``<|end|>`` = 32007) in ``added_tokens.json``
(``{text: id}``) and ``tokenizer_config.json``'s ``added_tokens_decoder`` (``{id: {"content", "special"}}``), and name
their special tokens (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``, ... and the
``additional_special_tokens`` list) in ``tokenizer_config.json`` (or ``special_tokens_map.json``). A ``tokenizer.json``
holds its added tokens itself; its folder's named special tokens are read here too (a chat template renders them).
They are kept as those entries of a ``tokenizer_config.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

ADDED_TOKENS_FILENAME = "added_tokens.json"
SPECIAL_TOKENS_FILENAME = "special_tokens_map.json"
CONFIG_FILENAME = "tokenizer_config.json"
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The special tokens a tokenizer names (``transformers``' ``SPECIAL_TOKENS_ATTRIBUTES``)."""
ADDITIONAL = "additional_special_tokens"


class AddedToken(NamedTuple):
    """An added token: its text, whether it is special, and whether it takes the whitespace before (``lstrip``) or
    after it (``rstrip``: Phi-3's ``<|end|>``) with it when read in a text, as ``tokenizers``' ``AddedToken``."""

    text: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False


@dataclass(frozen=True)
class FolderTokens:
    """What a tokenizer's folder says about its tokens besides the tokenizer file.

    Attributes:
        added: Added tokens by id.
        named: The named special tokens' text (``{"eos_token": "<|im_end|>"}``), and the ``additional_special_tokens``
            list: what ``transformers``' ``apply_chat_template`` gives a template.
    """

    added: dict[int, AddedToken] = field(default_factory=dict)
    named: dict[str, str | list[str]] = field(default_factory=dict)


def folder_tokens(tokenizer_file: Path) -> FolderTokens:
    """The added and named special tokens of the folder ``tokenizer_file`` lies in; none when it names none (or a
    file is unreadable, with a warning naming it; for ``tokenizer_config.json`` without one, as the chat template's
    reader says it already)."""
    folder = Path(tokenizer_file).parent
    config = _json_object(folder / CONFIG_FILENAME, warn=False)
    named = {**_named(_json_object(folder / SPECIAL_TOKENS_FILENAME)), **_named(config)}
    special = _texts(named)
    added = {}
    for text, token_id in _json_object(folder / ADDED_TOKENS_FILENAME).items():
        if _is_id(token_id):
            added[token_id] = AddedToken(text, text in special)
    decoder = config.get("added_tokens_decoder")
    for key, token in (decoder if isinstance(decoder, dict) else {}).items():
        text = _text(token)
        if key.isdigit() and text is not None:
            entry = token if isinstance(token, dict) else {"special": True}
            is_special = bool(entry.get("special", text in special))
            added[int(key)] = AddedToken(text, is_special, bool(entry.get("lstrip")), bool(entry.get("rstrip")))
    return FolderTokens(added, named)


def keep_folder_tokens(tokenizer_file: Path, folder: Path) -> None:
    """Write the added and named special tokens beside ``tokenizer_file`` (if any) into ``folder``'s
    ``tokenizer_config.json`` (with what it holds: the chat template kept there), where :func:`folder_tokens` finds
    them again."""
    tokens = folder_tokens(tokenizer_file)
    if not tokens.added and not tokens.named:
        return
    config = _json_object(folder / CONFIG_FILENAME)
    decoder = {str(i): decoder_entry(token) for i, token in sorted(tokens.added.items())}
    config.update(tokens.named, **({"added_tokens_decoder": decoder} if decoder else {}))
    (folder / CONFIG_FILENAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def with_added_tokens(file_sha256: str, added: Mapping[int, AddedToken]) -> str:
    """A tokenizer's hash: its file's ``file_sha256`` where it has no ``added`` tokens (as checkpoints and prepared
    folders recorded it before those were read), else the hash of both (an edited added token changes it)."""
    if not added:
        return file_sha256
    record = [file_sha256, [[token_id, *token] for token_id, token in sorted(added.items())]]
    return hashlib.sha256(json.dumps(record, ensure_ascii=False).encode("utf-8")).hexdigest()


def decoder_entry(token: AddedToken) -> dict[str, Any]:
    """``token`` as an entry of a ``tokenizer_config.json``'s ``added_tokens_decoder``: read before normalization,
    as :func:`split_encoder` reads it."""
    return {
        "content": token.text,
        "special": token.special,
        "lstrip": token.lstrip,
        "rstrip": token.rstrip,
        "normalized": False,
    }


def split_encoder(
    tokens: Mapping[str, int], encode: Callable[[str], list[int]], strips: Mapping[str, AddedToken] | None = None
) -> Callable[[str], list[int]]:
    """Text -> ids where each of ``tokens``' text is its id (the longest first), and the text between them as
    ``encode`` reads it; ``strips``: the added tokens (by text) that take the whitespace before or after them."""
    pattern = re.compile("|".join(re.escape(text) for text in sorted(tokens, key=len, reverse=True) if text))
    if not pattern.pattern:
        return encode
    strips = strips or {}

    def encode_split(text: str) -> list[int]:
        ids, start = [], 0
        for match in pattern.finditer(text):
            if match.start() < start:  # in the whitespace a token before took
                continue
            token = strips.get(match[0])
            before = text[start : match.start()]
            before = before.rstrip() if token is not None and token.lstrip else before
            ids += (encode(before) if before else []) + [tokens[match[0]]]
            start = match.end()
            if token is not None and token.rstrip:
                start = len(text) - len(text[start:].lstrip())
        return ids + (encode(text[start:]) if start < len(text) or not ids else [])

    return encode_split


def without_texts(named: Mapping[str, str | list[str]], texts: set[str]) -> dict[str, str | list[str]]:
    """The named special tokens ``named`` (:attr:`FolderTokens.named`) without those whose text is one of ``texts``
    (an ``additional_special_tokens`` list left empty is left out)."""
    kept: dict[str, str | list[str]] = {}
    for key, value in named.items():
        if isinstance(value, str) and value not in texts:
            kept[key] = value
        elif isinstance(value, list) and (items := [text for text in value if text not in texts]):
            kept[key] = items
    return kept


def _named(record: dict[str, Any]) -> dict[str, str | list[str]]:
    named: dict[str, str | list[str]] = {}
    for key in NAMED_TOKENS:
        if (text := _text(record.get(key))) is not None:
            named[key] = text
    if isinstance(extra := record.get(ADDITIONAL), list):
        named[ADDITIONAL] = [text for text in map(_text, extra) if text is not None]
    return named


def _texts(named: Mapping[str, str | list[str]]) -> set[str]:
    """The text of every named special token."""
    return {text for value in named.values() for text in ([value] if isinstance(value, str) else value)}


def _text(token: Any) -> str | None:
    """A token's text as the files write it: a string, or an ``AddedToken``'s ``{"content": ...}``."""
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) and token else None


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_object(path: Path, warn: bool = True) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if warn:
            log.warning(f"{path} is unreadable ({e}): the tokens it may name are not read")
        return {}
    return record if isinstance(record, dict) else {}
