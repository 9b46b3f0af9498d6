"""Chunked ``histogram``: ``bincount`` / ``index_add_`` over the unmasked indices, no one-hot."""
import torch


def binned_indices(indices: torch.Tensor, K: int) -> torch.Tensor:
    """int64 indices with every masked (negative) entry moved to an extra bin ``K``, which the
    caller drops at the end: no boolean indexing, so no host sync."""
    return torch.where(indices >= 0, indices, torch.full_like(indices, K)).to(torch.int64)


def histogram(indices, K, weights):
    binned = binned_indices(indices, K)
    if weights is None:
        return torch.bincount(binned, minlength=K + 1)[:K]
    counts = torch.zeros(K + 1, dtype=torch.float32, device=indices.device)
    counts.index_add_(0, binned, weights.to(torch.float32))
    return counts[:K].clone()
