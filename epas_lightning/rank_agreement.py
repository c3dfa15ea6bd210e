"""One boolean decision that every rank agrees on, without a device round trip when one process runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


def ranks_agree(trainer: Trainer, decision: bool, all: bool = True) -> bool:
    """``trainer.strategy.reduce_boolean_decision(decision, all)``: ``all`` ranks' decisions, or any one's.

    Lightning's parallel strategies (FSDP2 through ``ModelParallelStrategy``, DDP) reduce a tensor on the device even
    where the world is one process: on CUDA a host-to-device copy and a read back, two host syncs per decision at every
    step (the divergence guard and the interrupt check decide at every step). One process decides alone.
    """
    if trainer.world_size == 1:
        return bool(decision)
    return trainer.strategy.reduce_boolean_decision(decision, all=all)
