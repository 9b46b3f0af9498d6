"""CUDA C++ ``ema_update`` (csrc/kernels/stats.cuh), in place on ``cluster_size [C, K]``,
``embed_avg [C, K, D]`` and ``codebook [C, K, D]`` from ``counts [C, K]`` and ``sums
[C, K, D]``: one kernel updates the cluster sizes and reduces each codebook's total n (a
block per codebook), a second lerps embed_avg and writes the codebook (grid.y: the codebook)."""
from ... import _extension


def ema_update(cluster_size, embed_avg, codebook, counts, sums, decay, eps):
    _extension.ops().ema_update_cuda(cluster_size, embed_avg, codebook, counts, sums, float(decay), float(eps))
