"""Whether the processes of a ``fit`` can meet: the ones a launcher started (``torchrun``, ``srun``) against
``trainer.devices`` x ``trainer.num_nodes``, and a run over several nodes started without a launcher.

Lightning compares them only in the launcher it runs itself (DDP's), with a traceback. Under FSDP2, torchrun's extra
processes failed with an ``IndexError`` (or a ``RuntimeError`` about the mesh) while the first one waited; with the
default ``devices: 1`` every process trained a model of its own, all into the same run folder, and exited 0. A
``num_nodes`` above 1 with no launcher waited half an hour for nodes that could not know the port it had picked; a
SLURM environment missing ``SLURM_PROCID`` or its siblings (a task not started by ``srun``) was a ``KeyError``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from lightning.fabric.plugins.environments import (
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from epas_lightning.errors import ConfigError

if TYPE_CHECKING:
    from lightning.fabric.plugins.environments import ClusterEnvironment
    from lightning.pytorch import Trainer

SLURM_TASK_VARIABLES = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID")
"""What ``srun`` sets for each task it starts, and Lightning reads for a rank's place."""
WHERE = "trainer.devices, trainer.num_nodes"


NODE_RANK_VARIABLES = ("SLURM_NODEID", "GROUP_RANK", "NODE_RANK")
"""Where srun, torchrun and Lightning's own launcher (or the user, for it) put the node a process runs on."""


def launched_node_rank() -> int:
    """The node this process runs on, as its launcher set it before any process group exists; 0 where none did."""
    for name in NODE_RANK_VARIABLES:
        if (value := os.environ.get(name, "")).isdigit():
            return int(value)
    return 0


def check_slurm_tasks() -> None:
    """Before the ``Trainer`` is built: a SLURM job of several tasks must say how many per node (Lightning raised a
    ``RuntimeError`` traceback for ``--ntasks`` alone). Not for ``torchrun``'s processes (``srun torchrun``, one task
    a node): Lightning reads torchrun's variables first, never SLURM's."""
    if TorchElasticEnvironment.detect() or not SLURMEnvironment.detect():
        return
    tasks = os.environ.get("SLURM_NTASKS", "")
    if tasks.isdigit() and int(tasks) > 1 and "SLURM_NTASKS_PER_NODE" not in os.environ:
        raise ConfigError(
            f"the SLURM job asks for {tasks} tasks (SLURM_NTASKS) without saying how many per node",
            "SLURM_NTASKS_PER_NODE",
            f"request them with #SBATCH --ntasks-per-node (and --nodes) instead of --ntasks={tasks}",
        )


def missing_slurm_task(error: KeyError) -> ConfigError | None:
    """The one line for Lightning's ``KeyError`` when a distributed strategy reads a rank's place from a SLURM
    environment that lacks it (``SLURM_NTASKS`` set, this process not started by ``srun``); ``None`` for another."""
    if not error.args or error.args[0] not in SLURM_TASK_VARIABLES or not SLURMEnvironment.detect():
        return None
    missing = ", ".join(name for name in SLURM_TASK_VARIABLES if name not in os.environ)
    return ConfigError(
        f"SLURM_NTASKS is set but {missing} not: this process was not started as a SLURM task",
        "the environment",
        "start the command with srun, or set SLURM_JOB_NAME=interactive to run it outside SLURM's task layout",
    )


def check_processes_meet(trainer: Trainer) -> None:
    """Refuse, in one line on every process, a ``fit`` whose processes would not meet or would each train alone."""
    environment = trainer._accelerator_connector.cluster_environment
    devices, nodes = trainer.num_devices, trainer.num_nodes
    launched = launched_processes(environment)
    if launched is not None and launched != devices * nodes:
        raise ConfigError(
            f"{_launcher_says(environment, launched)}, but trainer.devices x trainer.num_nodes is {devices} x {nodes}",
            WHERE,
            _matching_settings(environment, launched),
        )
    per_node = _per_node(environment)
    if launched is not None and per_node is not None and per_node[0] != devices:
        raise ConfigError(
            f"{_launcher_says(environment, per_node[0], per_node[1])}, but trainer.devices is {devices}",
            WHERE,
            _matching_settings(environment, launched),
        )
    if launched is not None and (rank := _read(environment.local_rank)) is not None and rank >= devices:
        raise ConfigError(  # the launcher says no count per node (SLURM's 4(x2),2): Lightning's IndexError
            f"this process is local rank {rank} of its node, but trainer.devices is {devices}",
            WHERE,
            _matching_settings(environment, launched),
        )
    node = None if isinstance(environment, SLURMEnvironment) else _read(environment.node_rank)  # SLURM: SLURM_PROCID
    if launched is not None and node is not None and node >= nodes:
        raise ConfigError(  # its rank would be past the world size: it waited for the others until the timeout
            f"this process runs on node {node} (counted from 0), but trainer.num_nodes is {nodes}",
            WHERE,
            _matching_settings(environment, launched),
        )
    check_srun_tasks_in_interactive_mode(environment)
    if isinstance(environment, LightningEnvironment) and nodes > 1 and "MASTER_PORT" not in os.environ:
        raise ConfigError(
            f"trainer.num_nodes is {nodes}, but no launcher started this process and MASTER_PORT is not set: it would "
            "wait for nodes that cannot know the port it picks",
            "trainer.num_nodes",
            "start one copy per node with torchrun --nnodes or srun (README, Multi-node training), or set "
            "trainer.num_nodes: 1 on one machine",
        )


