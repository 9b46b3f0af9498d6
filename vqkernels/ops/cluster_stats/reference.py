"""Reference ``cluster_stats``: one-hot matrix products in fp64."""
import torch

from .._validation import compute_dtype


def cluster_stats(x, indices, K, deterministic):
    onehot = (indices.view(-1, 1) == torch.arange(K, device=x.device).view(1, -1)).to(torch.float64)
    counts = onehot.sum(0)
    kept = torch.where((indices >= 0).view(-1, 1), x.to(torch.float64), 0.0)  # masked rows may hold NaN
    sums = onehot.t() @ kept
    dtype = compute_dtype(x.dtype)
    return counts.to(dtype), sums.to(dtype)
