"""Reference ``ema_update``: the EMA formula written out in fp64."""


def ema_update(cluster_size, embed_avg, codebook, counts, sums, decay, eps):
    """In place on ``cluster_size [..., K]``, ``embed_avg [..., K, D]``, ``codebook [..., K, D]``
    (leading dims, the codebook axis C, broadcast: each codebook has its own ``n``)."""
    K = cluster_size.shape[-1]
    cs = decay * cluster_size.double() + (1 - decay) * counts.double()
    ea = decay * embed_avg.double() + (1 - decay) * sums.double()
    n = cs.sum(-1, keepdim=True)
    smoothed = (cs + eps) / (n + K * eps) * n
    cluster_size.copy_(cs)
    embed_avg.copy_(ea)
    codebook.copy_(ea / smoothed.unsqueeze(-1))
