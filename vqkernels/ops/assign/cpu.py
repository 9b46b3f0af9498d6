"""C++ CPU ``assign`` (csrc/cpu/assign_cpu.cpp, loaded by :mod:`vqkernels._cpu_extension`).

Backend contract: ``x [C, N, D]``, ``codebook [C, K, D]`` (contiguous, fp32/bf16/fp16) ->
``(indices int64 [C, N], distances float32 [C, N])``, all C codebooks in one call
(parallel over C x row blocks). D <= 16: fused direct-difference distance + running argmin
(exact ties stay ties, no cancellation for offset data); D > 16: BLAS tiles with the argmin
fused after each tile and the winner's distance recomputed exactly.
"""
from ... import _cpu_extension


def assign(x, codebook, metric):
    return _cpu_extension.ops().assign_cpu(x, codebook, metric)
