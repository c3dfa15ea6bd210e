"""Chat prompts for ``serve``: the checkpoint's chat template rendered as ``transformers``'
``apply_chat_template(messages, add_generation_prompt=True)`` renders it, and its control tokens read as their ids.

The template is a file from the checkpoint, never trusted: it runs in jinja2's ``ImmutableSandboxedEnvironment``
(no attribute starting with ``_``, no method that changes a list or dict), with what transformers gives a template:
``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, the ``tojson`` filter, the globals ``raise_exception``,
``strftime_now``, ``dict`` and ``namespace``, and the variables ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token`` and the other special tokens the tokenizer's folder names (``unk_token``, ``pad_token``,
``additional_special_tokens``, ...). A render is bounded, and past a bound it is a :class:`TemplateFailure` that names
it: it runs in a separate process (:mod:`~epas_lightning.serve.template_process`) that is killed past
:data:`RENDER_SECONDS` or stopped past its memory bound, even inside one C call (``'a'|center(10**9)``) no in-process
check can interrupt, so a template cannot take this process's memory or time. Inside it two cheap checks fail
earlier, with a precise cause and without a new process: the text may hold ``max_chars`` characters, and ``*`` or
``**`` may not build a value larger than :data:`MAX_PRODUCT`.

A template writes its control tokens as text (``<|im_start|>``, ``<|eot_id|>``). Our :class:`TextTokenizer` reads
such text as text (training data and completion prompts); the rendered chat is read by a second pipeline that matches
the tokenizer's special tokens, as the tokenizer ``export`` ships with a chat template reads it
(``split_special_tokens: false``).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

    from epas_lightning.data.added_tokens import AddedToken
    from epas_lightning.data.tokenizer import TextTokenizer

RENDER_SECONDS = 2.0
"""Time a chat template may take to render one request's messages (real ones take milliseconds)."""
MAX_PRODUCT = 10_000_000
"""Characters or items a template's ``*`` may repeat a string or list to, and bits a ``*`` or ``**`` may make an
integer of."""
MAX_TOKEN_CHARS = 256
"""Characters one token stands for, at most: chat messages longer than the context length times this cannot fit (and
are refused before the template renders them)."""


class TemplateRefusal(Exception):
    """The template's own ``raise_exception``: it refuses these messages (roles that do not alternate, ...)."""


class TemplateFailure(Exception):
    """The template failed on these messages otherwise: a sandbox violation, an undefined name, a Python error."""


def chat_template_text(entry: dict[str, Any]) -> str | None:
    """The template a chat without tools uses, from :func:`~epas_lightning.data.chat_template.chat_template_beside`'s
    entry: the one template, or the one named ``default`` of several (as transformers picks)."""
    template = entry.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    return template


def checked_chat_template(tokenizer_file: Path) -> tuple[str | None, str]:
    """The chat template beside the tokenizer file, compiled once to check it; or ``None`` and why there is no usable
    one (a sentence for the caller to follow with what to do)."""
    from epas_lightning.data.chat_template import UnreadableTemplate, read_chat_template

    try:
        entry = read_chat_template(tokenizer_file)
    except UnreadableTemplate as e:  # said once, as what stops the chat (it was a warning, then "no chat template")
        return None, f"the chat template beside {tokenizer_file} is unreadable ({e})"
    template = chat_template_text(entry)
    if template is None and entry:  # named templates, as transformers refuses them without a default
        names = ", ".join(t["name"] for t in entry["chat_template"])
        return None, (
            f"the chat templates beside {tokenizer_file} ({names}) include none named 'default', the one a chat "
            "without tools uses"
        )
    if template is None:
        return None, f"this model has no chat template (none beside {tokenizer_file})"
    try:  # in the bounded process: compiling runs its constant filters ('a'|center(10**9) written out)
        invalid = _bounded("check", template)
    except TemplateFailure as e:
        return None, f"the chat template beside {tokenizer_file} could not be compiled ({e})"
    if invalid:
        return None, f"the chat template beside {tokenizer_file} is not a valid template ({invalid})"
    return template, ""


