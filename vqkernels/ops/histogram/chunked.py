"""Chunked ``histogram``: one ``bincount`` / ``index_add_`` over the ``C * K`` bins of all
codebooks (see :mod:`..._indices`), no one-hot and no loop over C."""
import torch

from .._indices import flat_bins


def histogram(indices, K, weights):
    """``indices [C, N]``, ``weights [C, N]`` or None -> ``counts [C, K]`` (int64; float32 with weights)."""
    C = indices.shape[0]
    bins = flat_bins(indices, K)  # masked entries land in the extra bin C*K, dropped below
    if weights is None:
        return torch.bincount(bins, minlength=C * K + 1)[: C * K].view(C, K)
    counts = torch.zeros(C * K + 1, dtype=torch.float32, device=indices.device)
    counts.index_add_(0, bins, weights.reshape(-1).to(torch.float32))
    return counts[: C * K].view(C, K).clone()
