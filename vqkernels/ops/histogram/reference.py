"""Reference ``histogram``: compare every index with every code."""
import torch


def histogram(indices, K, weights):
    codes = torch.arange(K, device=indices.device)
    onehot = indices.view(-1, 1) == codes.view(1, -1)  # masked (negative) rows match nothing
    if weights is None:
        return onehot.sum(0, dtype=torch.int64)
    return (onehot.to(torch.float64) * weights.to(torch.float64).view(-1, 1)).sum(0).to(torch.float32)
