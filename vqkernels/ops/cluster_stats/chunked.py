"""Chunked ``cluster_stats``: scatter-add (or sort + segment sums) over row tiles."""
import torch

from .._validation import compute_dtype
from ..histogram.chunked import binned_indices

_ROW_TILE_ELEMENTS = 1 << 22  # bound the fp32 copy of x made for the scatter


def cluster_stats(x, indices, K, deterministic):
    N, D = x.shape
    dtype = compute_dtype(x.dtype)
    binned = binned_indices(indices, K)
    lengths = torch.bincount(binned, minlength=K + 1)
    counts = lengths.to(dtype)
    if deterministic:
        # Stable sort keeps rows of a code in input order; each code is one segment summed
        # in that order, so the result does not depend on thread scheduling.
        order = torch.argsort(binned, stable=True)
        sums = torch.segment_reduce(x[order].to(dtype), "sum", lengths=lengths, axis=0, unsafe=True)
        return counts[:K], sums[:K].contiguous()
    sums = torch.zeros(K + 1, D, dtype=dtype, device=x.device)
    rows = max(1, _ROW_TILE_ELEMENTS // max(1, D))
    for n0 in range(0, N, rows):
        sums.index_add_(0, binned[n0 : n0 + rows], x[n0 : n0 + rows].to(dtype))
    return counts[:K], sums[:K]
