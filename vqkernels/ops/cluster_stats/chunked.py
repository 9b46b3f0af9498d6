"""Chunked ``cluster_stats``: scatter-add (or sort + segment sums) over row tiles, all
codebooks at once on the flat ``C * K`` bins (see :mod:`..._indices`)."""
import torch

from .._indices import binned_indices, flat_bins
from ..histogram.chunked import bin_counts
from .._validation import compute_dtype

_ROW_TILE_ELEMENTS = 1 << 22  # bound the fp32 copy of x made for the scatter


def cluster_stats(x, indices, K, deterministic):
    """``x [C, N, D]``, ``indices [C, N]`` -> ``counts [C, K]``, ``sums [C, K, D]`` (fp32; fp64 for fp64 x)."""
    C, N, D = x.shape
    bins_total = C * K
    dtype = compute_dtype(x.dtype)
    # [C*N]; masked rows in the extra bin C*K, dropped below (C = 1 needs no offsets)
    binned = flat_bins(indices, K) if C > 1 else binned_indices(indices.reshape(-1), K)
    rows = x.reshape(C * N, D)
    lengths = bin_counts(binned, bins_total + 1)
    counts = lengths[:bins_total].to(dtype).view(C, K)
    if deterministic:
        # Stable sort keeps rows of a code in input order; each code is one segment summed
        # in that order, so the result does not depend on thread scheduling.
        order = torch.argsort(binned, stable=True)
        sums = torch.segment_reduce(rows[order].to(dtype), "sum", lengths=lengths, axis=0, unsafe=True)
        return counts, sums[:bins_total].reshape(C, K, D)
    sums = torch.zeros(bins_total + 1, D, dtype=dtype, device=x.device)
    step = max(1, _ROW_TILE_ELEMENTS // max(1, D))
    for n0 in range(0, C * N, step):
        sums.index_add_(0, binned[n0 : n0 + step], rows[n0 : n0 + step].to(dtype))
    return counts, sums[:bins_total].view(C, K, D)
