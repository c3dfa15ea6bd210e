"""The training loader, whose epochs are the trainer's (litdata's loader counts the times it was iterated)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from copy import deepcopy
from typing import Any

from litdata import StreamingDataLoader


class EpochLoader(StreamingDataLoader):
    """litdata's ``StreamingDataLoader`` reading in each epoch of the trainer the order that epoch has in an
    uninterrupted run (litdata's epoch ``n + 1`` in the trainer's epoch ``n``).

    litdata counts the epochs by the times its loader was iterated. A fit resumed at an epoch end under
    ``max_epochs`` (Lightning then restores no position) read the first epoch's order again, and a position restored
    mid-epoch outlived that epoch (Lightning stops reading at the epoch's length, so litdata never saw it end): the
    next epoch read the rest of the old one, or nothing, an empty epoch.

    ``trainer_epoch`` gives the trainer's epoch; ``None`` (no trainer, or a position that starts afresh) keeps
    litdata's own count.
    """

    trainer_epoch: Callable[[], int | None] | None = None
    read_to_end = False
    """The last epoch was read until the data ran out (a weighted mixture's epoch ends when a stream does, before the
    length Lightning counts on): a position saved then continues with nothing more in that epoch. litdata's own
    restores it with the workers' counts mixed up (it takes the workers to deliver batches in turn, which they no
    longer do once one has run out): one more batch, or a ``ValueError`` in a loader worker."""

    def __iter__(self) -> Iterator[Any]:
        epoch = self.trainer_epoch() if self.trainer_epoch is not None else None
        if epoch is not None:
            if self.restore and self.current_epoch != epoch + 1:
                self.restore = False  # a position in an epoch read already: this one starts afresh
            if not self.restore:  # litdata counts it up by one as it starts; never back: Lightning may start the loader
                self.current_epoch = max(self.current_epoch, epoch)  # before it ends the epoch a checkpoint ended
        if self.restore and self.read_to_end:  # the epoch is over: the next one starts afresh
            self.restore = self.read_to_end = False
            return iter(())
        return self._read_epoch()

    read_ahead = False
    """Read one batch ahead, to know which batch is an epoch's last (``last_batch``) where the data can run out before
    the loader's length (a weighted mixture's epoch): Lightning, given a length, reads none ahead, so it learns of
    such an end only after the last batch, where it no longer validates. The position saved stays the one after the
    batch given out."""
    last_batch = False
    """The batch given out last ended its epoch (with ``read_ahead``)."""
    every_rank_has: Callable[[bool], bool] | None = None
    """Under several ranks, whether every rank has its next batch, given whether this one has (a collective, in the
    main process): each rank reads its own part of every stream, and a weighted mixture's epoch, which ends when one
    of them runs out, could end at another batch on each rank (litdata deals whole chunks to the loader workers on a
    parallel file system, and each node its own chunks after a multi-node run's first epoch). A rank that went on to
    validate or to the next epoch while another trained waited in a collective that never matched: a hang. With it,
    every rank ends its epoch at the batch the first rank to run out ends it (read one ahead: ``read_ahead``)."""
    agreed_length: int | None = None
    """Under several ranks, the length every rank's loader gives (the shortest rank's): Lightning reads that many
    batches on each, and validates and schedules by it."""
    _position: dict[str, Any] | None = None
    """The position after the batch given out, while the one read ahead is held."""

    def _read_epoch(self) -> Iterator[Any]:
        self.read_to_end = False
        if self.read_ahead:
            yield from self._read_one_ahead(super().__iter__())
        else:
            yield from super().__iter__()
        self.read_to_end = True

    def _read_one_ahead(self, batches: Iterator[Any]) -> Iterator[Any]:
        self._position, self.last_batch = None, False
        held = self._next_on_every_rank(batches)
        while held is not _END:
            position = deepcopy(super().state_dict())  # after `held`: the next read moves it on
            following = self._next_on_every_rank(batches)
            self._position, self.last_batch = position, following is _END
            self.read_to_end = self.last_batch  # a save after the last batch continues in the next epoch
            yield held
            held = following

    def _next_on_every_rank(self, batches: Iterator[Any]) -> Any:
        """The next batch, or ``_END`` where this rank's data, or another rank's (``every_rank_has``), ran out."""
        batch = next(batches, _END)
        if self.every_rank_has is not None and not self.every_rank_has(batch is not _END):
            return _END
        return batch

    def __len__(self) -> int:
        length = super().__len__()  # also tells torch's loader how many batches to expect
        return length if self.agreed_length is None else self.agreed_length

    def state_dict(self) -> dict[str, Any]:
        position = super().state_dict() if self._position is None else self._position
        return {**position, "read_to_end": self.read_to_end}

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        self.read_to_end, self._position = bool(obj.get("read_to_end")), None
        super().load_state_dict(obj)


_END = object()
"""What ``next`` gives for a loader read to its end."""