def chat_prompt_ids(
    template: str, messages: Sequence[dict[str, str]], tokenizer: TextTokenizer, max_chars: int = 10**7
) -> list[int]:
    """The token ids of :func:`render_chat`'s text for ``messages``, with the tokenizer's BOS and EOS text and the
    special tokens its folder names, and its control tokens read as their ids (:func:`control_token_encoder`). A BOS
    or EOS that is a regular token (``--bos-token``) is its id too: rendered as a mark no message holds."""
    from epas_lightning.data.added_tokens import split_encoder

    encode, marks, ends = control_token_encoder(tokenizer), {}, {}
    for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
        ends[key] = token_text(tokenizer, token_id)
        if encode(ends[key]) != [token_id]:
            ends[key] = _unused_mark(key, [template, json.dumps(list(messages), ensure_ascii=False), *marks])
            marks[ends[key]] = token_id
    special = {**tokenizer.named, **ends}
    text = render_chat(template, messages, ends["bos_token"], ends["eos_token"], max_chars, special)
    return split_encoder(marks, encode)(text) if marks else encode(text)


PRIVATE_USE = range(0xE000, 0xF900)
"""The code points a mark is made of: no filter (``lower``, ``upper``, ``title``) changes them."""


def _unused_mark(name: str, texts: Sequence[str]) -> str:
    """A text no render of ``texts`` writes but where it stands for ``name``: ``name`` between a private-use character
    that none of ``texts`` holds (JSON keeps them as is), so no two messages joined, nor a message a filter changed,
    can make it; where they hold every one, a text none of them holds."""
    used = set().union(*texts)
    if (free := next((chr(c) for c in PRIVATE_USE if chr(c) not in used), None)) is not None:
        return f"{free}{name}{free}"
    return next(mark for n in itertools.count() if not any((mark := f"\ue000{name}{n}\ue001") in t for t in texts))


def render_chat(
    template: str,
    messages: Sequence[dict[str, str]],
    bos_token: str,
    eos_token: str,
    max_chars: int = 10**7,
    special_tokens: dict[str, str | list[str]] | None = None,
) -> str:
    """The prompt text of ``messages``, ending with the header of the assistant's turn, rendered in a separate process
    bounded in time and memory (:mod:`~epas_lightning.serve.template_process`); :class:`TemplateRefusal` or
    :class:`TemplateFailure` when the template does not render them, or runs past its bounds. ``special_tokens``: the
    other named special tokens a template gets (``unk_token``, ``pad_token``, ``additional_special_tokens``, as
    transformers' ``apply_chat_template`` gives its tokenizer's)."""
    return _bounded("render", template, messages, bos_token, eos_token, max_chars, special_tokens or {})


def _bounded(task: str, *args: Any) -> str:
    """:func:`template_task` in the bounded process (in this one, within the cheap checks only, on Windows)."""
    if os.name == "nt":
        try:
            return template_task(task, *args)
        except MemoryError:
            raise TemplateFailure("it ran out of memory") from None
    from epas_lightning.serve.template_process import run_bounded

    return run_bounded(task, args, RENDER_SECONDS)


def template_task(task: str, *args: Any) -> str:
    """What the bounded process does: ``"render"`` :func:`render_chat_here`'s text; ``"check"`` why a template does
    not compile (jinja2's message and line), or ``""``."""
    if task == "render":
        return render_chat_here(*args)
    import jinja2

    try:
        compile_template(*args)
    except jinja2.TemplateSyntaxError as e:
        return f"{e}, line {e.lineno}"
    return ""


