"""Chunked ``ema_update``: in-place torch ops on the [C, K] / [C, K, D] buffers."""
import torch


def ema_update(cluster_size, embed_avg, codebook, counts, sums, decay, eps):
    """In place on ``cluster_size [C, K]``, ``embed_avg [C, K, D]``, ``codebook [C, K, D]``."""
    K = cluster_size.shape[-1]
    weight = 1.0 - decay
    # lerp_: one pass over each buffer (mul_ + add_ made two); weight 0 and 1 are exact
    cluster_size.lerp_(counts.to(cluster_size.dtype), weight)
    embed_avg.lerp_(sums.to(embed_avg.dtype), weight)
    n = cluster_size.sum(-1, keepdim=True)
    smoothed = ((cluster_size + eps) / (n + K * eps) * n).unsqueeze(-1)
    if codebook.dtype == embed_avg.dtype:
        torch.div(embed_avg, smoothed, out=codebook)  # no temporary [C, K, D]
    else:
        codebook.copy_(embed_avg / smoothed)
