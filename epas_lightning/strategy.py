"""``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` with FSDP-only defaults; also ``strategy: fsdp2``."""

from __future__ import annotations

import difflib
import os
import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.fabric.strategies.model_parallel import _load_checkpoint
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy, StrategyRegistry
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.constants import default_pg_timeout

from epas_lightning.errors import ConfigError
from epas_lightning.outputs import NAME_MAX, shortened_name
from epas_lightning.safe_dcp import load_full_optimizer_states, load_sharded_checkpoint, raise_wrapped_interrupt
from epas_lightning.safe_load import SAVE_ID, is_sharded_checkpoint

STAGING, REPLACED = ".saving", ".replaced"
"""Suffixes of the hidden names beside a checkpoint ``name`` (:func:`hidden_beside`): ``.name.saving`` while it is
written, ``.name.replaced`` for the previous (sharded) one while the new one moves into place."""
CHECKPOINT_EXTENSION = ".ckpt"
"""``ModelCheckpoint.FILE_EXTENSION``: the readers of killed saves' leftovers look for ``.*.ckpt.saving``."""


def hidden_beside(path: Path, suffix: str) -> Path:
    """``.<name><suffix>`` beside ``path``. A name too long for that (a file name holds 255 bytes) keeps its head, a
    hash of the whole name and its ``.ckpt``: each checkpoint keeps its own, and it still reads as a checkpoint's."""
    extension = CHECKPOINT_EXTENSION if path.name.endswith(CHECKPOINT_EXTENSION) else ""
    short = shortened_name(path.name, extension, NAME_MAX - 1 - len(os.fsencode(suffix)))
    return path.with_name(f".{short}{suffix}")


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over every process of every node; no tensor parallelism.

    ``ModelParallelStrategy`` defaults to tensor parallelism within a node; here the data-parallel size is the world
    size and the tensor-parallel size 1. The module applies ``fully_shard`` in ``configure_model`` (see
    ``epas_lightning.parallel``). In YAML: ``trainer.strategy: fsdp2`` (registered with Lightning under that name),
    or ``{class_path: epas_lightning.strategy.FSDP2Strategy, init_args: {...}}`` to change its arguments.

    Checkpoints load without unpickling anything but tensors and plain data: a sharded directory's metadata through a
    restricted unpickler (``torch.distributed.checkpoint`` would use plain ``pickle``), files with ``weights_only``.
    Sharded checkpoints are written beside their target and renamed into place (see :meth:`save_checkpoint`).

    Args:
        save_distributed_checkpoint: Each rank writes its shard into a checkpoint directory (``True``) or rank 0
            writes one gathered file (``False``; fine up to ~1B parameters).
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
        timeout: Timeout of collectives.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        # `ModelParallelStrategy` would take `data_parallel_size = num_nodes`; shard over every rank instead.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Sharded: every rank writes into a staging folder beside ``filepath``, which rank 0 then renames into place,
        so a save that dies halfway never leaves a checkpoint of mixed shards (DCP would overwrite in place); the
        save's random id in every file (:data:`~epas_lightning.safe_load.SAVE_ID`) refuses a folder mixed later."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # one file, written atomically
        path = Path(self.broadcast(filepath))
        save_id = self.broadcast(uuid.uuid4().hex)  # in every rank's shard and meta.pt: a mix of saves is refused
        checkpoint["state_dict"][f"{SAVE_ID}.{save_id}.rank{self.global_rank}"] = save_id
        checkpoint[SAVE_ID] = save_id
        staging, old = (hidden_beside(path, suffix) for suffix in (STAGING, REPLACED))
        if self.is_global_zero:
            recover_replaced(path)
            for leftover in (staging, old):  # a killed save's partial shards; a replaced checkpoint not yet deleted
                _remove(leftover)
        self.barrier("epas_checkpoint_staging")
        try:
            super().save_checkpoint(checkpoint, staging, storage_options)
        except CheckpointException as e:  # a second Ctrl+C or signal while writing: stop as it asks
            raise_wrapped_interrupt(e)
            raise
        self.barrier("epas_checkpoint_written")
        if self.is_global_zero:
            if os.path.lexists(path):  # a checkpoint folder or file, or a link (save_last: link) to another one
                os.replace(path, old)
            os.replace(staging, path)
            _remove(old)
        self.barrier("epas_checkpoint_in_place")
        return None

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        strict = getattr(self.lightning_module, "strict_loading", True)
        if is_sharded_checkpoint(path):
            return load_sharded_checkpoint(path, self.model, self.optimizers, strict=strict)
        # a single file (one device's, DDP's or FSDP2's gathered one): Lightning loads the weights, we the optimizers
        checkpoint = _load_checkpoint(path, {"state_dict": self.model}, strict=strict, weights_only=True)
        load_full_optimizer_states(self.model, self.optimizers, checkpoint.get("optimizer_states", []))
        return checkpoint


