"""Held-out batches: every sample of the held-out streams read once, on any number of ranks, at any batch size.

litdata deals a stream to ranks and loader workers in whole batches and drops what is left, so validation scored
other samples at another batch size or rank count. Here the samples (``seq_len + 1`` tokens each, as the streams'
``TokensLoader`` cuts them) are read by index instead: rank ``r`` of ``W`` reads a contiguous part of ``N // W`` of
them, one more for the first ``N % W`` ranks, and every rank reads as many batches, the last ones filled with pad rows
(:data:`~epas_lightning.loss.PAD`) that the loss ignores, so that every rank runs as many forwards (FSDP2's
collectives) and a compiled model sees one batch shape.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from epas_lightning.loss import PAD


def stream_dataset(stream: Path, seq_len: int, shuffle: bool = False, seed: int = 42) -> Any:
    """The litdata dataset of a token stream in samples of ``seq_len + 1`` tokens: in stored order, or shuffled with
    ``seed`` (the training loader's)."""
    from litdata import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    return StreamingDataset(
        str(stream), item_loader=TokensLoader(block_size=seq_len + 1), shuffle=shuffle, drop_last=True, seed=seed
    )


def stream_samples(stream: Path, seq_len: int) -> int:
    """How many samples of ``seq_len + 1`` tokens a token stream holds (all ranks' together)."""
    from litdata.utilities.env import _DistributedEnv

    dataset = stream_dataset(stream, seq_len)
    dataset.distributed_env = _DistributedEnv(world_size=1, global_rank=0, num_nodes=1)  # not the environment's
    return dataset.get_len(1, 1)


class HeldOutBatches(IterableDataset):
    """One rank's batches (B, seq_len + 1) of the samples of ``streams``: a mixture's streams each in stored order,
    interleaved in the order ``seed`` draws (each stream spread over the whole in proportion to its length). With
    ``pad``, every rank has as many batches, all of ``batch_size`` rows (a rank's last ones filled with :data:`PAD`
    rows); without, one rank alone reads a short last batch instead. Loader workers read every ``num_workers``-th
    batch each, which a ``DataLoader`` yields in order. Nothing to save in a checkpoint: each pass reads it all."""

    def __init__(
        self,
        streams: list[Path],
        seq_len: int,
        batch_size: int,
        seed: int = 42,
        world_size: int = 1,
        rank: int = 0,
        pad: bool = True,
    ) -> None:
        if not pad and world_size > 1:
            raise ValueError("without pad rows the ranks' batch counts would differ")
        self.streams, self.seq_len, self.batch_size, self.pad = list(streams), seq_len, batch_size, pad
        lengths = [stream_samples(stream, seq_len) for stream in self.streams]
        self.total = sum(lengths)
        per_rank, extra = divmod(self.total, world_size)
        self.parts = [per_rank + (r < extra) for r in range(world_size)]  # each rank's samples, the first the most
        self.start = rank * per_rank + min(rank, extra)
        self.count = self.parts[rank]
        self.batches = math.ceil((self.parts[0] if pad else self.count) / batch_size)  # the largest part's: each rank's
        self.order = mixed_order(lengths, seed) if len(lengths) > 1 else None

    def __len__(self) -> int:
        return self.batches

    def rows_of_each_rank(self, batch: int) -> list[int]:
        """The samples (not pad rows) that the batch numbered ``batch`` of each rank holds, by rank."""
        return [min(self.batch_size, max(0, part - batch * self.batch_size)) for part in self.parts]

    def __iter__(self):  # noqa: ANN204
        worker = get_worker_info()
        first, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        datasets = [stream_dataset(stream, self.seq_len) for stream in self.streams]  # this process's own readers
        for batch in range(first, self.batches, step):
            begin = min(batch * self.batch_size, self.count)
            end = min(begin + self.batch_size, self.count)
            rows = torch.full((self.batch_size if self.pad else end - begin, self.seq_len + 1), PAD, dtype=torch.int32)
            for row, i in enumerate(range(begin, end)):
                rows[row] = self._sample(datasets, self.start + i)
            yield rows

    def _sample(self, datasets: list[Any], position: int) -> torch.Tensor:
        """The sample at ``position`` of the (mixed) order, as int32 tokens."""
        stream, index = (0, position) if self.order is None else (int(v) for v in self.order[:, position])
        return torch.as_tensor(datasets[stream][index], dtype=torch.int32)


def mixed_order(lengths: list[int], seed: int) -> torch.Tensor:
    """(2, sum(lengths)): for each position of a mixture of streams of ``lengths`` samples, its stream and its index
    there; each stream's samples in stored order, their places among the others drawn with ``seed``."""
    streams = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    streams = streams[torch.randperm(len(streams), generator=torch.Generator().manual_seed(seed))]
    index = torch.empty_like(streams)
    for stream in range(len(lengths)):
        where = streams == stream
        index[where] = torch.arange(int(where.sum()))
    return torch.stack([streams, index])
