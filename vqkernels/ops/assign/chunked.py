"""Chunked ``assign``: pure PyTorch, tiled over N and K, all C codebooks in each batched
``bmm`` (no loop over C), no N x K matrix.

Pass 1 scores one ``[C, tile_n, tile_k]`` tile per ``bmm`` into a reused buffer, every
metric as "smaller is nearer": for l2, ``[x, 1]`` times ``[-2c, ||c||^2]`` is
``||c||^2 - 2 x.c`` (``||x||^2`` is constant per row and left out; where a large common
offset dominates a codebook, both sides are first centred on its mean, which leaves l2
distances unchanged but removes the cancellation); for cosine (on normalised vectors) and
dot it is ``-x.c``. A running minimum and runner-up per row are kept across K tiles.

These scores are rounded (and centring rounds them differently from the direct
difference), so two codes at exactly the same distance may score a few ulps apart. Pass 1
therefore also marks a row *ambiguous* when its runner-up scores within the rounding bound
of its best (:func:`score_error_bound`). Pass 2 re-decides the ambiguous rows only: it
rescores them, takes every code within the bound of the best as a candidate, and picks
the candidate with the smallest exact distance (direct difference, the reference's
formula) and, among equal distances, the lowest index -- the reference's rule. (A few
ambiguous rows are simply compared with every code of their codebook.) One host sync
decides whether pass 2 runs; the candidate search syncs once per K tile when it does.

``distances`` is the winner's exact distance (:func:`vqkernels.ops._metrics.paired_distance`).
"""
from __future__ import annotations

import os

import torch

from .. import _metrics
from .._validation import compute_dtype

# Score-tile budget in elements. On CPU a sweep of 2**18 .. 2**22 on the 2-core
# development machine (N=16k-64k, K=1k-8k, D=8-64) put 2**20 (4 MiB of fp32 scores, held
# in the 32 MiB L3) first or within noise of first at every shape;
# smaller tiles pay per-tile overhead, larger ones re-read the scores from DRAM. On GPU a
# bigger tile keeps the matmul efficient while memory stays O(tile), not O(N*K).
_TILE_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}
_MIN_TILE_N = 64
_ROW_TILE_ELEMENTS = 1 << 23  # rows of x converted at a time (32 MiB in fp32)


def _budget(device_type: str) -> int:
    return int(os.environ.get("VQKERNELS_CHUNK_ELEMENTS", _TILE_ELEMENTS.get(device_type, 1 << 22)))


