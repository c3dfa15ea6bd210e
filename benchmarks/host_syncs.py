"""Where a training step makes the host wait for the GPU: ``HostSyncWatch``, a callback ``gpu_session.py`` adds to its
``fit`` run. For a few optimizer steps it turns on torch's warning for synchronising CUDA calls
(``torch.cuda.set_sync_debug_mode("warn")``: ``.item()``, ``bool()`` of a device tensor, a blocking copy) and writes,
as JSON, each place that made one, with how often per step: the innermost Python line, and the line of this package
the call came through. A sync per step is not wrong in itself (the divergence guard decides before each update); one
in a hot path of ours that needs none is a stall worth removing. On a machine without CUDA nothing is watched.
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

import epas_lightning
from epas_lightning.runtime import json_text, write_whole

SYNC_WARNING = "called a synchronizing CUDA operation"
"""torch's words for a synchronising call under ``set_sync_debug_mode("warn")``."""
PACKAGE_DIR = Path(epas_lightning.__file__).resolve().parent


class HostSyncWatch(Callback):
    """Count the synchronising CUDA calls of optimizer steps ``first_step .. first_step + steps - 1`` (every
    micro-batch, the logging after each, the data loading before the next) and write them to ``output`` as JSON
    (rank 0), by place.

    Args:
        output: The JSON file to write.
        first_step: The first optimizer step watched (leave compilation and the region's switches out).
        steps: How many optimizer steps to watch.
    """

    def __init__(self, output: str, first_step: int = 33, steps: int = 3) -> None:
        self.output, self.first_step, self.steps = Path(output), first_step, steps
        self.sites: Counter[tuple[str, str]] = Counter()
        self.watched_steps = 0
        self._catch: Any = None
        self._show: Any = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._catch is None and self.first_step <= step < self.first_step + self.steps:
            self._start(step)
        elif self._catch is not None and step >= self.first_step + self.steps:
            self._stop(step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._catch is not None:
            self._stop(trainer.global_step)
        if trainer.is_global_zero:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            write_whole(self.output, json_text(self.report(), indent=1) + "\n")

    def report(self) -> dict:
        """Syncs per watched step in all, and by place (most frequent first)."""
        steps = max(self.watched_steps, 1)
        return {
            "cuda": torch.cuda.is_available(),
            "first_step": self.first_step,
            "watched_steps": self.watched_steps,
            "syncs_per_step": sum(self.sites.values()) / steps,
            "sites": [
                {"ours": ours, "innermost": innermost, "per_step": count / steps}
                for (ours, innermost), count in self.sites.most_common()
            ],
        }

    def _start(self, step: int) -> None:
        self._started_at = step
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()  # puts back the filters and showwarning at _stop
        warnings.simplefilter("always")  # every call counts, not the first of each line
        self._show, warnings.showwarning = warnings.showwarning, self._record
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")

    def _stop(self, step: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(None, None, None)
        self._catch = None
        self.watched_steps += step - self._started_at

    def _record(self, message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None):  # noqa: ANN202
        if SYNC_WARNING not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        frames = traceback.extract_stack()[:-1]  # innermost last, without this function
        while frames and Path(frames[-1].filename).name == "warnings.py":  # how Python reached showwarning
            frames.pop()
        ours = next((f for f in reversed(frames) if Path(f.filename).resolve().is_relative_to(PACKAGE_DIR)), None)
        self.sites[(_place(ours) if ours else "-", _place(frames[-1]) if frames else f"{filename}:{lineno}")] += 1
        return None


def _place(frame: traceback.FrameSummary) -> str:
    """``path:line (function)``, the path relative to the package's parent where it is inside it."""
    path = Path(frame.filename).resolve()
    shown = path.relative_to(PACKAGE_DIR.parent) if path.is_relative_to(PACKAGE_DIR.parent) else path
    return f"{shown}:{frame.lineno} ({frame.name})"
