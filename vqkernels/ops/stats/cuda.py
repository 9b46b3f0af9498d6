"""CUDA C++ ``cluster_stats`` and ``ema_update`` (csrc/kernels/stats.cuh).

``cluster_stats``: atomic fp32 scatter, or with ``deterministic=True`` a stable sort of the
indices followed by per-code segment sums in a fixed order (one write per code, no float
atomics: bitwise reproducible run to run). ``ema_update``: one kernel updates the cluster
sizes and reduces each head's total n, a second lerps embed_avg and writes the codebook.
"""
from ... import _extension


def cluster_stats(x, indices, K, deterministic):
    return _extension.ops().cluster_stats_cuda(x, indices, K, bool(deterministic))


def ema_update(cluster_size, embed_avg, codebook, counts, sums, decay, eps):
    _extension.ops().ema_update_cuda(cluster_size, embed_avg, codebook, counts, sums, float(decay), float(eps))