def tile_sizes(N: int, K: int, D: int, device_type: str, C: int = 1) -> tuple[int, int]:
    """(tile_n, tile_k) for C codebooks: the score tile ``C * tile_n * tile_k`` and the row
    tile ``C * tile_n * D`` (its fp32 copy and the temporaries of the exact recomputation)
    both stay within budget. A tile holds at least 1024 rows over all codebooks (fewer
    only if N is smaller), so the batched matmul stays efficient."""
    budget = _budget(device_type)
    tile_k = min(K, max(16, budget // max(1024, C)))
    tile_n = max(1, min(N, budget // (C * tile_k), _ROW_TILE_ELEMENTS // (C * D)))
    min_rows = -(-_MIN_TILE_N // C)
    if tile_n < min_rows <= N and C * min_rows * D <= _ROW_TILE_ELEMENTS:
        tile_n = min_rows
    return tile_n, tile_k


def score_error_bound(dtype: torch.dtype, D: int) -> float:
    """Factor ``f`` such that ``f * S``, ``S = (|x'| + max|c'|)^2``, bounds per row how far the
    rounded score difference of two codes can be from the exact distance difference, so a
    code outside ``best + f * S`` cannot be the reference's pick.

    ``|x'|``, ``|c'|`` are the norms of the vectors that enter the matmul (centred for l2,
    unit for cosine); every score and every distance is at most ``S`` in magnitude (l2
    distances do not change under the centring). Worst case, any summation order: a score
    (a ``D + 1``-term dot product plus the precomputed ``||c'||^2``) is off by at most
    ``2 (D + 1) u S``, twice that for a difference; the reference's direct-difference
    distances by ``D u S`` each; centring adds a few ``u S``. fp32 matmuls that round their
    inputs (tf32 at "high", bf16 at "medium" float32_matmul_precision) add that rounding.
    """
    u = torch.finfo(dtype).eps / 2
    input_rounding = 0.0
    if dtype == torch.float32:
        input_rounding = {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}[torch.get_float32_matmul_precision()]
    return (6 * D + 16) * u + 8 * input_rounding


def _matmul_rows(rows: torch.Tensor, metric: str, centre) -> torch.Tensor:
    """The left matmul operand for rows ``[C, n, D]`` already in the accumulation dtype (and
    normalised for cosine): ``[x - centre, 1]`` for l2, ``x`` otherwise."""
    if metric != "l2":
        return rows
    return torch.cat([rows - centre, rows.new_ones(*rows.shape[:-1], 1)], -1)


def assign(x: torch.Tensor, codebook: torch.Tensor, metric: str):
    """``x [C, N, D]``, ``codebook [C, K, D]`` -> ``indices int64 [C, N]``, ``distances [C, N]``."""
    C, N, D = x.shape
    K = codebook.shape[1]
    dtype = compute_dtype(x.dtype)
    codes = _metrics.normalized(codebook.to(dtype), metric)  # [C, K, D]: what exact distances use
    centre = None
    if metric == "l2":
        # Centre only where a common offset dominates the codebook's spread (large-norm
        # inputs, where ||c||^2 - 2x.c cancels). Elsewhere the centre is exactly 0, so
        # data on a grid (small integers, say) keeps its exact scores.
        mean = codes.mean(1, keepdim=True)  # [C, 1, D]
        spread = (codes - mean).pow(2).sum(-1).mean(1, keepdim=True)  # [C, 1]
        offset_dominates = mean.pow(2).sum(-1) > 4 * spread
        centre = mean * offset_dominates.unsqueeze(-1)  # no host sync: a 0/1 factor, not a branch
        shifted = codes - centre
        # One batched GEMM gives the whole score: [x, 1] . [-2c, ||c||^2] = ||c||^2 - 2 x.c
        # (-2c is exact: a power-of-two scaling).
        codes_t = torch.cat([-2.0 * shifted, shifted.pow(2).sum(-1, keepdim=True)], -1).transpose(1, 2).contiguous()
    else:
        shifted = codes
        codes_t = (-codes).transpose(1, 2).contiguous()  # score -x.c: smaller is nearer, as for l2
    code_reach = shifted.norm(dim=-1).amax(1, keepdim=True)  # [C, 1] max |c'|
    error_factor = score_error_bound(dtype, D)

    tile_n, tile_k = tile_sizes(N, K, D, x.device.type, C)
    indices = torch.empty(C, N, dtype=torch.int64, device=x.device)
    distances = torch.empty(C, N, dtype=dtype, device=x.device)
    best_scores = torch.empty(C, N, dtype=dtype, device=x.device)
    bounds = torch.empty(C, N, dtype=dtype, device=x.device)
    ambiguous = torch.empty(C, N, dtype=torch.bool, device=x.device)
    scores = torch.empty(C, tile_n, tile_k, dtype=dtype, device=x.device)
    for n0 in range(0, N, tile_n):
        n1 = min(N, n0 + tile_n)
        rows = _metrics.normalized(x[:, n0:n1].to(dtype), metric)
        lhs = _matmul_rows(rows, metric, centre)
        reach = lhs[..., :D].norm(dim=-1) + code_reach
        bound = error_factor * reach * reach  # [C, n]
        best = best_idx = second = None
        for k0 in range(0, K, tile_k):
            k1 = min(K, k0 + tile_k)
            s = scores[:, : n1 - n0, : k1 - k0]
            torch.bmm(lhs, codes_t[:, :, k0:k1], out=s)
            vals, idx = s.min(-1)  # the first minimum: the lowest index among equal scores
            s.scatter_(-1, idx.unsqueeze(-1), float("inf"))
            runner_up = s.amin(-1)  # the tile's second-best score (cheaper than topk(2) on CPU)
            if best is None:
                best, best_idx, second = vals, idx, runner_up
                continue
            # second best over all tiles seen: of {best <= second} and {vals <= runner_up}
            second = torch.minimum(torch.maximum(best, vals), torch.minimum(second, runner_up))
            better = vals < best  # strict, though equal scores make the row ambiguous: pass 2 decides it
            best_idx = torch.where(better, idx + k0, best_idx)
            best = torch.where(better, vals, best)
        amb = second - best <= bound  # another code within the rounding bound of the best
        indices[:, n0:n1] = best_idx
        best_scores[:, n0:n1] = best
        bounds[:, n0:n1] = bound
        ambiguous[:, n0:n1] = amb & torch.isfinite(bound)  # non-finite rows are masked by the op
        winners = codes.gather(1, best_idx.unsqueeze(-1).expand(-1, -1, D))
        distances[:, n0:n1] = _metrics.paired_distance(rows, winners, metric, normalized_inputs=True)
    amb_c, amb_n = ambiguous.nonzero(as_tuple=True)  # the one host sync of a call without near-ties
    if amb_c.numel() == 0:
        return indices, distances
    if amb_c.numel() * K * D <= _budget(x.device.type):
        # Few rows: decide them against every code of their codebook by the exact distance.
        rows = _metrics.normalized(x[amb_c, amb_n].to(dtype), metric).unsqueeze(1)  # [M, 1, D]
        exact = _metrics.paired_distance(rows, codes[amb_c], metric, normalized_inputs=True)  # [M, K]
        best_d, best_i = exact.min(-1)  # the first minimum: the lowest index, as the reference
        indices[amb_c, amb_n] = best_i
        distances[amb_c, amb_n] = best_d
    else:
        _redecide(x, codes, codes_t, centre, metric, best_scores + bounds, ambiguous, indices, distances, tile_k)
    return indices, distances


def _redecide(x, codes, codes_t, centre, metric, thresholds, ambiguous, indices, distances, tile_k):
    """Pass 2: for each ambiguous row, the candidate (score <= threshold) with the smallest
    exact distance, lowest index among equals; rewrites ``indices`` and ``distances`` there.

    The ambiguous rows of each codebook are packed to the front of a ``[C, P]`` table
    (P = most ambiguous rows of any codebook), so every rescoring is one batched ``bmm``.
    """
    C, N, D = x.shape
    K = codes.shape[1]
    dtype = codes.dtype
    counts = ambiguous.sum(1)  # [C]
    P = int(counts.max())
    order = torch.argsort((~ambiguous).to(torch.uint8), dim=1, stable=True)[:, :P]  # ambiguous rows first
    valid = torch.arange(P, device=x.device).unsqueeze(0) < counts.unsqueeze(1)  # [C, P]
    budget = _budget(x.device.type)
    step = max(1, budget // (C * tile_k))
    pair_step = max(1, budget // max(1, D))  # bound the [pairs, D] gathers of one exact pass
    for p0 in range(0, P, step):
        rows_n = order[:, p0 : p0 + step]  # [C, p]
        ok = valid[:, p0 : p0 + step]
        p = rows_n.shape[1]
        rows = _metrics.normalized(x.gather(1, rows_n.unsqueeze(-1).expand(-1, -1, D)).to(dtype), metric)
        lhs = _matmul_rows(rows, metric, centre)
        limit = torch.where(ok, thresholds.gather(1, rows_n), float("-inf")).unsqueeze(-1)  # padding: no candidates
        run_d = torch.full((C * p,), float("inf"), dtype=dtype, device=x.device)
        run_i = torch.zeros(C * p, dtype=torch.int64, device=x.device)
        flat_rows = rows.reshape(C * p, D)
        for k0 in range(0, K, tile_k):
            k1 = min(K, k0 + tile_k)
            s = torch.bmm(lhs, codes_t[:, :, k0:k1])
            cand_c, cand_p, cand_j = (s <= limit).nonzero(as_tuple=True)
            if cand_c.numel() == 0:
                continue
            slot = cand_c * p + cand_p
            code = cand_j + k0
            d = torch.cat([
                _metrics.paired_distance(
                    flat_rows[slot[i : i + pair_step]], codes[cand_c[i : i + pair_step], code[i : i + pair_step]],
                    metric, normalized_inputs=True,
                )
                for i in range(0, slot.numel(), pair_step)
            ])
            tile_d = torch.full_like(run_d, float("inf")).scatter_reduce(0, slot, d, "amin")
            # lowest code among the candidates at the row's smallest exact distance
            at_min = torch.where(d == tile_d[slot], code, K)
            tile_i = torch.full_like(run_i, K).scatter_reduce(0, slot, at_min, "amin")
            better = tile_d < run_d  # strict: an equal exact distance in a later tile keeps the lower code
            run_i = torch.where(better, tile_i, run_i)
            run_d = torch.where(better, tile_d, run_d)
        decided = ok & torch.isfinite(run_d).view(C, p)  # a row always has a candidate; stay safe if not
        indices.scatter_(1, rows_n, torch.where(decided, run_i.view(C, p), indices.gather(1, rows_n)))
        distances.scatter_(1, rows_n, torch.where(decided, run_d.view(C, p), distances.gather(1, rows_n)))
