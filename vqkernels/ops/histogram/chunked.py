"""Chunked ``histogram``: one ``bincount`` / ``index_add_`` over the ``C * K`` bins of all
codebooks (see :mod:`..._indices`), no one-hot and no loop over C."""
import torch

from .._indices import binned_indices, flat_bins


def bin_counts(bins, size):
    """int64 ``[size]`` counts of ``bins`` (values in ``[0, size)``). ``torch.bincount`` on CUDA
    reads the largest value back to the host (a sync per call); a scatter of ones does not."""
    counts = torch.zeros(size, dtype=torch.int64, device=bins.device)
    return counts.index_add_(0, bins, torch.ones((), dtype=torch.int64, device=bins.device).expand(bins.shape[0]))


def histogram(indices, K, weights):
    """``indices [C, N]``, ``weights [C, N]`` or None -> ``counts [C, K]`` (int64; float32 with weights)."""
    C = indices.shape[0]
    # masked entries land in the extra bin C*K, dropped below (C = 1 needs no offsets)
    bins = flat_bins(indices, K) if C > 1 else binned_indices(indices.reshape(-1), K)
    if weights is None:
        return bin_counts(bins, C * K + 1)[: C * K].view(C, K)
    counts = torch.zeros(C * K + 1, dtype=torch.float32, device=indices.device)
    counts.index_add_(0, bins, weights.reshape(-1).to(torch.float32))
    return counts[: C * K].view(C, K).clone()
