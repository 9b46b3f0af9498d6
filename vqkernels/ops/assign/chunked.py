"""Chunked ``assign``: pure PyTorch, tiled over N and K, no N x K matrix.

Per tile the score is ``||c||^2 - 2 x.c`` (l2; ``||x||^2`` is constant per row and left
out; both sides are first centred on the codebook mean, which leaves l2 distances
unchanged but removes the cancellation that a large common offset would cause) or ``-x.c`` (cosine on normalised vectors, dot), computed with one ``addmm`` into
a reused buffer; a running (best, argmin) per row is kept across K tiles with a strict
comparison, so ties stay with the lowest index. The winner's distance is then
recomputed exactly by direct difference.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .._validation import compute_dtype

# Score-tile budget in elements. On CPU the tile should sit in the last-level cache so
# the argmin re-reads it from cache (measured in benchmarks/cpu_assign.py); on GPU a
# bigger tile keeps the matmul efficient while memory stays O(tile), not O(N*K).
_TILE_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}
_MIN_TILE_N = 64


def tile_sizes(N: int, K: int, D: int, device_type: str) -> tuple[int, int]:
    """(tile_n, tile_k) with tile_n * tile_k <= the device's score-tile budget."""
    budget = int(os.environ.get("VQKERNELS_CHUNK_ELEMENTS", _TILE_ELEMENTS.get(device_type, 1 << 22)))
    tile_k = min(K, max(16, budget // 1024))
    tile_n = max(1, min(N, budget // tile_k))
    if tile_n < _MIN_TILE_N and N >= _MIN_TILE_N:
        tile_n = _MIN_TILE_N
    return tile_n, tile_k


def exact_distance(xs: torch.Tensor, winners: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance of each row to its chosen code, by direct difference (inputs already cast)."""
    if metric == "l2":
        return (xs - winners).pow(2).sum(1)
    if metric == "cosine":
        return 1 - (xs * winners).sum(1)  # both already normalised
    return -(xs * winners).sum(1)


def assign(x: torch.Tensor, codebook: torch.Tensor, metric: str):
    N, D = x.shape
    K = codebook.shape[0]
    dtype = compute_dtype(x.dtype)
    c = codebook.to(dtype)
    centre = None
    if metric == "cosine":
        c = F.normalize(c, dim=1)
    elif metric == "l2":
        centre = c.mean(0)
        c = c - centre
    tile_n, tile_k = tile_sizes(N, K, D, x.device.type)
    # Pad the codebook to whole tiles (padding scores +inf, never chosen) so every addmm
    # has the same shape: BLAS then computes a given code's score with the same kernel
    # wherever the code sits, and exact duplicates in different tiles tie exactly.
    k_tiles = -(-K // tile_k)
    padded = torch.zeros(k_tiles * tile_k, D, dtype=dtype, device=x.device)
    padded[:K] = c
    bias = torch.full((k_tiles * tile_k,), float("inf"), dtype=dtype, device=x.device)
    if metric == "l2":
        bias[:K], alpha = c.pow(2).sum(1), -2.0
    else:
        bias[:K], alpha = 0.0, -1.0
    c_t = padded.t()
    indices = torch.empty(N, dtype=torch.int64, device=x.device)
    distances = torch.empty(N, dtype=dtype, device=x.device)
    scores = torch.empty(tile_n, tile_k, dtype=dtype, device=x.device)
    for n0 in range(0, N, tile_n):
        n1 = min(N, n0 + tile_n)
        xs = x[n0:n1].to(dtype)
        if metric == "cosine":
            xs = F.normalize(xs, dim=1)
        elif centre is not None:
            xs = xs - centre
        best = best_idx = None
        for k0 in range(0, k_tiles * tile_k, tile_k):
            k1 = k0 + tile_k
            s = scores[: n1 - n0]
            torch.addmm(bias[k0:k1], xs, c_t[:, k0:k1], beta=1, alpha=alpha, out=s)
            vals, idx = s.min(1)  # first minimum within the tile
            if best is None:
                best, best_idx = vals, idx
            else:
                better = vals < best  # strict: an equal score in a later tile keeps the earlier code
                best = torch.where(better, vals, best)
                best_idx = torch.where(better, idx + k0, best_idx)
        indices[n0:n1] = best_idx
        distances[n0:n1] = exact_distance(xs, c[best_idx], metric)
    return indices, distances
