"""What a run prints of Lightning's INFO lines and warnings: those that mislead here left out, ours as plain lines."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

IGNORED_WARNINGS = (
    # The token loader reads memory-mapped chunks in the main process far faster than any model trains.
    r".*does not have many workers which may be a bottleneck.*",
    # litdata's streams know their length per rank and worker; the generic caution does not apply.
    r".*Your `IterableDataset` has `__len__` defined.*",
    # Lightning's own use of a torch API that torch deprecated; nothing a user can change.
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # Materialising a meta-device model on CPU runs nn.Linear's own random init on sharded weights; `init_weights`
    # then draws every weight again, whole, so the model does not depend on that init or on the rank count.
    r".*DTensor random operators may not have complete support on cpu device mesh.*",
    # A resume without --trainer.max_time drops the time limit its checkpoint ran under: the user's choice, not a
    # callback missing (only when the Timer is the one callback the checkpoint has and the run lacks).
    r".*Please add the following callbacks: \['Timer'\]\.$",
)
"""Warnings no user can act on here, ignored in every run."""
QUIET_INFO = (
    "Skipping setting a default `ModelSummary`",  # we install our own summary on purpose
    "Tip: For seamless cloud logging",  # an advertisement
)
"""Lightning's INFO lines left out of every run."""
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
PACKAGE_DIR = Path(__file__).resolve().parent
"""Where our warnings come from (:func:`print_our_warnings_as_lines`)."""
SCORING_QUIET_INFO = ("Restoring states from the checkpoint path at",)
"""``validate``/``test --ckpt_path``: nothing is resumed; Lightning's next line says it loaded the file's weights."""
SCORING_QUIET_WARNINGS = (
    r"The dirpath has changed from .* won't be reloaded",
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
)
"""``validate``/``test --ckpt_path``: they write no checkpoints (from another version folder too) and restore no
callback state (from callbacks configured otherwise too)."""
RESUMING_QUIET_WARNINGS = (r"Checkpoint directory .* exists and is not empty",)
"""``fit`` resuming into the folder its checkpoint came from: that folder is meant to hold the run's checkpoints."""
RESUMING_ELSEWHERE_QUIET_WARNINGS = (r"The dirpath has changed from .* won't be reloaded",)
"""``fit`` resuming into another checkpoint folder than its checkpoint's (a new version folder, that of a copy): the
checkpoints there are this run's alone, as meant, and those of the run it came from stay."""


class QuietInfo(logging.Filter):
    """Leaves out the log records whose message contains one of ``texts``."""

    def __init__(self, texts: tuple[str, ...] = QUIET_INFO) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


@contextmanager
def quiet_messages(info: tuple[str, ...], warning_patterns: tuple[str, ...]) -> Iterator[None]:
    """Leave out Lightning's INFO lines containing one of ``info`` and the warnings matching ``warning_patterns``."""
    quiet = QuietInfo(info)
    # Lightning's loggers print through their own handler, or through the root logger's where it has one
    handlers = [handler for name in (*LIGHTNING_LOGGERS, None) for handler in logging.getLogger(name).handlers]
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            for pattern in warning_patterns:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def print_our_warnings_as_lines() -> None:
    """Our warnings (``rank_zero_warn`` in the callbacks, the module) print as their message alone, like our log lines:
    Lightning formats every warning from a path containing "lightning" as ``<file>:<line>: <message>``, ours too."""
    previous = warnings.formatwarning
    if getattr(previous, "ours", False):
        return

    def format_warning(message, category, filename, lineno, line=None):  # noqa: ANN001, ANN202
        if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
            return f"{message}\n"
        return previous(message, category, filename, lineno, line)

    format_warning.ours = True
    warnings.formatwarning = format_warning
