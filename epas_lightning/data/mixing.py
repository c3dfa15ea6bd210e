"""Mixing several token streams (imported lazily: it imports litdata)."""

from __future__ import annotations

from litdata import CombinedStreamingDataset


class SizedCombinedStreamingDataset(CombinedStreamingDataset):
    """litdata's ``CombinedStreamingDataset`` with a length even when mixing by weights.

    Lightning pre-fetches one batch from a loader without a length (to see the epoch's end coming), and the loader's
    saved position then counts that batch: a resumed run would skip it. With a length it does not pre-fetch. With
    weights the epoch ends when the first stream runs out, at about ``min(len_i / weight_i)`` samples: that estimate
    is the length (an epoch that ends a little earlier or later is fine; only the pre-fetching matters).
    """

    def get_len(self, num_workers: int, batch_size: int) -> int | None:
        if self._iterate_over_all:
            return super().get_len(num_workers, batch_size)
        self.num_workers, self.batch_size = num_workers, batch_size
        lengths = [d.get_len(num_workers, batch_size) for d in self._datasets]
        return int(min(n / w for n, w in zip(lengths, self._weights, strict=True) if w))
