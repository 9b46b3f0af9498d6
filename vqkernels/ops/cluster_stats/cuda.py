"""CUDA C++ ``cluster_stats`` (csrc/kernels/stats.cuh): atomic fp32 scatter, or with
``deterministic=True`` a stable sort of the indices followed by per-code segment sums in a
fixed order (one write per code, no float atomics: bitwise reproducible run to run).
"""
from ... import _extension


def cluster_stats(x, indices, K, deterministic):
    return _extension.ops().cluster_stats_cuda(x, indices, K, bool(deterministic))
