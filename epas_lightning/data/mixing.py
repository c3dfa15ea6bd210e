"""Mixing several token streams (imported lazily: it imports litdata)."""

from __future__ import annotations

from typing import Any

from litdata import CombinedStreamingDataset
from litdata.utilities.env import _WorkerEnv


class SizedCombinedStreamingDataset(CombinedStreamingDataset):
    """litdata's ``CombinedStreamingDataset`` with a length even when mixing by weights, and exact resumption.

    Lightning pre-fetches one batch from a loader without a length (to see the epoch's end coming), and the loader's
    saved position then counts that batch: a resumed run would skip it. With a length it does not pre-fetch. With
    weights the epoch ends when the first stream runs out, at about ``min(len_i / weight_i)`` samples: that estimate
    is the length (an epoch that ends a little earlier or later is fine; only the pre-fetching matters).

    Each loader worker draws its own mix of the streams, so it stops at its own position in each stream. litdata
    saves only each stream's total and, on resume, splits it evenly over the workers, so a resumed run with loader
    workers would repeat and skip samples. The loader's state also keeps every worker's own counts: each worker
    resumes every stream at those.
    """

    def get_len(self, num_workers: int, batch_size: int) -> int | None:
        if self._iterate_over_all:
            return super().get_len(num_workers, batch_size)
        self.num_workers, self.batch_size = num_workers, batch_size
        lengths = [d.get_len(num_workers, batch_size) for d in self._datasets]
        return int(min(n / w for n, w in zip(lengths, self._weights, strict=True) if w))

    def __len__(self) -> int:
        """The length for the loader's workers and batch size. litdata's sets the streams to one worker and batch 1,
        which re-deals their chunks to the workers: a loader resumed after it asked would read other samples."""
        return self.get_len(self.num_workers, self.batch_size)

    def __iter__(self) -> Any:
        worker = _WorkerEnv.detect()
        counts = (self._num_samples_yielded or {}).get(worker.rank)
        if counts is not None:
            for dataset, count in zip(self._datasets, counts, strict=True):
                if state := dataset._state_dict:
                    state["num_samples_yielded"] = even_split_total(
                        count, worker.rank, state["num_workers"], state["batch_size"]
                    )
        return super().__iter__()


def even_split_total(count: int, worker: int, num_workers: int, batch_size: int) -> int:
    """A total that litdata's even split over ``num_workers`` (whole batches in turn) turns into ``count`` for
    ``worker``: only this worker's share is used in its process."""
    batches, rest = divmod(count, batch_size)
    return batches * batch_size * num_workers + worker * batch_size + rest
