"""A sentencepiece ``tokenizer.model`` as an HF ``tokenizers`` pipeline that encodes and decodes as it does.

``transformers`` reads a bare ``tokenizer.model`` through its own converters, which do not follow the model's
normalizer settings (5.x drops the dummy-prefix space in front of leading spaces, and ignores the NFKC charsmap and
whitespace collapsing of a default-trained model), so ``export`` ships this pipeline as ``tokenizer.json`` and checks
it on :data:`PROBE_TEXTS` against the sentencepiece model. Known gaps: HF's Unigram still segments a literal ``<s>``
as that control piece when a character of it is unknown (the check's ``<s>`` probe reports it), and HF's charsmap
normalizer drops a combining mark after some characters (full-width letters, the whitespace symbol) that sentencepiece
composes with them (not probed: rare in text).
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from epas_lightning.data.tokenizer import TextTokenizer

UNIGRAM, BPE = 1, 2  # TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # SentencePiece.Type
SPACE = "\u2581"
"""Sentencepiece's whitespace symbol."""
NEVER = -1e9
"""The Unigram score of pieces that sentencepiece never segments text into (control, unknown, unused, byte): HF's
Unigram then prefers spelling them out of known pieces (not out of unknown characters, which cost even more)."""
MAX_LEADING_SPACES = 1 << 20

PROBE_TEXTS = (
    "Hello world, it's 2024!",
    " one leading space",
    "   three leading spaces",
    "runs  of   spaces",
    "trailing spaces  ",
    "line\nbreaks\n\nand a blank line\n",
    "windows\r\nline end",
    "tab\tand\t\ttabs",
    "naïve café, déjà vu",
    "日本語と中文",
    "emoji 🙂👍🏽",
    "ﬁ Ａ ½ x²",
    "def f(x):\n    return x  # done",
    "<s> and </s> are text",
    "",
)
"""Texts whose ids (and the decode of those ids) must be the same through the exported pipeline as through
sentencepiece: the whitespace, Unicode normalization and byte fallback cases where converters go wrong."""


def _proto(path: Path):  # noqa: ANN202
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto.FromString(Path(path).read_bytes())


def user_defined_pieces(path: Path) -> list[str]:
    """The model's user-defined pieces (always emitted whole)."""
    return [p.piece for p in _proto(path).pieces if p.type == USER_DEFINED]


def sentencepiece_tokenizer(path: Path) -> Tokenizer | None:
    """The ``tokenizers`` pipeline of the sentencepiece model ``path``; ``None`` for a word or char model."""
    proto = _proto(path)
    spec, trainer, pieces = proto.normalizer_spec, proto.trainer_spec, list(proto.pieces)
    user_defined = [p.piece for p in pieces if p.type == USER_DEFINED]
    if trainer.model_type == UNIGRAM:  # only normal and user-defined pieces segment text, as in sentencepiece
        scores = [(p.piece, p.score if p.type in (NORMAL, USER_DEFINED) else NEVER) for p in pieces]
        model = models.Unigram(scores, trainer.unk_id, trainer.byte_fallback)
    elif trainer.model_type == BPE:
        model = models.BPE(
            {p.piece: i for i, p in enumerate(pieces)},
            _merges(pieces),
            unk_token=pieces[trainer.unk_id].piece,
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
            ignore_merges=bool(user_defined),  # a user-defined piece, isolated below, is taken whole
        )
    else:
        return None
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(_normalizers(spec))
    if user_defined:
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    steps = [decoders.Replace(SPACE, " ")]
    steps += [decoders.ByteFallback()] if trainer.byte_fallback else []
    steps += [decoders.Fuse()]
    if spec.remove_extra_whitespaces:  # every leading space, as sentencepiece
        steps.append(decoders.Strip(" ", MAX_LEADING_SPACES, 0))
    elif spec.add_dummy_prefix:  # the dummy prefix of the first piece
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    special = [p.piece for p in pieces if p.type in (UNKNOWN, CONTROL)]
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in special])
    return tokenizer


def _merges(pieces) -> list[tuple[str, str]]:  # noqa: ANN001
    """BPE merges: every split of a normal piece into two normal pieces, ranked by the piece's score (sentencepiece
    merges the best-scoring pair first)."""
    normal = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
    ranked = sorted(
        (rank, piece[:k], piece[k:])
        for piece, rank in normal.items()
        for k in range(1, len(piece))
        if piece[:k] in normal and piece[k:] in normal
    )
    return [(left, right) for _, left, right in ranked]


def _normalizers(spec) -> list:  # noqa: ANN001
    """Sentencepiece's normalizer in its order: charsmap (NFKC), extra spaces removed, dummy prefix, spaces escaped."""
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # spaces (after the charsmap, which maps newlines and tabs to spaces); at the
        trailing = f"[ {SPACE}]" if spec.escape_whitespaces else " "  # end also the whitespace symbol itself
        steps += [normalizers.Replace(Regex(rf"\A +|{trailing}+\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))  # not to an empty text, as sentencepiece
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return steps


def first_difference(ours: TextTokenizer, pipeline: Tokenizer, texts: list[str]) -> str | None:
    """The first of ``texts`` that ``pipeline`` encodes, or decodes back, otherwise than ``ours``, described in a
    few words; ``None`` when they agree on all. Text with unknown pieces is not decoded: neither gets it back."""
    unknown = ours.backend.unk_id()
    for text in texts:
        ids, theirs = ours.encode(text), pipeline.encode(text, add_special_tokens=False).ids
        if ids != theirs:
            return f"{text!r} is tokens {theirs} instead of {ids}"
        if unknown not in ids and pipeline.decode(ids) != ours.decode(ids):
            return f"{text!r} decodes to {pipeline.decode(ids)!r} instead of {ours.decode(ids)!r}"
    return None