def render_chat_here(
    template: str,
    messages: Sequence[dict[str, str]],
    bos_token: str,
    eos_token: str,
    max_chars: int,
    special_tokens: dict[str, str | list[str]] | None = None,
) -> str:
    """:func:`render_chat` in this process, bounded by its cheap checks only (``max_chars`` characters written, ``*``
    and ``**`` within :data:`MAX_PRODUCT`), not in time or memory (a ``MemoryError`` as is)."""
    import jinja2

    compiled = compile_template(template)
    variables = {
        **(special_tokens or {}),
        "messages": [dict(message) for message in messages],
        "tools": None,
        "documents": None,
        "add_generation_prompt": True,
        "bos_token": bos_token,
        "eos_token": eos_token,
    }
    pieces, length = [], 0
    try:
        for piece in compiled.generate(**variables):
            length += len(piece)
            if length > max_chars:
                raise TemplateFailure(f"it wrote more than {max_chars} characters")
            pieces.append(piece)
        return "".join(pieces)
    except (TemplateRefusal, TemplateFailure, MemoryError):
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateFailure(f"the sandbox stopped it: {e}") from None
    except Exception as e:
        raise TemplateFailure(f"{type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=4)
def compile_template(template: str) -> jinja2.Template:
    """The template compiled in the sandbox (``jinja2.TemplateSyntaxError`` if it is not a template)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): its body as is."""

        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise TemplateRefusal(message)

    def tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:  # noqa: ANN001
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses attributes starting with ``_`` (as transformers')."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")

    extensions = [Generation, loopcontrols]

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, with ``*`` and ``**`` bounded."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_product(operator, left, right)
            return super().call_binop(context, operator, left, right)

    environment = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    environment.filters["tojson"] = tojson
    environment.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda format: datetime.now().strftime(format),
        dict=lambda *args, **kwargs: dict(*args, **kwargs),
        namespace=Namespace,
    )
    return environment.from_string(template)


def _check_product(operator: str, left: Any, right: Any) -> None:
    """Refuse a ``*`` or ``**`` whose result would exceed :data:`MAX_PRODUCT` characters, items or bits."""
    ints = [x for x in (left, right) if isinstance(x, int) and not isinstance(x, bool)]
    if operator == "*" and len(ints) == 2:  # the product of two integers has their bits together
        size = left.bit_length() + right.bit_length()
    elif operator == "*":
        sized = [x for x in (left, right) if isinstance(x, str | list | tuple)]
        size = len(sized[0]) * ints[0] if sized and ints else 0
    else:
        size = right * abs(left).bit_length() if len(ints) == 2 and right > 0 else 0
    if size > MAX_PRODUCT:
        raise TemplateFailure(f"its '{operator}' would build a value of {size} characters, items or bits")


def control_token_encoder(tokenizer: TextTokenizer) -> Callable[[str], list[int]]:
    """Text -> ids where the tokenizer's special tokens' text is their control id (a rendered chat), everything else
    as ``tokenizer.encode`` reads it. A separate pipeline: ``tokenizer`` itself goes on reading such text as text."""
    added = tuple(sorted(tokenizer.added.items()))
    return _control_token_pipeline(str(tokenizer.path), tokenizer.kind, added, tokenizer.vocab_size)


@functools.lru_cache(maxsize=2)
def _control_token_pipeline(
    path: str, kind: str, added: tuple[tuple[int, AddedToken], ...], vocab_size: int
) -> Callable[[str], list[int]]:
    """:func:`control_token_encoder` of the tokenizer file ``path``, with a sentencepiece model's ``added`` tokens
    (id, token) read as their ids too; a ``tokenizer.json``'s added tokens past ``vocab_size`` (dropped) are text."""
    from epas_lightning.data.added_tokens import split_encoder
    from epas_lightning.data.tokenizer import hf_pipeline

    ids, strips = {token.text: i for i, token in added}, {token.text: token for _, token in added}
    if kind == "hf":
        pipeline = hf_pipeline(path, below=vocab_size)
    else:
        from epas_lightning.hf.sentencepiece_json import sentencepiece_tokenizer

        pipeline = sentencepiece_tokenizer(Path(path))
        if pipeline is None:  # a word or char model
            import sentencepiece as spm

            encode = _split_at_control_pieces(spm.SentencePieceProcessor(model_file=path))
            return split_encoder(ids, encode, strips)
    pipeline.encode_special_tokens = False
    return split_encoder(ids, lambda text: pipeline.encode(text, add_special_tokens=False).ids, strips)


def _split_at_control_pieces(processor: Any) -> Callable[[str], list[int]]:
    """Text -> ids for a sentencepiece model no ``tokenizers`` pipeline mirrors (a word or char model): the text of its
    control and unknown pieces (``<s>``, ``</s>``, ``<unk>``) is their id, as transformers' slow tokenizer reads it;
    the text between them as sentencepiece encodes it (which reads such text as text: ``<s>`` was ``<unk> s <unk>``).
    """
    from epas_lightning.data.added_tokens import split_encoder

    special = {
        processor.id_to_piece(i): i
        for i in range(processor.get_piece_size())
        if processor.is_control(i) or processor.is_unknown(i)
    }
    return split_encoder(special, lambda text: processor.encode(text, out_type=int))


def token_text(tokenizer: TextTokenizer, token_id: int) -> str:
    """The text of one token id as a template writes it (``<|begin_of_text|>``, ``<s>``)."""
    return tokenizer.id_to_token(token_id)
