"""Held-out samples a ``DistributedSampler`` scores twice: it evens a map-style dataset out over the ranks by
repeating its first samples. Lightning gives a validation loader one under ``fit`` on several ranks, and warns only in
``validate`` and ``test``; during ``fit`` the validation loss silently counted the repeats."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data.distributed import DistributedSampler


def repeated_samples(loader: Any) -> tuple[int, int, int] | None:
    """``(repeated, samples, ranks)`` of a loader whose ``DistributedSampler`` (its own, or its batch sampler's)
    repeats samples to give every rank as many; ``None`` where none repeats (one rank, ``drop_last``, a length
    divisible by the ranks, no such sampler)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1 and not sampler.drop_last:
            samples = len(sampler.dataset)
            if repeated := sampler.total_size - samples:
                return repeated, samples, sampler.num_replicas
    return None


def _loaders(loaders: Any) -> list[Any]:
    """``trainer.val_dataloaders`` (one loader, a list or a dict of them) as a list."""
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, list | tuple) else [loaders]


def warn_repeated_validation_samples(trainer: Trainer, metric: str = "val/loss") -> None:
    """During ``fit``, one line for each validation loader whose ``DistributedSampler`` repeats samples into
    ``metric``: how many, and what to do. Call it once the loaders are set up (``on_validation_start``)."""
    if trainer.state.fn != TrainerFn.FITTING:
        return
    loaders = _loaders(trainer.val_dataloaders)
    scored = list(trainer.num_val_batches)  # limit_val_batches applied, of each loader in the same order
    for i, loader in enumerate(loaders):
        if (found := repeated_samples(loader)) is None or (i < len(scored) and scored[i] < len(loader)):
            continue  # the repeats end each rank's samples: a validation that stops before the last batch has none
        repeated, samples, ranks = found
        which = f"validation dataloader {i}" if len(loaders) > 1 else "the validation dataloader"
        rank_zero_warn(
            f"{metric} during fit counts {repeated} repeated sample{'s' * (repeated > 1)} beside the {samples} "
            f"held-out ones of {which}: its DistributedSampler repeats samples to give each of the {ranks} ranks "
            f"{(samples + repeated) // ranks}; "
            f"use TokenDataModule (every held-out sample once on any number of ranks), a dataset length divisible by "
            f"{ranks}, or a DistributedSampler(..., drop_last=True) of your own (it leaves {samples % ranks} out)"
        )
