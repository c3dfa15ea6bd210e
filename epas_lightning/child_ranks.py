"""``EndChildRanksOnError``: when the launching rank fails, the ranks it started end too.

On one node Lightning starts ranks 1..N-1 as child processes of rank 0 (its ``_SubprocessScriptLauncher``). If a
child fails, Lightning's observer ends every rank. If rank 0 fails with anything but Ctrl+C (a user error only it
checks, a full disk when it renames a checkpoint into place, a bug), Lightning re-raises and rank 0 exits while the
children wait in their next collective. Under NCCL that wait lasts until the process group's timeout (30 minutes by
default), holding the GPUs after the command has already printed its error. This callback, on rank 0, gives the
children a few seconds to end on their own (they usually meet the same error and say so), then kills them, as
Lightning does itself after Ctrl+C.

A child that fails first (a user error only it meets, such as a data folder it cannot read) prints its own error and
exits; rank 0's next collective then breaks (gloo: "Connection closed by peer") with a long traceback that buries that
line. :func:`peer_rank_ended` turns it into one line that points at the child's error and takes the child's exit status;
none where a signal stopped the child at once (Ctrl+C, or SIGTERM to it alone while ``fit`` set up), whose own line says
so.

Lightning's observer thread answers a failed child by SIGKILLing every rank, rank 0 included, within its 5 s poll:
rank 0 then died without its line, and with status -9 instead of the child's, whenever its next collective came later
than that poll (a long step, a slow machine), or while it waited for a child that failed before joining the process
group. A :class:`PatientObserver` watches the children instead, from their start where the command built the
``Trainer`` (:func:`watch_from_launch`), else from this callback's ``setup``: rank 0 gets :data:`ANSWER_SECONDS` more to
meet the failure itself. If it has not (stuck in a native wait such as an NCCL collective, which would otherwise wait
out its timeout), the observer ends the children, then rank 0 with that line and the child's status; at once where
rank 0 has not joined the process group yet: it waits in the rendezvous, which neither the failure nor Ctrl+C ends.

Lightning's private names used: ``_SubprocessScriptLauncher`` (its ``procs``, ``cluster_environment``,
``num_processes``) and ``_ChildProcessObserver`` (its ``_child_processes`` and ``_run``), as in Lightning 2.6.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from epas_lightning.errors import UserError, error_line, process_ending

GRACE_SECONDS = 5.0
ANSWER_SECONDS = 15.0
"""How long rank 0 has, after the observer saw a child fail, to meet that failure itself before it is killed."""

PEER_GONE = re.compile(r"Connection (?:closed|reset) by peer|remote process exited")
"""How a collective says another rank's process is gone (gloo's broken connection, NCCL's remote error)."""
STOPPED_AT_ONCE = (128 + signal.SIGINT, 128 + signal.SIGTERM)
"""The exit statuses of a rank the command stopped at once for a signal, with its "interrupted:" line (Ctrl+C, or
SIGTERM to it alone while ``fit`` set up)."""


class PeerRankEnded(UserError):
    """This rank's collective broke because another rank ended first, after saying why on its own stderr."""

    def __init__(self, what: str, where: str, fix: str, exit_status: int) -> None:
        super().__init__(what, where, fix)
        self.exit_status = exit_status

    def __reduce__(self):  # noqa: ANN204 - as UserError's
        return type(self), (self.what, self.where, self.fix, self.exit_status)


