"""Reference statistics: one-hot matrix products in fp64, and the EMA formula written out."""
import torch

from .._validation import compute_dtype


def cluster_stats(x, indices, K, deterministic):
    onehot = (indices.view(-1, 1) == torch.arange(K, device=x.device).view(1, -1)).to(torch.float64)
    counts = onehot.sum(0)
    kept = torch.where((indices >= 0).view(-1, 1), x.to(torch.float64), 0.0)  # masked rows may hold NaN
    sums = onehot.t() @ kept
    dtype = compute_dtype(x.dtype)
    return counts.to(dtype), sums.to(dtype)


def ema_update(cluster_size, embed_avg, codebook, counts, sums, decay, eps):
    K = cluster_size.shape[-1]
    cs = decay * cluster_size.double() + (1 - decay) * counts.double()
    ea = decay * embed_avg.double() + (1 - decay) * sums.double()
    n = cs.sum(-1, keepdim=True)
    smoothed = (cs + eps) / (n + K * eps) * n
    cluster_size.copy_(cs)
    embed_avg.copy_(ea)
    codebook.copy_(ea / smoothed.unsqueeze(-1))
