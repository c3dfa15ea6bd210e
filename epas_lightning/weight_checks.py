"""Checks of a model's weights before anything runs, exports or trains them: NaN and inf, values past the range of a
dtype, and names and shapes against the model they are loaded into."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from epas_lightning.errors import CheckpointError, listed
from epas_lightning.hf.convert import HFCheckpointError, hf_named

CHECK_ELEMENTS = 1 << 22
"""Elements checked for NaN and inf at once (:func:`is_finite_tensor`)."""


def check_finite(state: Mapping[str, torch.Tensor], where: object) -> None:
    """Refuse weights holding NaN or inf (meta tensors are not checked): nothing should run, export or train them."""
    refuse_not_finite(not_finite(state), where)


def not_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The floating-point tensors of ``state`` holding NaN or inf (meta tensors are not checked)."""
    return [
        key for key, t in state.items() if t.is_floating_point() and t.device.type != "meta" and not is_finite_tensor(t)
    ]


NOT_FINITE_FIX = (
    "use another checkpoint, e.g. an earlier one of the run (fit's divergence guard never writes such weights)"
)


def refuse_not_finite(bad: list[str], where: object) -> None:
    """Refuse the weights named ``bad`` (:func:`not_finite`), if any."""
    if bad:
        raise CheckpointError(f"the weights hold NaN or inf ({listed(bad)})", where, NOT_FINITE_FIX)


def is_finite_tensor(t: torch.Tensor) -> bool:
    """Whether the floating-point tensor ``t`` holds no NaN or inf, checked :data:`CHECK_ELEMENTS` at a time: the
    check's temporaries (``isfinite`` takes the absolute value, then compares) stay small beside a large tensor; an
    fp8 chunk (``isfinite`` has no kernel for it) is checked as fp32."""
    chunks = t.reshape(-1).split(CHECK_ELEMENTS)
    widen = t.element_size() == 1  # the float8 dtypes
    finite = [torch.isfinite(chunk.float() if widen else chunk).all() for chunk in chunks]
    return bool(torch.stack(finite).all()) if finite else True


def past_range(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> list[str]:
    """The tensors of ``state`` that a cast to ``dtype`` would turn into inf, each with its largest magnitude. Tensors
    of a dtype no wider than ``dtype`` are skipped; the others are reduced once each, without a copy."""
    over = []
    for key, t in state.items():
        if not t.is_floating_point() or t.device.type == "meta" or torch.finfo(t.dtype).max <= torch.finfo(dtype).max:
            continue
        low, high = torch.aminmax(t)
        peak = torch.maximum(-low, high)
        if bool(torch.isinf(peak.to(dtype))):  # the largest magnitude rounds past the range, as the cast would round
            over.append(f"{key} max |value| {float(peak):.3g}")
    return over


def state_mismatch(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], shown: int = 3, by: str = "the model has"
) -> str:
    """What keeps ``given`` from loading into a model whose state is ``expected`` ("" when it fits): each kind of
    problem with its count and first few names, so that a large model's 300 missing keys stay one readable line.
    ``by`` says whose the expected shapes are."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    reshaped = [
        f"{key} {list(given[key].shape)} where {by} {list(expected[key].shape)}"
        for key in expected
        if key in given and given[key].shape != expected[key].shape
    ]
    kinds = (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped))
    return "; ".join(f"{kind}: {listed(names, shown)}" for kind, names in kinds if names)


def hf_misfit(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], where: object
) -> HFCheckpointError:
    """The error for an HF folder whose weights (``given``, by our names) are not those of the model its config.json
    describes (``expected``): each tensor named as the folder names it."""
    mismatch = state_mismatch(hf_named(expected), hf_named(given), by="config.json makes")
    return HFCheckpointError(
        f"its config.json and weights disagree ({mismatch})",
        where,
        "make config.json describe the weights beside it (or copy the model folder again: both files from one model)",
    )