class EndChildRanksOnError(Callback):
    """On an exception in the launching process, end the rank processes it started (after ``grace_seconds``)."""

    def __init__(self, grace_seconds: float = GRACE_SECONDS, answer_seconds: float = ANSWER_SECONDS) -> None:
        self.grace_seconds = grace_seconds
        self.answer_seconds = answer_seconds
        self.failed_children: list[tuple[int, int]] = []
        """(global rank, exit status) of the started ranks that had failed before this one's error ended them."""
        self.children_finished = False
        """Whether every rank this one started had exited with status 0 before its error: none of them failed."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
            watch_patiently(launcher.procs, self.answer_seconds, trainer.global_rank)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            return  # Lightning kills the children itself after Ctrl+C
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
            procs = list(launcher.procs)
            # The observer thread watches this same list: emptied before the grace, it leaves this answer to run its
            # course instead of ending this process (Lightning's by SIGKILL) before it has said what went wrong.
            launcher.procs.clear()
            try:
                killed = end_processes(procs, self.grace_seconds)
            except BaseException:  # Ctrl+C in the grace: no observer ends them now
                end_processes(procs, 0.0)
                raise
            ranks = {proc: trainer.global_rank + i + 1 for i, proc in enumerate(procs)}
            self.failed_children = [(r, p.returncode) for p, r in ranks.items() if p.returncode and p not in killed]
            self.children_finished = not killed and all(p.returncode == 0 for p in procs)


class PatientObserver(_ChildProcessObserver):
    """Lightning's observer, except that after a child failed it waits up to ``answer_seconds`` for this process (global
    rank ``rank``) to answer the failure itself (``EndChildRanksOnError.on_exception`` empties the list it watches).
    Unanswered, it ends the children, says which one failed and ends this process with its status: at once where this
    process has not joined the process group (it waits in the rendezvous, which it cannot leave to answer)."""

    def __init__(self, child_processes: list[subprocess.Popen], answer_seconds: float, rank: int) -> None:
        super().__init__(main_pid=os.getpid(), child_processes=child_processes)
        self.answer_seconds = answer_seconds
        self.rank = rank

    def _run(self) -> bool:
        if any(proc.poll() for proc in self._child_processes):  # a child failed: wait for this process to answer
            joined = in_process_group()  # else it waits in the rendezvous, which it cannot leave to answer
            deadline = time.monotonic() + (self.answer_seconds if joined else 0.0)
            while self._child_processes and time.monotonic() < deadline:
                time.sleep(0.1)
            if children := list(self._child_processes):
                self.end_unanswered(children, joined)
        return super()._run()  # an emptied list: done, with nothing killed or said

    def end_unanswered(self, children: list[subprocess.Popen], joined: bool) -> None:
        """End ``children`` and this process, which did not answer a child's failure (``joined``: in the process group,
        else in its rendezvous): one line names the first child that failed (none for one a signal stopped at once: it
        said so), and this process exits with its status."""
        child, status = next((i, p.returncode) for i, p in enumerate(children) if p.returncode)  # not one killed here
        end_processes(children, 0.0)  # the failed ones have exited; the others may wait in a collective
        rank = self.rank + child + 1
        waited = f"still waited for it {self.answer_seconds:g} s later" if joined else "waited for it to join"
        ended = PeerRankEnded(
            f"rank {rank} ended ({process_ending(status)}) during the run",
            f"rank {self.rank}, which {waited}",
            "its own error, above, says why: fix that, then run again",
            128 - status if status < 0 else status,
        )
        if status not in STOPPED_AT_ONCE:
            print(error_line(ended), file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(ended.exit_status)  # the main thread waits where it cannot answer (a rendezvous, a native collective)


def in_process_group() -> bool:
    """Whether this process has joined its process group: before, it waits for the others in a rendezvous (a native
    wait that ends at its timeout, 30 minutes), where a signal cannot stop it and it cannot meet another's failure."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def watch_patiently(procs: list[subprocess.Popen], answer_seconds: float, rank: int) -> None:
    """Let a :class:`PatientObserver` watch ``procs``, started by global rank ``rank``, in place of Lightning's observer
    of that list, which is left a list of its own with nothing in it, so it ends at its next poll without killing
    anything."""
    observers = [t for t in threading.enumerate() if isinstance(t, _ChildProcessObserver)]
    if any(isinstance(t, PatientObserver) and t._child_processes is procs for t in observers):
        return  # this launch's children are watched already (from their start, or a second setup of the same run)
    for observer in observers:
        if observer._child_processes is procs:
            observer._child_processes = []
    PatientObserver(procs, answer_seconds, rank).start()


