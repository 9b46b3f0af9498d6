"""C++ CPU ``assign`` (csrc/cpu/assign_cpu.cpp, loaded by :mod:`vqkernels._cpu_extension`).

Backend contract: ``x [C, N, D]``, ``codebook [C, K, D]`` (contiguous, fp32/bf16/fp16) ->
``(indices int64 [C, N], distances float32 [C, N])``, all C codebooks in one call
(parallel over C x row blocks). D <= 16: fused expanded-form score (on mean-shifted inputs
for l2, so offsets do not cancel) + running minimum, rows along the SIMD lanes; D > 16: BLAS
tiles with the argmin fused after each tile. Both re-check every code within the score's
rounding margin of the best by exact distance: the lowest-index exact minimum wins.
"""
from ... import _cpu_extension


def assign(x, codebook, metric):
    return _cpu_extension.ops().assign_cpu(x, codebook, metric)
