"""Chunked ``histogram``: ``bincount`` / ``index_add_`` over the unmasked indices, no one-hot."""
import torch


def histogram(indices, K, weights):
    keep = indices >= 0
    if weights is None:
        # Masked rows are counted in an extra bin K and dropped, which avoids a host sync.
        binned = torch.where(keep, indices, torch.full_like(indices, K)).to(torch.int64)
        return torch.bincount(binned, minlength=K + 1)[:K]
    counts = torch.zeros(K + 1, dtype=torch.float32, device=indices.device)
    binned = torch.where(keep, indices, torch.full_like(indices, K)).to(torch.int64)
    counts.index_add_(0, binned, weights.to(torch.float32))
    return counts[:K].clone()
