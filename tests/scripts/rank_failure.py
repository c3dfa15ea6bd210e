"""Test callbacks: rank 0 fails with a user error while rank 1 is stuck (as in an NCCL collective that never ends).

Used by ``tests/test_distributed.py`` through ``--trainer.callbacks+=rank_failure.FailOnRankZero`` (this folder on
``PYTHONPATH``). Rank 1 writes its process id to ``$EPAS_TEST_PID_FILE`` and sleeps; rank 0 waits for that file, then
raises. Rank 1 never ends on its own, so the grace ``EndChildRanksOnError`` gives it is cut to half a second (the
default 5 s would only be waited out). ``FailOnRankOne``: rank 1 fails with a user error while rank 0 trains on, and
meets it only at its next collective, later than Lightning's observer polls (its 5 s). ``FailOnRankOneAtStart``: rank 1
fails with a user error as its command starts, before it joins the process group, which rank 0 waits in.
"""

import os
import time
from pathlib import Path

from lightning.pytorch import Callback

from epas_lightning.child_ranks import EndChildRanksOnError
from epas_lightning.errors import UserError


class FailOnRankZero(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pid_file = Path(os.environ["EPAS_TEST_PID_FILE"])
        if trainer.global_rank == 1:
            pid_file.write_text(str(os.getpid()))
            time.sleep(300)
        while not pid_file.exists():
            time.sleep(0.1)
        for callback in trainer.callbacks:
            if isinstance(callback, EndChildRanksOnError):
                callback.grace_seconds = 0.5
        raise UserError("a failure only rank 0 sees", "rank 0", "nothing: this is a test")


class FailOnRankOne(Callback):
    """Rank 1 alone meets a user error at its first step (a data folder only it cannot read); rank 0 trains on, and
    its step takes longer than Lightning's observer waits between polls (a long step, a slow machine)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 1:
            raise UserError("cannot read the data folder", "rank 1", "make it readable on every node")
        (child,) = trainer.strategy.launcher.procs
        while child.poll() is None:
            time.sleep(0.1)
        time.sleep(6.5)  # Lightning's observer polls every 5 s


class FailOnRankOneAtStart(Callback):
    """Rank 1 alone meets a user error as its command reads its options (which builds this callback), before it joins
    the process group: rank 0 waits for it there, in a rendezvous that cannot end. (Lightning's launcher sets
    ``LOCAL_RANK`` for the ranks it starts, after rank 0 built its own callbacks.)"""

    def __init__(self) -> None:
        if os.environ.get("LOCAL_RANK") == "1":
            raise UserError("cannot read the data folder", "rank 1", "make it readable on every node")
