"""``EndChildRanksOnError``: when the launching rank fails, the ranks it started end too.

On one node Lightning starts ranks 1..N-1 as child processes of rank 0 (its ``_SubprocessScriptLauncher``). If a
child fails, Lightning's observer ends every rank. If rank 0 fails with anything but Ctrl+C (a user error only it
checks, a full disk when it renames a checkpoint into place, a bug), Lightning re-raises and rank 0 exits while the
children wait in their next collective. Under NCCL that wait lasts until the process group's timeout (30 minutes by
default), holding the GPUs after the command has already printed its error. This callback, on rank 0, gives the
children a few seconds to end on their own (they usually meet the same error and say so), then kills them, as
Lightning does itself after Ctrl+C.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

GRACE_SECONDS = 5.0


class EndChildRanksOnError(Callback):
    """On an exception in the launching process, end the rank processes it started (after ``grace_seconds``)."""

    def __init__(self, grace_seconds: float = GRACE_SECONDS) -> None:
        self.grace_seconds = grace_seconds

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            return  # Lightning kills the children itself after Ctrl+C
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
            end_processes(launcher.procs, self.grace_seconds)
            # Lightning's observer thread watches this same list: emptied, it stops instead of answering the killed
            # children by SIGKILLing this process before it has said what went wrong.
            launcher.procs.clear()


def end_processes(procs: Sequence[subprocess.Popen], grace_seconds: float) -> None:
    """Wait up to ``grace_seconds`` in all for ``procs`` to exit, then kill (SIGKILL) the ones still running."""
    deadline = time.monotonic() + grace_seconds
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # not SIGTERM: a child's GracefulStop would try to save, in collectives with no rank 0
            proc.wait()
