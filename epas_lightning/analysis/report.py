"""Layer-by-layer similarity matrices and the sharing region they suggest.

Every layer of a region starting at layer ``s`` reuses what layer ``s - 1`` (its source) computed: its Q and K in
``qk`` mode, its K and V in ``kv`` mode. So what matters for a candidate region is how similar each of its layers is to
*that source*, not to its neighbour: the region's score is the smallest similarity sim(i, s - 1) over its layers
i = s .. L-1, of what the model's mode reuses (by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from epas_lightning.analysis.capture import Activations
from epas_lightning.analysis.similarity import similarity_matrix
from epas_lightning.flops import flop_cut
from epas_lightning.model import LlamaConfig
from epas_lightning.model.config import REUSED

SIGNALS = ("q", "k", "v", "attn")
"""What is compared: post-RoPE queries, post-RoPE keys, values, attention probabilities."""
MEASURES = ("cosine", "cka")
Metric = Literal[
    "q/cosine", "q/cka", "k/cosine", "k/cka", "v/cosine", "v/cka", "attn/cosine", "attn/cka", "kv/cosine", "kv/cka"
]
"""A signal compared by a measure; ``kv`` is the lower of the K and the V similarity."""
METRICS: tuple[str, ...] = get_args(Metric)
DEFAULT_METRICS = {"qk": "attn/cka", "kv": "kv/cka"}
"""By sharing mode, what a region is scored by: a sharing layer in ``qk`` mode attends with its source's
probabilities, their similarity is the direct measure; one in ``kv`` mode attends with its own Q over its source's K
and V, both of which must stay alike."""
DEFAULT_THRESHOLD = 0.9


def layer_features(acts: Activations, signal: str, measure: str) -> list[torch.Tensor]:
    """Per-layer matrices whose rows pair up across layers.

    Q/K/V, cosine: one row per (sequence, head, token): the D-dim vector; heads pair by index, as sharing pairs them.
    Q/K/V, CKA: one row per (sequence, token), every head side by side: (B*T, H*D), so any mixing of heads is allowed.
    Attention, both: one row per (sequence, head, query): its distribution over the T key positions, (B*H*T, T).
    """
    tensors = getattr(acts, signal)  # each (B, heads, T, F) with F = D, or T for attention
    if signal == "attn" or measure == "cosine":
        return [t.reshape(-1, t.shape[-1]) for t in tensors]
    return [t.transpose(1, 2).reshape(t.shape[0] * t.shape[2], -1) for t in tensors]


@dataclass
class RegionScore:
    """How well the region ``start .. n_layer-1`` could reuse the Q/K (or K/V) of layer ``start - 1``."""

    start: int
    n_shared: int
    min_similarity: float
    mean_similarity: float
    flop_cut: float | None = None

    @property
    def source(self) -> int:
        return self.start - 1


@dataclass
class Recommendation:
    """The region to share, with the evidence behind it (``reasoning`` is printable)."""

    metric: str
    threshold: float
    start: int
    meets_threshold: bool
    candidates: list[RegionScore]
    reasoning: str = ""

    @property
    def shared_layers(self) -> list[int]:
        return list(range(self.start, self.start + self.chosen.n_shared))

    @property
    def chosen(self) -> RegionScore:
        return next(c for c in self.candidates if c.start == self.start)


@dataclass
class RedundancyReport:
    """Similarity of every pair of layers for Q, K, V and attention maps, each by cosine and by CKA.

    Attributes:
        matrices: ``"<signal>/<measure>"`` for every signal of :data:`SIGNALS` (``"q/cosine"``, ..., ``"attn/cka"``)
            -> a symmetric (n_layer, n_layer) float64 tensor.
        n_tokens: Tokens the statistics were measured on.
        seq_len: Length of the sequences they came from.
    """

    matrices: dict[str, torch.Tensor]
    n_tokens: int
    seq_len: int
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_activations(cls, acts: Activations, device: torch.device | str = "cpu") -> RedundancyReport:
        """Compare every pair of layers; the float64 arithmetic runs on ``device`` (a GPU is much faster)."""
        matrices = {
            f"{signal}/{measure}": similarity_matrix(
                [f.to(device) for f in layer_features(acts, signal, measure)], measure
            ).cpu()
            for signal in SIGNALS
            for measure in MEASURES
        }
        return cls(matrices=matrices, n_tokens=acts.n_tokens, seq_len=acts.q[0].shape[2])

    @property
    def n_layer(self) -> int:
        return next(iter(self.matrices.values())).shape[0]

    def _matrix(self, metric: str) -> torch.Tensor:
        if metric.startswith("kv/") and {f"k/{metric[3:]}", f"v/{metric[3:]}"} <= set(self.matrices):
            return torch.minimum(self.matrices[f"k/{metric[3:]}"], self.matrices[f"v/{metric[3:]}"])
        if metric not in self.matrices:
            raise ValueError(f"Unknown metric {metric!r}; choose one of {METRICS}.")
        return self.matrices[metric]

    def region_scores(self, metric: str | None = None, config: LlamaConfig | None = None) -> list[RegionScore]:
        """Every candidate region ``s .. L-1`` for s = 1 .. L-1 (largest first), scored against its source s-1 by
        ``metric`` (default: what ``config``'s sharing mode reuses)."""
        sim = self._matrix(metric or DEFAULT_METRICS[sharing_mode(config)])
        L = self.n_layer
        scores = []
        for start in range(1, L):
            to_source = sim[start:, start - 1]
            cut = flop_cut(config, L - start, config.block_size) if config is not None else None
            scores.append(RegionScore(start, L - start, float(to_source.min()), float(to_source.mean()), cut))
        return scores

    def recommend(
        self, metric: str | None = None, threshold: float = DEFAULT_THRESHOLD, config: LlamaConfig | None = None
    ) -> Recommendation:
        """The largest deepest region whose every layer stays at least ``threshold`` similar to its source, by
        ``metric`` (default: what ``config``'s sharing mode reuses, :data:`DEFAULT_METRICS`; ``qk`` without one).

        When no region qualifies, the best-scoring one is returned with ``meets_threshold=False``.
        """
        if self.n_layer < 2:
            raise ValueError("A sharing region needs at least two layers (layer 0 always computes).")
        mode = sharing_mode(config)
        metric = DEFAULT_METRICS[mode] if metric is None else metric
        candidates = self.region_scores(metric, config)
        passing = [c for c in candidates if c.min_similarity >= threshold]
        if passing:
            chosen, meets = passing[0], True
        else:
            chosen, meets = max(candidates, key=lambda c: (c.min_similarity, c.n_shared)), False
        rec = Recommendation(metric, threshold, chosen.start, meets, candidates)
        rec.reasoning = _reasoning(rec, self.n_layer, REUSED[mode])
        return rec

    def to_dict(self) -> dict:
        return {
            "n_layer": self.n_layer,
            "n_tokens": self.n_tokens,
            "seq_len": self.seq_len,
            "matrices": {name: m.tolist() for name, m in self.matrices.items()},
            **self.metadata,
        }


def sharing_mode(config: LlamaConfig | None) -> str:
    """``config``'s sharing mode; ``qk``, the paper's, without one."""
    return "qk" if config is None else config.sharing_mode


def _reasoning(rec: Recommendation, n_layer: int, reused: str) -> str:
    lines = [
        f"Region candidates (layers s..{n_layer - 1} reuse the {reused} of layer s-1), scored by {rec.metric}: the "
        "lowest similarity of a region layer to that source.",
        f"{'start s':>8} {'source':>7} {'shared':>7} {'min sim':>8} {'mean sim':>9} {'FLOPs cut':>10}",
    ]
    for c in rec.candidates:
        cut = f"{100 * c.flop_cut:9.1f}%" if c.flop_cut is not None else f"{'-':>10}"
        mark = "  <-" if c.start == rec.start else ""
        lines.append(
            f"{c.start:>8} {c.source:>7} {c.n_shared:>7} {c.min_similarity:>8.3f} {c.mean_similarity:>9.3f} {cut}{mark}"
        )
    chosen = rec.chosen
    region = f"layers {chosen.start}..{n_layer - 1} ({chosen.n_shared} of {n_layer}, source layer {chosen.source})"
    if rec.meets_threshold:
        lines.append(
            f"Recommendation: share {region}: the largest region whose every layer stays >= {rec.threshold} "
            f"similar to its source (lowest {chosen.min_similarity:.3f})."
        )
    else:
        lines.append(
            f"No region keeps every layer >= {rec.threshold} similar to its source; the closest is {region} "
            f"(lowest {chosen.min_similarity:.3f}). Share fewer layers or train with EPAS so the region can adapt."
        )
    if chosen.flop_cut is not None:
        lines.append(f"Estimated training FLOPs cut for this region: {100 * chosen.flop_cut:.1f}% (estimate_flops).")
    deepest = "layer" if chosen.n_shared == 1 else f"{chosen.n_shared} layers"
    lines.append(
        "In training, grow the region to this size progressively: `sharing.target: "
        f"{chosen.n_shared}` with `sharing.order: deep_first`, the default (the deepest {deepest}; "
        "shallow_first would take layers from 1 on)."
    )
    return "\n".join(lines)
