"""SLURM's requeue signal: which one a run answers, and the ``scontrol requeue`` of the job after the stop.

Lightning's own answer (``SLURMEnvironment(auto_requeue=True)``, on by default under SLURM) saves ``hpc_ckpt_N.ckpt``
from inside the signal handler, wherever the step is (between two parameter updates of the optimizer, mid-way through
gradient accumulation), into the working directory rather than the run's checkpoint folder, and finalizes the loggers
while training goes on. ``GracefulStop`` answers the signal instead, like SIGTERM; these are its SLURM parts.
"""

from __future__ import annotations

import os
import signal
import subprocess

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer


def take_requeue_signal(trainer: Trainer) -> signal.Signals | None:
    """The signal SLURM requeues this run with (``SIGUSR1`` unless the environment names another), or ``None`` when
    the run is not a SLURM job with ``auto_requeue``; Lightning's own handler for it is switched off for this fit.
    Call before Lightning registers its signal handlers (``on_fit_start``)."""
    environment = trainer._accelerator_connector.cluster_environment  # what Lightning's signal connector reads
    if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
        return None
    if environment.requeue_signal is None:
        return None
    environment.auto_requeue = False  # read only when the handlers are registered: restored by give_back
    return signal.Signals(environment.requeue_signal)


def give_back_requeue(trainer: Trainer) -> None:
    """Undo :func:`take_requeue_signal`'s switch (the environment object outlives this fit)."""
    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = True


def slurm_job_id() -> str | None:
    """This job's id as ``scontrol`` names it (``<array job>_<task>`` for a job array task)."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


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
