"""Multiple-choice accuracy by log-likelihood on local JSONL tasks: the fallback for installs without lm-eval.

A task is a JSONL file, one question a line: ``{"context": "...", "choices": [" a", " b", ...], "label": 1}``
(write the separating space into the choices). Each choice is scored by the summed log-probabilities of its tokens
after the context, with the requests built as lm-eval's ``hf`` model builds them on our export (:func:`encode_pair`),
so the numbers equal ``python -m epas_lightning lm-eval`` on the same questions as a task YAML with
``output_type: multiple_choice``, ``doc_to_text: context``, ``doc_to_choice: choices``, ``doc_to_target: label``
and ``target_delimiter: ""`` (the README shows it).

- ``acc``: the choice with the highest summed log-likelihood is the answer.
- ``acc_norm``: the summed log-likelihood divided by the choice's length in characters (lm-eval's ``acc_norm``),
  which removes the bias towards short answers (an empty choice's is -inf, as lm-eval divides).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from epas_lightning.errors import ConfigError, DataError, read_text_file, text_lines
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.model.llama import check_has_weights, check_is_llama
from epas_lightning.runtime import activations_overflow, check_counts, is_whole_number


@dataclass
class Question:
    context: str
    choices: list[str]
    label: int
    where: str = ""
    """Its file and line, for errors."""


def check_not_an_lm_eval_task(path: Path) -> None:
    """A :class:`ConfigError` that points to the ``lm-eval`` command for what reads as one of its tasks (a YAML file,
    or a name that is no file: ``hellaswag``); they were a JSON error on line 1, or "task file does not exist"."""
    if path.suffix in (".yaml", ".yml") or (not path.suffix and not path.exists()):
        raise ConfigError(
            "evaluate scores multiple-choice JSONL task files; this reads as an lm-eval task (a YAML file or a name)",
            f"--tasks {path}",
            f"run it with the lm-eval command (python -m epas_lightning lm-eval --tasks {path}), or give a .jsonl file",
        )


def load_task(path: str | Path) -> list[Question]:
    """Read a JSONL task, naming the line of any malformed question."""
    path = Path(path)
    check_not_an_lm_eval_task(path)
    questions = []
    text = read_text_file(path, "task file", f"--tasks {path}", DataError)
    for n, line in enumerate(text_lines(text), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            fields = item["context"], item["choices"], item["label"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"expected {{'context', 'choices', 'label'}} ({e})", f"{path}:{n}", f"write it as {QUESTION_EXAMPLE}"
            ) from e
        question = Question(*checked_fields(*fields, where=f"{path}:{n}"), where=f"{path}:{n}")
        if len(question.choices) < 2:  # was "label 0 is not one of 1 choices"
            choices = f"{len(question.choices)} choice" + ("" if len(question.choices) == 1 else "s")
            raise DataError(f"the question has {choices}: accuracy needs 2 or more", f"{path}:{n}", "add the others")
        if not 0 <= question.label < len(question.choices):
            raise DataError(
                f"label {question.label} is not one of the {len(question.choices)} choices",
                f"{path}:{n}",
                f"give the index of the right choice, 0 to {len(question.choices) - 1}",
            )
        questions.append(question)
    if not questions:
        raise DataError("the task file holds no questions", path, f"write one a line, as {QUESTION_EXAMPLE}")
    return questions


QUESTION_EXAMPLE = '{"context": "The sky is", "choices": [" blue", " green"], "label": 0}'
"""A question as a task file writes it, for the errors that name a field of the wrong type."""


def checked_fields(context: Any, choices: Any, label: Any, where: str) -> tuple[str, list[str], int]:
    """A question's fields, each of the JSON type it must have: a :class:`DataError` naming the first that is not
    (they were read as ``str()`` and ``int()`` of anything, and scored)."""
    fix = f"write it as {QUESTION_EXAMPLE}"
    if not isinstance(context, str):
        raise DataError(f"context must be text, not {json.dumps(context)}", where, fix)
    if not isinstance(choices, list) or not all(isinstance(choice, str) for choice in choices):
        raise DataError(f"choices must be a list of texts, not {json.dumps(choices)}", where, fix)
    if not isinstance(label, int) or isinstance(label, bool):
        raise DataError(f"label must be the index of the right choice, not {json.dumps(label)}", where, fix)
    return context, choices, label


def load_tasks(paths: list[str | Path]) -> dict[str, list[Question]]:
    """Each task file's questions under its name (the file's stem: the column prefix), one file per name."""
    tasks: dict[str, list[Question]] = {}
    files: dict[str, Path] = {}
    for path in map(Path, paths):
        if path.stem in files and files[path.stem].resolve() != path.resolve():
            raise ConfigError(
                f"two task files are named {path.stem} ({files[path.stem]}, {path}): one would hide the other",
                "--tasks",
                "rename one of them",
            )
        files[path.stem] = path
        tasks[path.stem] = load_task(path)
    return tasks


def encode_pair(
    tokenizer,  # noqa: ANN001
    context: str,
    continuation: str,
    encode: Callable[[str], list[int]] | None = None,
) -> tuple[list[int], list[int]]:
    """The (context, continuation) token ids of one request, as lm-eval's ``hf`` model makes them with our exported
    tokenizer (which starts every text with BOS).

    Trailing whitespace of the context moves to the continuation; the continuation's tokens are those of
    ``context + continuation`` after the context's own tokens. An empty context becomes BOS. A text that starts with
    the BOS token's text (``<|bos|>``, ``<s>``) gets no BOS, as ``hf`` encodes it. ``encode``: the texts' encoder,
    :func:`request_encoder`'s (pass it for many requests: it looks for a chat template).
    """
    bos = tokenizer.bos_id
    prefix = bos_text(tokenizer)
    encode = encode or request_encoder(tokenizer)

    def with_bos(text: str) -> list[int]:
        ids = encode(text)
        skip = prefix is not None and text.startswith(prefix)
        return ids if skip or ids[:1] == [bos] else [bos, *ids]

    if not context:
        ids = encode(continuation)
        return ([bos], ids) if ids[:1] != [bos] else (ids[:1], ids[1:])
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    whole = with_bos(context + continuation)
    context_ids = with_bos(context)
    return context_ids, whole[len(context_ids) :]


def request_encoder(tokenizer) -> Callable[[str], list[int]]:  # noqa: ANN001
    """Text -> ids as the tokenizer ``export`` ships (lm-eval's ``hf`` model's) reads a request: a special token's text
    (``<|eos|>``, ``</s>``) is text, as training read it (``tokenizer.encode``), unless a chat template lies beside
    the tokenizer file; then it is the control token, as the template writes it (a context rendered with it)."""
    from epas_lightning.data.chat_template import chat_template_beside

    path, kind = getattr(tokenizer, "path", None), getattr(tokenizer, "kind", None)
    if path is None or kind is None or not chat_template_beside(Path(path)):
        return tokenizer.encode
    from epas_lightning.serve.chat import control_token_encoder

    return control_token_encoder(tokenizer)


def bos_text(tokenizer) -> str | None:  # noqa: ANN001
    """The BOS token's text in a :class:`TextTokenizer` (what lm-eval's ``hf`` decodes BOS to: a text starting with it
    gets no BOS there); ``None`` for a tokenizer of another kind."""
    if getattr(tokenizer, "kind", None) in ("hf", "sentencepiece"):
        return tokenizer.id_to_token(tokenizer.bos_id) or None
    return None


@torch.no_grad()
def score_continuations(
    model: Llama, requests: list[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-prob of the continuation and whether it is greedy.

    Sequences longer than the model's context length are cut from the left (the continuation is always kept whole).
    Requests are batched longest first and right-padded; padding never influences a scored position (causal
    attention).
    """
    block = model.config.context_length
    vocab = model.config.vocab_size
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        sequences, spans = [], []
        for i in chunk:
            context, continuation = requests[i]
            if not continuation:
                raise ValueError("An empty continuation cannot be scored.")
            if len(continuation) > block:
                raise ValueError(f"A continuation of {len(continuation)} tokens exceeds the context length {block}.")
            if not context:
                raise ValueError("The context must hold at least one token (BOS).")
            tokens = (context + continuation)[-(block + 1) :]
            sequences.append(tokens[:-1])  # inputs; position j predicts tokens[j + 1]
            spans.append((len(tokens) - 1 - len(continuation), tokens[-len(continuation) :]))
        width = max(len(s) for s in sequences)
        inputs = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
        for row, seq in enumerate(sequences):
            inputs[row, : len(seq)] = torch.tensor(seq)
        logprobs = F.log_softmax(model(inputs)[..., :vocab].float(), dim=-1)  # (B, T, V)
        for row, (i, (offset, target)) in enumerate(zip(chunk, spans, strict=True)):
            predicted = logprobs[row, offset : offset + len(target)]  # (n, V)
            target_t = torch.tensor(target, device=device)
            total = predicted.gather(-1, target_t[:, None]).sum().item()
            if not math.isfinite(total):
                raise activations_overflow("the log-probabilities", next(model.parameters()).dtype)
            results[i] = (total, bool((predicted.argmax(-1) == target_t).all()))
    return results  # type: ignore[return-value]