def watch_from_launch(trainer: Trainer) -> None:
    """Have the ranks that ``trainer``'s launcher starts on this node watched by a :class:`PatientObserver` from their
    start, where an ``EndChildRanksOnError`` is among its callbacks: a child that fails before that callback's
    ``setup`` (as it starts, in the rendezvous, in the data's setup) no longer meets Lightning's observer."""
    watchers = [c for c in trainer.callbacks if isinstance(c, EndChildRanksOnError)]
    launcher = trainer.strategy.launcher
    if watchers and isinstance(launcher, _SubprocessScriptLauncher) and not isinstance(launcher.launch, WatchedLaunch):
        launcher.launch = WatchedLaunch(launcher, watchers[0].answer_seconds)


class WatchedLaunch:
    """A ``_SubprocessScriptLauncher``'s ``launch`` that hands the children it starts to a :class:`PatientObserver`
    before the function it runs: Lightning's observer, started with them, is replaced before its first poll (5 s)."""

    def __init__(self, launcher: _SubprocessScriptLauncher, answer_seconds: float) -> None:
        self.launcher = launcher
        self.answer_seconds = answer_seconds

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        launcher = self.launcher

        def watched(*args: Any, **kwargs: Any) -> Any:
            if launcher.procs:  # none where the cluster starts every process (torchrun, srun)
                rank = launcher.cluster_environment.node_rank() * launcher.num_processes  # this process's
                watch_patiently(launcher.procs, self.answer_seconds, rank)
            return function(*args, **kwargs)

        return type(launcher).launch(launcher, watched, *args, **kwargs)


def end_processes(procs: Sequence[subprocess.Popen], grace_seconds: float) -> list[subprocess.Popen]:
    """Wait up to ``grace_seconds`` in all for ``procs`` to exit, then kill (SIGKILL) the ones still running: those."""
    deadline, killed = time.monotonic() + grace_seconds, []
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # not SIGTERM: a child's GracefulStop would try to save, in collectives with no rank 0
            proc.wait()
            killed.append(proc)
    return killed


def peer_rank_ended(error: BaseException, trainer: Trainer) -> PeerRankEnded | None:
    """The one line for a collective of ``trainer``'s rank broken by another rank's exit (that rank printed its own
    error); ``None`` for any other error. On the rank that started the others, it names the first one that had failed
    and exits with its status; elsewhere (``torchrun``, ``srun``: the launcher names the rank) with status 1.

    ``None`` too where every rank this one started had finished cleanly (one node): no rank failed, this one went on
    into a collective the others never joined, a bug whose traceback stays, with a note that says so."""
    if not isinstance(error, RuntimeError) or not PEER_GONE.search(str(error)):
        return None
    if trainer.num_nodes == 1 and any(
        isinstance(c, EndChildRanksOnError) and c.children_finished for c in trainer.callbacks
    ):
        error.add_note(
            f"The other ranks had all finished (exit status 0) while rank {trainer.global_rank} was still in a "
            "collective they never joined: no rank failed; this is a bug, please report it with this traceback."
        )
        return None
    watchers = [c for c in trainer.callbacks if isinstance(c, EndChildRanksOnError) and c.failed_children]
    this_rank = f"rank {trainer.global_rank}, whose collective broke ({PEER_GONE.search(str(error))[0]})"
    fix = "its own error, above, says why: fix that, then run again"
    if not watchers:
        return PeerRankEnded("another rank ended during the run", this_rank, fix.replace("its", "that rank's"), 1)
    rank, status = watchers[0].failed_children[0]
    ended = PeerRankEnded(
        f"rank {rank} ended ({process_ending(status)}) during the run",
        this_rank,
        fix,
        128 - status if status < 0 else status,
    )
    ended.announce = status not in STOPPED_AT_ONCE  # such a rank said so itself: the command's one line
    return ended