def recover_replaced(path: Path) -> bool:
    """Put the previous checkpoint back at ``path`` if a sharded save was killed between its two renames (``path``
    moved aside to ``.<name>.replaced``, the new one not yet moved in): that one is whole. Whether it did."""
    old = hidden_beside(path, REPLACED)
    if os.path.lexists(path) or not os.path.lexists(old):
        return False
    try:
        os.replace(old, path)
    except FileNotFoundError:  # another rank's lookup put it back first
        return os.path.lexists(path)
    return True


def _remove(path: Path) -> None:
    """Delete ``path`` if it is there: a link itself (never what it points to), a file, or a folder with its files."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


STRATEGY_NAME = "fsdp2"
if STRATEGY_NAME not in StrategyRegistry:
    StrategyRegistry.register(
        STRATEGY_NAME, FSDP2Strategy, description="FSDP2 (fully_shard) over every rank, one shard per rank on disk"
    )


def check_data_parallel_only(strategy: object, devices: int, nodes: int = 1) -> None:
    """Refuse Lightning's ``ModelParallelStrategy`` with tensor parallelism (by default over the processes of a node):
    ``parallelize`` shards over its data-parallel mesh only, so each tensor-parallel process trained a model of its own
    on data of its own, and the checkpoint kept one of them (exit 0). Refuse too, before the launch, sizes whose
    product is not the number of processes (``tensor_parallel_size: 1`` with the default data-parallel size, the node
    count): Lightning raised it on every rank as a traceback."""
    if not isinstance(strategy, ModelParallelStrategy):
        return
    size = strategy._tensor_parallel_size  # "auto": setup_environment makes it the processes of a node
    size = devices if size == "auto" else size
    if size != 1:
        raise ConfigError(
            f"ModelParallelStrategy would split the model over {size} processes by tensor parallelism, which it has "
            "no plan for: each process would train a model of its own",
            "trainer.strategy",
            f"use trainer.strategy: {STRATEGY_NAME} (FSDP2 over every process, no tensor parallelism)",
        )
    if isinstance(strategy, FSDP2Strategy):  # its data-parallel size is every process (setup_environment)
        return
    data = strategy._data_parallel_size  # "auto": setup_environment makes it the number of nodes
    data = nodes if data == "auto" else data
    if data != devices * nodes:
        raise ConfigError(
            f"ModelParallelStrategy's data_parallel_size {data} x tensor_parallel_size 1 is not the {devices * nodes} "
            f"processes of the run (trainer.devices {devices} x trainer.num_nodes {nodes})",
            "trainer.strategy",
            f"use trainer.strategy: {STRATEGY_NAME} (FSDP2 over every process), or set its data_parallel_size to "
            f"{devices * nodes}",
        )


def check_strategy_name(strategy: object) -> None:
    """Refuse a ``trainer.strategy`` name Lightning does not know, naming the nearest one (Lightning's refusal listed
    four examples, ``fsdp2`` not among them, and sent the user to its website)."""
    if not isinstance(strategy, str) or strategy.lower() == "auto" or strategy.lower() in StrategyRegistry:
        return
    # a class read as a name: jsonargparse takes a class (its path, or an imported one's bare name) from class_path
    if "." in strategy or is_strategy_class_name(strategy):
        raise ConfigError(
            f"unknown strategy {strategy!r}",
            f"trainer.strategy: {strategy}",
            f"a class is given as --trainer.strategy.class_path={strategy} "
            f"(YAML: strategy: {{class_path: {strategy}}})",
        )
    near = difflib.get_close_matches(strategy.lower(), sorted(StrategyRegistry), n=3, cutoff=0.6)
    near = [STRATEGY_NAME] if STRATEGY_NAME in near else near[:1]  # fsdp3: ours before Lightning's FSDP1
    raise ConfigError(
        f"unknown strategy {strategy!r}" + (f" (did you mean {near[0]!r}?)" if near else ""),
        f"trainer.strategy: {strategy}",
        f"give auto, ddp, {STRATEGY_NAME} or another name of Lightning's StrategyRegistry, or a class_path",
    )


def is_strategy_class_name(name: str) -> bool:
    """Whether ``name`` is the name of an imported ``Strategy`` class (``FSDP2Strategy``), which ``class_path``
    takes."""
    from epas_lightning.cli import imported_subclasses  # the short names jsonargparse resolves

    return any(cls.__name__ == name for cls in {Strategy, *imported_subclasses(Strategy)})
