"""Decode steps captured once in a CUDA graph and replayed for every token.

Small models decode one token in a few hundred tiny kernels, and in eager mode the host spends longer launching
them than the GPU spends running them. A graph replays the whole step with one launch. The step must have fixed
shapes and device-side positions: ``StaticKVCache`` provides both.
"""

from __future__ import annotations

import torch

from epas_lightning.model import Llama
from epas_lightning.model.kv_cache import StaticKVCache


class GraphedDecodeStep:
    """``step(tokens (B,)) -> logits (B, V)`` for the next position of ``cache``, replayed from a CUDA graph.

    Build it after the prefill: it captures the model with its current sharing region and attention-reuse setting.
    The returned logits live in a static buffer that the next call overwrites.
    """

    def __init__(self, model: Llama, cache: StaticKVCache, warmup: int = 2) -> None:
        if not isinstance(cache, StaticKVCache):
            raise TypeError("CUDA-graph decoding needs a StaticKVCache (model.new_cache(..., static=True)).")
        device = cache.valid.device
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a model and KV cache on a CUDA device.")
        self.cache = cache
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.k[0].device)
        index, next_pos = cache.index.clone(), cache.next_pos.clone()
        # On the cache's GPU, also where another is current (cuda:1): a capture stream of another GPU records none of
        # the model's kernels, and the empty graph's replays would return the capture's logits again and again.
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # warm-up runs (allocator, lazy init) outside the capture, as CUDA requires
                for _ in range(warmup):
                    model(self.tokens, cache)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=stream):  # not its default: made once, on the GPU current then
                self.logits = model(self.tokens, cache)[:, -1]
        # The warm-ups advanced the positions and wrote into the next slot: rewind (the first replay rewrites it).
        cache.index.copy_(index)
        cache.next_pos.copy_(next_pos)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()  # also advances cache.index / cache.next_pos on the device
        self.cache.count_step()
        return self.logits
