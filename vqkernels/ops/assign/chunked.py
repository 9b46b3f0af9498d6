"""Chunked ``assign``: pure PyTorch, tiled over N and K, no N x K matrix.

Per tile one ``mm`` into a reused buffer gives the score: for l2, ``[x, 1]`` times
``[-2c, ||c||^2]`` is ``||c||^2 - 2 x.c`` (``||x||^2`` is constant per row and left out;
where a large common offset dominates, both sides are first centred on the codebook
mean, which leaves l2 distances unchanged but removes the cancellation); for cosine (on
normalised vectors) and dot it is ``x.c`` and the largest wins. A running best per row
is kept across K tiles with a strict comparison, so ties stay with the lowest index, and
exact duplicate codes are mapped to their lowest copy (see lowest_duplicate). The
winner's distance is then recomputed exactly by direct difference.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .._validation import compute_dtype

# Score-tile budget in elements. On CPU a sweep of 2**18 .. 2**22 on the 2-core
# development machine (N=16k-64k, K=1k-8k, D=8-64) put 2**20 (4 MiB of fp32 scores, held
# in the 32 MiB L3) first or within noise of first at every shape;
# smaller tiles pay per-tile overhead, larger ones re-read the scores from DRAM. On GPU a
# bigger tile keeps the matmul efficient while memory stays O(tile), not O(N*K).
_TILE_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}
_MIN_TILE_N = 64
_ROW_TILE_ELEMENTS = 1 << 23  # rows of x converted at a time (32 MiB in fp32)


def tile_sizes(N: int, K: int, D: int, device_type: str) -> tuple[int, int]:
    """(tile_n, tile_k): the score tile tile_n * tile_k and the row tile tile_n * D (its
    fp32 copy and the temporaries of the exact recomputation) both stay within budget."""
    budget = int(os.environ.get("VQKERNELS_CHUNK_ELEMENTS", _TILE_ELEMENTS.get(device_type, 1 << 22)))
    tile_k = min(K, max(16, budget // 1024))
    tile_n = max(1, min(N, budget // tile_k, _ROW_TILE_ELEMENTS // D))
    if tile_n < _MIN_TILE_N <= N and _MIN_TILE_N * D <= _ROW_TILE_ELEMENTS:
        tile_n = _MIN_TILE_N
    return tile_n, tile_k


_HASH_WEIGHTS = {}


def lowest_duplicate(c: torch.Tensor):
    """``canon[k]`` = lowest index of a code bitwise equal to code k, or None if all differ.

    BLAS may compute identical columns with different kernels (edge columns, gemv vs
    gemm), so exact duplicates can score a rounding apart; mapping every pick to the
    lowest copy keeps "ties go to the lowest index" exact. Cost: O(K*D) integer hashing
    and one sort of K hashes per call.
    """
    K, D = c.shape
    if K == 1:
        return None
    c = c + 0.0  # -0.0 -> +0.0: equal values must hash equally
    int_dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16}[c.element_size()]
    bits = c.contiguous().view(int_dtype).to(torch.int64)
    key = (D, c.device)
    if key not in _HASH_WEIGHTS:  # fixed odd multipliers: a 64-bit multiplicative hash per row
        g = torch.Generator().manual_seed(D)
        _HASH_WEIGHTS[key] = (torch.randint(-(2**62), 2**62, (D,), generator=g) * 2 + 1).to(c.device)
    h = (bits * _HASH_WEIGHTS[key]).sum(1)  # wraps modulo 2**64: exact and order-independent
    order = torch.argsort(h, stable=True)  # equal hashes keep index order
    h_sorted = h[order]
    same = h_sorted[1:] == h_sorted[:-1]
    if not bool(same.any()):
        return None
    c_sorted = c[order]
    same &= (c_sorted[1:] == c_sorted[:-1]).all(1)  # a hash collision is not a duplicate
    starts = torch.cat([same.new_ones(1), ~same])
    group = torch.cumsum(starts.to(torch.int64), 0) - 1
    canon = torch.empty_like(order)
    canon[order] = order[starts][group]
    return canon


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
    canon = lowest_duplicate(c)
    centre = None
    if metric == "cosine":
        c = F.normalize(c, dim=1)
    elif metric == "l2":
        # Centre only where a common offset dominates the codebook's spread (large-norm
        # inputs, where ||c||^2 - 2x.c cancels). Elsewhere the centre is exactly 0, so
        # data on a grid (small integers, say) keeps its exact scores and exact ties.
        mean = c.mean(0)
        spread = (c - mean).pow(2).sum(1).mean()
        offset_dominates = mean.pow(2).sum() > 4 * spread
        centre = mean * offset_dominates  # no host sync: a 0/1 factor instead of a branch
        c = c - centre
    tile_n, tile_k = tile_sizes(N, K, D, x.device.type)
    k_tiles = -(-K // tile_k)
    if metric == "l2":
        # One GEMM gives the whole score: [x, 1] . [-2c, ||c||^2] = ||c||^2 - 2 x.c, so no
        # separate pass adds the bias (-2c is exact: a power-of-two scaling).
        codes_t = torch.cat([-2.0 * c, c.pow(2).sum(1, keepdim=True)], 1).t().contiguous()
    else:
        codes_t = c.t().contiguous()  # score = x.c, the nearest code has the largest
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
        lhs = torch.cat([xs, xs.new_ones(n1 - n0, 1)], 1) if metric == "l2" else xs
        pick = torch.Tensor.argmin if metric == "l2" else torch.Tensor.argmax  # first hit: lowest index
        best = best_idx = None
        for k0 in range(0, K, tile_k):
            k1 = min(K, k0 + tile_k)
            s = scores[: n1 - n0, : k1 - k0]
            torch.mm(lhs, codes_t[:, k0:k1], out=s)
            idx = pick(s, 1)
            if k_tiles == 1:
                best_idx = idx
                break
            vals = s.gather(1, idx.unsqueeze(1)).squeeze(1)
            if best is None:
                best, best_idx = vals, idx
            else:
                # strict: an equal score in a later tile keeps the earlier code
                better = vals < best if metric == "l2" else vals > best
                best = torch.where(better, vals, best)
                best_idx = torch.where(better, idx + k0, best_idx)
        if canon is not None:
            best_idx = canon[best_idx]
        indices[n0:n1] = best_idx
        distances[n0:n1] = exact_distance(xs, c[best_idx], metric)
    return indices, distances