def launched_processes(environment: ClusterEnvironment) -> int | None:
    """How many processes the launcher started in all, where one started this process and says; else ``None``."""
    if not environment.creates_processes_externally:
        return None  # Lightning starts the processes of this node itself, as many as trainer.devices
    if isinstance(environment, LightningEnvironment):  # started by hand or a script: LOCAL_RANK, maybe WORLD_SIZE
        size = os.environ.get("WORLD_SIZE", "")
        return int(size) if size.isdigit() else None
    try:
        return environment.world_size()
    except (KeyError, ValueError):  # a variable the environment reads is missing or malformed
        return None


def check_srun_tasks_in_interactive_mode(environment: ClusterEnvironment) -> None:
    """Refuse the second and later tasks of an ``srun`` whose job is named ``bash`` or ``interactive``: Lightning
    then ignores SLURM, and each task trained a model of its own into the same run folder, exiting 0. (The first task
    cannot tell itself from an ``srun --pty bash`` shell's, which runs ``fit`` alone, rightly.)"""
    task, name = os.environ.get("SLURM_PROCID", ""), os.environ.get("SLURM_JOB_NAME")
    if not isinstance(environment, LightningEnvironment) or environment.creates_processes_externally:
        return  # torchrun's, or another launcher's, or Lightning's own children
    if "SLURM_NTASKS" not in os.environ or name not in ("bash", "interactive") or not task.isdigit() or task == "0":
        return
    raise ConfigError(
        f"srun started this process as task {task} of a job named {name!r}, for which Lightning ignores SLURM: every "
        "task would train a model of its own",
        f"SLURM_JOB_NAME={name}",
        "give srun another --job-name so that the tasks train together, or run fit as one task and let "
        "trainer.devices start the processes of the node",
    )


def _launcher_says(environment: ClusterEnvironment, launched: int, per_node: str | None = None) -> str:
    if per_node is not None:  # the processes of each node, and the variable that says so
        if isinstance(environment, SLURMEnvironment):
            return f"the SLURM job runs {launched} tasks on each node ({per_node})"
        return f"torchrun started {launched} processes on each node ({per_node})"
    if isinstance(environment, TorchElasticEnvironment):
        return f"torchrun started {launched} processes (WORLD_SIZE)"
    if isinstance(environment, SLURMEnvironment):
        return f"the SLURM job runs {launched} tasks (SLURM_NTASKS)"
    if isinstance(environment, LightningEnvironment):
        return f"the launcher started {launched} processes (WORLD_SIZE)"
    return f"{type(environment).__name__} counts {launched} processes"


def _matching_settings(environment: ClusterEnvironment, launched: int) -> str:
    """The settings that match what the launcher started, where it says how many processes each node runs."""
    per_node = _per_node(environment)
    if per_node and launched % per_node[0] == 0:
        return f"pass --trainer.devices={per_node[0]} --trainer.num_nodes={launched // per_node[0]} to match"
    return "set trainer.devices to the processes per node and trainer.num_nodes to the nodes, to match"


def _read(rank: Callable[[], int]) -> int | None:
    """``rank()`` (a cluster environment's), or ``None`` where a variable it reads is missing or malformed."""
    try:
        return rank()
    except (KeyError, ValueError):
        return None


def _per_node(environment: ClusterEnvironment) -> tuple[int, str] | None:
    """The processes the launcher starts on every node, and the variable that says so, where it says one count for
    all (not SLURM's ``4(x2),2``: 4 on each of two nodes and 2 on a third). Under SLURM, srun's layout of this step
    where it says it: an ``srun --ntasks 4`` in a job of 8 tasks a node runs 4."""
    name = {TorchElasticEnvironment: "LOCAL_WORLD_SIZE", SLURMEnvironment: "SLURM_NTASKS_PER_NODE"}.get(
        type(environment)
    )
    if name == "SLURM_NTASKS_PER_NODE" and "SLURM_STEP_TASKS_PER_NODE" in os.environ:
        name = "SLURM_STEP_TASKS_PER_NODE"
    found = re.fullmatch(r"(\d+)(?:\(x\d+\))?", os.environ.get(name or "", ""))  # 8(x2): 8 on each of 2
    return (int(found[1]), f"{name}={found[0]}") if found and int(found[1]) > 0 else None


def port_in_use(error: BaseException) -> ConfigError | None:
    """The one line for the first rank's store failing to listen on ``MASTER_PORT`` because another program holds it
    (torch's ``DistNetworkError`` traceback); ``None`` for any other error."""
    from torch.distributed import DistNetworkError

    found = re.search(r"port: (\d+).*EADDRINUSE", str(error))
    if not isinstance(error, DistNetworkError) or found is None:
        return None
    return ConfigError(
        f"port {found[1]} is in use by another program: the ranks cannot meet on it",
        f"MASTER_PORT={found[1]}",
        "set MASTER_PORT to a free port, or leave it unset on one machine (a free one is picked)",
    )
