"""A preallocated KV cache that stores only what each layer projects under the sharing region.

| layer                   | ``qk`` mode (the paper) | ``kv`` mode          |
|-------------------------|-------------------------|----------------------|
| compute                 | K and V                 | K and V              |
| sharing                 | V (K is the source's)   | nothing              |

With half the layers sharing in ``qk`` mode the cache is 25% smaller: the saving is |S| / (2 L).

Rows may be left-padded prompts of different lengths: ``valid`` marks real key positions, and each row has its
own RoPE positions, so a padded row produces exactly what it would alone.

``StaticKVCache`` is the same cache for decoding with CUDA graphs: its one-token steps keep every shape fixed
(attention over all ``max_len`` slots under a mask) and take their position from device tensors that the step itself
advances, so a decode step can be captured once and replayed for every token (``epas_lightning.inference.cuda_graph``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from epas_lightning.model.attention import AttentionContext
from epas_lightning.model.config import LlamaConfig
from epas_lightning.model.rope import RotaryEmbedding


class KVCache:
    """Keys and values of ``batch_size`` sequences of up to ``max_len`` tokens, for one sharing region.

    Build it for the region the model runs with (``shared_flags``, e.g. ``model.sharing.flags``); the model refuses
    a cache built for another region.
    """

    def __init__(
        self,
        config: LlamaConfig,
        shared_flags: tuple[bool, ...],
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(shared_flags) != config.n_layer:
            raise ValueError(f"shared_flags has {len(shared_flags)} entries for a {config.n_layer}-layer model.")
        if max_len > config.context_length:
            raise ValueError(f"max_len={max_len} exceeds the model's context length {config.context_length}.")
        self.config, self.shared_flags = config, tuple(shared_flags)
        self.batch_size, self.max_len = batch_size, max_len
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)

        def buffer(needed: bool) -> torch.Tensor | None:
            return torch.zeros(shape, device=device, dtype=dtype) if needed else None

        qk = config.sharing_mode == "qk"
        self.k = [buffer(not shares) for shares in self.shared_flags]
        self.v = [buffer(not shares or qk) for shares in self.shared_flags]
        self.length = 0
        """Positions filled so far (the same for every row: padded rows are left-padded)."""
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.padded = False
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        """Each row's next RoPE position: the count of its real tokens so far."""
        cos, sin = RotaryEmbedding.of(config)(max_len, device)
        self._cos, self._sin = cos, sin  # (max_len, D) fp32

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v) if t is not None)

    def dense_nbytes(self) -> int:
        """Bytes the same cache would hold with no layer sharing."""
        one = next(t for t in (*self.k, *self.v) if t is not None)
        return 2 * self.config.n_layer * one.numel() * one.element_size()

    def context(self, T: int, attention_mask: torch.Tensor | None = None) -> AttentionContext:
        """Positions and mask for the next ``T`` tokens; ``attention_mask`` (B, T), 0 at (left) padding, if any."""
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"The KV cache holds {self.max_len} positions; {end} were asked for.")
        if attention_mask is not None and not bool(attention_mask.all()):
            self.valid[:, start:end] = attention_mask.bool()
            self.padded = True
        if not self.padded:
            cos, sin = self._cos[start:end], self._sin[start:end]  # (T, D): every row at the same positions
            if start == 0:
                return AttentionContext(cos, sin, None, True)
            mask = None if T == 1 else self._causal(start, end).view(1, 1, T, end)
            return AttentionContext(cos, sin, mask, False)
        real = self.valid[:, start:end].long()
        positions = self.next_pos[:, None] + real.cumsum(-1) - real  # (B, T): pads repeat the next position
        cos, sin = self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)  # (B, 1, T, D)
        mask = self.valid[:, None, None, :end] & self._causal(start, end)  # (B, 1, T, S)
        # A padding query sees at least itself, so no softmax row is empty (an empty row would give NaN).
        diagonal = torch.zeros(T, end, dtype=torch.bool, device=mask.device)
        rows = torch.arange(T, device=mask.device)  # on the host, the indices were a blocking copy: a sync every step
        diagonal[rows, rows + start] = True
        return AttentionContext(cos, sin, mask | diagonal, False)

    def _causal(self, start: int, end: int) -> torch.Tensor:
        """(T, S) bool: query ``start + t`` sees keys ``<= start + t``."""
        return torch.ones(end - start, end, dtype=torch.bool, device=self.valid.device).tril(start)

    def update(
        self, layer: int, k: torch.Tensor | None, v: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Write layer ``layer``'s new k/v (B, H_kv, T, D) at the current position; return all cached so far."""
        start = self.length
        end = start + (k if k is not None else v).shape[2]
        full_k = full_v = None
        if k is not None:
            self.k[layer][:, :, start:end] = k
            full_k = self.k[layer][:, :, :end]
        if v is not None:
            self.v[layer][:, :, start:end] = v
            full_v = self.v[layer][:, :, :end]
        return full_k, full_v

    def advance(self, T: int) -> None:
        """Mark ``T`` more positions filled (the model calls this after a forward)."""
        self.next_pos += self.valid[:, self.length : self.length + T].sum(-1)
        self.length += T

    def keep_rows(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Keep only the batch rows ``rows`` (indices, in their new order) and free the others' keys and values.

        Each row kept goes on exactly as before: its keys, values, padding and positions move with it.
        """
        index = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)  # (B',)
        self.k = [None if t is None else t.index_select(0, index) for t in self.k]  # (B', H_kv, max_len, D)
        self.v = [None if t is None else t.index_select(0, index) for t in self.v]
        self.valid, self.next_pos = self.valid.index_select(0, index), self.next_pos.index_select(0, index)
        self.batch_size = index.numel()
        # Without the padded rows, every row is at position ``length``: the unmasked path (as alone) applies again.
        self.padded = self.padded and not bool(self.valid[:, : self.length].all())


class StaticKVCache(KVCache):
    """A :class:`KVCache` whose one-token steps have fixed shapes and device-side positions: what a CUDA graph captures.

    A prefill (``T > 1``, before any one-token step) runs as in the dynamic cache. A one-token step attends over all
    ``max_len`` slots under a mask, writes its keys/values at the slot ``index`` (a device tensor) and advances
    ``index`` and the positions on the device, so a replayed graph repeats exactly that; the host-side ``length`` is
    the runner's to count (:meth:`count_step`).
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - those of KVCache
        super().__init__(*args, **kwargs)
        device = self.valid.device
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        """The slot the next token is written to (static steps read and advance it on the device)."""
        self._slots = torch.arange(self.max_len, device=device)
        self._stepped = False  # a one-token step ran: ``length`` no longer says where the next tokens go

    def context(self, T: int, attention_mask: torch.Tensor | None = None) -> AttentionContext:
        if T != 1:
            if self._stepped:  # the chunk would overwrite the slots the steps wrote, from the host's ``length``
                raise ValueError(
                    "a StaticKVCache takes several tokens at once only before its one-token steps: prefill first, or "
                    "use a KVCache (static=False) to mix them"
                )
            return super().context(T, attention_mask)
        if attention_mask is not None and not bool(attention_mask.all()):  # the static step would attend to the pads
            raise ValueError(
                "a StaticKVCache's one-token steps take no padding: run left-padded prompts in one prefill call "
                "(more than one token), or use a KVCache (static=False)"
            )
        cos = self._cos[self.next_pos][:, None, None, :]  # (B, 1, 1, D): each row at its own position
        sin = self._sin[self.next_pos][:, None, None, :]
        mask = (self._slots <= self.index) & self.valid  # (B, max_len): slots written so far, minus padding
        return AttentionContext(cos, sin, mask[:, None, None, :], False)

    def update(
        self, layer: int, k: torch.Tensor | None, v: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if (k if k is not None else v).shape[2] != 1:
            return super().update(layer, k, v)
        if k is not None:
            self.k[layer].index_copy_(2, self.index, k)
        if v is not None:
            self.v[layer].index_copy_(2, self.index, v)
        return self.k[layer], self.v[layer]  # every slot; the mask hides the unwritten ones

    def advance(self, T: int) -> None:
        if T != 1:
            super().advance(T)
            self.index.fill_(self.length)
            return
        self.next_pos += 1
        self.index += 1
        self._stepped = True

    def count_step(self) -> None:
        """Count on the host the one-token step that a replayed graph took on the device."""
        self.length += 1

    def keep_rows(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Refused: a captured CUDA graph holds this cache's buffers and batch size."""
        raise NotImplementedError(
            "rows cannot leave a StaticKVCache (a CUDA graph captured its batch): decode with cuda_graph=False"
        )
