"""lm-eval-harness adapter: ``lm_eval --model epas --model_args checkpoint=PATH,sharing_layers=5 --tasks ...``.

``lm_eval`` is optional: importing this module registers the model ``epas`` when it is installed, and otherwise
leaves a plain class whose request handling (the functions below) still works and is tested.
"""

from __future__ import annotations

from typing import Any

import torch

from epas_lightning.evaluation.multiple_choice import score_continuations
from epas_lightning.model import Llama

try:  # pragma: no cover - depends on the optional package
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register_model
except ImportError:
    _LMBase = object

    def _register_model(*names: str):  # noqa: ANN202
        return lambda cls: cls


def _args(request: Any) -> tuple:
    """lm-eval passes ``Instance`` objects whose ``.args`` hold the request; tests pass plain tuples."""
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


def loglikelihood(
    model: Llama, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16
) -> list[tuple[float, bool]]:  # noqa: ANN001
    """(log P(continuation | context), is_greedy) per (context, continuation) text pair; the context starts with BOS.

    As lm-eval-harness, trailing spaces of the context move to the continuation before tokenizing each part.
    """
    requests = []
    for context, continuation in pairs:
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        requests.append(([tokenizer.bos_id] + tokenizer.encode(stripped), tokenizer.encode(continuation)))
    return score_continuations(model, requests, batch_size)


@torch.no_grad()
def loglikelihood_rolling(model: Llama, tokenizer, text: str) -> float:  # noqa: ANN001
    """Total log-likelihood of ``text`` (BOS first), in disjoint windows of ``block_size`` scored tokens.

    Each window after the first is conditioned on up to ``block_size`` preceding tokens (lm-eval's rolling windows
    with full context overlap).
    """
    tokens = [tokenizer.bos_id] + tokenizer.encode(text)
    block = model.config.block_size
    requests = []
    for start in range(1, len(tokens), block):
        end = min(start + block, len(tokens))
        context = tokens[max(0, end - block - 1) : start]
        requests.append((context, tokens[start:end]))
    return sum(score for score, _ in score_continuations(model, requests))


@torch.no_grad()
def generate_until(model: Llama, tokenizer, context: str, until: list[str], max_gen_toks: int = 128) -> str:  # noqa: ANN001
    """Greedy continuation of ``context``, cut before the first stop string (or at EOS / ``max_gen_toks``)."""
    ids = [tokenizer.bos_id] + tokenizer.encode(context)
    device = next(model.parameters()).device
    generated: list[int] = []
    vocab = model.config.vocab_size
    for _ in range(max_gen_toks):
        window = (ids + generated)[-model.config.block_size :]
        logits = model(torch.tensor([window], device=device))[0, -1, :vocab]
        token = int(logits.argmax())
        if token == tokenizer.eos_id:
            break
        generated.append(token)
        text = tokenizer.decode(generated)
        if any(stop in text for stop in until):
            break
    text = tokenizer.decode(generated)
    cut = min((text.find(s) for s in until if s in text), default=len(text))
    return text[:cut]


@_register_model("epas")
class EPASLM(_LMBase):
    """An EPAS checkpoint as an lm-eval-harness model, run with the first ``sharing_layers`` layers of its trained
    region sharing.

    Args:
        checkpoint: ``.ckpt``, FSDP2 checkpoint directory or ``consolidate`` directory.
        sharing_layers: Region length N (default: the trained region); may not exceed it unless ``force``.
        tokenizer: Tokenizer file (default: the one the checkpoint records).
        batch_size: Sequences per forward when scoring.
        device: ``cpu``, ``cuda``, ...
    """

    def __init__(
        self,
        checkpoint: str,
        sharing_layers: int | None = None,
        tokenizer: str | None = None,
        batch_size: int | str = 16,
        device: str = "cpu",
        force: bool = False,
        **kwargs: Any,
    ) -> None:
        if _LMBase is not object:
            super().__init__()
        from epas_lightning.checkpoint import load_model
        from epas_lightning.data import load_tokenizer
        from epas_lightning.inference.generate import set_region

        loaded = load_model(checkpoint, device)
        self.model = loaded.model
        n_shared = loaded.max_shared if sharing_layers is None else int(sharing_layers)
        set_region(loaded.model, n_shared, loaded.region, bool(force))
        path = tokenizer or loaded.tokenizer_path
        if path is None:
            raise ValueError(f"{checkpoint} records no tokenizer: pass model_args tokenizer=PATH.")
        self.tokenizer = load_tokenizer(path)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        return loglikelihood(self.model, self.tokenizer, [_args(r)[:2] for r in requests], self.batch_size)

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        return [loglikelihood_rolling(self.model, self.tokenizer, _args(r)[0]) for r in requests]

    def generate_until(self, requests: list) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = _args(request)[:2]
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            out.append(
                generate_until(self.model, self.tokenizer, context, until, int(gen_kwargs.get("max_gen_toks", 128)))
            )
        return out
