"""Which decoder layers share: a tiny module so the mask survives meta-device init and lands in checkpoints."""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
from torch import nn

_DEVICE_MASKS_KEPT = 64
"""Regions whose device masks a :class:`SharingState` keeps (a schedule's and validation's are a few)."""


def layer_index(i: object) -> int:
    """``i`` as a layer's index: an integer (Python's, numpy's, a 0-d tensor's); a bool is refused (``TypeError``), as
    the True of a mask over the layers would read as layer 1."""
    if isinstance(i, bool) or getattr(i, "dtype", None) == torch.bool:
        raise TypeError(f"{i!r} is a bool")
    return operator.index(i)


class SharingState(nn.Module):
    """The sharing mask of an ``n_layer`` model.

    The mask is a persistent bool buffer (saved in ``state_dict`` and so in every checkpoint) mirrored in a
    Python tuple that the forward reads, so switching never syncs a device and ``torch.compile`` sees a constant.
    Each region's mask is made on the mask's device once: switching back to it (validation's other regions every
    held-out batch, serve's groups every step) is a copy on the device, not one from the host.
    """

    def __init__(self, n_layer: int) -> None:
        super().__init__()
        self.n_layer = n_layer
        self.register_buffer("mask", torch.zeros(n_layer, dtype=torch.bool))
        self._flags: tuple[bool, ...] = (False,) * n_layer
        self._device_masks: dict[tuple[bool, ...], torch.Tensor] = {}  # per region's flags, its mask on the device

    def reset_parameters(self) -> None:
        """Every layer computes (meta-device materialisation calls this)."""
        self.mask.zero_()
        self._flags = (False,) * self.n_layer

    @property
    def flags(self) -> tuple[bool, ...]:
        """Per-layer ``True`` where the layer shares."""
        return self._flags

    @property
    def shared_layers(self) -> list[int]:
        return [i for i, shares in enumerate(self._flags) if shares]

    @property
    def n_shared(self) -> int:
        return sum(self._flags)

    def set_shared_layers(self, layers: Iterable[int]) -> None:
        """Make exactly ``layers`` (integer indices: ints, or a tensor or array of them) share; every other layer
        computes. Layer 0 can never share."""
        try:
            layers = {layer_index(i) for i in layers}  # a 0-d tensor is no dict key of its int: read the int
        except TypeError:
            raise TypeError(f"sharing layers must be integer layer indices, like [2, 3]; got {layers!r}") from None
        bad = sorted(i for i in layers if not 1 <= i < self.n_layer)
        if bad:
            raise ValueError(f"Layers {bad} cannot share: valid sharing layers are 1..{self.n_layer - 1}.")
        self._flags = tuple(i in layers for i in range(self.n_layer))
        self.mask.copy_(self._device_mask(self._flags))

    def _device_mask(self, flags: tuple[bool, ...]) -> torch.Tensor:
        """``flags`` as a mask on the mask's device, made there once (again after the module moves; all of them
        again past ``_DEVICE_MASKS_KEPT`` regions)."""
        mask = self._device_masks.get(flags)
        if mask is None or mask.device != self.mask.device:
            if len(self._device_masks) >= _DEVICE_MASKS_KEPT:
                self._device_masks.clear()
            mask = self._device_masks[flags] = torch.tensor(flags, dtype=torch.bool, device=self.mask.device)
        return mask

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        loaded = state_dict.get(prefix + "mask")
        if loaded is not None and loaded.shape == self.mask.shape:  # else torch reports the size mismatch
            flags = tuple(bool(b) for b in self.mask.tolist())
            if flags and flags[0]:
                raise ValueError("Corrupt sharing mask in checkpoint: layer 0 is marked as sharing.")
            self._flags = flags
