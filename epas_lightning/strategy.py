"""``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` with FSDP-only defaults."""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over every process of every node; no tensor parallelism.

    ``ModelParallelStrategy`` defaults to tensor parallelism within a node; here the data-parallel size is the world
    size and the tensor-parallel size 1. The module applies ``fully_shard`` in ``configure_model`` (see
    ``epas_lightning.parallel``). In YAML: ``trainer.strategy: {class_path: epas_lightning.strategy.FSDP2Strategy}``.

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
