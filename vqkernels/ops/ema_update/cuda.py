"""CUDA C++ ``ema_update`` (csrc/kernels/stats.cuh): one kernel updates the cluster sizes and
reduces each codebook's total n, a second lerps embed_avg and writes the codebook."""
from ... import _extension


def ema_update(cluster_size, embed_avg, codebook, counts, sums, decay, eps):
    _extension.ops().ema_update_cuda(cluster_size, embed_avg, codebook, counts, sums, float(decay), float(eps))
