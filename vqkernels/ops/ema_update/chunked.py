"""Chunked ``ema_update``: in-place torch ops on the [C, K] / [C, K, D] buffers."""


def ema_update(cluster_size, embed_avg, codebook, counts, sums, decay, eps):
    """In place on ``cluster_size [C, K]``, ``embed_avg [C, K, D]``, ``codebook [C, K, D]``."""
    K = cluster_size.shape[-1]
    weight = 1.0 - decay
    cluster_size.mul_(decay).add_(counts.to(cluster_size.dtype), alpha=weight)
    embed_avg.mul_(decay).add_(sums.to(embed_avg.dtype), alpha=weight)
    n = cluster_size.sum(-1, keepdim=True)
    smoothed = (cluster_size + eps) / (n + K * eps) * n
    codebook.copy_(embed_avg / smoothed.unsqueeze(-1))
