"""Reference ``cluster_stats``: one-hot matrix products in fp64."""
import torch

from .._validation import compute_dtype


def cluster_stats(x, indices, K, deterministic):
    """``x [..., N, D]``, ``indices [..., N]`` -> ``counts [..., K]``, ``sums [..., K, D]``.
    Leading dims (the codebook axis C) broadcast; masked (negative) rows are ignored."""
    onehot = (indices.unsqueeze(-1) == torch.arange(K, device=x.device)).to(torch.float64)  # [..., N, K]
    counts = onehot.sum(-2)
    kept = torch.where((indices >= 0).unsqueeze(-1), x.to(torch.float64), 0.0)  # masked rows may hold NaN
    sums = onehot.transpose(-1, -2) @ kept
    dtype = compute_dtype(x.dtype)
    return counts.to(dtype), sums.to(dtype)
