"""The distance metrics of vqkernels and their exact formulas, defined once.

Every metric is a distance (smaller is nearer), so one argmin rule serves all of them:

* ``l2``:     ``||x - c||^2``, by direct difference (never the expanded form, which cancels
  for large-norm inputs)
* ``cosine``: ``1 - <x/|x|, c/|c|>`` (norms clamped at 1e-12, as ``F.normalize``)
* ``dot``:    ``-<x, c>``

Reference backends, the chunked backend's exact recomputation of the winner, k-means, the
diagnostics and the benchmarks' agreement checks all use these functions. Fast kernels use
cheaper expanded-form *scores* that rank codes the same way, documented beside each kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ("l2", "cosine", "dot")
# Metrics whose centroid is a (normalised) mean: what k-means and the EMA update can learn.
CENTROID_METRICS = ("l2", "cosine")


def normalized(v: torch.Tensor, metric: str) -> torch.Tensor:
    """``v`` on the unit sphere for cosine (rows of the last dimension), unchanged otherwise."""
    return F.normalize(v, dim=-1) if metric == "cosine" else v


def distance_matrix(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact distances ``[..., N, K]`` between rows ``x [..., N, D]`` and codes ``[..., K, D]``.

    Materialises ``[..., N, K, D]``: for small inputs only (references, tests, diagnostics).
    """
    if metric == "l2":
        return (x.unsqueeze(-2) - codebook.unsqueeze(-3)).pow(2).sum(-1)
    xs, cs = normalized(x, metric), normalized(codebook, metric)
    dots = (xs.unsqueeze(-2) * cs.unsqueeze(-3)).sum(-1)
    return 1 - dots if metric == "cosine" else -dots


def paired_distance(x: torch.Tensor, codes: torch.Tensor, metric: str, *, normalized_inputs: bool = False) -> torch.Tensor:
    """Exact distance of each row ``x [..., D]`` to its own code ``codes [..., D]`` -> ``[...]``.

    ``normalized_inputs=True`` says both are already on the unit sphere (cosine only).
    """
    if metric == "l2":
        return (x - codes).pow(2).sum(-1)
    if metric == "cosine":
        if not normalized_inputs:
            x, codes = normalized(x, metric), normalized(codes, metric)
        return 1 - (x * codes).sum(-1)
    return -(x * codes).sum(-1)


__all__ = ["METRICS", "CENTROID_METRICS", "normalized", "distance_matrix", "paired_distance"]
