"""Multiple-choice accuracy by log-likelihood scoring, as lm-eval-harness does it, on local JSONL tasks.

A task is a JSONL file, one question a line: ``{"context": "...", "choices": [" a", " b", ...], "label": 1}``.
Each choice is scored by the sum of the log-probabilities of its tokens following the context (BOS + context,
then the choice, tokenized separately as lm-eval-harness does; write the separating space into the choices).

- ``acc``: the choice with the highest summed log-likelihood is the answer.
- ``acc_norm``: the summed log-likelihood divided by the choice's length in characters (lm-eval-harness's
  ``acc_norm``), which removes the bias towards short answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from epas_lightning.model import Llama


@dataclass
class Question:
    context: str
    choices: list[str]
    label: int


def load_task(path: str | Path) -> list[Question]:
    """Read a JSONL task, naming the line of any malformed question."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Task file {path} does not exist.")
    questions = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            question = Question(str(item["context"]), [str(c) for c in item["choices"]], int(item["label"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected {{'context', 'choices', 'label'}}: {e}") from e
        if not 0 <= question.label < len(question.choices) or len(question.choices) < 2:
            raise ValueError(f"{path}:{n}: label {question.label} is not one of {len(question.choices)} choices.")
        questions.append(question)
    if not questions:
        raise ValueError(f"Task file {path} holds no questions.")
    return questions


@torch.no_grad()
def score_continuations(
    model: Llama, requests: list[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-prob of the continuation and whether it is greedy.

    Sequences longer than ``block_size`` are cut from the left (the continuation is always kept whole). Requests are
    batched longest first and right-padded; padding never influences a scored position (causal attention).
    """
    block = model.config.block_size
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
                raise ValueError(f"A continuation of {len(continuation)} tokens exceeds block_size={block}.")
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
            results[i] = (total, bool((predicted.argmax(-1) == target_t).all()))
    return results  # type: ignore[return-value]


def evaluate_task(model: Llama, tokenizer, questions: list[Question], batch_size: int = 16) -> dict[str, float]:  # noqa: ANN001
    """``acc`` and ``acc_norm`` (per-character normalised) of ``model`` on ``questions``."""
    requests = []
    for question in questions:
        context = [tokenizer.bos_id] + tokenizer.encode(question.context)
        for choice in question.choices:
            requests.append((context, tokenizer.encode(choice)))
    scores = score_continuations(model, requests, batch_size)
    correct = correct_norm = 0
    at = 0
    for question in questions:
        n = len(question.choices)
        logliks = [s for s, _ in scores[at : at + n]]
        normed = [s / max(1, len(c)) for s, c in zip(logliks, question.choices, strict=True)]
        correct += int(max(range(n), key=logliks.__getitem__) == question.label)
        correct_norm += int(max(range(n), key=normed.__getitem__) == question.label)
        at += n
    return {"acc": correct / len(questions), "acc_norm": correct_norm / len(questions), "n": len(questions)}
