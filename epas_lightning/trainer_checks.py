"""Checks of the ``trainer`` settings before anything is built: values Lightning refuses only once it runs (inside
its loops, with a traceback), or takes and then trains or scores nothing with."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch
from jsonargparse import Namespace

from epas_lightning.errors import ConfigError

COUNTS_AT_LEAST_ONE = {
    "val_check_interval": "set 1 or more (trainer.limit_val_batches: 0 trains without validation)",
    "check_val_every_n_epoch": "set 1 or more (trainer.limit_val_batches: 0 trains without validation)",
    "accumulate_grad_batches": "set 1 (no accumulation) or more",
}
"""Trainer counts that Lightning divides by, inside its loops (0 was a ZeroDivisionError traceback), and the fix."""


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_counts(trainer: Namespace) -> None:
    """Refuse a count of :data:`COUNTS_AT_LEAST_ONE` below 1 before anything is built."""
    for key, fix in COUNTS_AT_LEAST_ONE.items():
        if _whole(value := trainer.get(key)) and value < 1:
            raise ConfigError(f"trainer.{key} must be at least 1, not {value}", f"trainer.{key}", fix)


def check_gradient_clip(value: object) -> None:
    """A NaN ``gradient_clip_val`` (YAML's ``.nan``, or ``Trainer(gradient_clip_val=float("nan"))``) is no number at
    or below 0, Lightning's "no clipping": it made every gradient NaN, and the run stopped as diverged, blaming the
    learning rate. (+inf clips nothing; -inf, as 0 and below, is "no clipping".)"""
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(
            "trainer.gradient_clip_val must be a number, not nan",
            "trainer.gradient_clip_val",
            "set a positive number, or leave it unset for no clipping",
        )


def check_validation_interval(trainer: Namespace) -> None:
    """A validation interval in batches must fit in an epoch that ``limit_train_batches`` (or ``overfit_batches``,
    which replaces it) caps; Lightning checks this only once the data is set up, with a traceback. ``fast_dev_run``
    sets its own interval."""
    overfit = trainer.get("overfit_batches")
    cap = "overfit_batches" if _whole(overfit) and overfit > 0 else "limit_train_batches"
    interval, limit = trainer.get("val_check_interval"), trainer.get(cap)
    checked = trainer.get("check_val_every_n_epoch") is not None and not trainer.get("fast_dev_run")
    if _whole(interval) and _whole(limit) and checked and 0 < limit < interval:  # below 0: Lightning refuses it
        raise ConfigError(
            f"trainer.val_check_interval ({interval}) is longer than an epoch of {limit} training batches "
            f"(trainer.{cap})",
            "trainer.val_check_interval",
            "lower it, or set trainer.check_val_every_n_epoch: null to count batches across epochs",
        )


def check_scores_something(subcommand: str | None, trainer: Namespace) -> None:
    """``validate`` with ``limit_val_batches: 0`` (``test`` with ``limit_test_batches: 0``, ``fit`` with
    ``limit_train_batches``, ``max_steps`` or ``max_epochs`` 0) ended with status 0, having scored (trained) nothing."""
    key = {"validate": "limit_val_batches", "test": "limit_test_batches", "fit": "limit_train_batches"}.get(
        subcommand or ""
    )
    if key and trainer.get(key) == 0 and not isinstance(trainer.get(key), bool):
        does = "train" if subcommand == "fit" else "score"
        raise ConfigError(
            f"trainer.{key} is 0: {subcommand} would {does} no batch", f"trainer.{key}", "set it to 1 or more, or null"
        )
    for limit in ("max_steps", "max_epochs") if subcommand == "fit" else ():
        if _whole(trainer.get(limit)) and trainer.get(limit) == 0:  # ended with status 0, having trained nothing
            raise ConfigError(
                f"trainer.{limit} is 0: fit would train no step",
                f"trainer.{limit}",
                "set it to 1 or more, or -1 for no limit",
            )


def check_precision_available(precision: object) -> None:
    """Refuse a Transformer Engine precision when the package is missing (Lightning raised a ModuleNotFoundError)."""
    if str(precision).startswith("transformer-engine") and importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError(
            "this precision needs NVIDIA Transformer Engine, which is not installed",
            f"trainer.precision: {precision}",
            "install transformer_engine (GPUs only) or train in bf16-mixed",
        )


def check_accelerator_available(accelerator: object) -> None:
    """Refuse ``trainer.accelerator`` gpu/cuda without a visible CUDA GPU, and tpu without torch_xla (Lightning's
    traceback), before anything is built."""
    if isinstance(accelerator, str) and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "no CUDA GPU is visible to this process",
            f"trainer.accelerator: {accelerator}",
            "run on a machine with a GPU, or pass --trainer.accelerator=cpu (CPUs train best in 32-true)",
        )
    if accelerator == "tpu" and importlib.util.find_spec("torch_xla") is None:
        raise ConfigError(
            "the tpu accelerator needs torch_xla, which is not installed",
            "trainer.accelerator: tpu",
            "install torch_xla on a TPU machine, or pass --trainer.accelerator=cpu",
        )
