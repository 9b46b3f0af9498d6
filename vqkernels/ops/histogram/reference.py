"""Reference ``histogram``: compare every index with every code."""
import torch


def histogram(indices, K, weights):
    """``indices [..., N]`` (negative = masked), ``weights [..., N]`` or None -> ``counts [..., K]``
    (int64; float32 with weights). Leading dims (the codebook axis C) broadcast."""
    codes = torch.arange(K, device=indices.device)
    onehot = indices.unsqueeze(-1) == codes  # [..., N, K]; masked (negative) rows match nothing
    if weights is None:
        return onehot.sum(-2, dtype=torch.int64)
    return (onehot.to(torch.float64) * weights.to(torch.float64).unsqueeze(-1)).sum(-2).to(torch.float32)
