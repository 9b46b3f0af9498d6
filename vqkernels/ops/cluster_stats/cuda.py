"""CUDA C++ ``cluster_stats`` (csrc/kernels/stats.cuh).

Backend contract: ``x [C, N, D]``, ``indices [C, N]`` (negative: masked) -> ``(counts
float32 [C, K], sums float32 [C, K, D])``, all C codebooks in one launch per kernel.
Atomic fp32 scatter, or with ``deterministic=True`` one stable sort of the keys
``c * (K + 1) + code`` followed by per-(codebook, code) segment sums in a fixed order (one
write per code, no float atomics: bitwise reproducible run to run).
"""
from ... import _extension


def cluster_stats(x, indices, K, deterministic):
    return _extension.ops().cluster_stats_cuda(x, indices, K, bool(deterministic))
