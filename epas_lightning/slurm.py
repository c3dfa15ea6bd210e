"""SLURM's requeue signal: which one a run answers, and the ``scontrol requeue`` of the job after the stop.

Lightning's own answer (``SLURMEnvironment(auto_requeue=True)``, on by default under SLURM) saves ``hpc_ckpt_N.ckpt``
from inside the signal handler, wherever the step is (between two parameter updates of the optimizer, mid-way through
gradient accumulation), into the working directory rather than the run's checkpoint folder, and finalizes the loggers
while training goes on. ``GracefulStop`` answers the signal instead, like SIGTERM; these are its SLURM parts.

The signal's default action ends the process, and SLURM sends it whenever the time limit nears, also while ``fit`` is
still importing, building the model or validating before its first step; :func:`remembering_requeue_signal` keeps it
from the start of the command until ``GracefulStop`` answers it. This module imports Lightning only when called, so
that the command can install that handler before the slow imports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

REQUEUE_SIGNAL = signal.SIGUSR1
"""The signal ``--signal=USR1@<seconds>`` sends, and Lightning's ``SLURMEnvironment`` answers by default."""

_remembered: list[signal.Signals] = []
_received_at: list[float] = []


def take_requeue_signal(trainer: Trainer) -> signal.Signals | None:
    """The signal SLURM requeues this run with (``SIGUSR1`` unless the environment names another), or ``None`` when
    the run is not a SLURM job with ``auto_requeue``; Lightning's own handler for it is switched off for this fit.
    Call before Lightning registers its signal handlers (``on_fit_start``)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = trainer._accelerator_connector.cluster_environment  # what Lightning's signal connector reads
    if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
        return None
    if environment.requeue_signal is None:
        return None
    environment.auto_requeue = False  # read only when the handlers are registered: restored by give_back
    return signal.Signals(environment.requeue_signal)


def give_back_requeue(trainer: Trainer) -> None:
    """Undo :func:`take_requeue_signal`'s switch (the environment object outlives this fit)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = True


def is_slurm_task() -> bool:
    """Whether Lightning takes this process for a task ``srun`` started (``SLURMEnvironment.detect``'s rule)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


@contextmanager
def remembering_requeue_signal() -> Iterator[None]:
    """Within, a SLURM task remembers the requeue signal instead of ending (its default action) until something else
    answers it: ``GracefulStop`` stops ``fit`` before its first step when it was remembered (:func:`remembered`)."""
    if not is_slurm_task() or threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(REQUEUE_SIGNAL) != signal.SIG_DFL:  # a handler of the caller's own answers it
        yield
        return
    signal.signal(REQUEUE_SIGNAL, _remember)
    try:
        yield
    finally:
        if signal.getsignal(REQUEUE_SIGNAL) is _remember:
            signal.signal(REQUEUE_SIGNAL, signal.SIG_DFL)
        _remembered.clear()
        _received_at.clear()


def _remember(signum: int, frame: Any) -> None:
    if not _remembered:  # only a flag: GracefulStop has the ranks agree on it before the first step
        _remembered.append(signal.Signals(signum))
        _received_at.append(time.time())


def remembered() -> signal.Signals | None:
    """The requeue signal received while :func:`remembering_requeue_signal` was the handler, if it came."""
    return _remembered[0] if _remembered else None


def step_aside() -> signal.Signals | None:
    """Give the requeue signal its default action back (a run that leaves it to Lightning); :func:`remembered`."""
    if signal.getsignal(REQUEUE_SIGNAL) is _remember:
        signal.signal(REQUEUE_SIGNAL, signal.SIG_DFL)
    return remembered()


def slurm_job_id() -> str | None:
    """This job's id as ``scontrol`` names it (``<array job>_<task>`` for a job array task)."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def restart_count() -> int:
    """How many times this job was requeued (or restarted after a node failure): ``SLURM_RESTART_COUNT``, else 0."""
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(count) if count.isdigit() else 0


def signal_timing() -> str:
    """When the requeue signal came, against the job's start and time limit (``SLURM_JOB_START_TIME``,
    ``SLURM_JOB_END_TIME``), in words; empty when SLURM does not say."""
    start, end = (os.environ.get(name, "") for name in ("SLURM_JOB_START_TIME", "SLURM_JOB_END_TIME"))
    if not (start.isdigit() and end.isdigit()):
        return ""
    came, start_s, end_s = _received_at[0] if _received_at else time.time(), int(start), int(end)
    return f"{came - start_s:.0f} s into this run and {end_s - came:.0f} s before its time limit of {end_s - start_s} s"


def requeue_job() -> str:
    """``scontrol requeue`` this job; what happened, in words."""
    job_id = slurm_job_id()
    if not job_id:
        return "no SLURM_JOB_ID: the job was not requeued"
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`scontrol requeue {job_id}` failed ({type(e).__name__}): the job was not requeued"
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        return f"`scontrol requeue {job_id}` failed ({detail[-1] if detail else result.returncode}): not requeued"
    return f"SLURM job {job_id} requeued"