def check_scorable(questions: list[Question], requests: list[tuple[list[int], list[int]]], config: LlamaConfig) -> None:
    """A :class:`DataError` naming the question whose choice, as tokens, is empty or longer than the model's context,
    or holds ids outside its vocabulary (another model's tokenizer): :func:`score_continuations` can score none."""
    context_length = config.context_length
    pairs = iter(requests)
    for n, question in enumerate(questions):
        where = question.where or f"questions[{n}]"  # built in Python: no file and line
        for number, (context, continuation) in enumerate((next(pairs) for _ in question.choices), start=1):
            ids = context + continuation
            config.check_token_ids(min(ids), max(ids), where)
            if not 0 < len(continuation) <= context_length:
                size = f"{len(continuation)} tokens, more than the model's context length ({context_length})"
                raise DataError(
                    f"choice {number} has {size if continuation else 'no tokens to score'}",
                    where,
                    "fix the question, or leave it out",
                )


def check_is_tokenizer(tokenizer: object) -> None:
    """A loaded tokenizer (one with ``encode`` and ``bos_id``): a path or ``None`` failed with an AttributeError."""
    if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "bos_id")):
        raise ConfigError(
            f"tokenizer must be a loaded tokenizer, not a {type(tokenizer).__name__}",
            "tokenizer",
            "load it with epas_lightning.data.load_tokenizer(path)",
        )


