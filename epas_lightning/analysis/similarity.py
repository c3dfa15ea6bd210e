"""Similarity of two layers' activations: mean cosine similarity and linear CKA, both computed in float64.

Notation: N examples (rows), p and q features. Inputs are matrices whose rows pair up: row n of ``x`` and row n of
``y`` describe the same token (and head, for cosine) in two layers.

- :func:`mean_cosine` compares vectors one to one (e.g. the D-dim query of one head at one token) and averages:
  1 means every vector points the same way in both layers, 0 means unrelated directions.
- :func:`linear_cka` compares the *geometry* of the two representations (Kornblith et al., 2019, "Similarity of
  Neural Network Representations Revisited"). We use the standard (biased-HSIC) estimator with column-centred
  features::

      CKA(X, Y) = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F * ||Y_c^T Y_c||_F)

  It is invariant to orthogonal transforms and isotropic scaling of either side, is 1 for identical inputs and lies
  in [0, 1]. The biased estimator is slightly positive even for independent data when N is not much larger than the
  feature count; use enough tokens (a few thousand rows) when the absolute value matters.
"""

from __future__ import annotations

import torch


def mean_cosine(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> float:
    """Average over rows of cos(x_n, y_n) for ``x``, ``y`` of shape (N, F); rows that are zero in both count as 1."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"mean_cosine needs two (N, F) matrices of one shape, got {tuple(x.shape)}, {tuple(y.shape)}.")
    x, y = x.double(), y.double()
    nx, ny = x.norm(dim=1), y.norm(dim=1)
    cos = (x * y).sum(dim=1) / (nx * ny).clamp_min(eps)
    cos = torch.where((nx < eps) & (ny < eps), torch.ones_like(cos), cos)
    return float(cos.mean())


def _centered(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x - x.mean(dim=0, keepdim=True)


def _self_norm(xc: torch.Tensor) -> torch.Tensor:
    """||X_c^T X_c||_F of a centred (N, p) matrix, via the smaller of the two Gram matrices."""
    gram = xc.T @ xc if xc.shape[1] <= xc.shape[0] else xc @ xc.T
    return gram.square().sum().sqrt()


def _cross(xc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
    """||Y_c^T X_c||_F^2 = <X_c X_c^T, Y_c Y_c^T>_F, by whichever form is cheaper."""
    n, p, q = xc.shape[0], xc.shape[1], yc.shape[1]
    if p * q <= n * (p + q):  # feature-space form: cheaper when features are few
        return (yc.T @ xc).square().sum()
    return ((xc @ xc.T) * (yc @ yc.T)).sum()  # Gram form: cheaper when tokens are few


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs (N, p) and (N, q) matrices, got {tuple(x.shape)} and {tuple(y.shape)}.")


def _cka(cross: torch.Tensor, norm_x: torch.Tensor, norm_y: torch.Tensor) -> float:
    denominator = norm_x * norm_y
    return 0.0 if denominator <= 0 else float(cross / denominator)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (standard estimator) of ``x`` (N, p) and ``y`` (N, q); float64, 0 when either side is constant."""
    _check_pair(x, y)
    xc, yc = _centered(x), _centered(y)
    return _cka(_cross(xc, yc), _self_norm(xc), _self_norm(yc))


def similarity_matrix(features: list[torch.Tensor], measure: str) -> torch.Tensor:
    """The symmetric (L, L) float64 matrix of ``measure`` ("cosine" or "cka") between every pair of layers.

    The diagonal is 1. For CKA each layer's self-term is computed once and only the cross terms per pair.
    """
    if measure not in ("cosine", "cka"):
        raise ValueError(f"Unknown similarity measure {measure!r}; choose 'cosine' or 'cka'.")
    n = len(features)
    out = torch.eye(n, dtype=torch.float64, device=features[0].device if features else None)
    norms = [_self_norm(_centered(f)) for f in features] if measure == "cka" else []
    for i in range(n):
        xi = _centered(features[i]) if measure == "cka" else features[i]
        for j in range(i):
            if measure == "cosine":
                value = mean_cosine(xi, features[j])
            else:
                _check_pair(xi, features[j])
                value = _cka(_cross(xi, _centered(features[j])), norms[i], norms[j])
            out[i, j] = out[j, i] = value
    return out
