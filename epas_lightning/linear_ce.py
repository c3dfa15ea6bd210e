"""LM head + cross-entropy chunk by chunk over tokens: the (N, V) logits of a batch never exist at once.

For each chunk of rows the forward computes the logits, their log-softmax and the loss, and right away the gradients
(softmax - one-hot), which it turns into the chunk's gradient of the hidden states and adds to the LM-head weight's;
the logits chunk is freed before the next one. Backward only scales the stored gradients, in place, by the incoming
one, so a graph can be backpropagated through once (a second ``backward`` after ``retain_graph=True`` raises). The
matmuls are those of the plain path (one forward, two backward), so no work is recomputed; what stays allocated past
the loss is the two gradients instead of the logits (and their fp32 copies, softmax and gradient).

Mean over the targets that are not ``ignore_index``, as ``F.cross_entropy``; log-softmax in fp32 whatever the
compute dtype (under autocast the inputs are cast to its dtype, as ``F.linear`` would be). In 16-bit compute the
LM-head weight gradient is summed over chunks in that dtype (as Liger's fused kernel does by default), so it rounds
once per chunk where the plain path rounds once: fewer chunks, closer to the plain path (benchmarks/RESULTS.md). In
fp16 (``16-mixed``) the 1/N mean over the tokens would underflow before GradScaler's scale could lift the gradients:
the hidden-state gradient is kept in fp32 until the loss scale is applied, and the weight gradient is summed times a
power of two that keeps it in fp16's normal range without overflow (divided out when the loss scale arrives).

``compile``: the chunk's softmax and its gradient, the elementwise work between the matmuls, run as one
``torch.compile``d function (a reduction and one pointwise pass over the logits in the compute dtype) instead of
eager kernels that each read and write an fp32 copy of the chunk; the matmuls are the same. Same loss and gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

IGNORE_INDEX = -100

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk (fp32: 64 MiB): rows per chunk = CHUNK_ELEMENTS // vocabulary, at least one. Fewer, larger
chunks are faster: each chunk's weight-gradient matmul reads and writes the whole (V, C) gradient once."""


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int | None = None,
    chunk_rows: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    compile: bool | str = False,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight[:vocab_size].T, targets)`` without materialising the logits.

    Args:
        hidden: (..., C) final hidden states (after the last norm).
        weight: (V_pad, C) LM-head weight.
        targets: (...) token ids in ``[0, vocab_size)`` or ``ignore_index``.
        vocab_size: The softmax runs over the first ``vocab_size`` rows (default all); the padding rows after them
            get a zero gradient.
        chunk_rows: Tokens per chunk; default: the fewest chunks of at most ``CHUNK_ELEMENTS // vocab_size`` rows,
            made equal (one shape for ``compile``).
        compile: Fuse each chunk's softmax and gradient with ``torch.compile`` (``True``: inductor, a string names
            another backend).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    vocab_size = vocab_size or weight.shape[0]
    hidden = hidden.flatten(0, -2)  # (N, C)
    rows = chunk_rows or balanced_rows(hidden.shape[0], max(1, CHUNK_ELEMENTS // vocab_size))
    nll_and_grad = _compiled(compile) if compile else _nll_and_grad
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden, weight, targets.flatten().long(), vocab_size, rows, ignore_index, nll_and_grad
        )


def balanced_rows(n_rows: int, most: int) -> int:
    """Rows per chunk for the fewest chunks of at most ``most`` rows, as equal as possible (8192 tokens at 524 rows
    most: 16 chunks of 512, not 15 of 524 and one of 332)."""
    n_chunks = -(-n_rows // most)
    return -(-n_rows // n_chunks)


def _nll_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) negative log-likelihoods in fp32 and d(their sum)/d(logits) = softmax - one-hot (n, V) in the logits'
    dtype, for logits (n, V) and targets (n, 1); eager and in place, one fp32 copy of the chunk at a time."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (n, V), fp32
    nll = -logp.gather(1, targets).squeeze(1)  # (n,)
    probs = logp.exp_()  # softmax, in place
    probs.scatter_add_(1, targets, probs.new_full(targets.shape, -1.0))  # - one-hot
    return nll, probs.to(logits.dtype)


def _nll_and_grad_pointwise(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_nll_and_grad`` written without in-place ops, for ``torch.compile`` to fuse into a reduction and one
    pointwise pass (the one-hot is a comparison, not a scatter into a copy of the chunk)."""
    x = logits.float()  # (n, V)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (n, 1)
    nll = (lse - x.gather(1, targets)).squeeze(1)  # (n,)
    one_hot = torch.arange(x.shape[1], device=x.device) == targets  # (n, V)
    return nll, (torch.exp(x - lse) - one_hot.float()).to(logits.dtype)


@functools.cache
def _compiled(backend: bool | str) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return torch.compile(_nll_and_grad_pointwise, backend="inductor" if backend is True else backend, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, rows, ignore_index, nll_and_grad):  # noqa: ANN001, ANN205
        # hidden (N, C), weight (V_pad, C), targets (N,)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_weight = torch.empty_like(weight) if want_weight else None  # (V_pad, C)
        if want_weight and vocab_size < weight.shape[0]:
            grad_weight[vocab_size:].zero_()  # padding rows take no part in the softmax
        weight = weight[:vocab_size]  # (V, C)
        valid = targets != ignore_index  # (N,)
        safe_targets = torch.where(valid, targets, 0).unsqueeze(1)  # (N, 1)
        scale = valid / valid.sum()  # (N,): each valid token's weight in the mean, 0 where ignored
        loss = hidden.new_zeros((), dtype=torch.float32)
        # fp16 (16-mixed): the gradients, scaled by 1/N long before the loss scale arrives, would underflow
        wide = hidden.dtype == torch.float16
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32 if wide else None) if want_hidden else None
        weight_scale = _fp16_weight_grad_scale(hidden) if want_weight and wide else None
        for start in range(0, hidden.shape[0], rows):
            end = min(start + rows, hidden.shape[0])
            h = hidden[start:end]  # (n, C)
            logits = h @ weight.T  # (n, V)
            if not (want_hidden or want_weight):
                nll = -torch.log_softmax(logits.float(), dim=-1).gather(1, safe_targets[start:end]).squeeze(1)
                loss += (nll * scale[start:end]).sum()
                continue
            # g: d(sum of nll)/d(logits); the per-token scale goes on the (n, C) side
            nll, g = nll_and_grad(logits, safe_targets[start:end])  # (n,), (n, V)
            loss += (nll * scale[start:end]).sum()
            del logits
            chunk_scale = scale[start:end, None].to(weight.dtype)  # (n, 1)
            if want_hidden and wide:
                grad_hidden[start:end] = torch.mm(g, weight).float().mul_(scale[start:end, None])
            elif want_hidden:
                torch.mm(g, weight, out=grad_hidden[start:end]).mul_(chunk_scale)
            if want_weight:  # accumulated by the matmul itself (beta = 1), no (V, C) temporary per chunk
                if weight_scale is None:
                    scaled = h * chunk_scale  # (n, C)
                else:  # the per-token factor in fp32: 1/N alone may be subnormal in fp16
                    scaled = (h * (scale[start:end, None] * weight_scale)).to(h.dtype)
                if start == 0:
                    torch.mm(g.T, scaled, out=grad_weight[:vocab_size])
                else:
                    grad_weight[:vocab_size].addmm_(g.T, scaled)
        ctx.save_for_backward(grad_hidden, grad_weight, weight_scale)
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        if ctx.backward_done:  # the stored gradients were scaled in place by the first backward
            raise RuntimeError(
                "linear_cross_entropy supports one backward per forward: run the forward again instead of "
                "backpropagating a retained graph twice"
            )
        ctx.backward_done = True
        grad_hidden, grad_weight, weight_scale = ctx.saved_tensors
        if weight_scale is not None:
            grad_weight = _times(grad_weight, grad_loss / weight_scale)
            return _times(grad_hidden, grad_loss), grad_weight, None, None, None, None, None
        if grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:  # the usual case; a free check on the host
            return grad_hidden, grad_weight, None, None, None, None, None
        return _times(grad_hidden, grad_loss), _times(grad_weight, grad_loss), None, None, None, None, None


def _fp16_weight_grad_scale(hidden: torch.Tensor) -> torch.Tensor:
    """A power of two (0-dim, fp32) that lifts the fp16 LM-head weight gradient, a mean over the tokens, out of fp16's
    subnormal range while it is summed over chunks, without overflow: each of its entries, and every partial sum over
    chunks, is at most max|hidden| in magnitude (softmax - one-hot is within [-1, 1]), so at most 2^15 once scaled."""
    low, high = torch.aminmax(hidden)
    amax = torch.maximum(-low, high).float()
    return torch.exp2(torch.floor(torch.log2(2.0**15 / amax))).clamp_(max=2.0**64)  # an all-zero hidden: any scale


def _times(grad: torch.Tensor | None, grad_loss: torch.Tensor) -> torch.Tensor | None:
    """``grad * grad_loss``: in place, but an fp16 gradient is scaled in fp32 (GradScaler's 65536 is inf in fp16)."""
    if grad is None:
        return None
    if grad.dtype == torch.float16:
        return (grad.float() * grad_loss).half()
    return grad.mul_(grad_loss.to(grad.dtype))