def check_questions(questions: list[Question]) -> None:
    """At least one :class:`Question`, each with a label that indexes its choices (``load_task`` checks its own; one
    built in Python was scored as wrong, or failed with a ZeroDivisionError when there was none)."""
    if not questions:
        raise DataError("no questions to evaluate", "questions", "pass the questions load_task(path) reads")
    for n, question in enumerate(questions):
        where = question.where if isinstance(question, Question) and question.where else f"questions[{n}]"
        if not isinstance(question, Question):
            raise DataError(
                f"a question must be a Question, not a {type(question).__name__}",
                where,
                "read them with load_task(path), or build Question(context, choices, label)",
            )
        if not (is_whole_number(question.label) and 0 <= question.label < len(question.choices)):
            raise DataError(
                f"label {question.label!r} is not the index of one of its {len(question.choices)} choices",
                where,
                f"set it to 0..{len(question.choices) - 1}",
            )


def evaluate_task(model: Llama, tokenizer, questions: list[Question], batch_size: int = 16) -> dict[str, float]:  # noqa: ANN001
    """``acc`` and ``acc_norm`` (per-character normalised) of ``model`` on ``questions`` (:func:`load_task`'s), their
    texts encoded with ``tokenizer`` (``load_tokenizer(path)``'s)."""
    check_is_llama(model)
    check_has_weights(model)
    check_counts({"batch_size": batch_size})
    check_is_tokenizer(tokenizer)
    check_questions(questions)
    encode = request_encoder(tokenizer)
    requests = [encode_pair(tokenizer, q.context, choice, encode) for q in questions for choice in q.choices]
    check_scorable(questions, requests, model.config)
    scores = score_continuations(model, requests, batch_size)
    correct = correct_norm = 0
    at = 0
    for question in questions:
        n = len(question.choices)
        logliks = np.array([s for s, _ in scores[at : at + n]])
        lengths = np.array([float(len(c)) for c in question.choices])
        with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice: -inf, as lm-eval divides (numpy's)
            normed = logliks / lengths
        correct += int(np.argmax(logliks) == question.label)
        correct_norm += int(np.argmax(normed) == question.label)
        at += n
    return {"acc": correct / len(questions), "acc_norm": correct_norm / len(questions), "n": len(questions)}
